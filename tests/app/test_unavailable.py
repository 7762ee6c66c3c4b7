"""While the database is unreachable the API answers 503 with Retry-After, never a bare 500 (issue 9, item 7).
The outage is real: a PostgreSQL URL on a port where nothing listens (the fault suite also stops and starts a
private server mid-job, tests/faults)."""

from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.fixture
def unreachable(tmp_path):
    settings = Settings(home=tmp_path / "home", broker_url="memory://",
                        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/ctpd")
    app = create_app(settings)
    with TestClient(app, headers={"Authorization": "Bearer ctpd_whatever"}) as client:
        yield client
    app.state.db.dispose()


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/jobs"), ("GET", "/v1/jobs/job_x"), ("POST", "/v1/jobs/job_x/cancel"), ("GET", "/v1/jobs/job_x/events"),
    ("GET", "/v1/jobs/job_x/metrics"), ("GET", "/v1/models"), ("GET", "/v1/datasets/ds_x"),
])
def test_every_endpoint_answers_503_with_retry_after(unreachable, method, path):
    response = unreachable.request(method, path)
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    error = response.json()["error"]
    assert error["code"] == "service_unavailable" and "retry" in error["message"]


def test_a_submit_during_an_outage_is_a_503_and_stores_nothing(unreachable):
    body = {"teacher": {"model": "gemma-3-270m"}, "student": {"model": "smollm2-135m-instruct"},
            "dataset": {"id": "ds_x"}}
    response = unreachable.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert response.status_code == 503 and "Retry-After" in response.headers


def test_liveness_still_answers_and_readiness_names_the_database(unreachable):
    assert unreachable.get("/healthz").status_code == 200
    ready = unreachable.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["database"]["ok"] is False
    assert int(ready.headers["Retry-After"]) > 0
