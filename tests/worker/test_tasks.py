"""The worker's pieces against a real (SQLite) database: the sinks, the heartbeat, the task body's claim and
error classification, and the reaper pass. The full path through Celery is in test_service_e2e.py."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import timedelta

import pytest

from app.db import events as job_log
from app.db import jobs as job_rows
from app.db.models import utcnow
from app.settings import Settings
from ctpd_core.train import Progress
from worker.sinks import DbObserver, DbStopSignal, Heartbeat, jsonable
from worker.tasks import JobOutcome, classify_error, execute_job, reap


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", lease_seconds=30, allow_server_paths=True)  # the embedded shape


def new_job(db, spec=None, tenant="acme") -> str:
    job, created = job_rows.create_job(
        db, tenant=tenant, spec=spec or {"method": "ctpd"}, name=None, metadata={}, idempotency_key=None,
        request_hash="h", max_attempts=3,
    )
    assert created
    return job.id


def events(db, job_id):
    rows, _ = job_log.list_events(db, job_id, limit=1000)
    return rows


def test_observer_records_stages_checkpoints_and_metrics(db):
    job_id = new_job(db)
    observer = DbObserver(db, job_id)
    observer.stage_started("distill", False)
    observer.metrics("distill", 1, {"loss": 0.5, "grad_norm": float("nan")})
    observer.checkpoint("distill", 1, "/runs/x/checkpoint-1")
    observer.stage_finished("distill", 1.25, False, {"steps": 1, "loss": float("inf"), "path": "/a"})

    rows = events(db, job_id)
    assert [row.type for row in rows] == ["job_created", "stage_started", "checkpoint_saved", "stage_finished"]
    assert rows[2].data == {"stage": "distill", "step": 1, "path": "/runs/x/checkpoint-1"}
    assert rows[2].stage == "distill"
    assert rows[3].data == {"seconds": 1.25, "cached": False, "summary": {"steps": 1, "loss": None, "path": "/a"}}
    assert job_log.metric_series(db, job_id) == {"loss": [("distill", 1, 0.5)]}  # NaN skipped


def test_progress_writes_at_most_once_per_second_per_stage(db):
    job_id = new_job(db)
    clock = FakeClock()
    observer = DbObserver(db, job_id, clock=clock)
    observer.stage_started("distill", False)
    assert job_rows.get_job(db, job_id).stage == "distill"

    observer.progress(Progress("distill", 1, 10, 9.0))  # first of the stage: written
    clock.now += 0.3
    observer.progress(Progress("distill", 2, 10, 8.0))  # throttled
    job = job_rows.get_job(db, job_id)
    assert (job.stage, job.progress_step, job.progress_total, job.eta_seconds) == ("distill", 1, 10, 9.0)
    clock.now += 0.3
    observer.progress(Progress("distill", 3, 10, 7.0))  # still throttled
    assert job_rows.get_job(db, job_id).progress_step == 1
    clock.now += 0.5
    observer.progress(Progress("distill", 4, 10, 6.0))  # 1.1 s after the last write: written
    assert job_rows.get_job(db, job_id).progress_step == 4
    clock.now += 0.1
    observer.progress(Progress("distill", 10, 10, 0.0))  # throttled, but the stage's end flushes it
    observer.stage_finished("distill", 2.0, False, {})
    job = job_rows.get_job(db, job_id)
    assert (job.progress_step, job.progress_total) == (10, 10)


def test_progress_names_the_sub_stage_in_its_own_column(db):
    """contrastive:positive is the contrastive stage counting π+'s steps: stage and detail apart, and a stage
    with one part clears the detail its predecessor left."""
    job_id = new_job(db)
    observer = DbObserver(db, job_id, progress_interval=0.0)
    observer.stage_started("contrastive", False)
    observer.progress(Progress("contrastive:positive", 3, 8, 5.0))
    job = job_rows.get_job(db, job_id)
    assert (job.stage, job.progress_detail, job.progress_step) == ("contrastive", "positive", 3)
    observer.progress(Progress("distill", 1, 4, None))
    job = job_rows.get_job(db, job_id)
    assert (job.stage, job.progress_detail) == ("distill", None)


def test_stop_signal_polls_at_most_once_per_second(db):
    job_id = new_job(db)
    assert job_rows.claim_job(db, job_id, "w1", 30) is not None
    clock = FakeClock()
    signal = DbStopSignal(db, job_id, clock=clock)
    assert signal.should_stop() is False
    job_rows.request_cancel(db, job_id, "acme")
    clock.now += 0.5
    assert signal.should_stop() is False  # the flag is read at most once a second
    clock.now += 0.6
    assert signal.should_stop() is True
    assert signal.should_stop() is True


def test_stop_signal_fires_when_the_lease_is_lost(db):
    import threading

    job_id = new_job(db)
    lost = threading.Event()
    signal = DbStopSignal(db, job_id, lease_lost=lost)
    assert signal.should_stop() is False
    lost.set()
    assert signal.should_stop() is True


def test_heartbeat_renews_the_lease_then_stops_when_it_is_lost(db):
    job_id = new_job(db)
    job_rows.claim_job(db, job_id, "w1", 0.4)
    first_lease = job_rows.get_job(db, job_id).lease_expires_at
    heartbeat = Heartbeat(db, job_id, "w1", 0.4).start()  # beats every 0.1 s
    try:
        deadline = time.monotonic() + 5
        while job_rows.get_job(db, job_id).lease_expires_at <= first_lease:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
        # The reaper takes the job away (as if this worker had missed its lease): the next beat notices.
        assert job_rows.reap_stale_jobs(db, now=utcnow() + timedelta(seconds=10)) == [job_id]
        assert heartbeat.lost.wait(timeout=5), "the heartbeat did not notice the lost lease"
    finally:
        heartbeat.stop()
    assert not heartbeat._thread.is_alive()


def test_a_duplicate_delivery_does_nothing(db, settings):
    job_id = new_job(db)
    job_rows.claim_job(db, job_id, "other-worker", 30)
    assert execute_job(db, settings, job_id, "w2") == JobOutcome(job_id, "skipped")
    job = job_rows.get_job(db, job_id)
    assert (job.status, job.worker_id, job.attempt) == ("running", "other-worker", 1)


def _spec(student, teacher, dataset: dict) -> dict:
    from ctpd_core.spec import JobSpec

    return JobSpec.model_validate(
        {"method": "ctpd", "student": {"model": str(student)}, "teacher": {"model": str(teacher)}, "dataset": dataset,
         "training": {"max_steps": 2}}
    ).model_dump(mode="json")


def test_user_errors_are_classified(db, settings, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, tmp_path):
    missing_dataset = new_job(db, _spec(tiny_student_folder, tiny_teacher_folder, {"id": "ds_nope"}))
    outcome = execute_job(db, settings, missing_dataset, "w1", device="cpu")
    assert outcome == JobOutcome(missing_dataset, "failed", "invalid_dataset")
    job = job_rows.get_job(db, missing_dataset)
    assert (job.status, job.error_kind, job.error_code) == ("failed", "user", "invalid_dataset")
    assert "ds_nope" in job.error_message and "POST /v1/datasets" in job.error_message
    assert job.lease_expires_at is None
    failed = [row for row in events(db, missing_dataset) if row.type == "job_failed"]
    assert failed and failed[0].data == {"status": "failed", "code": "invalid_dataset", "kind": "user"}

    missing_model = new_job(db, _spec(tmp_path / "no-such-model", tiny_teacher_folder, {"path": str(tiny_dataset_path)}))
    assert execute_job(db, settings, missing_model, "w1", device="cpu").error_code == "model_not_found"
    assert job_rows.get_job(db, missing_model).error_kind == "user"

    bad_spec = new_job(db, {"method": "ctpd", "student": {"model": "x"}})  # stored specs are resolved; not this one
    assert execute_job(db, settings, bad_spec, "w1", device="cpu").error_code == "invalid_spec"


def test_a_validation_id_is_only_ever_the_tenants_own_upload(db, settings, tiny_student_folder, tiny_teacher_folder,
                                                             tiny_dataset_path):
    """dataset.validation_id resolves like dataset.id: through the job's own tenant's datasets, so another
    tenant's upload is refused (the API refuses it at submission too) and never read."""
    from app.db import datasets as dataset_rows

    def upload(tenant: str) -> str:
        return dataset_rows.create_dataset(db, tenant=tenant, filename="pairs.jsonl", format="jsonl", num_rows=1,
                                           sha256="0" * 64, size_bytes=1, path=tiny_dataset_path).id

    mine, theirs = upload("acme"), upload("globex")
    job_id = new_job(db, _spec(tiny_student_folder, tiny_teacher_folder, {"id": mine, "validation_id": theirs}))
    assert execute_job(db, settings, job_id, "w1", device="cpu") == JobOutcome(job_id, "failed", "invalid_dataset")
    job = job_rows.get_job(db, job_id)
    assert theirs in job.error_message and "tenant 'acme'" in job.error_message and job.error_kind == "user"


