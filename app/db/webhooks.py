"""Webhook rows: the tenants' endpoints, the outbox and the attempt log (docs/service-contract.md, "Webhooks").

**The outbox.** A job's transitions, checkpoints and evaluation results are events (``job_events``), and every
event row is written by a transaction of :mod:`app.db.jobs` or :func:`app.db.events.record_attempt_writes`. A
mapper listener (:func:`_announce`, installed when this module is imported, which :mod:`app.db.events` does)
runs inside the flush that inserts an event and, for the events a webhook announces, inserts one
``webhook_messages`` row per enabled endpoint of the job's tenant that subscribes to its type, on the same
connection: the message commits with the transition or not at all. Whichever path writes the event (the API's
create and cancel, a worker's claim, finish and hand-back, the reaper), no code of its own has to remember it.
A unique (endpoint, event) pair means no event is announced twice (and ``job.evaluated`` goes to an endpoint
once per job, however many attempts re-run the evaluate stage); a dispatcher that dies after the commit
leaves a pending row that the next one sends.

**The body is frozen** when the message is written (JSON text), and the row's id is the ``webhook-id``, so every
retry and every redelivery of a message is byte-identical and carries the same id: the receiver's idempotency key.

**Sending** (:mod:`app.webhooks.dispatcher`): :func:`claim` leases a due message right before its send by
compare-and-set (``UPDATE ... WHERE lease_expires_at < now``; SQLite and PostgreSQL alike), so two dispatchers
never send one message at once, and counts the attempt at the claim (an attempt that died mid-send still counts). :func:`record_attempt`
writes the attempt's log row and the message's next state, fenced by (lease owner, attempt), and counts the
endpoint's run of failures, disabling it (with a log entry the tenant reads) once the run is long enough.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, event, exists, func, insert, or_, select, update
from sqlalchemy.orm import Mapper

from app.db.engine import Database, escape_nul, updated_rows
from app.db.models import (
    Job,
    JobEvent,
    Webhook,
    WebhookDelivery,
    WebhookDeliveryTotal,
    WebhookMessage,
    utcnow,
)
from app.webhooks.signing import new_secret
from ctpd_core.vocab import EventType, JobStatus, Stage, WebhookEventType

logger = logging.getLogger(__name__)

# Message states.
PENDING, DELIVERED, GAVE_UP = "pending", "delivered", "gave_up"
# Attempt outcomes (the log's ``outcome``): sent and 2xx; failed (retried at next_attempt_at); failed and the retry
# window is over; the entry that records the endpoint's disabling after a run of failures.
OUTCOMES = ("delivered", "failed", "gave_up", "endpoint_disabled")

ALL_EVENT_TYPES: tuple[str, ...] = tuple(WebhookEventType)


# ------------------------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class CreatedWebhook:
    row: Webhook
    secret: str  # shown once, in the answer to the creation


def create_webhook(db: Database, *, tenant: str, url: str, event_types: Sequence[str] | None,
                   description: str | None) -> CreatedWebhook:
    """A new enabled endpoint with a fresh secret (the URL was checked by the caller: app.webhooks.targets)."""
    now = utcnow()
    secret = new_secret()
    row = Webhook(id=f"wh_{uuid.uuid4().hex}", tenant=tenant, url=url, event_types=_event_types(event_types),
                  description=escape_nul(description), secret=secret, enabled=True, disabled_reason=None,
                  disabled_at=None, consecutive_failures=0, created_at=now, updated_at=now)
    with db.write() as session:
        session.add(row)
    return CreatedWebhook(row, secret)


def _event_types(event_types: Sequence[str] | None) -> list[str]:
    """The subscribed types in the vocabulary's order, each once; None: all of them."""
    if event_types is None:
        return list(ALL_EVENT_TYPES)
    unknown = sorted(set(event_types) - set(ALL_EVENT_TYPES))
    if unknown:
        raise ValueError(f"event_types: unknown {unknown}; use some of {', '.join(ALL_EVENT_TYPES)}")
    return [kind for kind in ALL_EVENT_TYPES if kind in set(event_types)]


def get_webhook(db: Database, webhook_id: str, tenant: str) -> Webhook | None:
    """The tenant's endpoint, or None (another tenant's is None too)."""
    with db.read() as session:
        return session.scalars(select(Webhook).where(Webhook.id == webhook_id, Webhook.tenant == tenant)).one_or_none()


def list_webhooks(db: Database, tenant: str) -> list[Webhook]:
    """The tenant's endpoints, oldest first."""
    with db.read() as session:
        return list(session.scalars(
            select(Webhook).where(Webhook.tenant == tenant).order_by(Webhook.created_at, Webhook.id)))


