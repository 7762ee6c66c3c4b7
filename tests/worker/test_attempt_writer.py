"""The worker's writes while the database blinks (issue 9, item 7) and after its attempt went stale (item 4).

The outage here is injected at the repository call (the real one, with a private PostgreSQL stopped and
started mid-job, is in tests/faults); what this pins down is the writer's contract: nothing dropped, order
kept, bounded, and a stale attempt's writes refused as a whole."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.exc import OperationalError

from app.db import events as job_log
from app.db import jobs as job_rows
from app.db.models import utcnow
from ctpd_core.observe import Progress
from tests.worker.test_tasks import FakeClock
from worker.sinks import AttemptLease, AttemptWriter, DbObserver, DbStopSignal


@pytest.fixture
def settings(tmp_path):
    from app.settings import Settings

    return Settings(home=tmp_path / "home")


@pytest.fixture
def running(db):
    job, _ = job_rows.create_job(db, tenant="acme", spec={}, name=None, metadata={}, idempotency_key=None,
                                   request_hash="h", max_attempts=3)
    assert job_rows.claim_job(db, job.id, "w1", 60) is not None
    return job.id


def _outage(monkeypatch, calls: list[int]):
    real = job_log.record_attempt_writes

    def flaky(*args, **kwargs):
        calls.append(1)
        if outage["down"]:
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        return real(*args, **kwargs)

    outage = {"down": True}
    monkeypatch.setattr(job_log, "record_attempt_writes", flaky)
    return outage


def test_an_outage_loses_nothing_and_keeps_the_order(db, running, monkeypatch):
    calls: list[int] = []
    outage = _outage(monkeypatch, calls)
    clock = FakeClock()
    writer = AttemptWriter(AttemptLease(db, running, "w1", 1), clock=clock)
    observer = DbObserver(db, running, writer=writer, clock=clock)
    observer.stage_started("distill", False)
    for step in range(1, 6):
        clock.now += 0.3
        observer.metrics("distill", step, {"loss": 1.0 / step})
        observer.progress(Progress("distill", step, 5, 1.0))
        observer.checkpoint("distill", step, "/ckpt")
    assert job_log.metric_series(db, running) == {}  # nothing reached the database yet ...
    assert len(calls) < 15  # ... and the writer backed off instead of hammering it on every write
    outage["down"] = False
    assert observer.close(deadline_seconds=5)
    assert job_log.metric_series(db, running)["loss"] == [("distill", step, 1.0 / step) for step in range(1, 6)]
    events, _ = job_log.list_events(db, running, limit=100)
    checkpoints = [event.data["step"] for event in events if event.type == "checkpoint_saved"]
    assert checkpoints == [1, 2, 3, 4, 5] and all(event.attempt == 1 for event in events[1:])
    job = job_rows.get_job(db, running)
    assert (job.stage, job.progress_step) == ("distill", 5)


def test_an_outage_past_the_deadline_says_so(db, running, monkeypatch):
    _outage(monkeypatch, [])
    writer = AttemptWriter(AttemptLease(db, running, "w1", 1))
    writer.submit(job_log.EventWrite("stage_started", "x"))
    assert writer.close(deadline_seconds=0.3, sleep=lambda _: None) is False
    assert writer.pending  # kept, not dropped: the attempt is abandoned to the reaper instead of lying


def test_a_full_buffer_stops_the_run_cleanly(db, running, monkeypatch):
    _outage(monkeypatch, [])
    writer = AttemptWriter(AttemptLease(db, running, "w1", 1), max_pending=3)
    stop = DbStopSignal(db, running, writer=writer)
    for step in range(5):
        writer.submit(job_log.MetricsWrite((("distill", step, "loss", 0.5),)))
    assert writer.overflowed and stop.should_stop() and stop.reason == "storage"


def test_a_stale_attempt_is_refused_as_a_whole_and_stops(db, running):
    lease = AttemptLease(db, running, "w1", 1)
    writer = AttemptWriter(lease)
    assert job_rows.reap_stale_jobs(db, now=utcnow() + timedelta(hours=1)) == [running]
    assert job_rows.claim_job(db, running, "w2", 60).attempt == 2
    writer.submit(job_log.MetricsWrite((("distill", 7, "loss", 0.1),)))
    assert lease.lost.is_set() and not writer.pending
    assert DbStopSignal(db, running, lease_lost=lease.lost).reason == "lease_lost"
    assert job_log.metric_series(db, running) == {}
    assert lease.holds() is False  # and it may not publish a checkpoint or an export any more


def test_an_attempt_whose_lease_ran_out_by_its_own_clock_stops_and_publishes_nothing(db, running, monkeypatch):
    """A network partition: the database cannot be asked, but past its lease the attempt must assume the
    reaper gave the job away, so it stops and publishes no checkpoint (issue 9.4)."""
    from sqlalchemy.exc import OperationalError as DbDown

    clock = FakeClock()
    lease = AttemptLease(db, running, "w1", 1, lease_seconds=60, clock=clock, granted_at=clock.now)
    monkeypatch.setattr(job_rows, "holds", lambda *args: (_ for _ in ()).throw(DbDown("SELECT", {}, Exception())))
    clock.now += 30
    assert lease.holds() is True  # unreachable, but the lease it was granted still runs: nobody else has the job
    lease.renewed(clock.now)  # a heartbeat got through at t=30: valid until 90
    clock.now += 50
    assert not lease.is_lost()
    clock.now += 6  # within the margin of the end (5 s for a 60 s lease)
    assert lease.is_lost() and lease.holds() is False
    assert DbStopSignal(db, running, lease=lease).reason == "lease_lost"
    writer = AttemptWriter(lease)
    writer.submit(job_log.EventWrite("checkpoint_saved", "late"))
    assert writer.pending == []


def test_an_attempt_that_died_with_unflushed_writes_loses_no_metric_point(
    db, running, monkeypatch, tmp_path, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path
):
    """The outage outlasts attempt 1's lease: it trains and checkpoints, but none of its writes reach the
    database before it is given up. Attempt 2 resumes from the checkpoint and replays the steps before it, so
    the series is whole, each step once."""
    from tests.worker.test_recipe import context, tiny_spec
    from worker.recipe import run_spec

    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, weights={"source": "uniform"},
                     training={"max_steps": 6, "checkpoint_every": 1})
    outage = _outage(monkeypatch, [])

    class StopAtFourthCheckpoint:
        def should_stop(self) -> bool:
            return (tmp_path / "runs" / "job" / "distill" / "step-00000004").exists()

    first = DbObserver(db, running, writer=AttemptWriter(AttemptLease(db, running, "w1", 1)))
    assert run_spec(spec, context(tmp_path, "job", first, StopAtFourthCheckpoint())).status == "stopped"
    assert first.writer.pending  # ... and attempt 1 dies with them
    outage["down"] = False
    assert job_rows.reap_stale_jobs(db, now=utcnow() + timedelta(hours=1)) == [running]
    assert job_rows.claim_job(db, running, "w2", 60).attempt == 2

    second = DbObserver(db, running, writer=AttemptWriter(AttemptLease(db, running, "w2", 2)))
    assert run_spec(spec, context(tmp_path, "job", second)).status == "succeeded"
    assert second.close(5)
    losses = [(stage, step) for stage, step, _ in job_log.metric_series(db, running)["loss"]]
    assert [step for stage, step in losses if stage == "distill"] == [1, 2, 3, 4, 5, 6]


def test_only_unavailability_is_waited_out():
    """Bad data or a bug fails the same way every time: retrying it for a lease would only turn a clear error
    into worker_lost (review finding); a dropped connection is retried."""
    from sqlalchemy.exc import DataError

    from worker.tasks import _retrying

    calls: list[int] = []

    def bad_data():
        calls.append(1)
        raise DataError("INSERT", {}, Exception("text fields cannot contain NUL"))

    with pytest.raises(DataError):
        _retrying("the outcome", bad_data, deadline_seconds=30)
    assert calls == [1]

    def blinks():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT", {}, Exception("connection refused"))
        return "ok"

    assert _retrying("the outcome", blinks, deadline_seconds=30) == "ok"


def test_a_nul_in_a_message_is_stored_escaped(db, running):
    job_log.add_event(db, running, "stage_finished", "model_type 'x\x00'", data={"note": "a\x00b"}, attempt=1)
    last = job_log.list_events(db, running, limit=100)[0][-1]
    assert "\x00" not in last.message and last.data == {"note": "a\\x00b"}
