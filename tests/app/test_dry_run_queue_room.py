"""A dry run sees the submission's 429 ahead: the tenant's ``max_queued`` queued jobs (real app and database)."""

from __future__ import annotations

from app.db import jobs as job_rows
from tests.app.conftest import SPEC


def _queue_warnings(report: dict) -> list[dict]:
    return [entry for entry in report["warnings"] if entry["code"] == "queue_full"]


def test_a_full_queue_is_a_warning_with_the_fix_and_a_started_job_clears_it(alice, bob, admin):
    assert admin.put("/v1/tenants/acme/limits", json={"max_running": None, "max_queued": 1}).status_code == 200
    assert _queue_warnings(alice.post("/v1/jobs?dry_run=true", json=SPEC).json()) == []  # room for one
    assert alice.post("/v1/jobs", json=SPEC).status_code == 201

    report = alice.post("/v1/jobs?dry_run=true", json=SPEC).json()
    (warning,) = _queue_warnings(report)
    assert "1 queued jobs, its limit (max_queued 1)" in warning["message"] and "429" in warning["message"]
    assert "PUT /v1/tenants/acme/limits" in warning["fix"] and "cancel" in warning["fix"]
    refused = alice.post("/v1/jobs", json={**SPEC, "name": "second"})
    assert refused.status_code == 429  # what the warning foretold
    assert _queue_warnings(bob.post("/v1/jobs?dry_run=true", json=SPEC).json()) == []  # another tenant's queue

    job_rows.claim_job(alice.app.state.db, alice.get("/v1/jobs").json()["data"][0]["id"], "w1", 60)
    assert _queue_warnings(alice.post("/v1/jobs?dry_run=true", json=SPEC).json()) == []
