"""The job rows (docs/service-contract.md, "Repository"): the only code that changes a job's status.

Both planes call these functions: the API (create, list, cancel) and the worker (claim, heartbeat, finish,
release, reap). Each function runs one short transaction and returns ORM rows that are safe to read after it
returns (``expire_on_commit=False``, no lazy relationships).

Status changes are compare-and-set ``UPDATE ... WHERE status = ...`` statements, so two workers, two
reapers or a worker and a cancel never both win. Each writes its event (:func:`app.db.events.new_event`,
``data["status"]`` = the new status) in the same transaction. The heartbeat, the finish and a hand-back are
fenced by the attempt (see :mod:`app.db.events`); a heartbeat renews only an unexpired lease: a process that
was paused past its lease has lost it even if nobody has taken the job yet.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, exists, func, literal, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import tenants as tenant_rows
from app.db import workers as worker_rows
from app.db.engine import Database, escape_nul, newest_first_page, updated_rows
from app.db.events import new_event
from app.db.models import PRIORITY_NAMES, Dataset, Job, UTCDateTime, utcnow
from app.db.workers import LiveWorkers
from ctpd_core.vocab import HELD_STATUSES, EventLevel, EventType, JobStatus

logger = logging.getLogger(__name__)

# PostgreSQL advisory locks, held to the end of their transaction (pg_advisory_xact_lock). SQLite needs none: every
# write transaction there is BEGIN IMMEDIATE, one writer at a time.
# One claim at a time per database: the claim counts a tenant's running jobs and then adds one, so two concurrent
# claims must not both count before either commits. A claim is one short transaction per job start: serialising
# them costs nothing next to the jobs themselves.
_CLAIM_LOCK_ID = 7_453_002
# One submission at a time per tenant (key: this class and hashtext(tenant)): the same count-then-insert for
# max_queued, without making one tenant's submissions wait for another's.
_SUBMIT_LOCK_CLASS = 7_453


class DatasetsGone(Exception):
    """Uploads the job names were deleted between the submission's check and its insert (nothing stored)."""

    def __init__(self, dataset_ids: Sequence[str]) -> None:
        self.dataset_ids = list(dataset_ids)
        super().__init__(f"datasets {', '.join(self.dataset_ids)} were deleted while the job was submitted")


class QueueFull(Exception):
    """The tenant already has ``max_queued`` queued jobs (the API's 429; nothing stored)."""

    def __init__(self, tenant: str, queued: int, max_queued: int) -> None:
        self.tenant, self.queued, self.max_queued = tenant, queued, max_queued
        super().__init__(
            f"tenant {tenant} has {queued} queued jobs, its limit (max_queued {max_queued}); wait for some to start, "
            f"cancel queued ones (POST /v1/jobs/{{id}}/cancel), or ask an admin to raise it "
            f"(PUT /v1/tenants/{tenant}/limits)")


