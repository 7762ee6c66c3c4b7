"""The repository (docs/service-contract.md, "Repository"): the only code that writes job rows.

Both planes call these functions: the API (create, list, cancel) and the worker (claim, heartbeat,
progress, events, metrics, finish, reap). Each function runs one short transaction and returns ORM rows
that are safe to read after it returns (``expire_on_commit=False``, no lazy relationships).

Status changes are compare-and-set ``UPDATE ... WHERE status = ...`` statements, so two workers, two
reapers or a worker and a cancel never both win.

**Fencing.** ``jobs.attempt`` goes up by one at every claim and is the attempt's fencing token. Everything a
running attempt writes (heartbeat, progress, events, metric points, the finish, a hand-back) names its
attempt, and is refused (:class:`StaleAttempt`, or ``False``) once the job is no longer held by that attempt:
the reaper requeued it, another attempt claimed it, or it ended. A fenced write locks the job row
(``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises writers anyway), so a
concurrent reap or claim is ordered strictly before or after it. A heartbeat renews only an unexpired lease:
a process that was paused past its lease has lost it even if nobody has taken the job yet. Every status change writes its event in the same
transaction, with ``data["status"]`` set to the new status: the API derives a job's transitions from those
events (an event a caller adds with :func:`add_event` never counts as a transition).

SQLite: write transactions start with ``BEGIN IMMEDIATE`` (a deferred transaction that reads and then
writes can fail with SQLITE_BUSY when another writer got there first); reads use a plain ``BEGIN``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, create_engine, event, exists, func, literal, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from app.db.models import TERMINAL_STATUSES, ApiKey, Dataset, Job, JobEvent, MetricPoint, UTCDateTime, utcnow

logger = logging.getLogger(__name__)

JobRow = Job
EventRow = JobEvent
DatasetRow = Dataset

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
_MIGRATION_LOCK_ID = 7_453_001  # pg_advisory_xact_lock key: one `upgrade` at a time per database

# Event types that record a status change (their data["status"] is the new status).
TRANSITION_EVENT_TYPES = (
    "job_created",
    "job_started",
    "job_restarted",
    "job_handed_back",
    "cancel_requested",
    "job_succeeded",
    "job_failed",
    "job_cancelled",
)


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


class InvalidCursor(ValueError):
    """``after`` names no row of this listing."""


class StaleAttempt(Exception):
    """A write from an attempt that no longer holds the job (requeued, claimed again, or ended)."""

    def __init__(self, job_id: str, attempt: int, current: str) -> None:
        self.job_id, self.attempt = job_id, attempt
        super().__init__(f"job {job_id}: attempt {attempt} no longer holds the job ({current}); write refused")


HELD_STATUSES = ("running", "cancelling")


def is_unavailable(error: BaseException) -> bool:
    """A database error that means "not reachable now" (connection refused or dropped, pool timeout), as
    opposed to a bug or bad data (a bad statement, a constraint, a NUL in a text column): only these are worth
    waiting out."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(error, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def _text(value: Any) -> Any:
    """``value`` with NUL characters escaped, recursively: PostgreSQL text and JSON cannot hold U+0000, and an
    event or error message quoting user input (a model's config, a file name) may carry one."""
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if isinstance(value, Mapping):
        return {_text(key): _text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_text(item) for item in value]
    return value


def _hold(session: Session, job_id: str, attempt: int) -> Job:
    """Lock the job row and check that ``attempt`` still holds it; raises :class:`StaleAttempt`."""
    job = session.scalars(
        select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
    ).one_or_none()
    if job is None:
        raise StaleAttempt(job_id, attempt, "no such job")
    if job.attempt != attempt or job.status not in HELD_STATUSES:
        raise StaleAttempt(job_id, attempt, f"it is {job.status} at attempt {job.attempt}")
    return job


# ------------------------------------------------------------------------------------------- the database


