"""docs/service-contract.md names every operation the API serves: a route added without its line in the contract
(the datasets' stats, the preflights) fails here, as do the contract's claims about which error codes a route
declares."""

from __future__ import annotations

from pathlib import Path

CONTRACT = (Path(__file__).resolve().parents[2] / "docs" / "service-contract.md").read_text(encoding="utf-8")


def _operations(app) -> dict[str, tuple[str, str, set[str]]]:
    document = app.openapi()
    return {operation["operationId"]: (method.upper(), path, set(operation.get("responses", {})))
            for path, methods in document["paths"].items() for method, operation in methods.items()}


def test_every_served_operation_is_in_the_contract(app):
    missing = sorted(f"{method} {path} ({operation_id})" for operation_id, (method, path, _) in _operations(app).items()
                     if f"`{operation_id}`" not in CONTRACT and f"`{method} {path}`" not in CONTRACT)
    assert missing == [], "add these to docs/service-contract.md's API section"


def test_the_error_codes_the_contract_lists_are_declared(app):
    operations = _operations(app)
    claims = {"429": ["create_job"], "410": ["get_job_checkpoint", "build_checkpoint_model",
                                            "download_checkpoint_model", "download_checkpoint_model_file"],
              "409": ["create_job", "cancel_job", "delete_dataset", "redeliver_webhook_message", "download_job_model",
                      "download_job_model_tar", "download_job_model_file", "download_checkpoint_model"],
              "416": ["download_job_model_tar", "download_checkpoint_model"], "413": ["upload_dataset"],
              "403": ["create_job", "list_api_keys", "set_tenant_limits"]}
    wrong = [(code, name) for code, names in claims.items() for name in names if code not in operations[name][2]]
    assert wrong == []