class IdempotencyConflict(Exception):
    """The Idempotency-Key was already used with a different request body."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"the Idempotency-Key was already used for job {job_id} with a different request body")


class JobNotCancellable(Exception):
    """Cancel asked of a job that already succeeded or failed."""

    def __init__(self, job_id: str, status: str) -> None:
        self.job_id, self.status = job_id, status
        super().__init__(f"job {job_id} already {status}; only queued or running jobs can be cancelled")


# ---------------------------------------------------------------------------------- create, read, list


def create_job(
    db: Database,
    *,
    tenant: str,
    spec: dict[str, Any],
    name: str | None,
    metadata: Mapping[str, str],
    idempotency_key: str | None,
    request_hash: str,
    max_attempts: int,
    submitted_by_admin: bool = False,
    dataset_ids: Sequence[str] = (),
    priority: int = 1,
    gpus_required: int = 1,
    default_max_queued: int | None = None,
) -> tuple[Job, bool]:
    """A new ``queued`` job, or ``(existing, False)`` when the same key came with the same request hash.

    Raises :class:`IdempotencyConflict` when the key was used with another request hash, and
    :class:`DatasetsGone` when one of ``dataset_ids`` (the tenant's uploads the spec names) no longer exists.
    With ``default_max_queued`` (the settings' default; a tenant's override wins), :class:`QueueFull` when the
    tenant already has that many queued jobs: counted in the insert's transaction after a per-tenant lock
    (PostgreSQL advisory lock; SQLite serialises writers), so concurrent submissions never overshoot it.
    Those rows are read with a share lock in the insert's own transaction (``FOR SHARE`` on PostgreSQL; SQLite
    serialises writers): a concurrent ``datasets.delete_dataset``, which locks the row ``FOR UPDATE`` and looks for
    active jobs after it, either waits for this job and sees it (its 409), or deletes first and this finds the
    row gone. No job is ever queued on a dataset that is being deleted.
    """
    for _ in range(3):
        if idempotency_key is not None:
            existing = _job_by_idempotency_key(db, tenant, idempotency_key)
            if existing is not None:
                if existing.request_hash != request_hash:
                    raise IdempotencyConflict(existing.id)
                return existing, False
        now = utcnow()
        job = Job(
            id=f"job_{uuid.uuid4().hex}", tenant=tenant, status=JobStatus.QUEUED, attempt=0,
            max_attempts=max_attempts, spec=spec, name=name, job_metadata=dict(metadata),
            idempotency_key=idempotency_key, request_hash=request_hash, created_at=now, updated_at=now, handoffs=0,
            submitted_by_admin=submitted_by_admin, priority=priority, gpus_required=gpus_required,
        )
        try:
            with db.write() as session:
                if default_max_queued is not None:
                    _check_queue_room(db, session, tenant, default_max_queued)
                if dataset_ids:
                    found = session.scalars(
                        select(Dataset.id).where(Dataset.id.in_(list(dataset_ids)), Dataset.tenant == tenant)
                        .with_for_update(read=True)
                    ).all()
                    gone = sorted(set(dataset_ids) - set(found))
                    if gone:
                        raise DatasetsGone(gone)  # rolls the transaction back: nothing stored
                session.add(job)
                session.flush()  # the job row first: the event's foreign key needs it (PostgreSQL)
                session.add(new_event(job.id, EventType.JOB_CREATED, "job created",
                                      data={"status": JobStatus.QUEUED}, now=now))
        except IntegrityError:
            if idempotency_key is None:
                raise
            continue  # a concurrent request with the same key won the insert: read it back
        return job, True
    raise RuntimeError(f"could not create or read back the job for Idempotency-Key {idempotency_key!r}")


def queue_full(session: Session, tenant: str, default_max_queued: int) -> QueueFull | None:
    """The tenant already has its ``max_queued`` queued jobs (what a submission is refused for), or None. The
    submission asks it under its per-tenant lock; a dry run asks it too, to warn ahead."""
    max_queued = tenant_rows.effective_limits(session, [tenant], 1, default_max_queued)[tenant].max_queued
    queued = session.scalar(select(func.count()).where(Job.tenant == tenant, Job.status == JobStatus.QUEUED)) or 0
    return QueueFull(tenant, int(queued), max_queued) if queued >= max_queued else None


def _check_queue_room(db: Database, session: Session, tenant: str, default_max_queued: int) -> None:
    if not db.is_sqlite:
        session.execute(text("SELECT pg_advisory_xact_lock(:lock_class, hashtext(:tenant))"),
                        {"lock_class": _SUBMIT_LOCK_CLASS, "tenant": tenant})
    full = queue_full(session, tenant, default_max_queued)
    if full is not None:
        raise full  # rolls the transaction back: nothing stored


def _job_by_idempotency_key(db: Database, tenant: str, key: str) -> Job | None:
    with db.read() as session:
        return session.scalars(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key)).one_or_none()


def get_job(db: Database, job_id: str, tenant: str | None = None) -> Job | None:
    """The job, or None; with a tenant, another tenant's job is None too (``tenant=None``: the worker)."""
    with db.read() as session:
        query = select(Job).where(Job.id == job_id)
        if tenant is not None:
            query = query.where(Job.tenant == tenant)
        return session.scalars(query).one_or_none()


