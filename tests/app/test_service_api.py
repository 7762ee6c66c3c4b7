"""Health, readiness, auth, the error shape and the OpenAPI document."""

from __future__ import annotations

import pytest

from app.db import auth as key_rows
from app.main import create_app
from tests.app.conftest import SPEC

OPERATION_IDS = {
    ("post", "/v1/jobs"): "create_job",
    ("get", "/v1/jobs"): "list_jobs",
    ("get", "/v1/jobs/{job_id}"): "get_job",
    ("post", "/v1/jobs/{job_id}/cancel"): "cancel_job",
    ("get", "/v1/jobs/{job_id}/events"): "list_job_events",
    ("get", "/v1/jobs/{job_id}/metrics"): "get_job_metrics",
    ("get", "/v1/jobs/{job_id}/artifacts"): "list_job_artifacts",
    ("get", "/v1/jobs/{job_id}/artifacts/model.tar.gz"): "download_job_model",
    ("get", "/v1/jobs/{job_id}/model.tar"): "download_job_model_tar",
    ("get", "/v1/jobs/{job_id}/model/files/{path}"): "download_job_model_file",
    ("get", "/v1/jobs/{job_id}/checkpoints"): "list_job_checkpoints",
    ("get", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}"): "get_job_checkpoint",
    ("post", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/model"): "build_checkpoint_model",
    ("get", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/model.tar"): "download_checkpoint_model",
    ("get", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/model/files/{path}"): "download_checkpoint_model_file",
    ("post", "/v1/datasets"): "upload_dataset",
    ("get", "/v1/datasets"): "list_datasets",
    ("get", "/v1/datasets/{dataset_id}"): "get_dataset",
    ("get", "/v1/datasets/{dataset_id}/stats"): "get_dataset_stats",
    ("delete", "/v1/datasets/{dataset_id}"): "delete_dataset",
    ("get", "/v1/preflights/{preflight_id}"): "get_preflight",
    ("get", "/v1/models"): "list_models",
    ("get", "/v1/api-keys"): "list_api_keys",
    ("post", "/v1/api-keys"): "create_api_key",
    ("delete", "/v1/api-keys/{key_id}"): "revoke_api_key",
    ("get", "/v1/webhooks"): "list_webhooks",
    ("post", "/v1/webhooks"): "create_webhook",
    ("get", "/v1/webhooks/{webhook_id}"): "get_webhook",
    ("patch", "/v1/webhooks/{webhook_id}"): "update_webhook",
    ("delete", "/v1/webhooks/{webhook_id}"): "delete_webhook",
    ("get", "/v1/webhooks/{webhook_id}/deliveries"): "list_webhook_deliveries",
    ("post", "/v1/webhooks/{webhook_id}/deliveries/{message_id}/redeliver"): "redeliver_webhook_message",
    ("get", "/v1/tenants/{tenant}/limits"): "get_tenant_limits",
    ("put", "/v1/tenants/{tenant}/limits"): "set_tenant_limits",
    ("get", "/healthz"): "healthz",
    ("get", "/readyz"): "readyz",
}


def test_openapi_has_the_stable_operation_ids(client):
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    found = {(method, path): operation["operationId"]
             for path, operations in document["paths"].items() for method, operation in operations.items()}
    assert found == OPERATION_IDS
    assert document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobSpec"
    }
    assert "HTTPValidationError" not in document["components"]["schemas"]  # every 422 is our error shape


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": {"ok": True, "error": None},
                                                          "broker": {"ok": True, "error": None}}}


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/15", "sqla+sqlite:///{tmp}/broker.db"])
def test_readyz_reaches_real_brokers(settings, queue, tmp_path, broker):
    from fastapi.testclient import TestClient

    app = create_app(settings.model_copy(update={"broker_url": broker.format(tmp=tmp_path)}), queue=queue)
    response = TestClient(app).get("/readyz")
    assert response.status_code == 200, response.text
    app.state.db.dispose()


def test_readyz_is_503_naming_the_broker(settings, queue):
    from fastapi.testclient import TestClient

    app = create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}), queue=queue)
    response = TestClient(app).get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["checks"]["database"]["ok"] is True
    assert body["checks"]["broker"]["ok"] is False and body["checks"]["broker"]["error"]
    assert body["error"]["code"] == "not_ready" and "broker unreachable" in body["error"]["message"]
    app.state.db.dispose()


def test_readyz_is_503_naming_the_database(settings, queue, tmp_path):
    from fastapi.testclient import TestClient

    unreachable = f"sqlite:///{tmp_path}/missing-dir/nested/ctpd.db?mode=ro&uri=true"
    app = create_app(settings.model_copy(update={"database_url": unreachable}), queue=queue)
    (tmp_path / "missing-dir" / "nested").rmdir()  # Database() made it; take it away again
    response = TestClient(app).get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"]["ok"] is False and response.json()["checks"]["broker"]["ok"] is True
    app.state.db.dispose()


def test_auth_is_required_and_checked(client, alice, db):
    missing = client.get("/v1/jobs")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    assert "ctpd keys create" in missing.json()["error"]["message"]
    wrong = client.get("/v1/jobs", headers={"Authorization": "Bearer ctpd_not-a-key"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    basic = client.get("/v1/jobs", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401
    assert client.post("/v1/jobs", json=SPEC).status_code == 401
    assert client.get("/v1/models").status_code == 401

    assert alice.get("/v1/jobs").status_code == 200
    (key,) = key_rows.list_api_keys(db, "acme")
    key_rows.revoke_api_key(db, key.id)
    assert alice.get("/v1/jobs").status_code == 401


def test_errors_have_one_shape(alice):
    unknown = alice.get("/v1/nothing")
    assert unknown.status_code == 404 and set(unknown.json()["error"]) == {"code", "message", "param"}
    wrong_method = alice.delete("/v1/jobs")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    missing = alice.get("/v1/jobs/job_missing")
    assert missing.json() == {"error": {"code": "not_found", "message": "no job 'job_missing' for this API key",
                                        "param": "job_id"}}
