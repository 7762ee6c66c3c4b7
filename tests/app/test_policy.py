"""What a tenant may point a job at (issue 9, items 1-3), with the deployment's *default* settings: server
paths off, remote code off. The worker applies the same rules again (tests/worker/test_policy.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.db import auth as key_rows
from app.db import events as job_log
from app.db import jobs as job_rows
from app.main import create_app
from tests.app.conftest import SPEC

PAIR = b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'


@pytest.fixture
def locked(settings, queue):
    """The app with the defaults a production deployment gets (conftest's settings turn server paths on)."""
    defaults = settings.model_copy(update={"allow_server_paths": False, "allow_remote_code": False})
    assert type(settings)().allow_server_paths is False and type(settings)().allow_remote_code is False
    application = create_app(defaults, queue=queue)
    yield application
    application.state.db.dispose()


def _client(app, db, *, admin: bool = False) -> TestClient:
    key = key_rows.create_api_key(db, "acme", "admin" if admin else "tenant", is_admin=admin)
    return TestClient(app, headers={"Authorization": f"Bearer {key}"})


def _spec_with(body: dict, dataset_id: str) -> dict:
    """SPEC on the uploaded dataset with ``body`` merged in; a ``"DATASET"`` id placeholder becomes the upload's."""
    spec = {**SPEC, "dataset": {"id": dataset_id}, **body}
    if spec["dataset"].get("id") == "DATASET":
        spec["dataset"] = {**spec["dataset"], "id": dataset_id}
    return spec


@pytest.fixture
def dataset_id(locked, db) -> str:
    response = _client(locked, db).post("/v1/datasets", files={"file": ("p.jsonl", PAIR)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.parametrize("param, body", [
    ("dataset.path", {"dataset": {"path": "secret/pairs.jsonl"}}),  # relative: the worker would open it from its cwd
    ("dataset.path", {"dataset": {"path": "pairs.jsonl"}}),
    ("dataset.path", {"dataset": {"path": "/etc/passwd"}}),
    ("dataset.validation_path", {"dataset": {"id": "DATASET", "validation_path": "val/pairs.jsonl"}}),
    ("student.model", {"student": {"model": "./models/student"}}),
    ("teacher.model", {"teacher": {"model": "../outside"}}),
    ("teacher.model", {"teacher": {"model": "/srv/models/llama"}}),
    ("teacher.model", {"teacher": {"model": "~/models/llama"}}),
    ("contrastive.positive.model", {"contrastive": {"positive": {"model": "a/b/c"}, "negative": {"model": "gemma-3-270m"}}}),
])
def test_a_tenant_names_no_server_path_relative_or_absolute(locked, db, dataset_id, param, body):
    refused = _client(locked, db).post("/v1/jobs", json=_spec_with(body, dataset_id))
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["param"] == param
    assert "POST /v1/datasets" in refused.json()["error"]["message"]  # names the fix
    assert job_rows.list_jobs(db, "acme", limit=10)[0] == []  # nothing stored


def test_a_hub_id_that_is_a_folder_here_is_a_server_path(locked, db, dataset_id, tmp_path, monkeypatch):
    """'org/name' is a hub id only where no such folder exists: the loader would read the folder instead."""
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    refused = _client(locked, db).post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset_id},
                                                          "teacher": {"model": "org/name"}})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "teacher.model"


def test_tenants_still_use_uploads_catalog_names_and_hub_ids(locked, db, dataset_id):
    tenant = _client(locked, db)
    assert tenant.post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset_id}}).status_code == 201
    hub = {**SPEC, "dataset": {"id": dataset_id}, "teacher": {"model": "google/gemma-3-270m"}}
    assert tenant.post("/v1/jobs", json=hub).status_code == 201


def test_an_admin_may_name_server_paths(locked, db, dataset_id):
    admin = _client(locked, db, admin=True)
    response = admin.post("/v1/jobs", json={**SPEC, "dataset": {"path": "secret/pairs.jsonl"}})
    assert response.status_code == 201, response.text
    assert job_rows.get_job(db, response.json()["id"]).submitted_by_admin is True


@pytest.mark.parametrize("admin", [False, True])
def test_remote_code_is_refused_by_default_even_for_admins(locked, db, dataset_id, admin):
    spec = {**SPEC, "dataset": {"id": dataset_id}, "teacher": {"model": "org/model", "trust_remote_code": True}}
    refused = _client(locked, db, admin=admin).post("/v1/jobs", json=spec)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "remote_code_forbidden" and error["param"] == "teacher.trust_remote_code"
    assert "CTPD_ALLOW_REMOTE_CODE" in error["message"]