def list_jobs(
    db: Database,
    tenant: str,
    *,
    limit: int,
    after: str | None = None,
    status: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """The tenant's jobs, newest first; ``after`` is the id of the last job of the previous page."""
    with db.read() as session:
        query = select(Job).where(Job.tenant == tenant)
        if status is not None:
            query = query.where(Job.status == status)
        for key, value in (metadata or {}).items():
            query = query.where(_metadata_matches(db, key, value))
        return newest_first_page(session, query, Job, tenant, limit=limit, after=after, noun="job")


def _metadata_matches(db: Database, key: str, value: str) -> Any:
    if db.is_sqlite:
        # json_each compares the key exactly; a JSON path ('$."key"') cannot express every key (e.g. with '"').
        pairs = func.json_each(Job.job_metadata).table_valued("key", "value")
        return exists(select(1).select_from(pairs).where(pairs.c.key == key, pairs.c.value == value))
    return Job.job_metadata[key].as_string() == value


def list_exported_models(db: Database, tenant: str) -> list[Job]:
    """The tenant's succeeded jobs that exported a student, newest first."""
    with db.read() as session:
        return list(session.scalars(
            select(Job).where(Job.tenant == tenant, Job.status == JobStatus.SUCCEEDED, Job.export_dir.is_not(None))
            .order_by(Job.finished_at.desc(), Job.id.desc())
        ))


def has_export(db: Database, job_id: str, tenant: str) -> bool:
    """Whether ``job_id`` is one of the tenant's succeeded jobs with an exported student."""
    with db.read() as session:
        return session.scalar(select(Job.id).where(
            Job.id == job_id, Job.tenant == tenant, Job.status == JobStatus.SUCCEEDED, Job.export_dir.is_not(None)
        )) is not None


# ------------------------------------------------------------------------------------------- the queue


@dataclass(frozen=True)
class QueuePlace:
    """Where a queued job stands: its 1-based ``position`` in claim order among every queued job, and why it waits.

    ``reason``: waiting_for_worker (no live worker, or it is next and every worker is busy), no_worker_with_gpus,
    tenant_limit, behind_higher_priority or behind_older; ``detail`` says it for a person."""

    position: int
    reason: str
    detail: str


def queue_places(db: Database, jobs: Sequence[Job], default_max_running: int) -> dict[str, QueuePlace]:
    """The :class:`QueuePlace` of each queued job of ``jobs`` (others are left out), read in one transaction."""
    queued = [job for job in jobs if job.status == JobStatus.QUEUED]
    if not queued:
        return {}
    live = worker_rows.live_workers(db)
    with db.read() as session:
        counts = tenant_rows.job_counts(session)
        limits = tenant_rows.effective_limits(session, {job.tenant for job in queued}, default_max_running, 1)
        return {job.id: _place(session, job, live, counts.get(job.tenant, (0, 0))[0], limits[job.tenant].max_running)
                for job in queued}


def _place(session: Session, job: Job, live: LiveWorkers, running: int, max_running: int) -> QueuePlace:
    def queued_count(*conditions: Any) -> int:
        return int(session.scalar(select(func.count()).where(Job.status == JobStatus.QUEUED, *conditions)) or 0)

    higher = queued_count(Job.priority < job.priority)
    older = queued_count(Job.priority == job.priority, or_(
        Job.created_at < job.created_at, and_(Job.created_at == job.created_at, Job.id < job.id)))
    position = higher + older + 1
    gpus = job.gpus_required or 1
    if live.count == 0:
        return QueuePlace(position, "waiting_for_worker",
                          "no worker is running; start one (ctpd worker --queues train) and it claims the job")
    if gpus > live.max_devices:
        return QueuePlace(position, "no_worker_with_gpus",
                          f"the job needs {gpus} GPUs on one worker and the largest live worker has "
                          f"{live.max_gpus}; start a worker on a host with {gpus} GPUs, or lower training.devices")
    if running >= max_running:
        return QueuePlace(position, "tenant_limit",
                          f"tenant {job.tenant} runs {running} of its {max_running} jobs (max_running); the job "
                          "starts when one of them ends")
    if higher:
        return QueuePlace(position, "behind_higher_priority",
                          f"{higher} queued job(s) of higher priority than {PRIORITY_NAMES.get(job.priority, 'its')} "
                          "go first")
    if older:
        return QueuePlace(position, "behind_older", f"{older} older queued job(s) of the same priority go first")
    return QueuePlace(position, "waiting_for_worker",
                      f"next to run; waiting for one of the {live.count} live worker(s) to be free")


# ------------------------------------------------------------------------------------------------ cancel


def request_cancel(db: Database, job_id: str, tenant: str | None) -> Job | None:
    """queued -> cancelled at once; running -> cancelling (the worker stops, then finishes it as cancelled).

    Cancelling, or already cancelled: the job as it is. Succeeded or failed: :class:`JobNotCancellable`.
    None if there is no such job (for this tenant). A status that changes under us (a worker claims the
    job at that very moment) is read again, so the request is never lost.
    """
    with db.write() as session:
        query = select(Job).where(Job.id == job_id)
        if tenant is not None:
            query = query.where(Job.tenant == tenant)
        job = session.scalars(query).one_or_none()
        if job is None:
            return None
        for _ in range(5):
            now = utcnow()
            if job.status == JobStatus.QUEUED:
                if updated_rows(session,
                    update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                    .values(status=JobStatus.CANCELLED, cancel_requested_at=now, finished_at=now, updated_at=now)
                ):
                    session.add(new_event(job_id, EventType.CANCEL_REQUESTED, "cancel requested", now=now))
                    session.add(new_event(job_id, EventType.JOB_CANCELLED, "cancelled before it started", now=now,
                                          data={"status": JobStatus.CANCELLED}))
                    break
            elif job.status == JobStatus.RUNNING:
                if updated_rows(session,
                    update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                    .values(status=JobStatus.CANCELLING, cancel_requested_at=now, updated_at=now)
                ):
                    session.add(new_event(job_id, EventType.CANCEL_REQUESTED,
                                          "cancel requested; the worker stops at its next check", now=now,
                                          data={"status": JobStatus.CANCELLING}))
                    break
            elif job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                raise JobNotCancellable(job_id, job.status)
            else:  # cancelling or cancelled: nothing to do
                break
            session.refresh(job)  # it changed between our read and our update: decide again
        session.flush()
        session.refresh(job)
        return job


def is_cancel_requested(db: Database, job_id: str) -> bool:
    with db.read() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status in (JobStatus.CANCELLING, JobStatus.CANCELLED)


# ------------------------------------------------------------------------------- an attempt's lifecycle


def claim_job(db: Database, job_id: str, worker_id: str, lease_seconds: float) -> Job | None:
    """queued -> running by compare-and-set: attempt += 1, started_at (first start), lease. None if not queued.

    This job and no other, whatever the limits: the workers claim with :func:`claim_next_job`."""
    with db.write() as session:
        return _claim(session, job_id, worker_id, lease_seconds)


def claim_next_job(db: Database, worker_id: str, lease_seconds: float, *, devices: int, default_max_running: int,
                   hint: str | None = None) -> Job | None:
    """Claim the best queued job this worker may run, or None when there is none (the doorbell does nothing).

    Best: highest priority, then oldest (``created_at``, then id), among the jobs whose tenant runs fewer than its
    ``max_running`` and that need at most ``devices`` GPUs. ``hint`` (the doorbell's job id) only names the
    delivery in the log: the order is SQL's, so a doorbell never lets a job jump the queue or past a limit.
    On PostgreSQL the count and the claim run under one transaction-scoped advisory lock, so concurrent claims
    on many workers never exceed a limit; SQLite's BEGIN IMMEDIATE serialises them the same way."""
    with db.write() as session:
        if not db.is_sqlite:
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CLAIM_LOCK_ID})
        for _ in range(5):  # a job cancelled between the choice and the update: choose again
            job_id = best_eligible_job(session, default_max_running, devices=devices)
            if job_id is None:
                return None
            job = _claim(session, job_id, worker_id, lease_seconds,
                         note=None if hint in (None, job_id) else f" (for the doorbell of {hint})")
            if job is not None:
                return job
        return None


