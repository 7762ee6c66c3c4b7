"""The repository's state machine on both backends: CAS claim, heartbeat, finish, reaper, requeue."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from app.db import auth as key_rows
from app.db import events as job_log
from app.db import jobs as job_rows
from app.db.engine import Database
from app.db.models import Job, utcnow


def _job(db: Database, tenant: str = "acme", *, max_attempts: int = 3, key: str | None = None,
         request_hash: str = "h", metadata: dict | None = None) -> Job:
    job, created = job_rows.create_job(
        db, tenant=tenant, spec={"student": {"model": "s"}}, name=None, metadata=metadata or {},
        idempotency_key=key, request_hash=request_hash, max_attempts=max_attempts,
    )
    assert created
    return job


def _types(db: Database, job_id: str) -> list[str]:
    return [event.type for event in job_log.list_events(db, job_id, limit=1000)[0]]


def _statuses(db: Database, job_id: str) -> list[str]:
    return [status for status, _ in job_log.job_transitions(db, [job_id])[job_id]]


def test_claim_is_a_compare_and_set(db: Database):
    job = _job(db)
    claimed = job_rows.claim_job(db, job.id, "worker-1", lease_seconds=60)
    assert claimed is not None and claimed.status == "running" and claimed.attempt == 1
    assert claimed.worker_id == "worker-1" and claimed.started_at is not None
    assert claimed.lease_expires_at > utcnow() + timedelta(seconds=50)
    assert job_rows.claim_job(db, job.id, "worker-2", lease_seconds=60) is None  # a duplicate delivery does nothing
    assert job_rows.get_job(db, job.id).worker_id == "worker-1"
    assert _types(db, job.id) == ["job_created", "job_started"]


def test_concurrent_claims_have_one_winner(db: Database):
    job = _job(db)
    barrier = threading.Barrier(6)
    results: list[object] = []

    def claim(worker: str) -> None:
        barrier.wait()
        results.append(job_rows.claim_job(db, job.id, worker, lease_seconds=60))

    threads = [threading.Thread(target=claim, args=(f"worker-{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [row for row in results if row is not None]
    assert len(results) == 6 and len(winners) == 1
    assert job_rows.get_job(db, job.id).attempt == 1
    assert _types(db, job.id).count("job_started") == 1


def test_heartbeat_renews_only_the_holders_lease(db: Database):
    job = _job(db)
    first = job_rows.claim_job(db, job.id, "worker-1", lease_seconds=10)
    assert job_rows.heartbeat(db, job.id, "worker-1", lease_seconds=600)
    assert job_rows.get_job(db, job.id).lease_expires_at > first.lease_expires_at + timedelta(seconds=500)
    assert not job_rows.heartbeat(db, job.id, "worker-2", lease_seconds=600)
    assert job_rows.finish_job(db, job.id, "worker-1", "succeeded", export_dir="/x")
    assert not job_rows.heartbeat(db, job.id, "worker-1", lease_seconds=600)  # finished: nothing to hold


def test_finish_records_the_outcome_once(db: Database):
    job = _job(db)
    job_rows.claim_job(db, job.id, "worker-1", lease_seconds=60)
    assert not job_rows.finish_job(db, job.id, "worker-2", "succeeded")  # not the holder
    assert job_rows.finish_job(db, job.id, "worker-1", "failed", error_code="invalid_dataset",
                           error_message="row 3: chosen is empty", error_kind="user")
    row = job_rows.get_job(db, job.id)
    assert (row.status, row.error_code, row.error_kind, row.lease_expires_at) == ("failed", "invalid_dataset", "user", None)
    assert row.finished_at is not None
    assert not job_rows.finish_job(db, job.id, "worker-1", "succeeded")  # already finished
    assert _statuses(db, job.id) == ["queued", "running", "failed"]
    with pytest.raises(ValueError, match="succeeded, failed or cancelled"):
        job_rows.finish_job(db, job.id, "worker-1", "done")


def test_cancel_queued_is_immediate_and_running_waits_for_the_worker(db: Database):
    queued = _job(db)
    cancelled = job_rows.request_cancel(db, queued.id, "acme")
    assert cancelled.status == "cancelled" and cancelled.finished_at and cancelled.cancel_requested_at
    assert job_rows.claim_job(db, queued.id, "worker-1", 60) is None

    running = _job(db)
    job_rows.claim_job(db, running.id, "worker-1", 60)
    assert not job_rows.is_cancel_requested(db, running.id)
    assert job_rows.request_cancel(db, running.id, "acme").status == "cancelling"
    assert job_rows.is_cancel_requested(db, running.id)
    assert job_rows.request_cancel(db, running.id, "acme").status == "cancelling"  # asking twice changes nothing
    assert job_rows.heartbeat(db, running.id, "worker-1", 60)  # the worker keeps its lease while it checkpoints
    assert job_rows.finish_job(db, running.id, "worker-1", "cancelled")
    assert job_rows.get_job(db, running.id).status == "cancelled"
    assert _statuses(db, running.id) == ["queued", "running", "cancelling", "cancelled"]

    assert job_rows.request_cancel(db, running.id, "globex") is None  # another tenant's job
    done = _job(db)
    job_rows.claim_job(db, done.id, "worker-1", 60)
    job_rows.finish_job(db, done.id, "worker-1", "succeeded")
    with pytest.raises(job_rows.JobNotCancellable):
        job_rows.request_cancel(db, done.id, "acme")


def test_reaper_requeues_then_fails_with_worker_lost(db: Database):
    job = _job(db, max_attempts=2)
    job_rows.claim_job(db, job.id, "worker-1", lease_seconds=60)
    assert job_rows.reap_stale_jobs(db, utcnow()) == []  # the lease still runs

    assert job_rows.reap_stale_jobs(db, utcnow() + timedelta(seconds=120)) == [job.id]
    row = job_rows.get_job(db, job.id)
    assert (row.status, row.attempt, row.worker_id, row.lease_expires_at) == ("queued", 1, None, None)
    assert not job_rows.heartbeat(db, job.id, "worker-1", 60)  # the lost worker learns it lost the job
    restarted = [event for event in job_log.list_events(db, job.id)[0] if event.type == "job_restarted"]
    assert len(restarted) == 1 and restarted[0].level == "warning"

    again = job_rows.claim_job(db, job.id, "worker-2", lease_seconds=60)
    assert again.attempt == 2
    assert job_rows.reap_stale_jobs(db, utcnow() + timedelta(seconds=120)) == []  # no attempts left: failed
    row = job_rows.get_job(db, job.id)
    assert (row.status, row.error_code, row.error_kind) == ("failed", "worker_lost", "system")
    assert row.finished_at is not None
    assert _statuses(db, job.id) == ["queued", "running", "queued", "running", "failed"]
    assert job_rows.reap_stale_jobs(db, utcnow() + timedelta(seconds=120)) == []  # nothing left to reap


def test_reaper_finishes_a_lost_cancelling_job_as_cancelled(db: Database):
    job = _job(db)
    job_rows.claim_job(db, job.id, "worker-1", lease_seconds=60)
    job_rows.request_cancel(db, job.id, "acme")
    assert job_rows.reap_stale_jobs(db, utcnow() + timedelta(seconds=120)) == []
    row = job_rows.get_job(db, job.id)
    assert row.status == "cancelled" and row.finished_at is not None
    assert _statuses(db, job.id)[-1] == "cancelled"


def test_stale_queued_jobs_come_back_once_per_period(db: Database):
    job = _job(db)
    claimed = _job(db)
    job_rows.claim_job(db, claimed.id, "worker-1", 60)
    assert job_rows.stale_queued_jobs(db, 300) == []
    later = utcnow() + timedelta(seconds=301)
    assert job_rows.stale_queued_jobs(db, 300, now=later) == [job.id]
    assert job_rows.stale_queued_jobs(db, 300, now=later + timedelta(seconds=1)) == []  # just re-enqueued
    assert job_rows.stale_queued_jobs(db, 300, now=later + timedelta(seconds=302)) == [job.id]


def test_progress_events_and_metrics(db: Database):
    job = _job(db)
    job_rows.claim_job(db, job.id, "worker-1", 60)
    job_log.update_progress(db, job.id, stage="distill", step=3, total=10, eta_seconds=12.5)
    row = job_rows.get_job(db, job.id)
    assert (row.stage, row.progress_step, row.progress_total, row.eta_seconds) == ("distill", 3, 10, 12.5)

    job_log.add_event(db, job.id, "stage_started", "distill started", stage="distill", data={"cached": False})
    job_log.add_event(db, job.id, "job_succeeded", "not a real transition", data={"status": "succeeded"})
    assert _statuses(db, job.id) == ["queued", "running"]  # only the repository's own status changes count
    with pytest.raises(ValueError, match="level"):
        job_log.add_event(db, job.id, "x", "y", level="debug")

    job_log.add_metrics(db, job.id, "distill", 1, {"loss": 0.7, "bad": float("nan"), "inf": float("inf")})
    job_log.add_metrics(db, job.id, "distill", 2, {"loss": 0.6})
    job_log.add_metrics(db, job.id, "evaluate", 2, {"accuracy": 0.75})
    assert job_log.add_metric_points(db, job.id, [("distill", 3, "loss", 0.5), ("distill", 3, "margin", float("-inf"))]) == 1
    assert job_log.metric_series(db, job.id) == {
        "accuracy": [("evaluate", 2, 0.75)],
        "loss": [("distill", 1, 0.7), ("distill", 2, 0.6), ("distill", 3, 0.5)],
    }

    events, has_more = job_log.list_events(db, job.id, limit=2)
    assert has_more and [event.type for event in events] == ["job_created", "job_started"]
    rest, has_more = job_log.list_events(db, job.id, after=events[-1].id, limit=10)
    assert not has_more and [event.type for event in rest] == ["stage_started", "job_succeeded"]


def test_idempotency_in_the_repository(db: Database):
    job = _job(db, key="k1", request_hash="a")
    same, created = job_rows.create_job(db, tenant="acme", spec={}, name=None, metadata={}, idempotency_key="k1",
                                    request_hash="a", max_attempts=3)
    assert not created and same.id == job.id
    with pytest.raises(job_rows.IdempotencyConflict):
        job_rows.create_job(db, tenant="acme", spec={}, name=None, metadata={}, idempotency_key="k1",
                        request_hash="b", max_attempts=3)
    other, created = job_rows.create_job(db, tenant="globex", spec={}, name=None, metadata={}, idempotency_key="k1",
                                     request_hash="b", max_attempts=3)
    assert created and other.id != job.id  # keys are per tenant


def test_concurrent_requests_with_one_idempotency_key_make_one_job(db: Database):
    barrier = threading.Barrier(4)
    ids: list[str] = []

    def submit() -> None:
        barrier.wait()
        job, _ = job_rows.create_job(db, tenant="acme", spec={}, name=None, metadata={}, idempotency_key="same",
                                 request_hash="h", max_attempts=3)
        ids.append(job.id)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 4 and len(set(ids)) == 1


def test_api_keys_are_hashed_and_revocable(db: Database):
    key = key_rows.create_api_key(db, "acme", "ci", is_admin=True)
    assert key.startswith("ctpd_") and len(key) == 5 + 43
    (row,) = key_rows.list_api_keys(db, "acme")
    assert row.key_hash == key_rows.hash_api_key(key) and key not in (row.key_hash, row.prefix) and row.prefix == key[:8]
    assert key_rows.authenticate(db, key) == key_rows.Principal(tenant="acme", key_id=row.id, is_admin=True)
    assert key_rows.authenticate(db, key + "x") is None
    assert key_rows.revoke_api_key(db, row.id)
    assert key_rows.authenticate(db, key) is None
    with pytest.raises(ValueError, match="tenant"):
        key_rows.create_api_key(db, " ", "nobody")


def test_a_cancel_racing_a_claim_is_never_lost(db: Database):
    jobs = [_job(db) for _ in range(8)]
    claims: dict[str, object] = {}

    def claim(job_id: str, barrier: threading.Barrier) -> None:
        barrier.wait()
        claims[job_id] = job_rows.claim_job(db, job_id, "worker-1", 60)

    def cancel(job_id: str, barrier: threading.Barrier) -> None:
        barrier.wait()
        job_rows.request_cancel(db, job_id, "acme")

    for job in jobs:
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=claim, args=(job.id, barrier)),
                   threading.Thread(target=cancel, args=(job.id, barrier))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        status = job_rows.get_job(db, job.id).status
        assert status == ("cancelling" if claims[job.id] is not None else "cancelled"), (status, claims[job.id])