def delete_webhook(db: Database, webhook_id: str, tenant: str) -> bool:
    """Delete the endpoint with its messages and log (cascade); False if there is no such endpoint. Its attempts
    by outcome are added to ``webhook_delivery_totals`` in the same transaction, so the metrics counter that
    :func:`delivery_outcome_counts` feeds never goes down."""
    with db.write() as session:
        row = session.scalars(select(Webhook).where(Webhook.id == webhook_id, Webhook.tenant == tenant)
                              .with_for_update()).one_or_none()
        if row is None:
            return False
        counted = session.execute(select(WebhookDelivery.outcome, func.count())
                                  .where(WebhookDelivery.webhook_id == webhook_id)
                                  .group_by(WebhookDelivery.outcome)).all()
        for outcome, count in counted:
            # The migration wrote one row per outcome: an atomic increment, no upsert race between deletes.
            if not updated_rows(session, update(WebhookDeliveryTotal).where(WebhookDeliveryTotal.outcome == outcome)
                                .values(count=WebhookDeliveryTotal.count + count)):
                session.add(WebhookDeliveryTotal(outcome=outcome, count=count))
        session.delete(row)
    return True


_UNSET: Any = object()


def update_webhook(db: Database, webhook_id: str, tenant: str, *, enabled: bool | None = None,
                   event_types: Sequence[str] | None = None, url: str | None = None,
                   description: str | None = _UNSET) -> Webhook | None:
    """Change an endpoint; None if there is no such endpoint. Enabling it ends its run of failures (and the
    messages still pending within their retry window go out again); disabling it records why."""
    now = utcnow()
    with db.write() as session:
        row = session.scalars(
            select(Webhook).where(Webhook.id == webhook_id, Webhook.tenant == tenant).with_for_update()
        ).one_or_none()
        if row is None:
            return None
        if event_types is not None:
            row.event_types = _event_types(event_types)
        if url is not None:
            row.url = url
        if description is not _UNSET:
            row.description = escape_nul(description)
        if enabled is True:  # (again): the run of failures ends either way
            row.enabled, row.disabled_reason, row.disabled_at, row.consecutive_failures = True, None, None, 0
        elif enabled is False and row.enabled:
            row.enabled, row.disabled_reason, row.disabled_at = False, "disabled with PATCH /v1/webhooks/{id}", now
        row.updated_at = now
    return row


# ------------------------------------------------------------------------------------------ the outbox


def webhook_event_type(event_type: str, stage: str | None, data: Mapping[str, Any]) -> WebhookEventType | None:
    """The webhook type that announces a job event, or None. A status change (``data["status"]``, written only by
    :mod:`app.db.jobs`) is announced as its new status (``cancelling`` by nothing: the cancel ends ``cancelled``);
    a checkpoint as ``job.checkpoint``; the evaluate stage's end as ``job.evaluated``."""
    status = data.get("status")
    if status is not None:
        return _STATUS_EVENTS.get(status)
    if event_type == EventType.CHECKPOINT_SAVED:
        return WebhookEventType.JOB_CHECKPOINT
    if event_type == EventType.STAGE_FINISHED and stage == Stage.EVALUATE:
        return WebhookEventType.JOB_EVALUATED
    return None


_STATUS_EVENTS = {
    JobStatus.QUEUED: WebhookEventType.JOB_QUEUED,
    JobStatus.RUNNING: WebhookEventType.JOB_RUNNING,
    JobStatus.SUCCEEDED: WebhookEventType.JOB_SUCCEEDED,
    JobStatus.FAILED: WebhookEventType.JOB_FAILED,
    JobStatus.CANCELLED: WebhookEventType.JOB_CANCELLED,
}

# Why a job is queued (again), for the receiver: the event that put it there.
_QUEUED_REASONS: dict[str, str] = {EventType.JOB_CREATED: "created", EventType.JOB_RESTARTED: "requeued",
                   EventType.JOB_HANDED_BACK: "handed_back"}