def best_eligible_job(session: Session, default_max_running: int, *, devices: int | None = None) -> str | None:
    """The id of the queued job a worker with ``devices`` GPUs (None: any) would claim now, or None."""
    running = {tenant: count for tenant, (count, _) in tenant_rows.job_counts(session).items() if count}
    limits = tenant_rows.effective_limits(session, running, default_max_running, 1)
    full = sorted(tenant for tenant, count in running.items() if count >= limits[tenant].max_running)
    query = select(Job.id).where(Job.status == JobStatus.QUEUED)
    if devices is not None:
        query = query.where(Job.gpus_required <= devices)
    if full:
        query = query.where(Job.tenant.not_in(full))
    return session.scalar(query.order_by(Job.priority, Job.created_at, Job.id).limit(1))


def next_eligible_job(db: Database, default_max_running: int) -> str | None:
    """The job a doorbell should name now (a job just ended, a slot is free), or None when nothing can start."""
    with db.read() as session:
        return best_eligible_job(session, default_max_running)


def _claim(session: Session, job_id: str, worker_id: str, lease_seconds: float, note: str | None = None) -> Job | None:
    """The compare-and-set of a claim and its job_started event, in the caller's transaction."""
    now = utcnow()
    claimed = updated_rows(session,
        update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, attempt=Job.attempt + 1, worker_id=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now,
                started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())))  # started_at: the first start
    )
    if not claimed:
        return None
    job = session.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one()
    session.add(new_event(job_id, EventType.JOB_STARTED,
                          f"attempt {job.attempt} of {job.max_attempts} started on {worker_id}{note or ''}", now=now,
                          data={"status": JobStatus.RUNNING, "attempt": job.attempt, "worker_id": worker_id},
                          attempt=job.attempt))
    session.flush()
    return job