class Database:
    """Owns the engine and sessions of one database URL. Creating it connects to nothing."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.engine: Engine = _make_engine(url, echo=echo)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def ping(self) -> None:
        """``SELECT 1``; raises when the database is unreachable."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def upgrade(self, revision: str = "head") -> None:
        """Run the Alembic migrations up to ``revision`` (from any working directory)."""
        from alembic import command

        config = alembic_config()
        with self._write_engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_ID})
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str | None = None):
    """An Alembic ``Config`` for app/migrations, built without an ini file."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _make_engine(url: str, *, echo: bool) -> Engine:
    if not url.startswith("sqlite"):
        connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
        return create_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args)
    memory = url in ("sqlite://", "sqlite:///:memory:")
    if not memory:
        database = url.split("///", 1)[-1].split("?", 1)[0]
        if database:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=echo,
        connect_args={"check_same_thread": False, "timeout": 30},
        **({"poolclass": StaticPool} if memory else {}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


# ------------------------------------------------------------------------------------------------- jobs


def _event(job_id: str, type: str, message: str, *, level: str = "info", stage: str | None = None,
           data: Mapping[str, Any] | None = None, now: datetime | None = None, attempt: int | None = None) -> JobEvent:
    return JobEvent(job_id=job_id, created_at=now or utcnow(), type=type, level=level, stage=stage,
                    message=_text(message), data=_text(dict(data or {})), attempt=attempt)


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
) -> tuple[Job, bool]:
    """A new ``queued`` job, or ``(existing, False)`` when the same key came with the same request hash.

    Raises :class:`IdempotencyConflict` when the key was used with another request hash.
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
            id=f"job_{uuid.uuid4().hex}", tenant=tenant, status="queued", attempt=0, max_attempts=max_attempts,
            spec=spec, name=name, job_metadata=dict(metadata), idempotency_key=idempotency_key,
            request_hash=request_hash, created_at=now, updated_at=now, handoffs=0,
            submitted_by_admin=submitted_by_admin,
        )
        try:
            with db.write() as session:
                session.add(job)
                session.flush()  # the job row first: the event's foreign key needs it (PostgreSQL)
                session.add(_event(job.id, "job_created", "job created", data={"status": "queued"}, now=now))
        except IntegrityError:
            if idempotency_key is None:
                raise
            continue  # a concurrent request with the same key won the insert: read it back
        return job, True
    raise RuntimeError(f"could not create or read back the job for Idempotency-Key {idempotency_key!r}")


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
        if after is not None:
            cursor = session.execute(
                select(Job.created_at, Job.id).where(Job.tenant == tenant, Job.id == after)
            ).one_or_none()
            if cursor is None:
                raise InvalidCursor(f"after={after!r} is not one of your jobs; pass the id of the last job of a page")
            query = query.where(or_(Job.created_at < cursor.created_at,
                                    and_(Job.created_at == cursor.created_at, Job.id < cursor.id)))
        if status is not None:
            query = query.where(Job.status == status)
        for key, value in (metadata or {}).items():
            query = query.where(_metadata_matches(db, key, value))
        rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _metadata_matches(db: Database, key: str, value: str) -> Any:
    if db.is_sqlite:
        # json_each compares the key exactly; a JSON path ('$."key"') cannot express every key (e.g. with '"').
        pairs = func.json_each(Job.job_metadata).table_valued("key", "value")
        return exists(select(1).select_from(pairs).where(pairs.c.key == key, pairs.c.value == value))
    return Job.job_metadata[key].as_string() == value


