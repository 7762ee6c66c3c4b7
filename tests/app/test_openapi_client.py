"""A typed client generated from the service's own ``/openapi.json`` works against the running service.

openapi-python-client (pinned in the ``dev`` extra) generates a package from the document a real server (uvicorn
on a free port, this suite's app on SQLite and PostgreSQL) serves; the test imports it and uses it the way a client
author would: submit a typed JobSpec, read the job back with ``spec`` typed, list jobs, read events whose ``type``
is an enum, and parse the 422 and 404 bodies as the typed ``ErrorResponse``. ``--fail-on-warning``: a schema the
generator has to drop (an untyped ``Job.spec`` whose inline schema clashed with the ``JobSpec`` request model
used to cost the client ``Job`` and ``JobList``) fails here with the generator's own message.
"""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from app.main import create_app
from tests.live_service import serving

PACKAGE = "ctpd_client"
# No formatter hooks (ruff is not needed to import the code); the tar.gz and tar downloads are binary, which the
# generator knows as application/octet-stream.
GENERATOR_CONFIG = (
    f"package_name_override: {PACKAGE}\n"
    "post_hooks: []\n"
    "content_type_overrides:\n"
    "  application/gzip: application/octet-stream\n"
    "  application/x-tar: application/octet-stream\n"
)


@pytest.fixture
def server(app) -> Iterator[str]:
    with serving(app) as url:
        yield url


def generate_client(document: dict, folder: Path) -> ModuleType:
    """Generate the client package from ``document`` into ``folder`` (on ``sys.path``) and import it."""
    (folder / "openapi.json").write_text(json.dumps(document))
    (folder / "generator.yaml").write_text(GENERATOR_CONFIG)
    result = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(folder / "openapi.json"),
         "--config", str(folder / "generator.yaml"), "--output-path", str(folder / PACKAGE), "--meta", "none",
         "--fail-on-warning"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"openapi-python-client refused the document:\n{result.stdout}\n{result.stderr}"
    return importlib.import_module(PACKAGE)


@pytest.fixture
def client_package(tmp_path: Path, server: str) -> Iterator[ModuleType]:
    document = httpx.get(f"{server}/openapi.json", timeout=30).json()
    sys.path.insert(0, str(tmp_path))
    try:
        yield generate_client(document, tmp_path)
    finally:  # each backend's run generates and imports its own copy
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name == PACKAGE or name.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def test_the_document_has_one_jobspec_for_the_request_and_the_response(server):
    document = httpx.get(f"{server}/openapi.json", timeout=30).json()
    schemas = document["components"]["schemas"]
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}
    assert schemas["Job"]["properties"]["spec"]["$ref"] == "#/components/schemas/JobSpec"
    assert not [name for name in schemas if name.startswith("JobSpec-") or name.endswith(("-Input", "-Output"))]
    assert schemas["JobEvent"]["properties"]["type"]["$ref"] == "#/components/schemas/EventType"


def test_every_route_declares_the_errors_it_can_return(server):
    document = httpx.get(f"{server}/openapi.json", timeout=30).json()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where, responses = f"{method.upper()} {path}", operation["responses"]
            if path == "/healthz":  # answers from the process alone
                assert not [status for status in responses if status.startswith(("4", "5"))], where
                continue
            # Any database route answers 503 service_unavailable with Retry-After while the database is away;
            # /readyz answers its own 503 (NotReady), with Retry-After too.
            assert responses["503"]["headers"]["Retry-After"]["required"] is True, where
            body = responses["503"]["content"]["application/json"]["schema"]
            assert body == ({"$ref": "#/components/schemas/NotReady"} if path == "/readyz" else error), where
            if path == "/readyz":
                continue
            assert responses["401"]["content"]["application/json"]["schema"] == error, where
            assert "WWW-Authenticate" in responses["401"]["headers"], where
            if "{" in path:  # an id of this tenant's, or a 404
                assert responses["404"]["content"]["application/json"]["schema"] == error, where
            for status, response in responses.items():
                if status.startswith("4"):
                    assert response["content"]["application/json"]["schema"] == error, (where, status)
    jobs = document["paths"]["/v1/jobs"]
    assert {"401", "403", "409", "422", "503"} <= set(jobs["post"]["responses"]) and "404" not in jobs["get"]["responses"]
    assert {"400", "401", "413", "422", "503"} <= set(document["paths"]["/v1/datasets"]["post"]["responses"])