def message_body(kind: WebhookEventType, job_event: JobEvent, job: Any) -> dict[str, Any]:
    """``{"type", "timestamp", "data": {"job_id", "status", "attempt", ...}}`` for one event of ``job`` (its row
    as of the event's transaction)."""
    data_in = job_event.data or {}
    data: dict[str, Any] = {
        "job_id": job_event.job_id,
        "status": data_in.get("status", job.status),
        "attempt": data_in.get("attempt", job_event.attempt if job_event.attempt is not None else job.attempt),
        "name": job.name,
        "metadata": job.job_metadata or {},
    }
    if kind == WebhookEventType.JOB_QUEUED:
        data["reason"] = _QUEUED_REASONS.get(job_event.type, job_event.type)
    elif kind == WebhookEventType.JOB_FAILED:
        data["error"] = {"code": job.error_code or data_in.get("code"), "message": job.error_message,
                         "kind": job.error_kind or data_in.get("kind")}
    elif kind == WebhookEventType.JOB_CANCELLED and "reported" in data_in:
        data["reported"] = data_in["reported"]
    elif kind == WebhookEventType.JOB_CHECKPOINT:
        data.update(stage=data_in.get("stage", job_event.stage), step=data_in.get("step"))
    elif kind == WebhookEventType.JOB_EVALUATED:
        data["metrics"] = dict(data_in.get("summary") or {})
    return {"type": str(kind), "timestamp": job_event.created_at.isoformat(), "data": finite_values(data)}


def finite_values(value: Any) -> Any:
    """JSON has no NaN or Infinity: a non-finite number becomes null (receivers' parsers refuse the bare words)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): finite_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_values(item) for item in value]
    return value


def encode_body(body: Mapping[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)


def _announce(_mapper: Mapper[Any], connection: Connection, job_event: JobEvent) -> None:
    """after_insert of a job event: its outbox rows, on the flush's own connection (so in its transaction)."""
    kind = webhook_event_type(job_event.type, job_event.stage, job_event.data or {})
    if kind is None:
        return
    job = connection.execute(
        select(Job.tenant, Job.status, Job.attempt, Job.name, Job.job_metadata.label("job_metadata"), Job.error_code,
               Job.error_message,
               Job.error_kind).where(Job.id == job_event.job_id)
    ).one_or_none()
    if job is None:
        return
    endpoints = connection.execute(
        select(Webhook.id, Webhook.event_types).where(Webhook.tenant == job.tenant, Webhook.enabled.is_(True))
    ).all()
    subscribed = [webhook_id for webhook_id, event_types in endpoints if kind in (event_types or ())]
    if subscribed and kind == WebhookEventType.JOB_EVALUATED:
        # Once per job and endpoint: an attempt that re-runs the evaluate stage (a hand-back during export, its
        # result cached) writes its stage_finished again, which is not news.
        told = set(connection.scalars(select(WebhookMessage.webhook_id).where(
            WebhookMessage.job_id == job_event.job_id, WebhookMessage.event_type == str(kind),
            WebhookMessage.webhook_id.in_(subscribed))))
        subscribed = [webhook_id for webhook_id in subscribed if webhook_id not in told]
    if not subscribed:
        return
    body = encode_body(message_body(kind, job_event, job))
    now = utcnow()
    connection.execute(insert(WebhookMessage), [
        dict(id=f"msg_{uuid.uuid4().hex}", webhook_id=webhook_id, job_id=job_event.job_id, event_id=job_event.id,
             event_type=str(kind), body=body, status=PENDING, attempts=0, created_at=now, retry_from=now,
             next_attempt_at=now)
        for webhook_id in subscribed
    ])


event.listen(JobEvent, "after_insert", _announce)


# ------------------------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class Claimed:
    """A leased message with what sending it needs."""

    message_id: str
    webhook_id: str
    url: str
    secret: str
    body: str
    attempt: int  # this attempt's number (1, 2, ...)
    retry_from: datetime
    event_type: str
    attempts_before_window: int = 0  # attempts made before the retry window started (a redelivery)

    @property
    def window_attempt(self) -> int:
        """This attempt's number within its retry window (what the backoff counts: a redelivery starts at 1)."""
        return self.attempt - self.attempts_before_window


def _due(now: datetime) -> Any:
    """A pending message whose time has come, that no live lease holds, of an enabled endpoint."""
    free = or_(WebhookMessage.lease_expires_at.is_(None), WebhookMessage.lease_expires_at < now)
    enabled = exists().where(Webhook.id == WebhookMessage.webhook_id, Webhook.enabled.is_(True))
    return and_(WebhookMessage.status == PENDING, WebhookMessage.next_attempt_at <= now, free, enabled)


def due_messages(db: Database, *, now: datetime, limit: int) -> list[str]:
    """The ids of up to ``limit`` due messages, oldest due first (candidates: :func:`claim` decides)."""
    return [message_id for message_id, _ in due_candidates(db, now=now, limit=limit)]


