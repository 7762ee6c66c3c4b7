"""What a job reports: its event log, its metric points and its progress columns, and the fence that every
write of a running attempt passes (docs/service-contract.md, "Repository").

**Fencing.** ``jobs.attempt`` goes up by one at every claim and is the attempt's fencing token. Everything a
running attempt writes (progress, events, metric points here; the heartbeat, the finish and a hand-back in
:mod:`app.db.jobs`) names its attempt, and is refused (:class:`StaleAttempt`, or ``False``) once the job is
no longer held by that attempt: the reaper requeued it, another attempt claimed it, or it ended. A fenced
write locks the job row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises
writers anyway), so a concurrent reap or claim is ordered strictly before or after it.

Every status change (in :mod:`app.db.jobs`) writes its event in the same transaction, with
``data["status"]`` set to the new status: the API derives a job's transitions from those events (an event a
caller adds with :func:`add_event` never counts as a transition).

**Webhooks.** Importing :mod:`app.db.webhooks` (above) installs its listener on ``JobEvent`` inserts: the flush
that writes a transition, a checkpoint or the evaluate stage's end writes the outbox rows that announce it, in
the same transaction, whichever path wrote the event.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import webhooks as _webhook_outbox  # noqa: F401  installs the outbox listener wherever events are written
from app.db.engine import Database, escape_nul
from app.db.models import Job, JobEvent, MetricPoint, utcnow
from ctpd_core.vocab import HELD_STATUSES, EventLevel, EventType

logger = logging.getLogger(__name__)

# Event types that record a status change (their data["status"] is the new status).
TRANSITION_EVENT_TYPES = (
    EventType.JOB_CREATED,
    EventType.JOB_STARTED,
    EventType.JOB_RESTARTED,
    EventType.JOB_HANDED_BACK,
    EventType.CANCEL_REQUESTED,
    EventType.JOB_SUCCEEDED,
    EventType.JOB_FAILED,
    EventType.JOB_CANCELLED,
)


class StaleAttempt(Exception):
    """A write from an attempt that no longer holds the job (requeued, claimed again, or ended)."""

    def __init__(self, job_id: str, attempt: int, current: str) -> None:
        self.job_id, self.attempt = job_id, attempt
        super().__init__(f"job {job_id}: attempt {attempt} no longer holds the job ({current}); write refused")


def new_event(job_id: str, type: str, message: str, *, level: str = EventLevel.INFO, stage: str | None = None,
              data: Mapping[str, Any] | None = None, now: datetime | None = None,
              attempt: int | None = None) -> JobEvent:
    """An event row (NULs escaped), for the caller's session to add in the transaction it belongs to."""
    return JobEvent(job_id=job_id, created_at=now or utcnow(), type=type, level=level, stage=stage,
                    message=escape_nul(message), data=escape_nul(dict(data or {})), attempt=attempt)


def hold(session: Session, job_id: str, attempt: int) -> Job:
    """Lock the job row and check that ``attempt`` still holds it; raises :class:`StaleAttempt`."""
    job = session.scalars(
        select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
    ).one_or_none()
    if job is None:
        raise StaleAttempt(job_id, attempt, "no such job")
    if job.attempt != attempt or job.status not in HELD_STATUSES:
        raise StaleAttempt(job_id, attempt, f"it is {job.status} at attempt {job.attempt}")
    return job


# --------------------------------------------------------------------------- an attempt's fenced writes


@dataclass(frozen=True)
class EventWrite:
    type: str
    message: str
    level: str = EventLevel.INFO
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
    detail: str | None = None  # the sub-stage: "positive" of contrastive:positive, "chosen" of reference:chosen


AttemptWrite = EventWrite | MetricsWrite | ProgressWrite


def record_attempt_writes(db: Database, job_id: str, attempt: int | None, writes: Sequence[AttemptWrite]) -> None:
    """A running attempt's buffered writes, in order, in one fenced transaction: all of them or none.

    Raises :class:`StaleAttempt` (nothing written) once the attempt no longer holds the job, and the
    driver's error when the database is unreachable (nothing written either: the caller keeps them).
    ``attempt=None`` writes unfenced (a local run that holds no lease)."""
    now = utcnow()
    with db.write() as session:
        if attempt is not None:
            hold(session, job_id, attempt)
        for write in writes:
            if isinstance(write, EventWrite):
                session.add(new_event(job_id, write.type, write.message, level=write.level, stage=write.stage,
                                      data=_event_data(write.level, write.data), now=now, attempt=attempt))
            elif isinstance(write, MetricsWrite):
                points = _finite_points(write.points)
                if write.only_missing and points:
                    points = _missing_points(session, job_id, points)
                session.add_all(MetricPoint(job_id=job_id, stage=stage, name=name, step=step, value=value,
                                            created_at=now, attempt=attempt) for stage, step, name, value in points)
            else:
                session.execute(update(Job).where(Job.id == job_id).values(
                    **_progress_values(write.stage, write.step, write.total, write.eta_seconds),
                    progress_detail=write.detail))