def test_a_generated_client_submits_reads_lists_and_parses_errors(client_package, server, alice):
    from ctpd_client.api.jobs import create_job, get_job, list_job_events, list_jobs
    from ctpd_client.client import AuthenticatedClient
    from ctpd_client.models import (
        DatasetRef,
        ErrorResponse,
        EventLevel,
        EventType,
        FieldProblem,
        Job,
        JobList,
        JobSpec,
        JobStatus,
        ModelRef,
        TrainingSpec,
    )

    assert {"Job", "JobList", "JobSpec"} <= set(client_package.models.__all__)
    client = AuthenticatedClient(base_url=server, token=alice.api_key)

    spec = JobSpec(teacher=ModelRef(model="gemma-3-270m"), student=ModelRef(model="smollm2-135m-instruct"),
                   dataset=DatasetRef(path="/data/pairs.jsonl"), name="typed")
    created = create_job.sync_detailed(client=client, body=spec)
    assert created.status_code == 201, created.content
    job = created.parsed
    assert isinstance(job, Job) and job.status is JobStatus.QUEUED
    assert isinstance(job.spec, JobSpec) and isinstance(job.spec.training, TrainingSpec)
    assert job.spec.training.batch_size == 16 and job.spec.dataset.path == "/data/pairs.jsonl"  # defaults resolved

    fetched = get_job.sync(job.id, client=client)
    assert isinstance(fetched, Job) and isinstance(fetched.spec, JobSpec)
    assert fetched.spec.to_dict() == job.spec.to_dict() and fetched.spec.name == "typed"

    listed = list_jobs.sync(client=client, status=JobStatus.QUEUED)
    assert isinstance(listed, JobList) and [item.id for item in listed.data] == [job.id]
    assert isinstance(listed.data[0].spec, JobSpec) and listed.has_more is False

    events = list_job_events.sync(job.id, client=client)
    # The generator names the field type_ (type is a builtin); its value is the enum, not a bare string.
    assert [(event.type_, event.level) for event in events.data] == [
        (EventType.JOB_CREATED, EventLevel.INFO), (EventType.JOB_QUEUED, EventLevel.INFO)]
    assert all(isinstance(event.type_, EventType) for event in events.data)

    invalid = JobSpec.from_dict({**spec.to_dict(), "training": {"batch_size": 6, "micro_batch_size": 4}})
    refused = create_job.sync_detailed(client=client, body=invalid)
    assert refused.status_code == 422 and isinstance(refused.parsed, ErrorResponse)
    assert refused.parsed.error.code == "invalid_request" and refused.parsed.error.param == "training.batch_size"
    assert "multiple of training.micro_batch_size" in refused.parsed.error.message
    [problem] = refused.parsed.error.errors
    assert isinstance(problem, FieldProblem) and problem.param == "training.batch_size"

    missing = get_job.sync_detailed("job_missing", client=client)
    assert missing.status_code == 404 and isinstance(missing.parsed, ErrorResponse)
    assert (missing.parsed.error.code, missing.parsed.error.param) == ("not_found", "job_id")


def test_a_generated_client_uploads_and_reads_a_bad_rows_422(client_package, server, alice):
    from ctpd_client.api.datasets import upload_dataset
    from ctpd_client.client import AuthenticatedClient
    from ctpd_client.models import Dataset, ErrorResponse, RowProblem, UploadDatasetBody
    from ctpd_client.types import File

    client = AuthenticatedClient(base_url=server, token=alice.api_key)
    good = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    uploaded = upload_dataset.sync(client=client, body=UploadDatasetBody(
        file=File(payload=io.BytesIO(good * 2), file_name="pairs.jsonl", mime_type="application/jsonl")))
    assert isinstance(uploaded, Dataset) and uploaded.num_rows == 2 and uploaded.format_ == "jsonl"

    bad = upload_dataset.sync_detailed(client=client, body=UploadDatasetBody(
        file=File(payload=io.BytesIO(good + b'{"prompt": "p"}\n'), file_name="pairs.jsonl")))
    assert bad.status_code == 422 and isinstance(bad.parsed, ErrorResponse)
    assert bad.parsed.error.code == "invalid_dataset" and bad.parsed.error.param == "file"
    [problem] = bad.parsed.error.errors
    assert isinstance(problem, RowProblem) and problem.row == 2


def test_a_generated_client_reads_the_readiness_503_as_not_ready(client_package, settings, queue):
    from ctpd_client.api.health import readyz
    from ctpd_client.client import Client
    from ctpd_client.models import NotReady

    unready = create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1"}), queue=queue)  # refused
    try:
        with serving(unready) as url:
            answer = readyz.sync_detailed(client=Client(base_url=url))
    finally:
        unready.state.db.dispose()
    assert answer.status_code == 503 and answer.headers["Retry-After"].isdigit()
    assert isinstance(answer.parsed, NotReady) and answer.parsed.error.code == "not_ready"
    assert answer.parsed.checks["database"].ok is True and answer.parsed.checks["broker"].ok is False