def test_where_remote_code_is_allowed_only_an_admin_may_enable_it(settings, queue, db):
    app = create_app(settings.model_copy(update={"allow_remote_code": True}), queue=queue)
    try:
        spec = {**SPEC, "student": {"model": "org/student", "trust_remote_code": True}}
        tenant = _client(app, db).post("/v1/jobs", json=spec)
        assert tenant.status_code == 403 and "only an admin key" in tenant.json()["error"]["message"]
        assert tenant.json()["error"]["param"] == "student.trust_remote_code"
        assert _client(app, db, admin=True).post("/v1/jobs", json=spec).status_code == 201
    finally:
        app.state.db.dispose()


def test_another_tenants_job_is_not_a_model(locked, db, dataset_id):
    job, _ = job_rows.create_job(db, tenant="globex", spec={}, name=None, metadata={}, idempotency_key=None,
                             request_hash="h", max_attempts=3)
    refused = _client(locked, db).post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset_id},
                                                          "teacher": {"model": f"job:{job.id}"}})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "teacher.model"


@pytest.mark.parametrize("param, body", [
    ("dataset.path", {"dataset": {"path": "job:/etc/passwd"}}),  # job: is a model reference, never a dataset
    ("dataset.validation_path", {"dataset": {"id": "DATASET", "validation_path": "job:../../x"}}),
    ("teacher.model", {"teacher": {"model": "~nosuchuser/model"}}),  # expanduser raises: a 422, not a 500
    ("teacher.model", {"teacher": {"model": "a" * 300}}),  # longer than a file name may be: a 422, not a 500
])
def test_crafted_references_are_refused_not_crashed_on(locked, db, dataset_id, param, body):
    refused = _client(locked, db).post("/v1/jobs", json=_spec_with(body, dataset_id))
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["param"] == param


def test_an_unfinished_job_of_ones_own_is_not_a_model(locked, db, dataset_id):
    tenant = _client(locked, db)
    queued = tenant.post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset_id}}).json()["id"]
    refused = tenant.post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset_id}, "teacher": {"model": f"job:{queued}"}})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "teacher.model"


def test_a_database_blink_after_the_commit_still_answers_201(locked, db, dataset_id, monkeypatch):
    """Once the job is committed the answer is 201: a 503 then would make a client without an Idempotency-Key
    submit the job twice."""
    from sqlalchemy.exc import OperationalError

    def down(*args, **kwargs):
        raise OperationalError("SELECT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(job_log, "add_event", down)
    monkeypatch.setattr(job_log, "job_transitions", down)
    response = _client(locked, db).post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset_id}})
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "queued"
    assert job_rows.get_job(db, response.json()["id"]) is not None


def _tracking_caller():
    from pathlib import Path

    from app.policy import Caller

    return Caller(tenant="acme", is_admin=False, allow_server_paths=False, allow_remote_code=False,
                  artifact_root=Path("/srv/ctpd/artifacts"))


def _tracked(uri: str):
    from ctpd_core.spec import JobSpec

    return JobSpec.model_validate({**SPEC, "dataset": {"id": "ds_x"}, "tracking": {"mlflow": {"uri": uri}}})


def test_the_policys_switch_lets_a_test_call_a_loopback_tracking_server_and_nothing_else(monkeypatch):
    import ipaddress

    import app.policy
    from app.policy import tracking_address_refused, tracking_problems

    loopback = ipaddress.ip_address("127.0.0.1")
    assert tracking_address_refused(loopback) == "loopback"
    monkeypatch.setattr(app.policy, "TRACKING_ALLOWED_NETWORKS", (ipaddress.ip_network("127.0.0.0/8"),))
    assert tracking_address_refused(loopback) is None
    assert tracking_address_refused(ipaddress.ip_address("10.0.0.5")) == "private"
    assert tracking_problems(_tracked("http://127.0.0.1:5000"), _tracking_caller()) == []
    assert tracking_problems(_tracked("http://localhost:5000"), _tracking_caller()) != []  # a name: still refused


def test_a_tracking_host_that_resolves_to_nothing_is_refused_only_where_required(monkeypatch):
    """The API lets it pass (its network is not the workers'); the worker, which would connect, refuses it."""
    import socket

    from app.policy import tracking_problems

    def nothing(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", nothing)
    spec = _tracked("https://mlflow.nowhere.test")
    assert tracking_problems(spec, _tracking_caller()) == []
    problems = tracking_problems(spec, _tracking_caller(), where="the worker", require_resolved=True)
    assert len(problems) == 1 and "resolves to no address on the worker" in problems[0][1], problems
