"""Preflight at submission (app/preflight.py): where the GPU memory and the model sizes come from, on SQLite and
PostgreSQL, and that a refusal carries what the API's 422 needs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, update

from app import preflight
from app.api.errors import invalid_request
from app.db import jobs as job_rows
from app.db.models import Job, utcnow
from app.preflight import PreflightRefused, check_job, gpu_budget, model_shape, plan_for
from ctpd_core.memory_plan import GiB
from ctpd_core.spec import JobSpec

workers_table = pytest.importorskip("app.db.workers", reason="the workers table (scheduling) is not in this build")

EIGHT_B = {"method": "dpo", "student": {"model": "meta-llama/Llama-3.1-8B"}, "dataset": {"path": "/data/pairs.jsonl"}}


def _spec(**training) -> JobSpec:
    return JobSpec.model_validate({**EIGHT_B, "training": training})


@pytest.fixture
def workers(db):
    """Registers workers for one test, on an empty workers table (the session's PostgreSQL database keeps rows
    across tests unless they are removed), and removes them after."""
    from app.db.models import Worker

    with db.write() as session:
        session.execute(delete(Worker))

    def register(worker_id: str, gpus: int, memory_gib: float | None, seen_ago: float = 0.0) -> None:
        workers_table.register_worker(db, worker_id, "host", gpus, None if memory_gib is None else int(memory_gib * 1024),
                                      now=utcnow() - timedelta(seconds=seen_ago))

    yield register
    with db.write() as session:
        session.execute(delete(Worker))


def test_the_8b_full_fine_tune_on_the_default_80gb_gpu_is_a_422_with_the_numbers(settings):
    assert settings.gpu_memory_gb == 80
    with pytest.raises(PreflightRefused) as refused:
        check_job(_spec(), settings)
    ((param, message),) = refused.value.problems
    assert param == "training.devices"
    assert "CTPD_GPU_MEMORY_GB=80" in message and "128.5 GB" in message
    assert "training.devices 2 with training.strategy fsdp" in message and "lora.enabled true" in message
    error = invalid_request(refused.value.problems)  # what app/api/jobs.py answers for an InvalidSubmission
    assert error.status == 422 and error.param == "training.devices"
    check_job(_spec(devices=2), settings)  # the fix it offers passes
    check_job(JobSpec.model_validate({**EIGHT_B, "lora": {"enabled": True}}), settings)


def test_a_cpu_only_deployment_refuses_nothing(settings):
    check_job(_spec(), settings.model_copy(update={"gpu_memory_gb": 0.0}))


def test_the_live_workers_memory_wins_over_the_setting(settings, db, workers):
    workers("gpu-big@a", gpus=1, memory_gib=200)
    workers("gpu-small@b", gpus=1, memory_gib=24)
    workers("gpu-gone@c", gpus=1, memory_gib=1000, seen_ago=workers_table.STALE_SECONDS + 60)  # stale: ignored
    budget = gpu_budget(_spec(), settings, db)
    assert budget.memory_bytes == 200 * GiB and "gpu-big@a" in budget.source
    check_job(_spec(), settings, db)  # 8B full fine-tune fits 200 GiB
    # A 2-GPU job: no live worker has 2 GPUs, so the setting decides (the queue view says why it waits).
    assert gpu_budget(_spec(devices=2), settings, db).source == "CTPD_GPU_MEMORY_GB=80"


def test_cpu_workers_run_one_device_jobs_without_a_gpu_budget(settings, db, workers):
    workers("cpu@a", gpus=0, memory_gib=None)
    assert gpu_budget(_spec(), settings, db).memory_bytes is None
    check_job(_spec(), settings, db)  # runs on CPU: not refused
    assert gpu_budget(_spec(devices=2), settings, db).memory_bytes == 80 * GiB  # needs GPUs: the setting


def test_models_are_sized_from_folders_exported_jobs_and_tables(settings, db, tiny_student_folder):
    folder_shape = model_shape(str(tiny_student_folder))
    assert folder_shape is not None and "safetensors" in folder_shape.source
    assert model_shape("someone/not-in-the-table") is None
    job, _ = job_rows.create_job(db, tenant="acme", spec=_spec().model_dump(mode="json"), name=None, metadata={},
                                 idempotency_key=None, request_hash="h", max_attempts=1)
    # An export folder on this host: read it. Not here (a bucket deployment): the model its job started from.
    with db.write() as session:
        session.execute(update(Job).where(Job.id == job.id).values(export_dir=str(tiny_student_folder)))
    assert model_shape(f"job:{job.id}", db=db) == folder_shape
    with db.write() as session:
        session.execute(update(Job).where(Job.id == job.id).values(export_dir="/nowhere/export"))
    exported = model_shape(f"job:{job.id}", db=db)
    assert exported is not None and exported.params == 8_030_261_248
    assert model_shape("job:job_missing", db=db) is None
    # A job on an exported 8B student is planned (and refused) like the 8B itself.
    spec = JobSpec.model_validate({**EIGHT_B, "student": {"model": f"job:{job.id}"}})
    assert not plan_for(spec, settings, db).fits
    assert preflight.model_shapes(spec, db)["student"] == exported


def _submission_runs_preflight() -> bool:
    from app.services import jobs as job_service

    return hasattr(job_service, "preflight")  # `from app import preflight` in app/services/jobs.py


@pytest.mark.skipif(not _submission_runs_preflight(), reason="POST /v1/jobs does not call app.preflight yet")
def test_post_jobs_refuses_the_8b_full_fine_tune_with_a_422_and_stores_nothing(alice, db, queue):
    response = alice.post("/v1/jobs", json=EIGHT_B)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "training.devices"
    assert "128.5 GB" in error["message"] and "lora.enabled true" in error["message"]
    assert alice.get("/v1/jobs").json()["data"] == [] and queue.jobs == []
    fixed = alice.post("/v1/jobs", json={**EIGHT_B, "training": {"devices": 2}})
    assert fixed.status_code == 201, fixed.text