def heartbeat(db: Database, job_id: str, worker_id: str, lease_seconds: float, attempt: int | None = None) -> bool:
    """Renew the lease if this worker (and attempt) still holds the job (running or cancelling) and the lease
    has not run out; False if it lost it. An expired lease is never renewed: the process may have been paused
    past it, and the reaper may be handing the job to another attempt at this very moment."""
    now = utcnow()
    held = [Job.id == job_id, Job.worker_id == worker_id, Job.status.in_(HELD_STATUSES), Job.lease_expires_at > now]
    if attempt is not None:
        held.append(Job.attempt == attempt)
    with db.write() as session:
        return bool(updated_rows(session,
            update(Job).where(*held).values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        ))


def holds(db: Database, job_id: str, worker_id: str, attempt: int) -> bool:
    """Whether this worker's attempt still holds the job (checked before publishing files: checkpoints, export)."""
    with db.read() as session:
        row = session.execute(select(Job.worker_id, Job.attempt, Job.status).where(Job.id == job_id)).one_or_none()
    return row is not None and tuple(row) in tuple((worker_id, attempt, status) for status in HELD_STATUSES)


_FINISH_EVENTS: dict[str, EventType] = {
    JobStatus.SUCCEEDED: EventType.JOB_SUCCEEDED,
    JobStatus.FAILED: EventType.JOB_FAILED,
    JobStatus.CANCELLED: EventType.JOB_CANCELLED,
}


