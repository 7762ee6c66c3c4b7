"""Scheduling in SQL (docs/service-contract.md, "Scheduling"), on SQLite and the real PostgreSQL: the claim's order
(priority, then oldest), per-tenant max_running under concurrent claims, GPU placement, max_queued at submission
(a 429 with nothing stored), the queue position and its reason, and the admin-only limits API."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime

import pytest
from sqlalchemy import delete, func, select

from app.db import auth as key_rows
from app.db import jobs as job_rows
from app.db import tenants as tenant_rows
from app.db import workers as worker_rows
from app.db.engine import Database
from app.db.models import PRIORITY_RANKS, Job, JobEvent, TenantLimits, Worker
from tests.app.conftest import SPEC

DEFAULT_RUNNING = 4


@pytest.fixture(autouse=True)
def _no_workers_or_limits(db: Database):
    """The session's PostgreSQL database is truncated per test without these two tables (tests/app/conftest.py):
    emptied before and after each test here, so no other test sees a worker or a limit of these."""
    def empty() -> None:
        with db.write() as session:
            session.execute(delete(Worker))
            session.execute(delete(TenantLimits))

    empty()
    yield
    empty()


def queue_job(db: Database, tenant: str = "acme", priority: str = "normal", gpus: int = 1,
              default_max_queued: int | None = None) -> str:
    job, _ = job_rows.create_job(db, tenant=tenant, spec={"student": {"model": "s"}}, name=None, metadata={},
                                 idempotency_key=None, request_hash="h", max_attempts=3,
                                 priority=PRIORITY_RANKS[priority], gpus_required=gpus,
                                 default_max_queued=default_max_queued)
    return job.id


def claim(db: Database, worker: str = "w1", devices: int = 1, default_running: int = DEFAULT_RUNNING):
    return job_rows.claim_next_job(db, worker, 60, devices=devices, default_max_running=default_running)


def set_running_limit(db: Database, tenant: str, max_running: int) -> None:
    tenant_rows.set_limits(db, tenant, max_running, None, DEFAULT_RUNNING, 100)


# --------------------------------------------------------------------------------------------- the claim


def test_the_claim_takes_the_highest_priority_then_the_oldest(db: Database):
    low = queue_job(db, priority="low")
    normal_old = queue_job(db, tenant="globex")
    high = queue_job(db, priority="high")
    normal_new = queue_job(db)
    hinted = claim(db)  # whatever the doorbell named
    assert hinted is not None and hinted.id == high
    order = [claim(db).id for _ in range(3)]
    assert order == [normal_old, normal_new, low]
    assert claim(db) is None  # nothing queued: the doorbell does nothing


def test_the_doorbells_job_is_only_a_hint(db: Database):
    older, newer = queue_job(db), queue_job(db)
    claimed = job_rows.claim_next_job(db, "w1", 60, devices=1, default_max_running=DEFAULT_RUNNING, hint=newer)
    assert claimed.id == older
    started = [event for event in _events(db, older) if event.type == "job_started"]
    assert f"for the doorbell of {newer}" in started[0].message


def test_a_tenant_at_its_limit_is_passed_over_not_blocking_others(db: Database):
    set_running_limit(db, "acme", 2)
    acme = [queue_job(db) for _ in range(4)]
    globex = queue_job(db, tenant="globex")
    assert [claim(db).id for _ in range(3)] == [acme[0], acme[1], globex]
    assert claim(db) is None  # acme runs 2 of its 2
    job_rows.finish_job(db, acme[0], "w1", "succeeded")
    assert claim(db).id == acme[2]  # a slot freed: the next oldest of acme


def test_cancelling_jobs_count_against_the_limit(db: Database):
    set_running_limit(db, "acme", 1)
    first, second = queue_job(db), queue_job(db)
    assert claim(db).id == first
    job_rows.request_cancel(db, first, "acme")  # cancelling: its worker still holds it
    assert claim(db) is None
    job_rows.finish_job(db, first, "w1", "cancelled")
    assert claim(db).id == second


def test_a_job_is_claimed_only_by_a_worker_with_its_gpus(db: Database):
    wide = queue_job(db, gpus=4)
    narrow = queue_job(db)
    assert claim(db, devices=1).id == narrow  # the older 4-GPU job is not for a 1-device worker
    assert claim(db, devices=1) is None
    assert claim(db, "big", devices=2) is None
    claimed = claim(db, "big", devices=8)
    assert claimed.id == wide and claimed.worker_id == "big"


@pytest.mark.parametrize("claimers", [12])
def test_concurrent_claims_never_exceed_a_limit_nor_claim_a_job_twice(settings, claimers: int):
    """Many workers (threads, each with its own connections) claim, run a moment and finish jobs of three tenants
    at once; the event history shows no tenant above its limit at any moment and each job started once."""
    limits = {"t1": 1, "t2": 2, "t3": 3}
    setup = Database(settings.database_url)
    for tenant, limit in limits.items():
        set_running_limit(setup, tenant, limit)
    job_ids = [queue_job(setup, tenant=tenant) for _ in range(8) for tenant in limits]
    barrier = threading.Barrier(claimers)
    claimed: list[str] = []
    first_wave: list[int] = []
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        db = Database(settings.database_url)
        try:
            # First wave: every worker claims at the same moment, and nothing ends until all have: 12 claims
            # for 24 jobs leave each tenant running exactly its limit (1 + 2 + 3), and the others empty-handed.
            barrier.wait()
            job = job_rows.claim_next_job(db, f"w{index}", 60, devices=1, default_max_running=DEFAULT_RUNNING)
            barrier.wait()
            if index == 0:
                with db.read() as session:
                    first_wave.extend(tenant_rows.job_counts(session).get(tenant, (0, 0))[0] for tenant in limits)
            barrier.wait()
            if job is not None:
                claimed.append(job.id)
                assert job_rows.finish_job(db, job.id, f"w{index}", "succeeded", attempt=job.attempt) == "succeeded"
            # Then claim, run a moment and finish until the queue is empty.
            while True:
                job = job_rows.claim_next_job(db, f"w{index}", 60, devices=1, default_max_running=DEFAULT_RUNNING)
                if job is None:
                    with db.read() as session:
                        if not session.scalar(select(func.count()).where(Job.status == "queued")):
                            return
                    threading.Event().wait(0.01)
                    continue
                claimed.append(job.id)
                threading.Event().wait(0.005)
                assert job_rows.finish_job(db, job.id, f"w{index}", "succeeded", attempt=job.attempt) == "succeeded"
        except BaseException as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)
        finally:
            db.dispose()

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(claimed) == sorted(job_ids)  # every job once, none twice
    with setup.read() as session:
        events = list(session.scalars(select(JobEvent).where(JobEvent.type.in_(["job_started", "job_succeeded"]))
                                      .order_by(JobEvent.id)))
        tenant_of = {job_id: tenant for job_id, tenant in session.execute(select(Job.id, Job.tenant))}
    assert Counter(event.job_id for event in events if event.type == "job_started") == Counter(job_ids)
    peaks = _peak_concurrency(events, tenant_of)
    assert first_wave == [1, 2, 3]
    assert all(peaks[tenant] <= limit for tenant, limit in limits.items()), peaks
    setup.dispose()


def _peak_concurrency(events: list[JobEvent], tenant_of: dict[str, str]) -> dict[str, int]:
    """The most jobs of each tenant between job_started and job_succeeded at once (an end sorts before a start at
    the same instant: the claim that took a freed slot counted after the finish committed)."""
    points: list[tuple[datetime, int, str]] = [
        (event.created_at, 1 if event.type == "job_started" else -1, tenant_of[event.job_id]) for event in events]
    running: Counter[str] = Counter()
    peaks: Counter[str] = Counter()
    for _, step, tenant in sorted(points, key=lambda point: (point[0], point[1])):
        running[tenant] += step
        peaks[tenant] = max(peaks[tenant], running[tenant])
    return dict(peaks)


def _events(db: Database, job_id: str) -> list[JobEvent]:
    with db.read() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


# ----------------------------------------------------------------------------------------- max_queued


def test_a_full_queue_refuses_the_submission_and_stores_nothing(alice, admin, db: Database, settings):
    response = admin.put("/v1/tenants/acme/limits", json={"max_running": None, "max_queued": 2})
    assert response.status_code == 200, response.text
    assert [alice.post("/v1/jobs", json=SPEC).status_code for _ in range(2)] == [201, 201]
    refused = alice.post("/v1/jobs", json={**SPEC, "name": "third"})
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "queue_full"
    assert "max_queued 2" in error["message"] and "PUT /v1/tenants/acme/limits" in error["message"]
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 2
        assert session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.type == "job_created")) == 2
    # Another tenant has its own queue; a job that starts makes room.
    job_rows.claim_job(db, alice.get("/v1/jobs").json()["data"][-1]["id"], "w1", 60)
    assert alice.post("/v1/jobs", json={**SPEC, "name": "third"}).status_code == 201


def test_concurrent_submissions_never_overshoot_max_queued(settings):
    setup = Database(settings.database_url)
    tenant_rows.set_limits(setup, "acme", None, 5, DEFAULT_RUNNING, 100)
    barrier = threading.Barrier(10)
    outcomes: list[str] = []

    def submit() -> None:
        db = Database(settings.database_url)
        try:
            barrier.wait()
            for _ in range(2):
                try:
                    queue_job(db, default_max_queued=100)
                    outcomes.append("stored")
                except job_rows.QueueFull:
                    outcomes.append("full")
        finally:
            db.dispose()

    threads = [threading.Thread(target=submit) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert Counter(outcomes) == {"stored": 5, "full": 15}
    with setup.read() as session:
        assert session.scalar(select(func.count()).where(Job.tenant == "acme", Job.status == "queued")) == 5
    setup.dispose()


# ------------------------------------------------------------------------------------ the queue's view


def test_a_queued_job_says_where_it_stands_and_why(alice, bob, admin, db: Database):
    def queue_of(job_id: str, client=alice) -> dict:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()["queue"]

    first = alice.post("/v1/jobs", json=SPEC).json()
    assert first["queue"]["position"] == 1 and first["queue"]["reason"] == "waiting_for_worker"
    assert "no worker is running" in first["queue"]["detail"]

    worker_rows.register_worker(db, "train1@host", "host", 1, 81_559)
    assert queue_of(first["id"])["reason"] == "waiting_for_worker"  # next, waiting for a free worker
    assert "next to run" in queue_of(first["id"])["detail"]
    second = alice.post("/v1/jobs", json=SPEC).json()["id"]
    assert queue_of(second) == {"position": 2, "reason": "behind_older",
                                "detail": "1 older queued job(s) of the same priority go first"}
    urgent = bob.post("/v1/jobs", json={**SPEC, "priority": "high"}).json()["id"]
    assert queue_of(urgent, bob)["position"] == 1
    assert queue_of(second) == {"position": 3, "reason": "behind_higher_priority",
                                "detail": "1 queued job(s) of higher priority than normal go first"}

    wide = alice.post("/v1/jobs", json={**SPEC, "training": {"devices": 4, "batch_size": 8,
                                                             "micro_batch_size": 2}}).json()
    assert wide["spec"]["training"]["devices"] == 4
    assert queue_of(wide["id"])["reason"] == "no_worker_with_gpus"
    assert "needs 4 GPUs" in queue_of(wide["id"])["detail"] and "has 1" in queue_of(wide["id"])["detail"]
    assert claim(db, devices=1).id == urgent and claim(db, devices=1).id == first["id"]  # never the 4-GPU job

    admin.put("/v1/tenants/acme/limits", json={"max_running": 1, "max_queued": None})
    assert queue_of(second) == {"position": 1, "reason": "tenant_limit",
                                "detail": "tenant acme runs 1 of its 1 jobs (max_running); the job starts when "
                                          "one of them ends"}
    listed = {job["id"]: job["queue"] for job in alice.get("/v1/jobs").json()["data"]}
    assert listed[second]["reason"] == "tenant_limit" and listed[first["id"]] is None  # running: no queue

    worker_rows.remove_worker(db, "train1@host")
    assert queue_of(second)["reason"] == "waiting_for_worker"


def test_a_stale_worker_does_not_count(db: Database):
    from datetime import timedelta

    from app.db.models import utcnow

    worker_rows.register_worker(db, "gone@host", "host", 8, None,
                                now=utcnow() - timedelta(seconds=worker_rows.STALE_SECONDS + 1))
    assert worker_rows.live_workers(db).count == 0
    worker_rows.register_worker(db, "cpu@host", "host", 0, None)
    live = worker_rows.live_workers(db)
    assert (live.count, live.max_gpus, live.max_devices) == (1, 0, 1)  # a CPU host runs 1-device jobs


# -------------------------------------------------------------------------------------- the limits API


def test_the_limits_api_is_for_admins_only(alice, admin, db: Database, settings):
    assert alice.get("/v1/tenants/acme/limits").status_code == 403
    refused = alice.put("/v1/tenants/acme/limits", json={"max_running": 50, "max_queued": None})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"

    missing = admin.get("/v1/tenants/acmee/limits")
    assert missing.status_code == 404 and "ctpd keys create --tenant acmee" in missing.json()["error"]["message"]
    assert admin.put("/v1/tenants/acmee/limits", json={"max_running": 1, "max_queued": None}).status_code == 404
    key_rows.create_api_key(db, "globex", "globex key")
    defaults = admin.get("/v1/tenants/globex/limits").json()
    assert defaults == {"object": "tenant.limits", "tenant": "globex", "max_running": settings.tenant_max_running,
                        "max_queued": settings.tenant_max_queued, "max_running_override": None,
                        "max_queued_override": None, "running": 0, "queued": 0}
    alice.post("/v1/jobs", json=SPEC)
    changed = admin.put("/v1/tenants/acme/limits", json={"max_running": 2, "max_queued": 7}).json()
    assert (changed["max_running"], changed["max_queued"], changed["queued"]) == (2, 7, 1)
    reset = admin.put("/v1/tenants/acme/limits", json={"max_running": None, "max_queued": 7}).json()
    assert (reset["max_running"], reset["max_running_override"]) == (settings.tenant_max_running, None)
    bad = admin.put("/v1/tenants/acme/limits", json={"max_running": 0, "max_queued": None})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "max_running"
    assert admin.put("/v1/tenants/acme/limits", json={"max_running": 1}).status_code == 422  # both, always
