"""The worker's side of scheduling: what it detects it can run (worker/capacity.py), its row in ``workers``, and a
delivery of ``run_job`` that claims the best job it may run, not the doorbell's, and rings for waiting work."""

from __future__ import annotations

import pytest

from app.db import jobs as job_rows
from app.db import workers as worker_rows
from app.db.models import PRIORITY_RANKS
from app.settings import Settings
from worker.capacity import Capacity, WorkerRegistration, detect_capacity
from worker.tasks import JobOutcome, execute_job

BAD_SPEC = {"method": "ctpd", "student": {"model": "x"}}  # fails at once with invalid_spec: a quick "run"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", lease_seconds=30, allow_server_paths=True, tenant_max_running=1)


def new_job(db, tenant: str = "acme", priority: str = "normal", gpus: int = 1) -> str:
    job, _ = job_rows.create_job(db, tenant=tenant, spec=BAD_SPEC, name=None, metadata={}, idempotency_key=None,
                                 request_hash="h", max_attempts=3, priority=PRIORITY_RANKS[priority],
                                 gpus_required=gpus)
    return job.id


@pytest.mark.parametrize(("worker_gpus", "environ", "gpus", "source"), [
    (None, {}, 0, "none"),  # this CI host: no nvidia-smi, nothing set
    (None, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4, "CUDA_VISIBLE_DEVICES"),
    (None, {"CUDA_VISIBLE_DEVICES": "2"}, 1, "CUDA_VISIBLE_DEVICES"),
    (None, {"CUDA_VISIBLE_DEVICES": ""}, 0, "CUDA_VISIBLE_DEVICES"),
    (None, {"CUDA_VISIBLE_DEVICES": "-1"}, 0, "CUDA_VISIBLE_DEVICES"),
    (None, {"CUDA_VISIBLE_DEVICES": "0,-1,1"}, 1, "CUDA_VISIBLE_DEVICES"),  # CUDA stops at the invalid entry
    (8, {"CUDA_VISIBLE_DEVICES": "0"}, 8, "worker_gpus"),  # CTPD_WORKER_GPUS wins
    (0, {"CUDA_VISIBLE_DEVICES": "0,1"}, 0, "worker_gpus"),
])
def test_capacity_comes_from_the_setting_then_the_visible_devices(worker_gpus, environ, gpus, source, monkeypatch):
    monkeypatch.setattr("worker.capacity.shutil.which", lambda name: None)  # no nvidia-smi here, as on CI
    capacity = detect_capacity(worker_gpus, environ)
    assert (capacity.gpus, capacity.source) == (gpus, source)
    assert capacity.devices == max(gpus, 1)  # a CPU host claims 1-device jobs


def test_nvidia_smi_counts_every_gpu_and_their_memory(tmp_path, monkeypatch):
    """A real executable on PATH answering as nvidia-smi does (no GPU on this host)."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '81559\\n81559\\n40960\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert detect_capacity(None, {}) == Capacity(3, 40960, "nvidia-smi")
    assert detect_capacity(None, {"CUDA_VISIBLE_DEVICES": "0,1"}) == Capacity(2, 81559, "CUDA_VISIBLE_DEVICES")


def test_a_worker_advertises_itself_until_it_stops(db, settings):
    registration = WorkerRegistration(settings.model_copy(update={"worker_gpus": 2}), "train1@host").start()
    try:
        live = worker_rows.live_workers(db)
        assert (live.count, live.max_gpus) == (1, 2)
        worker_rows.remove_worker(db, "train1@host")  # an operator's cleanup: the next refresh registers again
        assert not worker_rows.touch_worker(db, "train1@host")
    finally:
        registration.stop()
    assert worker_rows.live_workers(db).count == 0


def test_a_delivery_claims_the_best_eligible_job_not_the_doorbells(db, settings):
    later = new_job(db, priority="low")
    urgent = new_job(db, priority="high")
    rung: list[str] = []
    outcome = execute_job(db, settings, later, "w1", device="cpu", requeue=rung.append,
                          capacity=Capacity(0, None, "none"))
    assert outcome == JobOutcome(urgent, "failed", "invalid_spec")
    assert job_rows.get_job(db, later).status == "queued"
    assert rung == [later]  # the job ended and acme has a free slot: the doorbell of the next one


def test_a_delivery_that_finds_nothing_eligible_does_nothing(db, settings):
    wide = new_job(db, gpus=4)
    rung: list[str] = []
    assert execute_job(db, settings, wide, "w1", requeue=rung.append,
                       capacity=Capacity(1, 81559, "worker_gpus")) == JobOutcome(wide, "skipped")
    assert job_rows.get_job(db, wide).status == "queued" and rung == []

    # A tenant at its limit (max_running 1 here): its next job is not claimed, nor rung for, while one runs.
    running, waiting = new_job(db), new_job(db)
    assert job_rows.claim_job(db, running, "other", 30) is not None
    assert execute_job(db, settings, waiting, "w1", requeue=rung.append,
                       capacity=Capacity(0, None, "none")) == JobOutcome(waiting, "skipped")
    job_rows.finish_job(db, running, "other", "succeeded")
    # The doorbell names the best eligible job for any worker (the 4-GPU one here); whoever takes it claims the
    # best it may run itself.
    assert job_rows.next_eligible_job(db, settings.tenant_max_running) == wide
    assert execute_job(db, settings, wide, "w1", capacity=Capacity(0, None, "none")).job_id == waiting