def update_progress(db: Database, job_id: str, *, stage: str | None, step: int | None, total: int | None,
                    eta_seconds: float | None, attempt: int | None = None) -> None:
    """The job's stage and progress columns; with ``attempt``, fenced (raises :class:`StaleAttempt`)."""
    record_attempt_writes(db, job_id, attempt, [ProgressWrite(stage, step, total, eta_seconds)])


def add_event(db: Database, job_id: str, type: str, message: str, *, level: str = EventLevel.INFO,
              stage: str | None = None, data: Mapping[str, Any] | None = None, attempt: int | None = None) -> None:
    """A job event (stage_started, stage_finished, checkpoint_saved, ...). A ``"status"`` key in ``data`` is
    dropped: only the status changes of :mod:`app.db.jobs` carry it (they are the job's transitions). With
    ``attempt``, the write is fenced (raises :class:`StaleAttempt`) and the event records its attempt."""
    _event_data(level, data)  # a bad level is refused before any transaction starts
    record_attempt_writes(db, job_id, attempt, [EventWrite(type, message, level=level, stage=stage, data=data)])


def add_metrics(db: Database, job_id: str, stage: str, step: int, metrics: Mapping[str, float],
                attempt: int | None = None) -> None:
    """One point per metric at this step; non-finite (and non-numeric) values are skipped."""
    add_metric_points(db, job_id, ((stage, step, name, value) for name, value in metrics.items()), attempt=attempt)


def add_metric_points(db: Database, job_id: str, points: Iterable[tuple[str, int, str, float]],
                      attempt: int | None = None) -> int:
    """Many ``(stage, step, name, value)`` points in one transaction. Non-finite values are skipped; returns
    how many were written. With ``attempt``, fenced (raises :class:`StaleAttempt`)."""
    finite = _finite_points(points)
    if finite:
        record_attempt_writes(db, job_id, attempt, [MetricsWrite(tuple(finite))])
    return len(finite)


_MAX_PROGRESS = 2**31 - 1  # the columns are 32-bit integers


def _progress_values(stage: str | None, step: int | None, total: int | None, eta_seconds: float | None) -> dict:
    if eta_seconds is not None and not math.isfinite(eta_seconds):
        eta_seconds = None
    return dict(stage=stage, progress_step=_clamp_progress(step), progress_total=_clamp_progress(total),
                eta_seconds=eta_seconds, updated_at=utcnow())


def _clamp_progress(value: int | None) -> int | None:
    return None if value is None else max(0, min(int(value), _MAX_PROGRESS))


def _event_data(level: str, data: Mapping[str, Any] | None) -> dict[str, Any]:
    if level not in tuple(EventLevel):
        raise ValueError(f"event level {level!r}: use info, warning or error")
    return {key: value for key, value in (data or {}).items() if key != "status"}  # status marks transitions only


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


# ----------------------------------------------------------------------------------------------- reads


def list_events(db: Database, job_id: str, *, after: int | None = None, limit: int = 100) -> tuple[list[JobEvent], bool]:
    """A job's events, oldest first; ``after`` is the id of the last event already seen."""
    with db.read() as session:
        query = select(JobEvent).where(JobEvent.job_id == job_id)
        if after is not None:
            query = query.where(JobEvent.id > after)
        rows = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


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


def events_of_types(db: Database, job_id: str, types: Sequence[str]) -> list[JobEvent]:
    """A job's events of these types, oldest first (the checkpoint listing reads its checkpoint events)."""
    with db.read() as session:
        return list(session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type.in_(list(types))).order_by(JobEvent.id)
        ))


def metrics_at_steps(db: Database, job_id: str, stage: str, steps: Sequence[int]) -> dict[int, dict[str, float]]:
    """``{step: {name: value}}`` of one stage at the given steps; a point recorded twice (a resumed attempt)
    keeps its last value."""
    result: dict[int, dict[str, float]] = {step: {} for step in steps}
    if not steps:
        return result
    with db.read() as session:
        rows = session.execute(
            select(MetricPoint.step, MetricPoint.name, MetricPoint.value)
            .where(MetricPoint.job_id == job_id, MetricPoint.stage == stage, MetricPoint.step.in_(list(steps)))
            .order_by(MetricPoint.id)
        )
        for step, name, value in rows:
            result[step][name] = value
    return result