def due_candidates(db: Database, *, now: datetime, limit: int, skip_messages: Collection[str] = (),
                   skip_webhooks: Collection[str] = ()) -> list[tuple[str, str]]:
    """(message id, endpoint id) of up to ``limit`` due messages, oldest due first, leaving out the messages and
    endpoints named (the dispatcher's own in-flight sends and its busy endpoints, so that a slow endpoint's backlog
    does not fill the page)."""
    query = select(WebhookMessage.id, WebhookMessage.webhook_id).where(_due(now))
    if skip_messages:
        query = query.where(WebhookMessage.id.not_in(list(skip_messages)))
    if skip_webhooks:
        query = query.where(WebhookMessage.webhook_id.not_in(list(skip_webhooks)))
    with db.read() as session:
        rows = session.execute(
            query.order_by(WebhookMessage.next_attempt_at, WebhookMessage.created_at, WebhookMessage.event_id)
            .limit(limit)).all()
    return [(message_id, webhook_id) for message_id, webhook_id in rows]


def claim(db: Database, message_id: str, owner: str, *, now: datetime, lease_seconds: float) -> Claimed | None:
    """Lease one due message by compare-and-set and count the attempt; None when it is no longer due (sent,
    leased by another dispatcher, its endpoint disabled or deleted). Claimed right before its send, so a lease
    only has to outlive one attempt."""
    with db.write() as session:
        if not updated_rows(session, update(WebhookMessage).where(WebhookMessage.id == message_id, _due(now)).values(
                lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=WebhookMessage.attempts + 1)):
            return None
        message, url, secret = session.execute(
            select(WebhookMessage, Webhook.url, Webhook.secret)
            .join(Webhook, Webhook.id == WebhookMessage.webhook_id).where(WebhookMessage.id == message_id)
            .execution_options(populate_existing=True)
        ).one()
        return Claimed(message.id, message.webhook_id, url, secret, message.body, message.attempts,
                       message.retry_from, message.event_type, message.attempts_before_window)


def claim_due(db: Database, owner: str, *, now: datetime, lease_seconds: float, limit: int) -> list[Claimed]:
    """Lease up to ``limit`` due messages at once (tests, and a sender that sends them all at once)."""
    claimed = (claim(db, message_id, owner, now=now, lease_seconds=lease_seconds)
               for message_id in due_messages(db, now=now, limit=limit))
    return [message for message in claimed if message is not None]


@dataclass(frozen=True)
class AttemptResult:
    delivered: bool
    status_code: int | None
    latency_ms: float | None
    error: str | None


def record_attempt(db: Database, claimed: Claimed, owner: str, result: AttemptResult, *, now: datetime,
                   next_attempt_at: datetime | None, disable_after: int) -> str | None:
    """The attempt's log row and the message's next state: delivered; pending again at ``next_attempt_at``; or
    given up (``next_attempt_at`` None after a failure). A failure lengthens the endpoint's run of failures and a
    run of ``disable_after`` disables it; a delivery ends the run. Returns the outcome, or None when this
    dispatcher no longer holds the message (its lease ran out and another took it: nothing is written).

    A redelivery asked for while this attempt was in flight (:func:`redeliver`) is queued behind it: the attempt
    is logged and counted, its lease released, and the message keeps the redelivery's state (pending, due now,
    its new window) instead of this attempt's."""
    if result.delivered:
        outcome, values = "delivered", dict(status=DELIVERED, delivered_at=now, next_attempt_at=None)
    elif next_attempt_at is not None:
        outcome, values = "failed", dict(status=PENDING, next_attempt_at=next_attempt_at)
    else:
        outcome, values = "gave_up", dict(status=GAVE_UP, next_attempt_at=None)
    fence = (WebhookMessage.id == claimed.message_id, WebhookMessage.lease_owner == owner,
             WebhookMessage.attempts == claimed.attempt)
    with db.write() as session:
        held = updated_rows(session, update(WebhookMessage).where(
            *fence, WebhookMessage.attempts_before_window == claimed.attempts_before_window,
        ).values(lease_owner=None, lease_expires_at=None, **values))
        if not held:
            # Redelivered meanwhile: release the lease, keep the redelivery's state.
            if not updated_rows(session, update(WebhookMessage).where(*fence)
                                .values(lease_owner=None, lease_expires_at=None)):
                logger.warning("webhook message %s: attempt %d finished after its lease was taken over; not "
                               "recorded", claimed.message_id, claimed.attempt)
                return None
            if outcome == "gave_up":
                outcome = "failed"  # the redelivery tries it again
        session.add(WebhookDelivery(
            webhook_id=claimed.webhook_id, message_id=claimed.message_id, attempt=claimed.attempt, attempted_at=now,
            status_code=result.status_code, latency_ms=result.latency_ms, outcome=outcome,
            error=escape_nul(result.error), next_attempt_at=values["next_attempt_at"]))
        if result.delivered:
            session.execute(update(Webhook).where(Webhook.id == claimed.webhook_id, Webhook.consecutive_failures != 0)
                            .values(consecutive_failures=0))
            return outcome
        session.execute(update(Webhook).where(Webhook.id == claimed.webhook_id)
                        .values(consecutive_failures=Webhook.consecutive_failures + 1))
        failures = session.scalar(select(Webhook.consecutive_failures).where(Webhook.id == claimed.webhook_id)) or 0
        if failures >= disable_after:
            reason = (f"disabled after {failures} consecutive failed delivery attempts (the last: "
                      f"{result.error or result.status_code}); fix the endpoint, then re-enable it with "
                      "PATCH /v1/webhooks/{id} {\"enabled\": true}")
            if updated_rows(session, update(Webhook).where(Webhook.id == claimed.webhook_id, Webhook.enabled.is_(True))
                            .values(enabled=False, disabled_reason=reason, disabled_at=now, updated_at=now)):
                session.add(WebhookDelivery(
                    webhook_id=claimed.webhook_id, message_id=claimed.message_id, attempt=claimed.attempt,
                    attempted_at=now, outcome="endpoint_disabled", error=reason))
                logger.warning("webhook %s disabled after %d consecutive failed attempts (last: %s)",
                               claimed.webhook_id, failures, result.error or result.status_code)
    return outcome


