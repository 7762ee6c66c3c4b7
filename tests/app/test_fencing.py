"""Every write of a running attempt is fenced by its attempt (issue 9, item 4), and a cancelled job ends
cancelled (item 5), on both backends. The fault suite (tests/faults) shows the same with real paused processes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app.db import events as job_log
from app.db import jobs as job_rows
from app.db.engine import Database
from app.db.events import EventWrite, MetricsWrite, ProgressWrite, StaleAttempt
from app.db.models import Job, utcnow


def _running(db: Database, worker: str = "w1", lease: float = 60, max_attempts: int = 3) -> Job:
    job, _ = job_rows.create_job(db, tenant="acme", spec={"student": {"model": "s"}}, name=None, metadata={},
                             idempotency_key=None, request_hash="h", max_attempts=max_attempts)
    claimed = job_rows.claim_job(db, job.id, worker, lease_seconds=lease)
    assert claimed is not None
    return claimed


def _take_over(db: Database, job_id: str, worker: str = "w2") -> Job:
    """The reaper requeues the job after its lease ran out, and another worker claims attempt 2."""
    assert job_rows.reap_stale_jobs(db, now=utcnow() + timedelta(hours=1)) == [job_id]
    claimed = job_rows.claim_job(db, job_id, worker, lease_seconds=60)
    assert claimed is not None
    return claimed


def test_a_stale_attempt_writes_nothing(db: Database):
    job = _running(db)
    job_log.add_event(db, job.id, "stage_started", "prepare started", attempt=1)
    job_log.add_metrics(db, job.id, "distill", 1, {"loss": 0.7}, attempt=1)
    second = _take_over(db, job.id)
    assert second.attempt == 2

    with pytest.raises(StaleAttempt):
        job_log.add_event(db, job.id, "checkpoint_saved", "late", attempt=1)
    with pytest.raises(StaleAttempt):
        job_log.add_metrics(db, job.id, "distill", 2, {"loss": 0.6}, attempt=1)
    with pytest.raises(StaleAttempt):
        job_log.update_progress(db, job.id, stage="distill", step=9, total=10, eta_seconds=1.0, attempt=1)
    with pytest.raises(StaleAttempt):
        job_log.record_attempt_writes(db, job.id, 1, [EventWrite("stage_finished", "late"), MetricsWrite((("distill", 3, "loss", 0.5),))])
    assert not job_rows.heartbeat(db, job.id, "w1", 60, attempt=1)
    assert job_rows.finish_job(db, job.id, "w1", "succeeded", attempt=1) is None
    assert job_rows.release_job(db, job.id, "w1", 1, "SIGTERM") is None

    events, _ = job_log.list_events(db, job.id, limit=100)
    assert [(e.type, e.attempt) for e in events if e.attempt == 1] == [("job_started", 1), ("stage_started", 1)]
    assert job_log.metric_series(db, job.id) == {"loss": [("distill", 1, 0.7)]}
    assert job_rows.get_job(db, job.id).progress_step is None  # the stale progress never landed
    # The current attempt writes as usual.
    job_log.record_attempt_writes(db, job.id, 2, [ProgressWrite("distill", 2, 10, 5.0), EventWrite("checkpoint_saved", "ok"),
                                               MetricsWrite((("distill", 2, "loss", 0.6),))])
    assert job_rows.get_job(db, job.id).progress_step == 2
    assert job_rows.finish_job(db, job.id, "w2", "succeeded", attempt=2) == "succeeded"


def test_the_same_worker_id_cannot_write_for_an_older_attempt(db: Database):
    """After a takeover by the same host:pid (a recycled pid), the attempt number alone still fences."""
    job = _running(db, worker="w1")
    _take_over(db, job.id, worker="w1")
    with pytest.raises(StaleAttempt):
        job_log.add_event(db, job.id, "checkpoint_saved", "late", attempt=1)
    assert not job_rows.heartbeat(db, job.id, "w1", 60, attempt=1)
    assert job_rows.heartbeat(db, job.id, "w1", 60, attempt=2)
    assert job_rows.holds(db, job.id, "w1", 2) and not job_rows.holds(db, job.id, "w1", 1)


def test_an_expired_lease_is_never_renewed(db: Database):
    """A process paused past its lease learns it lost the job even before the reaper has run."""
    job = _running(db, lease=60)
    with db.write() as session:
        session.execute(update(Job).where(Job.id == job.id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert not job_rows.heartbeat(db, job.id, "w1", 60, attempt=1)


def test_an_all_or_nothing_flush(db: Database):
    """A buffered flush is one transaction: a bad write in it leaves none of the others."""
    job = _running(db)
    with pytest.raises(ValueError):
        job_log.record_attempt_writes(db, job.id, 1, [MetricsWrite((("distill", 1, "loss", 0.7),)),
                                                   EventWrite("x", "bad level", level="loud")])
    assert job_log.metric_series(db, job.id) == {}


@pytest.mark.parametrize("reported", ["succeeded", "failed", "cancelled"])
def test_a_cancelled_job_ends_cancelled_whatever_the_attempt_reports(db: Database, reported: str):
    job = _running(db)
    job_rows.request_cancel(db, job.id, "acme")
    recorded = job_rows.finish_job(db, job.id, "w1", reported, attempt=1, export_dir="/x", error_code="internal_error",
                               error_kind="system", error_message="boom")
    assert recorded == "cancelled"
    row = job_rows.get_job(db, job.id)
    assert row.status == "cancelled" and row.export_dir is None and row.error_code is None
    last = job_log.list_events(db, job.id, limit=100)[0][-1]
    assert last.type == "job_cancelled" and last.data["status"] == "cancelled"
    assert last.data.get("reported", "cancelled") == reported


def test_a_hand_back_requeues_without_consuming_an_attempt(db: Database):
    job = _running(db, max_attempts=1)
    assert job_rows.release_job(db, job.id, "w1", 1, "SIGTERM") == "queued"
    row = job_rows.get_job(db, job.id)
    assert (row.status, row.attempt, row.handoffs, row.worker_id, row.lease_expires_at) == ("queued", 1, 1, None, None)
    assert [s for s, _ in job_log.job_transitions(db, [job.id])[job.id]] == ["queued", "running", "queued"]
    # max_attempts=1 and one attempt already ran, but it was handed back: the next one still gets its chance.
    again = job_rows.claim_job(db, job.id, "w2", lease_seconds=60)
    assert again is not None and again.attempt == 2
    assert job_rows.reap_stale_jobs(db, now=utcnow() + timedelta(hours=1)) == []  # now a real failure: no attempts left
    assert job_rows.get_job(db, job.id).status == "failed"


def test_a_hand_back_while_cancelling_ends_cancelled(db: Database):
    job = _running(db)
    job_rows.request_cancel(db, job.id, "acme")
    assert job_rows.release_job(db, job.id, "w1", 1, "SIGTERM") == "cancelled"
    assert job_rows.get_job(db, job.id).status == "cancelled"