def finish_job(
    db: Database,
    job_id: str,
    worker_id: str,
    status: str,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    error_kind: str | None = None,
    export_dir: str | Path | None = None,
    attempt: int | None = None,
) -> str | None:
    """Record the end of the worker's attempt; returns the status recorded, or None (nothing written) if this
    worker (and attempt) no longer holds the job.

    **A cancelled job ends cancelled, always:** once a cancel was requested (``cancelling``), an attempt that
    reports succeeded or failed (it finished, or failed, before it saw the request) is recorded as
    ``cancelled``, with what it reported in the event's data. Nothing is exported for a cancelled job."""
    if status not in _FINISH_EVENTS:
        raise ValueError(f"finish_job status {status!r}: use succeeded, failed or cancelled")
    if error_kind not in (None, "user", "system"):
        raise ValueError(f"error_kind {error_kind!r}: use user or system")
    now = utcnow()
    held = [Job.id == job_id, Job.worker_id == worker_id]
    if attempt is not None:
        held.append(Job.attempt == attempt)
    with db.write() as session:
        job = session.scalars(select(Job).where(*held).with_for_update()).one_or_none()
        if job is None or job.status not in HELD_STATUSES:
            return None
        reported = status
        if job.status == JobStatus.CANCELLING:
            status = JobStatus.CANCELLED
        values: dict[str, Any] = dict(status=status, finished_at=now, updated_at=now, lease_expires_at=None)
        if status == JobStatus.FAILED:
            values.update(error_code=error_code, error_message=escape_nul(error_message), error_kind=error_kind)
        if status == JobStatus.SUCCEEDED:
            values.update(export_dir=str(export_dir) if export_dir is not None else None)
        session.execute(update(Job).where(*held, Job.status == job.status).values(**values))
        data: dict[str, Any] = {"status": status}
        if status == JobStatus.FAILED:
            data.update(code=error_code, kind=error_kind)
        outcomes: dict[str, str] = {JobStatus.SUCCEEDED: "job succeeded", JobStatus.CANCELLED: "job cancelled"}
        message = outcomes.get(
            status, f"job failed: {error_message or error_code}")
        if reported != status:
            data["reported"] = reported
            message = f"job cancelled (the attempt {reported} before it saw the cancel request)"
        level = EventLevel.ERROR if status == JobStatus.FAILED else EventLevel.INFO
        session.add(new_event(job_id, _FINISH_EVENTS[status], message, level=level, now=now, data=data,
                              attempt=job.attempt))
    return status


def release_job(db: Database, job_id: str, worker_id: str, attempt: int, reason: str) -> str | None:
    """Hand the job back (SIGTERM: a deploy or a scale-down, not a failure): running -> queued with
    ``handoffs += 1``, so the attempt does not count against ``max_attempts``; cancelling -> cancelled.
    Returns the new status, or None if this attempt no longer holds the job."""
    now = utcnow()
    with db.write() as session:
        job = session.scalars(
            select(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.attempt == attempt).with_for_update()
        ).one_or_none()
        if job is None or job.status not in HELD_STATUSES:
            return None
        if job.status == JobStatus.CANCELLING:
            values: dict[str, Any] = dict(status=JobStatus.CANCELLED, finished_at=now)
            event = new_event(job_id, EventType.JOB_CANCELLED, f"job cancelled ({reason})", now=now, attempt=attempt,
                              data={"status": JobStatus.CANCELLED})
        else:
            values = dict(status=JobStatus.QUEUED, worker_id=None, handoffs=Job.handoffs + 1)
            event = new_event(job_id, EventType.JOB_HANDED_BACK,
                              f"attempt {attempt} handed the job back ({reason}); it resumes from its checkpoint",
                              level=EventLevel.WARNING, now=now, attempt=attempt,
                              data={"status": JobStatus.QUEUED, "attempt": attempt})
        session.execute(update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == job.status)
                        .values(lease_expires_at=None, updated_at=now, **values))
        session.add(event)
        return values["status"]


