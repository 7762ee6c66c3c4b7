"""/v1/jobs against the real app on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from sqlalchemy import func, select

from app.db import auth as key_rows
from app.db import events as job_log
from app.db import jobs as job_rows
from app.db.engine import Database
from app.db.models import Job, JobEvent
from tests.app.conftest import SPEC


def _count_jobs(db: Database) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(Job))


def _submit(client, spec=None, **kwargs):
    response = client.post("/v1/jobs", json=spec or SPEC, **kwargs)
    assert response.status_code == 201, response.text
    return response.json()


def _run_to_success(db: Database, job_id: str, export_dir: Path) -> None:
    """What a worker would do: claim, report, export, finish (through the repository the worker uses)."""
    job_rows.claim_job(db, job_id, "worker-1", lease_seconds=60)
    job_log.add_metrics(db, job_id, "distill", 1, {"loss": 0.70})
    job_log.add_metrics(db, job_id, "distill", 2, {"loss": 0.62})
    job_log.add_metrics(db, job_id, "evaluate", 2, {"accuracy": 0.75})
    (export_dir / "adapter").mkdir(parents=True)
    (export_dir / "model.safetensors").write_bytes(b"\x01" * 1500)
    (export_dir / "config.json").write_text('{"model_type": "llama"}')
    (export_dir / "adapter" / "adapter_config.json").write_text("{}")
    assert job_rows.finish_job(db, job_id, "worker-1", "succeeded", export_dir=str(export_dir))


def test_create_and_get_a_job(alice, db, queue):
    seen_at_enqueue = []
    queue.on_enqueue = lambda job_id: seen_at_enqueue.append(job_rows.get_job(db, job_id))  # a second connection
    job = _submit(alice, {**SPEC, "name": "first run", "metadata": {"team": "nlp"}, "training": {"max_steps": 5}})
    assert job["id"].startswith("job_") and job["object"] == "job" and job["status"] == "queued"
    assert queue.jobs == [job["id"]]
    assert seen_at_enqueue[0] is not None and seen_at_enqueue[0].status == "queued"  # committed before enqueue
    assert job["name"] == "first run" and job["metadata"] == {"team": "nlp"}
    assert job["attempt"] == 0 and job["max_attempts"] == 3 and job["error"] is None and job["model"] is None
    assert job["progress"] == {"step": None, "total": None, "eta_seconds": None, "detail": None}
    # the resolved spec: defaults filled in, the request's values kept
    assert job["spec"]["training"]["max_steps"] == 5 and job["spec"]["training"]["batch_size"] == 16
    assert job["spec"]["weights"]["source"] == "teacher_contrastive" and job["spec"]["method"] == "ctpd"
    assert [t["status"] for t in job["transitions"]] == ["queued"]

    fetched = alice.get(f"/v1/jobs/{job['id']}")
    assert fetched.status_code == 200 and fetched.json()["spec"] == job["spec"]
    events = alice.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [(e["type"], e["level"]) for e in events] == [("job_created", "info"), ("job_queued", "info")]


def test_invalid_spec_is_a_422_naming_the_field_and_stores_nothing(alice, db, queue):
    cases = {
        "training.batch_size": {**SPEC, "training": {"batch_size": 0}},
        "training.lr": {**SPEC, "training": {"lr": 1e-5}},
        "dataset.path": {**SPEC, "dataset": {}},
        "teacher": {"student": SPEC["student"], "dataset": SPEC["dataset"]},
        "student": {"teacher": SPEC["teacher"], "dataset": SPEC["dataset"]},
        "method": {**SPEC, "method": "orpo"},
    }
    for param, body in cases.items():
        response = alice.post("/v1/jobs", json=body)
        assert response.status_code == 422, (param, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and error["param"] == param, (param, error)
        assert param in error["message"] and error["errors"][0]["param"] == param
    message = alice.post("/v1/jobs", json=cases["training.lr"]).json()["error"]["message"]
    assert "learning_rate" in message  # the fix: the allowed names
    both = alice.post("/v1/jobs", json={**SPEC, "beta": -1, "training": {"warmup_ratio": 2}}).json()["error"]
    assert [e["param"] for e in both["errors"]] == ["beta", "training.warmup_ratio"]  # one entry per error
    assert alice.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    assert alice.post("/v1/jobs", json=[1, 2]).status_code == 422
    metadata = alice.post("/v1/jobs", json={**SPEC, "metadata": {"k" * 65: "v"}}).json()["error"]
    assert metadata["param"].startswith("metadata.")
    assert _count_jobs(db) == 0 and queue.jobs == []


def test_unknown_dataset_id_is_a_422(alice, bob, db):
    response = alice.post("/v1/jobs", json={**SPEC, "dataset": {"id": "ds_missing"}})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "dataset.id" and "POST /v1/datasets" in response.json()["error"]["message"]
    upload = bob.post("/v1/datasets", files={"file": ("p.jsonl", b'{"prompt": "a", "chosen": " b", "rejected": " c"}\n')})
    assert upload.status_code == 201
    other_tenant = alice.post("/v1/jobs", json={**SPEC, "dataset": {"id": upload.json()["id"]}})
    assert other_tenant.status_code == 422 and other_tenant.json()["error"]["param"] == "dataset.id"
    assert _count_jobs(db) == 0


def test_list_pagination_and_filters(alice, bob, db):
    ids = [_submit(alice, {**SPEC, "metadata": {"team": "nlp" if n % 2 else "vision", "n": str(n)}})["id"]
           for n in range(5)]
    _submit(bob, {**SPEC, "metadata": {"team": "nlp"}})
    job_rows.claim_job(db, ids[1], "worker-1", 60)

    page = alice.get("/v1/jobs", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [job["id"] for job in page["data"]] == ids[::-1][:2]  # newest first
    seen = [job["id"] for job in page["data"]]
    while page["has_more"]:
        page = alice.get("/v1/jobs", params={"limit": 2, "after": seen[-1]}).json()
        seen += [job["id"] for job in page["data"]]
    assert seen == ids[::-1]

    running = alice.get("/v1/jobs", params={"status": "running"}).json()["data"]
    assert [job["id"] for job in running] == [ids[1]]
    nlp = alice.get("/v1/jobs?metadata[team]=nlp").json()["data"]
    assert sorted(job["id"] for job in nlp) == sorted([ids[1], ids[3]])
    both = alice.get("/v1/jobs", params={"metadata[team]": "nlp", "metadata[n]": "3"}).json()["data"]
    assert [job["id"] for job in both] == [ids[3]]
    assert alice.get("/v1/jobs?metadata[team]=none").json() == {"object": "list", "data": [], "has_more": False}
    odd = _submit(alice, {**SPEC, "metadata": {'say "hi"': "it's", "a.b": "c"}})["id"]  # keys a JSON path can't spell
    assert [job["id"] for job in alice.get("/v1/jobs", params={'metadata[say "hi"]': "it's"}).json()["data"]] == [odd]
    assert [job["id"] for job in alice.get("/v1/jobs", params={"metadata[a.b]": "c"}).json()["data"]] == [odd]

    assert alice.get("/v1/jobs", params={"status": "done"}).json()["error"]["param"] == "status"
    assert alice.get("/v1/jobs", params={"limit": 0}).json()["error"]["param"] == "limit"
    bad_cursor = alice.get("/v1/jobs", params={"after": "job_nope"})
    assert bad_cursor.status_code == 422 and bad_cursor.json()["error"]["param"] == "after"


def test_idempotency_key(alice, bob, db, queue):
    headers = {"Idempotency-Key": "run-42"}
    first = alice.post("/v1/jobs", json=SPEC, headers=headers)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    replay = alice.post("/v1/jobs", json={**SPEC}, headers=headers)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    reordered = dict(reversed(list(SPEC.items())))  # the same body with its keys in another order
    assert alice.post("/v1/jobs", json=reordered, headers=headers).json()["id"] == first.json()["id"]
    conflict = alice.post("/v1/jobs", json={**SPEC, "beta": 0.2}, headers=headers)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    assert conflict.json()["error"]["param"] == "Idempotency-Key"
    assert queue.jobs == [first.json()["id"]]  # a replay enqueues nothing
    assert bob.post("/v1/jobs", json=SPEC, headers=headers).status_code == 201  # keys are per tenant
    assert _count_jobs(db) == 2


def test_tenant_isolation(alice, bob, db, tmp_path):
    mine = _submit(alice)["id"]
    theirs = _submit(bob)["id"]
    for path in ("", "/events", "/metrics", "/artifacts", "/artifacts/model.tar.gz"):
        response = bob.get(f"/v1/jobs/{mine}{path}")
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert bob.post(f"/v1/jobs/{mine}/cancel").status_code == 404
    assert [job["id"] for job in alice.get("/v1/jobs").json()["data"]] == [mine]
    assert [job["id"] for job in bob.get("/v1/jobs").json()["data"]] == [theirs]
    assert job_rows.get_job(db, mine).status == "queued"  # bob's cancel touched nothing


def test_cancel_a_queued_and_a_running_job(alice, db):
    queued = _submit(alice)["id"]
    response = alice.post(f"/v1/jobs/{queued}/cancel")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "cancelled" and body["cancel_requested_at"] and body["finished_at"]
    assert [t["status"] for t in body["transitions"]] == ["queued", "cancelled"]

    running = _submit(alice)["id"]
    job_rows.claim_job(db, running, "worker-1", 60)
    body = alice.post(f"/v1/jobs/{running}/cancel").json()
    assert body["status"] == "cancelling" and body["finished_at"] is None
    assert job_rows.is_cancel_requested(db, running)
    assert job_rows.finish_job(db, running, "worker-1", "cancelled")
    body = alice.get(f"/v1/jobs/{running}").json()
    assert body["status"] == "cancelled"
    assert [t["status"] for t in body["transitions"]] == ["queued", "running", "cancelling", "cancelled"]
    types = [e["type"] for e in alice.get(f"/v1/jobs/{running}/events").json()["data"]]
    assert types[-2:] == ["cancel_requested", "job_cancelled"]
    assert alice.post(f"/v1/jobs/{running}/cancel").json()["status"] == "cancelled"  # again: unchanged

    done = _submit(alice)["id"]
    job_rows.claim_job(db, done, "worker-1", 60)
    job_rows.finish_job(db, done, "worker-1", "failed", error_code="internal_error", error_message="boom", error_kind="system")
    conflict = alice.post(f"/v1/jobs/{done}/cancel")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "job_not_cancellable"
    failed = alice.get(f"/v1/jobs/{done}").json()
    assert failed["error"] == {"code": "internal_error", "message": "boom", "kind": "system"}


def test_events_feed_is_typed_and_paginated(alice, db):
    job_id = _submit(alice)["id"]
    job_rows.claim_job(db, job_id, "worker-1", 60)
    job_log.add_event(db, job_id, "stage_started", "prepare started", stage="prepare", data={"cached": False})
    job_log.add_event(db, job_id, "checkpoint_saved", "checkpoint", stage="distill",
                   data={"stage": "distill", "step": 10, "path": "/ckpt"})
    first = alice.get(f"/v1/jobs/{job_id}/events", params={"limit": 2}).json()
    assert first["has_more"] is True and len(first["data"]) == 2
    rest = alice.get(f"/v1/jobs/{job_id}/events", params={"after": first["data"][-1]["id"]}).json()
    assert rest["has_more"] is False
    events = first["data"] + rest["data"]
    assert [e["type"] for e in events] == ["job_created", "job_queued", "job_started", "stage_started",
                                           "checkpoint_saved"]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    checkpoint = events[-1]
    assert checkpoint["object"] == "job.event" and checkpoint["stage"] == "distill"
    assert checkpoint["data"] == {"stage": "distill", "step": 10, "path": "/ckpt"}
    assert events[2]["data"]["attempt"] == 1


def test_progress_metrics_artifacts_and_download(alice, db, settings):
    job_id = _submit(alice)["id"]
    export_dir = Path(settings.artifact_root) / "jobs" / job_id / "export"
    assert alice.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
    not_yet = alice.get(f"/v1/jobs/{job_id}/artifacts/model.tar.gz")
    assert not_yet.status_code == 409 and not_yet.json()["error"]["code"] == "job_not_succeeded"

    job_rows.claim_job(db, job_id, "worker-1", 60)
    job_log.update_progress(db, job_id, stage="distill", step=4, total=10, eta_seconds=30.0)
    body = alice.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "running" and body["stage"] == "distill" and body["attempt"] == 1
    assert body["progress"] == {"step": 4, "total": 10, "eta_seconds": 30.0, "detail": None} and body["started_at"]

    _run_to_success(db, job_id, export_dir)
    job_log.add_metrics(db, job_id, "distill", 2, {"loss": 0.60})  # a resumed attempt re-logs step 2: last wins
    metrics = alice.get(f"/v1/jobs/{job_id}/metrics").json()
    assert metrics == {
        "object": "job.metrics",
        "job_id": job_id,
        "data": {
            "distill/loss": [{"step": 1, "value": 0.70}, {"step": 2, "value": 0.60}],
            "evaluate/accuracy": [{"step": 2, "value": 0.75}],
        },
    }

    body = alice.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "succeeded" and body["finished_at"]
    assert body["model"]["id"] == f"job:{job_id}"  # the reference /v1/models lists, never the server path
    assert str(export_dir) not in json.dumps(body)
    assert body["model"]["download_url"] == f"/v1/jobs/{job_id}/artifacts/model.tar.gz"

    artifacts = alice.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    files = f"/v1/jobs/{job_id}/model/files"
    assert artifacts == [
        {"path": "adapter/adapter_config.json", "size_bytes": 2, "download_url": f"{files}/adapter/adapter_config.json"},
        {"path": "config.json", "size_bytes": 23, "download_url": f"{files}/config.json"},
        {"path": "model.safetensors", "size_bytes": 1500, "download_url": f"{files}/model.safetensors"},
    ]

    download = alice.get(f"/v1/jobs/{job_id}/artifacts/model.tar.gz")
    assert download.status_code == 200 and download.headers["content-type"] == "application/gzip"
    assert f'filename="{job_id}-model.tar.gz"' in download.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as archive:
        names = archive.getnames()
        assert {f"{job_id}/config.json", f"{job_id}/model.safetensors", f"{job_id}/adapter/adapter_config.json"} <= set(names)
        assert archive.extractfile(f"{job_id}/model.safetensors").read() == b"\x01" * 1500
        assert archive.extractfile(f"{job_id}/config.json").read() == b'{"model_type": "llama"}'


def test_models_lists_the_catalog_and_the_tenants_students(alice, bob, db, settings):
    catalog = {model["id"] for model in alice.get("/v1/models").json()["data"]}
    assert {"smollm2-135m-instruct", "gemma-3-270m"} <= catalog
    job_id = _submit(alice, {**SPEC, "name": "distilled"})["id"]
    export_dir = Path(settings.artifact_root) / "jobs" / job_id / "export"
    _run_to_success(db, job_id, export_dir)

    listing = alice.get("/v1/models")
    assert str(settings.artifact_root) not in listing.text and str(settings.home) not in listing.text  # no server path
    students = [m for m in listing.json()["data"] if m["source"] == "job"]
    assert len(students) == 1 and students[0]["id"] == f"job:{job_id}" and students[0]["job_id"] == job_id
    assert students[0]["available"] is True and students[0]["base_model"] == "smollm2-135m-instruct"
    assert [m for m in bob.get("/v1/models").json()["data"] if m["source"] == "job"] == []

    # The student is a model reference for the next job (as the teacher) of its own tenant only.
    reuse = {**SPEC, "teacher": {"model": students[0]["id"]}}
    assert alice.post("/v1/jobs", json=reuse).status_code == 201
    refused = bob.post("/v1/jobs", json=reuse)
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "teacher.model"
    peek = bob.post("/v1/jobs", json={**SPEC, "dataset": {"path": str(Path(settings.artifact_root) / "datasets" / "x")}})
    assert peek.status_code == 422 and peek.json()["error"]["param"] == "dataset.path"


def test_a_failed_enqueue_keeps_the_job_queued_and_says_so(alice, db, queue):
    queue.fail_with = ConnectionError("broker down")
    response = alice.post("/v1/jobs", json=SPEC)
    assert response.status_code == 201 and response.json()["status"] == "queued"
    job_id = response.json()["id"]
    events = alice.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert events[-1]["type"] == "job_queued" and events[-1]["level"] == "warning"
    assert events[-1]["data"]["enqueued"] is False and "broker down" in events[-1]["message"]
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)) == 2
    assert job_rows.get_job(db, job_id).status == "queued"  # the reaper's stale_queued_jobs picks it up later


def test_multi_tenant_mode_refuses_server_paths_for_non_admin_keys(settings, db, queue, tmp_path):
    """CTPD_ALLOW_SERVER_PATHS=false: tenants may use uploads, catalog names, hub ids and their own exports,
    never a file or folder on the server; an admin key still may."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    locked = create_app(settings.model_copy(update={"allow_server_paths": False}), queue=queue)
    try:
        key = key_rows.create_api_key(db, "acme", "tenant key")
        admin_key = key_rows.create_api_key(db, "acme", "admin key", is_admin=True)
        tenant = TestClient(locked, headers={"Authorization": f"Bearer {key}"})
        admin = TestClient(locked, headers={"Authorization": f"Bearer {admin_key}"})
        upload = tenant.post(
            "/v1/datasets", files={"file": ("p.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n')}
        )
        dataset_id = upload.json()["id"]
        folder = tmp_path / "some-model"
        folder.mkdir()
        cases = {
            "dataset.path": {**SPEC, "dataset": {"path": "/etc/passwd"}},
            "teacher.model": {**SPEC, "dataset": {"id": dataset_id}, "teacher": {"model": str(folder)}},
        }
        for param, body in cases.items():
            refused = tenant.post("/v1/jobs", json=body)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["param"] == param
            assert "does not allow for your key" in refused.json()["error"]["message"]
            assert admin.post("/v1/jobs", json=body).status_code == 201
        hub_and_catalog = {**SPEC, "dataset": {"id": dataset_id}, "teacher": {"model": "google/gemma-3-270m"}}
        assert tenant.post("/v1/jobs", json=hub_and_catalog).status_code == 201
        assert tenant.post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset_id}}).status_code == 201
    finally:
        locked.state.db.dispose()