def job_transitions(db: Database, job_ids: Sequence[str]) -> dict[str, list[tuple[str, datetime]]]:
    """Each job's status changes, oldest first, as ``(status, at)``, from its events."""
    result: dict[str, list[tuple[str, datetime]]] = {job_id: [] for job_id in job_ids}
    if not job_ids:
        return result
    with db.read() as session:
        rows = session.execute(
            select(JobEvent.job_id, JobEvent.created_at, JobEvent.data)
            .where(JobEvent.job_id.in_(list(job_ids)), JobEvent.type.in_(TRANSITION_EVENT_TYPES))
            .order_by(JobEvent.id)
        )
        for job_id, created_at, data in rows:
            status = (data or {}).get("status")
            if status:
                result[job_id].append((status, created_at))
    return result


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
            if job.status == "queued":
                if session.execute(
                    update(Job).where(Job.id == job_id, Job.status == "queued")
                    .values(status="cancelled", cancel_requested_at=now, finished_at=now, updated_at=now)
                ).rowcount:
                    session.add(_event(job_id, "cancel_requested", "cancel requested", now=now))
                    session.add(_event(job_id, "job_cancelled", "cancelled before it started", now=now,
                                       data={"status": "cancelled"}))
                    break
            elif job.status == "running":
                if session.execute(
                    update(Job).where(Job.id == job_id, Job.status == "running")
                    .values(status="cancelling", cancel_requested_at=now, updated_at=now)
                ).rowcount:
                    session.add(_event(job_id, "cancel_requested",
                                       "cancel requested; the worker stops at its next check", now=now,
                                       data={"status": "cancelling"}))
                    break
            elif job.status in ("succeeded", "failed"):
                raise JobNotCancellable(job_id, job.status)
            else:  # cancelling or cancelled: nothing to do
                break
            session.refresh(job)  # it changed between our read and our update: decide again
        session.flush()
        session.refresh(job)
        return job