# ------------------------------------------------------------------------------------------ the reaper


def reap_stale_jobs(db: Database, now: datetime | None = None, *, expired_before: datetime | None = None) -> list[str]:
    """Jobs whose lease ran out: running -> queued (attempt < max_attempts, with a ``job_restarted`` event)
    or failed with ``worker_lost``; cancelling -> cancelled. Returns the ids to enqueue again.

    ``now`` stamps the rows and events; a lease counts as run out when it ends before ``expired_before``
    (default ``now``; later to treat leases that still run as lost, without stamping the future)."""
    now = now or utcnow()
    expired_before = expired_before or now
    requeued = []
    with db.read() as session:
        stale = session.execute(
            select(Job.id, Job.status, Job.attempt, Job.max_attempts, Job.lease_expires_at, Job.worker_id,
                   Job.handoffs)
            .where(Job.status.in_(HELD_STATUSES), Job.lease_expires_at < expired_before)
        ).all()
    for job_id, status, attempt, max_attempts, lease, worker_id, handoffs in stale:
        failures = attempt - (handoffs or 0)  # hand-backs on SIGTERM are not failures
        # The compare-and-set on (status, lease) makes a concurrent heartbeat or a second reaper win cleanly.
        current = and_(Job.id == job_id, Job.status == status, Job.lease_expires_at == lease)
        with db.write() as session:
            if status == JobStatus.CANCELLING:
                values: dict[str, Any] = dict(status=JobStatus.CANCELLED, finished_at=now)
                event = new_event(job_id, EventType.JOB_CANCELLED, f"the worker {worker_id} was lost while cancelling",
                                  now=now, data={"status": JobStatus.CANCELLED})
            elif failures < max_attempts:
                values = dict(status=JobStatus.QUEUED, worker_id=None)
                event = new_event(job_id, EventType.JOB_RESTARTED,
                                  f"the lease of {worker_id} expired; requeued (attempt {attempt} lost, "
                                  f"{failures} of {max_attempts} failed)",
                                  level=EventLevel.WARNING, now=now,
                                  data={"status": JobStatus.QUEUED, "attempt": attempt})
            else:
                message = (f"the worker stopped heartbeating during attempt {attempt} ({failures} of {max_attempts} "
                           "failed); no attempts are left")
                values = dict(status=JobStatus.FAILED, finished_at=now, error_code="worker_lost", error_kind="system",
                              error_message=message)
                event = new_event(job_id, EventType.JOB_FAILED, message, level=EventLevel.ERROR, now=now,
                                  data={"status": JobStatus.FAILED, "code": "worker_lost", "kind": "system"})
            done = updated_rows(session, update(Job).where(current)
                                .values(lease_expires_at=None, updated_at=now, **values))
            if done:
                session.add(event)
                if values["status"] == JobStatus.QUEUED:
                    requeued.append(job_id)
    return requeued


def stale_queued_jobs(db: Database, older_than_seconds: float, now: datetime | None = None) -> list[str]:
    """Queued jobs no worker claimed for ``older_than_seconds``: ids to enqueue again.

    Each returned job's ``updated_at`` is bumped, so it comes back at most once per period.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=older_than_seconds)
    with db.read() as session:
        candidates = list(session.scalars(
            select(Job.id).where(Job.status == JobStatus.QUEUED, Job.updated_at < cutoff)))
    ids = []
    for job_id in candidates:
        with db.write() as session:
            done = updated_rows(session,
                update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.updated_at < cutoff)
                .values(updated_at=now)
            )
            if done:
                session.add(new_event(job_id, EventType.JOB_QUEUED,
                                      f"no worker claimed the job for {older_than_seconds:g} s; enqueueing it again",
                                      level=EventLevel.WARNING, now=now, data={"requeue": True}))
                ids.append(job_id)
    return ids
