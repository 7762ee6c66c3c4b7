"""Every write of a running attempt is fenced by its attempt (issue 9, item 4), and a cancelled job ends
cancelled (item 5), on both backends. The fault suite (tests/faults) shows the same with real paused processes."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.db import repository as repo
from app.db.models import utcnow
from app.db.repository import Database, EventWrite, MetricsWrite, ProgressWrite, StaleAttempt


def _running(db: Database, worker: str = "w1", lease: float = 60, max_attempts: int = 3) -> repo.JobRow:
    job, _ = repo.create_job(db, tenant="acme", spec={"student": {"model": "s"}}, name=None, metadata={},
                             idempotency_key=None, request_hash="h", max_attempts=max_attempts)
    claimed = repo.claim_job(db, job.id, worker, lease_seconds=lease)
    assert claimed is not None
    return claimed


def _take_over(db: Database, job_id: str, worker: str = "w2") -> repo.JobRow:
    """The reaper requeues the job after its lease ran out, and another worker claims attempt 2."""
    assert repo.reap_stale_jobs(db, now=utcnow() + timedelta(hours=1)) == [job_id]
    claimed = repo.claim_job(db, job_id, worker, lease_seconds=60)
    assert claimed is not None
    return claimed


def test_a_stale_attempt_writes_nothing(db: Database):
    job = _running(db)
    repo.add_event(db, job.id, "stage_started", "prepare started", attempt=1)
    repo.add_metrics(db, job.id, "distill", 1, {"loss": 0.7}, attempt=1)
    second = _take_over(db, job.id)
    assert second.attempt == 2

    with pytest.raises(StaleAttempt):
        repo.add_event(db, job.id, "checkpoint_saved", "late", attempt=1)
    with pytest.raises(StaleAttempt):
        repo.add_metrics(db, job.id, "distill", 2, {"loss": 0.6}, attempt=1)
    with pytest.raises(StaleAttempt):
        repo.update_progress(db, job.id, stage="distill", step=9, total=10, eta_seconds=1.0, attempt=1)
    with pytest.raises(StaleAttempt):
        repo.record_attempt_writes(db, job.id, 1, [EventWrite("stage_finished", "late"), MetricsWrite((("distill", 3, "loss", 0.5),))])
    assert not repo.heartbeat(db, job.id, "w1", 60, attempt=1)
    assert repo.finish_job(db, job.id, "w1", "succeeded", attempt=1) is None
    assert repo.release_job(db, job.id, "w1", 1, "SIGTERM") is None

    events, _ = repo.list_events(db, job.id, limit=100)
    assert [(e.type, e.attempt) for e in events if e.attempt == 1] == [("job_started", 1), ("stage_started", 1)]
    assert repo.metric_series(db, job.id) == {"loss": [("distill", 1, 0.7)]}
    assert repo.get_job(db, job.id).progress_step is None  # the stale progress never landed
    # The current attempt writes as usual.
    repo.record_attempt_writes(db, job.id, 2, [ProgressWrite("distill", 2, 10, 5.0), EventWrite("checkpoint_saved", "ok"),
                                               MetricsWrite((("distill", 2, "loss", 0.6),))])
    assert repo.get_job(db, job.id).progress_step == 2
    assert repo.finish_job(db, job.id, "w2", "succeeded", attempt=2) == "succeeded"


def test_the_same_worker_id_cannot_write_for_an_older_attempt(db: Database):
    """After a takeover by the same host:pid (a recycled pid), the attempt number alone still fences."""
    job = _running(db, worker="w1")
    _take_over(db, job.id, worker="w1")
    with pytest.raises(StaleAttempt):
        repo.add_event(db, job.id, "checkpoint_saved", "late", attempt=1)
    assert not repo.heartbeat(db, job.id, "w1", 60, attempt=1)
    assert repo.heartbeat(db, job.id, "w1", 60, attempt=2)
    assert repo.holds(db, job.id, "w1", 2) and not repo.holds(db, job.id, "w1", 1)


def test_an_expired_lease_is_never_renewed(db: Database):
    """A process paused past its lease learns it lost the job even before the reaper has run."""
    job = _running(db, lease=60)
    with db.write() as session:
        session.execute(repo.update(repo.Job).where(repo.Job.id == job.id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert not repo.heartbeat(db, job.id, "w1", 60, attempt=1)


def test_an_all_or_nothing_flush(db: Database):
    """A buffered flush is one transaction: a bad write in it leaves none of the others."""
    job = _running(db)
    with pytest.raises(ValueError):
        repo.record_attempt_writes(db, job.id, 1, [MetricsWrite((("distill", 1, "loss", 0.7),)),
                                                   EventWrite("x", "bad level", level="loud")])
    assert repo.metric_series(db, job.id) == {}


@pytest.mark.parametrize("reported", ["succeeded", "failed", "cancelled"])
def test_a_cancelled_job_ends_cancelled_whatever_the_attempt_reports(db: Database, reported: str):
    job = _running(db)
    repo.request_cancel(db, job.id, "acme")
    recorded = repo.finish_job(db, job.id, "w1", reported, attempt=1, export_dir="/x", error_code="internal_error",
                               error_kind="system", error_message="boom")
    assert recorded == "cancelled"
    row = repo.get_job(db, job.id)
    assert row.status == "cancelled" and row.export_dir is None and row.error_code is None
    last = repo.list_events(db, job.id, limit=100)[0][-1]
    assert last.type == "job_cancelled" and last.data["status"] == "cancelled"
    assert last.data.get("reported", "cancelled") == reported


def test_a_hand_back_requeues_without_consuming_an_attempt(db: Database):
    job = _running(db, max_attempts=1)
    assert repo.release_job(db, job.id, "w1", 1, "SIGTERM") == "queued"
    row = repo.get_job(db, job.id)
    assert (row.status, row.attempt, row.handoffs, row.worker_id, row.lease_expires_at) == ("queued", 1, 1, None, None)
    assert [s for s, _ in repo.job_transitions(db, [job.id])[job.id]] == ["queued", "running", "queued"]
    # max_attempts=1 and one attempt already ran, but it was handed back: the next one still gets its chance.
    again = repo.claim_job(db, job.id, "w2", lease_seconds=60)
    assert again is not None and again.attempt == 2
    assert repo.reap_stale_jobs(db, now=utcnow() + timedelta(hours=1)) == []  # now a real failure: no attempts left
    assert repo.get_job(db, job.id).status == "failed"


def test_a_hand_back_while_cancelling_ends_cancelled(db: Database):
    job = _running(db)
    repo.request_cancel(db, job.id, "acme")
    assert repo.release_job(db, job.id, "w1", 1, "SIGTERM") == "cancelled"
    assert repo.get_job(db, job.id).status == "cancelled"