def claim_job(db: Database, job_id: str, worker_id: str, lease_seconds: float) -> Job | None:
    """queued -> running by compare-and-set: attempt += 1, started_at (first start), lease. None if not queued."""
    now = utcnow()
    with db.write() as session:
        claimed = session.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued")
            .values(status="running", attempt=Job.attempt + 1, worker_id=worker_id,
                    lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now,
                    started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())))  # started_at: the first start
        ).rowcount
        if not claimed:
            return None
        job = session.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one()
        session.add(_event(job_id, "job_started", f"attempt {job.attempt} of {job.max_attempts} started on {worker_id}",
                           now=now, data={"status": "running", "attempt": job.attempt, "worker_id": worker_id},
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
        return bool(session.execute(
            update(Job).where(*held).values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        ).rowcount)


def holds(db: Database, job_id: str, worker_id: str, attempt: int) -> bool:
    """Whether this worker's attempt still holds the job (checked before publishing files: checkpoints, export)."""
    with db.read() as session:
        row = session.execute(select(Job.worker_id, Job.attempt, Job.status).where(Job.id == job_id)).one_or_none()
    return row is not None and tuple(row) in ((worker_id, attempt, "running"), (worker_id, attempt, "cancelling"))


def is_cancel_requested(db: Database, job_id: str) -> bool:
    with db.read() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status in ("cancelling", "cancelled")


_MAX_PROGRESS = 2**31 - 1  # the columns are 32-bit integers


def _progress_values(stage: str | None, step: int | None, total: int | None, eta_seconds: float | None) -> dict:
    if eta_seconds is not None and not math.isfinite(eta_seconds):
        eta_seconds = None
    return dict(stage=stage, progress_step=_clamp_progress(step), progress_total=_clamp_progress(total),
                eta_seconds=eta_seconds, updated_at=utcnow())


def _clamp_progress(value: int | None) -> int | None:
    return None if value is None else max(0, min(int(value), _MAX_PROGRESS))


def update_progress(db: Database, job_id: str, *, stage: str | None, step: int | None, total: int | None,
                    eta_seconds: float | None, attempt: int | None = None) -> None:
    """The job's stage and progress columns; with ``attempt``, fenced (raises :class:`StaleAttempt`)."""
    record_attempt_writes(db, job_id, attempt, [ProgressWrite(stage, step, total, eta_seconds)])


def _event_data(level: str, data: Mapping[str, Any] | None) -> dict[str, Any]:
    if level not in ("info", "warning", "error"):
        raise ValueError(f"event level {level!r}: use info, warning or error")
    return {key: value for key, value in (data or {}).items() if key != "status"}  # status marks transitions only


def add_event(db: Database, job_id: str, type: str, message: str, *, level: str = "info", stage: str | None = None,
              data: Mapping[str, Any] | None = None, attempt: int | None = None) -> None:
    """A job event (stage_started, stage_finished, checkpoint_saved, ...). A ``"status"`` key in ``data`` is
    dropped: only the repository's own status changes carry it (they are the job's transitions). With
    ``attempt``, the write is fenced (raises :class:`StaleAttempt`) and the event records its attempt."""
    _event_data(level, data)  # a bad level is refused before any transaction starts
    record_attempt_writes(db, job_id, attempt, [EventWrite(type, message, level=level, stage=stage, data=data)])


def add_metrics(db: Database, job_id: str, stage: str, step: int, metrics: Mapping[str, float],
                attempt: int | None = None) -> None:
    """One point per metric at this step; non-finite (and non-numeric) values are skipped."""
    add_metric_points(db, job_id, ((stage, step, name, value) for name, value in metrics.items()), attempt=attempt)


def _finite_points(points: Iterable[tuple[str, int, str, float]]) -> list[tuple[str, int, str, float]]:
    """The points whose value is a finite number (non-finite and non-numeric values are skipped)."""
    kept = []
    for stage, step, name, value in points:
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            kept.append((stage, int(step), name, number))
    return kept


def add_metric_points(db: Database, job_id: str, points: Iterable[tuple[str, int, str, float]],
                      attempt: int | None = None) -> int:
    """Many ``(stage, step, name, value)`` points in one transaction. Non-finite values are skipped; returns
    how many were written. With ``attempt``, fenced (raises :class:`StaleAttempt`)."""
    finite = _finite_points(points)
    if finite:
        record_attempt_writes(db, job_id, attempt, [MetricsWrite(tuple(finite))])
    return len(finite)


def _missing_points(session: Session, job_id: str, points: Sequence[tuple[str, int, str, float]]
                    ) -> list[tuple[str, int, str, float]]:
    """The points whose (stage, name, step) the job has no value for yet."""
    stages = sorted({stage for stage, _, _, _ in points})
    steps = [int(step) for _, step, _, _ in points]
    have = set(session.execute(
        select(MetricPoint.stage, MetricPoint.name, MetricPoint.step)
        .where(MetricPoint.job_id == job_id, MetricPoint.stage.in_(stages),
               MetricPoint.step.between(min(steps), max(steps)))
    ).tuples())
    return [point for point in points if (point[0], point[2], int(point[1])) not in have]


@dataclass(frozen=True)
class EventWrite:
    type: str
    message: str
    level: str = "info"
    stage: str | None = None
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class MetricsWrite:
    points: tuple[tuple[str, int, str, float], ...]  # (stage, step, name, value)
    # A replay (a resumed training stage restoring the metrics of the steps before its checkpoint): only the
    # points the job does not have yet are written, so a replay never doubles a series.
    only_missing: bool = False


@dataclass(frozen=True)
class ProgressWrite:
    stage: str | None
    step: int | None
    total: int | None
    eta_seconds: float | None


AttemptWrite = EventWrite | MetricsWrite | ProgressWrite


def record_attempt_writes(db: Database, job_id: str, attempt: int | None, writes: Sequence[AttemptWrite]) -> None:
    """A running attempt's buffered writes, in order, in one fenced transaction: all of them or none.

    Raises :class:`StaleAttempt` (nothing written) once the attempt no longer holds the job, and the
    driver's error when the database is unreachable (nothing written either: the caller keeps them).
    ``attempt=None`` writes unfenced (a local run that holds no lease)."""
    now = utcnow()
    with db.write() as session:
        if attempt is not None:
            _hold(session, job_id, attempt)
        for write in writes:
            if isinstance(write, EventWrite):
                session.add(_event(job_id, write.type, write.message, level=write.level, stage=write.stage,
                                   data=_event_data(write.level, write.data), now=now, attempt=attempt))
            elif isinstance(write, MetricsWrite):
                points = _finite_points(write.points)
                if write.only_missing and points:
                    points = _missing_points(session, job_id, points)
                session.add_all(MetricPoint(job_id=job_id, stage=stage, name=name, step=step, value=value,
                                            created_at=now, attempt=attempt) for stage, step, name, value in points)
            else:
                session.execute(update(Job).where(Job.id == job_id).values(
                    **_progress_values(write.stage, write.step, write.total, write.eta_seconds)))


_FINISH_EVENTS = {"succeeded": "job_succeeded", "failed": "job_failed", "cancelled": "job_cancelled"}


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
        if job.status == "cancelling":
            status = "cancelled"
        values: dict[str, Any] = dict(status=status, finished_at=now, updated_at=now, lease_expires_at=None)
        if status == "failed":
            values.update(error_code=error_code, error_message=_text(error_message), error_kind=error_kind)
        if status == "succeeded":
            values.update(export_dir=str(export_dir) if export_dir is not None else None)
        session.execute(update(Job).where(*held, Job.status == job.status).values(**values))
        data: dict[str, Any] = {"status": status}
        if status == "failed":
            data.update(code=error_code, kind=error_kind)
        message = {"succeeded": "job succeeded", "cancelled": "job cancelled"}.get(
            status, f"job failed: {error_message or error_code}")
        if reported != status:
            data["reported"] = reported
            message = f"job cancelled (the attempt {reported} before it saw the cancel request)"
        session.add(_event(job_id, _FINISH_EVENTS[status], message, level="error" if status == "failed" else "info",
                           now=now, data=data, attempt=job.attempt))
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
        if job.status == "cancelling":
            values: dict[str, Any] = dict(status="cancelled", finished_at=now)
            event = _event(job_id, "job_cancelled", f"job cancelled ({reason})", now=now, attempt=attempt,
                           data={"status": "cancelled"})
        else:
            values = dict(status="queued", worker_id=None, handoffs=Job.handoffs + 1)
            event = _event(job_id, "job_handed_back",
                           f"attempt {attempt} handed the job back ({reason}); it resumes from its checkpoint",
                           level="warning", now=now, attempt=attempt, data={"status": "queued", "attempt": attempt})
        session.execute(update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == job.status)
                        .values(lease_expires_at=None, updated_at=now, **values))
        session.add(event)
        return values["status"]


def reap_stale_jobs(db: Database, now: datetime | None = None) -> list[str]:
    """Jobs whose lease ran out: running -> queued (attempt < max_attempts, with a ``job_restarted`` event)
    or failed with ``worker_lost``; cancelling -> cancelled. Returns the ids to enqueue again."""
    now = now or utcnow()
    requeued = []
    with db.read() as session:
        stale = session.execute(
            select(Job.id, Job.status, Job.attempt, Job.max_attempts, Job.lease_expires_at, Job.worker_id,
                   Job.handoffs)
            .where(Job.status.in_(HELD_STATUSES), Job.lease_expires_at < now)
        ).all()
    for job_id, status, attempt, max_attempts, lease, worker_id, handoffs in stale:
        failures = attempt - (handoffs or 0)  # hand-backs on SIGTERM are not failures
        # The compare-and-set on (status, lease) makes a concurrent heartbeat or a second reaper win cleanly.
        current = and_(Job.id == job_id, Job.status == status, Job.lease_expires_at == lease)
        with db.write() as session:
            if status == "cancelling":
                values: dict[str, Any] = dict(status="cancelled", finished_at=now)
                event = _event(job_id, "job_cancelled", f"the worker {worker_id} was lost while cancelling",
                               now=now, data={"status": "cancelled"})
            elif failures < max_attempts:
                values = dict(status="queued", worker_id=None)
                event = _event(job_id, "job_restarted",
                               f"the lease of {worker_id} expired; requeued (attempt {attempt} lost, "
                               f"{failures} of {max_attempts} failed)",
                               level="warning", now=now, data={"status": "queued", "attempt": attempt})
            else:
                message = (f"the worker stopped heartbeating during attempt {attempt} ({failures} of {max_attempts} "
                           "failed); no attempts are left")
                values = dict(status="failed", finished_at=now, error_code="worker_lost", error_kind="system",
                              error_message=message)
                event = _event(job_id, "job_failed", message, level="error", now=now,
                               data={"status": "failed", "code": "worker_lost", "kind": "system"})
            done = session.execute(update(Job).where(current).values(lease_expires_at=None, updated_at=now, **values))
            if done.rowcount:
                session.add(event)
                if values["status"] == "queued":
                    requeued.append(job_id)
    return requeued


def stale_queued_jobs(db: Database, older_than_seconds: float, now: datetime | None = None) -> list[str]:
    """Queued jobs no worker claimed for ``older_than_seconds``: ids to enqueue again.

    Each returned job's ``updated_at`` is bumped, so it comes back at most once per period.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=older_than_seconds)
    with db.read() as session:
        candidates = list(session.scalars(select(Job.id).where(Job.status == "queued", Job.updated_at < cutoff)))
    ids = []
    for job_id in candidates:
        with db.write() as session:
            done = session.execute(
                update(Job).where(Job.id == job_id, Job.status == "queued", Job.updated_at < cutoff).values(updated_at=now)
            ).rowcount
            if done:
                session.add(_event(job_id, "job_queued",
                                   f"no worker claimed the job for {older_than_seconds:g} s; enqueueing it again",
                                   level="warning", now=now, data={"requeue": True}))
                ids.append(job_id)
    return ids


def list_events(db: Database, job_id: str, *, after: int | None = None, limit: int = 100) -> tuple[list[JobEvent], bool]:
    """A job's events, oldest first; ``after`` is the id of the last event already seen."""
    with db.read() as session:
        query = select(JobEvent).where(JobEvent.job_id == job_id)
        if after is not None:
            query = query.where(JobEvent.id > after)
        rows = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def metric_series(db: Database, job_id: str) -> dict[str, list[tuple[str, int, float]]]:
    """Metric name -> ``[(stage, step, value), ...]`` in the order they were recorded (by step within a stage)."""
    series: dict[str, list[tuple[str, int, float]]] = {}
    with db.read() as session:
        rows = session.execute(
            select(MetricPoint.name, MetricPoint.stage, MetricPoint.step, MetricPoint.value)
            .where(MetricPoint.job_id == job_id)
            .order_by(MetricPoint.name, MetricPoint.stage, MetricPoint.step, MetricPoint.id)
        )
        for name, stage, step, value in rows:
            series.setdefault(name, []).append((stage, step, value))
    return series


def list_exported_models(db: Database, tenant: str) -> list[Job]:
    """The tenant's succeeded jobs that exported a student, newest first."""
    with db.read() as session:
        return list(session.scalars(
            select(Job).where(Job.tenant == tenant, Job.status == "succeeded", Job.export_dir.is_not(None))
            .order_by(Job.finished_at.desc(), Job.id.desc())
        ))


def has_export(db: Database, job_id: str, tenant: str) -> bool:
    """Whether ``job_id`` is one of the tenant's succeeded jobs with an exported student."""
    with db.read() as session:
        return session.scalar(select(Job.id).where(
            Job.id == job_id, Job.tenant == tenant, Job.status == "succeeded", Job.export_dir.is_not(None))) is not None


def owns_job(db: Database, job_id: str, tenant: str) -> bool:
    with db.read() as session:
        return session.scalar(select(Job.id).where(Job.id == job_id, Job.tenant == tenant)) is not None


# --------------------------------------------------------------------------------------------- datasets


def create_dataset(
    db: Database,
    *,
    tenant: str,
    filename: str,
    format: str,
    num_rows: int,
    sha256: str,
    size_bytes: int,
    path: str | Path,
    dataset_id: str | None = None,
) -> Dataset:
    row = Dataset(
        id=dataset_id or new_dataset_id(), tenant=tenant, filename=filename, format=format, num_rows=num_rows,
        sha256=sha256, size_bytes=size_bytes, path=str(path), created_at=utcnow(),
    )
    with db.write() as session:
        session.add(row)
    return row


def new_dataset_id() -> str:
    return f"ds_{uuid.uuid4().hex}"


def get_dataset(db: Database, dataset_id: str, tenant: str | None = None) -> Dataset | None:
    """The dataset, or None; ``tenant=None`` only for the worker (which reads the job's own tenant's data)."""
    with db.read() as session:
        query = select(Dataset).where(Dataset.id == dataset_id)
        if tenant is not None:
            query = query.where(Dataset.tenant == tenant)
        return session.scalars(query).one_or_none()


# --------------------------------------------------------------------------------------------- API keys


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str
    is_admin: bool


def hash_api_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_api_key(db: Database, tenant: str, name: str, is_admin: bool = False) -> str:
    """A new key for ``tenant``; returns the plaintext (``ctpd_<43 urlsafe chars>``), which is never stored."""
    if not tenant or not tenant.strip() or len(tenant.strip()) > 200:
        raise ValueError(f"a key needs a tenant name of 1 to 200 characters (e.g. --tenant research), got {tenant!r}")
    if len(name) > 200:
        raise ValueError(f"a key's name has at most 200 characters, got {len(name)}")
    plaintext = f"ctpd_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        id=f"key_{uuid.uuid4().hex}", tenant=tenant.strip(), name=name, key_hash=hash_api_key(plaintext),
        prefix=plaintext[:8], is_admin=is_admin, created_at=utcnow(),
    )
    with db.write() as session:
        session.add(row)
    return plaintext


