"""The worker applies the path and remote-code policy itself, where it opens the files (issue 9, items 1-2):
a job row that names a server path is refused before anything is read, whatever the API saw."""

from __future__ import annotations

import shutil

import pytest

from app.db import jobs as job_rows
from app.settings import Settings
from tests.worker.test_tasks import _spec, new_job
from worker.policy import enforce_job_policy
from worker.tasks import JobOutcome, execute_job


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", lease_seconds=30)  # the multi-tenant defaults


def test_a_relative_dataset_path_that_exists_only_on_the_worker_is_refused(
    db, settings, tmp_path, monkeypatch, tiny_dataset_path
):
    """The defect: the API checked existence on its own host, the worker opened the path from its cwd."""
    worker_cwd = tmp_path / "worker-cwd"
    (worker_cwd / "secret").mkdir(parents=True)
    shutil.copy(tiny_dataset_path, worker_cwd / "secret" / "pairs.jsonl")
    monkeypatch.chdir(worker_cwd)
    job_id = new_job(db, _spec("gemma-3-270m", "smollm2-135m-instruct", {"path": "secret/pairs.jsonl"}))
    outcome = execute_job(db, settings, job_id, "w1", device="cpu")
    assert outcome == JobOutcome(job_id, "failed", "policy_violation")
    job = job_rows.get_job(db, job_id)
    assert job.error_kind == "user" and "dataset.path" in job.error_message and "the worker" in job.error_message
    assert not (settings.artifact_root / "jobs" / job_id).exists()  # refused before anything ran


def test_remote_code_is_refused_on_the_worker_too(db, settings):
    spec = _spec("org/student", "gemma-3-270m", {"id": "ds_x"})
    spec["student"]["trust_remote_code"] = True
    job_id = new_job(db, spec)
    assert execute_job(db, settings, job_id, "w1", device="cpu").error_code == "policy_violation"
    assert "CTPD_ALLOW_REMOTE_CODE" in job_rows.get_job(db, job_id).error_message


def test_job_references_resolve_to_the_tenants_own_export(db, settings, tmp_path):
    from ctpd_core.spec import JobSpec

    done = new_job(db, _spec("gemma-3-270m", "smollm2-135m-instruct", {"id": "ds_x"}))
    export = tmp_path / "export"
    export.mkdir()
    job_rows.claim_job(db, done, "w1", 30)
    job_rows.finish_job(db, done, "w1", "succeeded", export_dir=export)
    spec = JobSpec.model_validate(_spec(f"job:{done}", "gemma-3-270m", {"id": "ds_x"}))
    mine = job_rows.get_job(db, new_job(db, spec.model_dump(mode="json")))
    assert enforce_job_policy(db, spec, mine, settings).student.model == str(export)
    theirs = job_rows.get_job(db, new_job(db, spec.model_dump(mode="json"), tenant="globex"))
    with pytest.raises(ValueError, match="student.model"):
        enforce_job_policy(db, spec, theirs, settings)