# --------------------------------------------------------------------------------- the log, redelivery


@dataclass(frozen=True)
class DeliveryView:
    """One entry of an endpoint's log, with its message's type and job."""

    row: WebhookDelivery
    event_type: str
    job_id: str | None


def list_deliveries(db: Database, webhook_id: str, *, after: int | None = None, limit: int = 20
                    ) -> tuple[list[DeliveryView], bool]:
    """The endpoint's attempts, newest first; ``after`` is the id of the last entry of the previous page."""
    with db.read() as session:
        query = (select(WebhookDelivery, WebhookMessage.event_type, WebhookMessage.job_id)
                 .join(WebhookMessage, WebhookMessage.id == WebhookDelivery.message_id)
                 .where(WebhookDelivery.webhook_id == webhook_id))
        if after is not None:
            query = query.where(WebhookDelivery.id < after)
        rows = session.execute(query.order_by(WebhookDelivery.id.desc()).limit(limit + 1)).all()
    views = [DeliveryView(row, event_type, job_id) for row, event_type, job_id in rows]
    return views[:limit], len(views) > limit


def redeliver(db: Database, webhook_id: str, message_id: str) -> bool:
    """Send the message again, now, with its id and body; False if the endpoint has no such message. Its retry
    window starts again, and so does its backoff (``attempts_before_window``: the attempts made so far). A message
    in flight (leased) keeps its lease: the redelivery is queued behind the attempt, which
    :func:`record_attempt` finds (the window's base moved) and leaves in place, so it goes out once that attempt
    ends."""
    now = utcnow()
    with db.write() as session:
        return bool(updated_rows(session, update(WebhookMessage).where(
            WebhookMessage.id == message_id, WebhookMessage.webhook_id == webhook_id
        ).values(status=PENDING, next_attempt_at=now, retry_from=now, delivered_at=None,
                 attempts_before_window=WebhookMessage.attempts)))


def list_messages(db: Database, webhook_id: str) -> list[WebhookMessage]:
    """The endpoint's messages, oldest first (tests and operators; the API shows the attempt log)."""
    with db.read() as session:
        return list(session.scalars(select(WebhookMessage).where(WebhookMessage.webhook_id == webhook_id)
                                    .order_by(WebhookMessage.created_at, WebhookMessage.event_id)))


def delivery_outcome_counts(db: Database) -> dict[str, int]:
    """Attempts by outcome, every outcome present (for the metrics endpoint: counters that only go up): the live
    log's and the deleted endpoints' (``webhook_delivery_totals``, added to by :func:`delete_webhook`)."""
    with db.read() as session:
        counted = dict(session.execute(
            select(WebhookDelivery.outcome, func.count()).group_by(WebhookDelivery.outcome)).all())
        deleted = dict(session.execute(select(WebhookDeliveryTotal.outcome, WebhookDeliveryTotal.count)).all())
    return {outcome: int(counted.get(outcome, 0)) + int(deleted.get(outcome, 0)) for outcome in OUTCOMES}