def test_an_unexpected_error_is_a_system_error(db, tmp_path, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    settings = Settings(home=tmp_path / "home", artifact_root=blocked,  # the run folder cannot be created
                        allow_server_paths=True)
    job_id = new_job(db, _spec(tiny_student_folder, tiny_teacher_folder, {"path": str(tiny_dataset_path)}))
    assert execute_job(db, settings, job_id, "w1", device="cpu").error_code == "internal_error"
    job = job_rows.get_job(db, job_id)
    assert (job.status, job.error_kind) == ("failed", "system")
    assert job.error_message.startswith(("FileExistsError", "NotADirectoryError"))


def test_classify_error():
    from pydantic import BaseModel, ValidationError

    from ctpd_core.alignment import AlignmentError
    from ctpd_core.catalog import ModelLoadError
    from ctpd_core.data import DatasetError

    class Strict(BaseModel):
        x: int

    with pytest.raises(ValidationError) as validation:
        Strict.model_validate({"x": "no"})
    assert classify_error(DatasetError("bad rows")) == ("user", "invalid_dataset")
    assert classify_error(ModelLoadError("no model")) == ("user", "model_not_found")
    assert classify_error(validation.value) == ("user", "invalid_spec")
    assert classify_error(AlignmentError("offsets")) == ("user", "invalid_spec")
    assert classify_error(RuntimeError("CUDA out of memory")) == ("system", "internal_error")
    assert classify_error(KeyError("x")) == ("system", "internal_error")


class RecordingQueue:
    """A TaskQueue that remembers what it was asked to send (the reaper pass under test is pure SQL)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def enqueue_job(self, job_id: str) -> None:
        self.sent.append(job_id)

    def enqueue_reaper(self) -> None:
        pass


def test_reaper_requeues_expired_leases_and_unclaimed_jobs(db, settings):
    lost = new_job(db)
    job_rows.claim_job(db, lost, "dead-worker", 0.01)
    unclaimed = new_job(db)
    healthy = new_job(db)
    job_rows.claim_job(db, healthy, "live-worker", 300)
    time.sleep(0.05)
    queue = RecordingQueue()
    fast = settings.model_copy(update={"requeue_after_seconds": 0})
    assert sorted(reap(db, fast, queue)) == sorted([lost, unclaimed])
    assert sorted(queue.sent) == sorted([lost, unclaimed])
    assert job_rows.get_job(db, lost).status == "queued"
    assert job_rows.get_job(db, healthy).status == "running"
    assert any(row.type == "job_restarted" for row in events(db, lost))


def test_jsonable():
    import numpy as np

    assert jsonable({"a": np.float32(1.5), "b": [float("nan"), 2], "c": (1, "x"), 3: None}) == {
        "a": 1.5, "b": [None, 2], "c": [1, "x"], "3": None
    }
    assert json.dumps(jsonable({"p": os.path.sep, "inf": math.inf}))


def test_observer_only_reports_and_the_stop_signal_stops(db):
    """Reporting and stopping are separate (issue 10): progress of a cancelled job is still written and never
    raises; the stop signal is what says stop, and the core's loops ask it between batches (tests/ctpd_core)."""
    job_id = new_job(db)
    job_rows.claim_job(db, job_id, "w1", 30)
    observer, stop = DbObserver(db, job_id), DbStopSignal(db, job_id)
    observer.progress(Progress("reference", 64, 256, None))
    assert not stop.should_stop()  # no cancel yet
    job_rows.request_cancel(db, job_id, "acme")
    time.sleep(1.05)  # the stop signal reads the flag at most once a second
    observer.progress(Progress("evaluate", 4, 8, None))  # reporting never stops anything
    assert stop.should_stop() and stop.reason == "cancel"
    assert observer.close()
    job = job_rows.get_job(db, job_id)
    assert (job.stage, job.progress_step, job.progress_total) == ("evaluate", 4, 8)


def test_a_worker_that_is_shutting_down_passes_a_job_on_unclaimed(db, settings, monkeypatch):
    # A stopping worker still pulls the doorbell its own hand-back rang; starting an attempt there would be
    # killed with the worker and counted as a lost attempt (seen in tests/faults/test_embedded_up.py).
    import threading

    import worker.tasks as tasks

    draining = threading.Event()
    draining.set()
    monkeypatch.setattr(tasks, "_DRAINING", draining)
    job_id = new_job(db)
    rung: list[str] = []
    outcome = execute_job(db, settings, job_id, "w1", requeue=rung.append)
    assert outcome == JobOutcome(job_id, "passed_on") and rung == [job_id]
    job = job_rows.get_job(db, job_id)
    assert (job.status, job.attempt) == ("queued", 0)


def test_a_start_up_reap_counts_every_lease_as_lost_but_stamps_the_real_time(db, settings):
    # `ctpd up` at start: a job a dead previous run left "running" is requeued at once, and its event is not
    # dated a lease into the future (it was, and sorted after the events of the attempt that resumed it).
    left = new_job(db)
    job_rows.claim_job(db, left, "previous-run", settings.lease_seconds)
    before = utcnow()
    assert reap(db, settings, RecordingQueue(), leases_lost=True) == [left]
    job = job_rows.get_job(db, left)
    restarted = [row for row in events(db, left) if row.type == "job_restarted"]
    assert job.status == "queued" and len(restarted) == 1
    assert restarted[0].created_at.replace(tzinfo=None) <= utcnow().replace(tzinfo=None)
    assert job.updated_at.replace(tzinfo=None) >= before.replace(tzinfo=None)