def authenticate(db: Database, plaintext: str) -> Principal | None:
    """The key's principal, or None for an unknown or revoked key."""
    with db.read() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_api_key(plaintext))).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(tenant=row.tenant, key_id=row.id, is_admin=row.is_admin)


def list_api_keys(db: Database, tenant: str | None = None) -> list[ApiKey]:
    with db.read() as session:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if tenant is not None:
            query = query.where(ApiKey.tenant == tenant)
        return list(session.scalars(query))


def revoke_api_key(db: Database, key_id: str) -> bool:
    with db.write() as session:
        return bool(session.execute(
            update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
        ).rowcount)


__all__ = [
    "TERMINAL_STATUSES",
    "Database",
    "DatasetRow",
    "EventRow",
    "IdempotencyConflict",
    "InvalidCursor",
    "JobNotCancellable",
    "StaleAttempt",
    "record_attempt_writes",
    "release_job",
    "holds",
    "is_unavailable",
    "JobRow",
    "Principal",
    "add_event",
    "add_metric_points",
    "add_metrics",
    "alembic_config",
    "authenticate",
    "claim_job",
    "create_api_key",
    "create_dataset",
    "create_job",
    "finish_job",
    "get_dataset",
    "get_job",
    "heartbeat",
    "is_cancel_requested",
    "job_transitions",
    "list_api_keys",
    "list_events",
    "list_exported_models",
    "list_jobs",
    "metric_series",
    "owns_job",
    "has_export",
    "reap_stale_jobs",
    "request_cancel",
    "revoke_api_key",
    "stale_queued_jobs",
    "update_progress",
]
