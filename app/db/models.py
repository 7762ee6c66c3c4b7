"""The tables (docs/service-contract.md, "Tables"): SQLAlchemy 2.0 typed ORM.

Alembic migration ``0001_initial`` creates exactly these (a test compares the migrated schema with this
metadata). Timestamps are timezone-aware UTC on both SQLite and PostgreSQL (:class:`UTCDateTime`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The statuses come from the shared vocabulary; re-exported here beside the column that stores them.
from ctpd_core.vocab import ACTIVE_STATUSES, TERMINAL_STATUSES, JobStatus  # noqa: F401

JOB_STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)

# jobs.priority: the spec's priority as the rank the claim orders by (ascending).
PRIORITY_RANKS: dict[str, int] = {"high": 0, "normal": 1, "low": 2}
PRIORITY_NAMES: dict[int, str] = {rank: name for name, rank in PRIORITY_RANKS.items()}

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# An int64 id that is still SQLite's INTEGER PRIMARY KEY (the only column SQLite autoincrements).
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always hands back aware UTC datetimes (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the plaintext
    prefix: Mapped[str] = mapped_column(String(16))  # the key's first 8 characters, for display
    is_admin: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key"),
        Index("ix_jobs_tenant_created_at_id", "tenant", "created_at", "id"),
        Index("ix_jobs_status", "status"),  # /metrics: jobs by status, the queue, the running jobs (0005)
        # The claim (app/db/jobs.claim_next_job) and the queue position: queued jobs in claim order (0006).
        Index("ix_jobs_status_priority_created_at", "status", "priority", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # job_<uuid4 hex>
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # What the progress counts within the stage: "positive" (π+) in contrastive, "chosen" in a log-prob pass.
    progress_detail: Mapped[str | None] = mapped_column(String(64), nullable=True)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer)  # 0 until the first claim; +1 per claim: the fencing token
    max_attempts: Mapped[int] = mapped_column(Integer)
    # Attempts handed back on SIGTERM (a deploy, not a failure): they do not count against max_attempts.
    handoffs: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    # Whether an admin key submitted the job: the worker applies the same path and remote-code policy.
    submitted_by_admin: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the resolved spec, defaults filled in
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    job_metadata: Mapped[dict[str, str]] = mapped_column("metadata", JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)  # user | system
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    export_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Claim order: the spec's priority as a rank (PRIORITY_RANKS: 0 high, 1 normal, 2 low; lower claims first),
    # and the GPUs one worker must have (JobSpec.gpus_required). Columns, not spec lookups, so the claim is indexed.
    priority: Mapped[int] = mapped_column(Integer, server_default=text("1"), default=1)
    gpus_required: Mapped[int] = mapped_column(Integer, server_default=text("1"), default=1)


class JobEvent(Base):
    __tablename__ = "job_events"
    # /metrics: the stage_finished and job_restarted events of the whole deployment (0005)
    __table_args__ = (Index("ix_job_events_type", "type"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)  # the feed's cursor
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    type: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(16))  # info | warning | error
    stage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempt: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the writing attempt; null: the API


class MetricPoint(Base):
    __tablename__ = "metric_points"
    __table_args__ = (
        Index("ix_metric_points_job_id_name_step", "job_id", "name", "step"),
        Index("ix_metric_points_name_stage", "name", "stage"),  # /metrics: the training figures by stage (0005)
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(64))  # distill, contrastive:positive, evaluate, ...
    name: Mapped[str] = mapped_column(String(128))
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    attempt: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the writing attempt


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # ds_<uuid4 hex>
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))  # jsonl | json | parquet
    num_rows: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)  # absolute path of the file under the artifact root
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # What the upload's validator counted, and per tokenizer the token lengths measured later (0007_dataset_stats);
    # None for datasets stored before it.
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


# --------------------------------------------------------------------------------------------- webhooks
# app/db/webhooks.py: endpoints, the outbox written in the transaction of the event it announces, the attempt log.


class Webhook(Base):
    """A tenant's endpoint. The secret signs every message (HMAC needs it in the clear; it is never shown again)."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_tenant_created_at_id", "tenant", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # wh_<uuid4 hex>
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str]] = mapped_column(JSON)  # WebhookEventType values
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    secret: Mapped[str] = mapped_column(String(100))  # whsec_<base64>
    enabled: Mapped[bool] = mapped_column(Boolean)
    disabled_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer)  # failed attempts since the last delivered one
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WebhookMessage(Base):
    """The outbox: one row per (announced event, endpoint), written in the event's own transaction. Its id is the
    ``webhook-id`` of every attempt and its body is frozen, so retries and redeliveries are byte-identical."""

    __tablename__ = "webhook_messages"
    # One message per event and endpoint: a transition is never announced twice.
    __table_args__ = (
        UniqueConstraint("webhook_id", "event_id"),
        Index("ix_webhook_messages_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # msg_<uuid4 hex>: the webhook-id
    webhook_id: Mapped[str] = mapped_column(String(40), ForeignKey("webhooks.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True,
                                               index=True)
    event_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("job_events.id", ondelete="CASCADE"),
                                                 nullable=True)
    event_type: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)  # the JSON sent, frozen when the message was written
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | gave_up
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    retry_from: Mapped[datetime] = mapped_column(UTCDateTime())  # the retry window starts here (a redelivery: now)
    # The attempts made before the retry window started (a redelivery): the backoff counts the attempts since.
    attempts_before_window: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # null: nothing due
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the dispatcher sending it
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebhookDelivery(Base):
    """One delivery attempt of a message (``GET /v1/webhooks/{id}/deliveries``), and the disabling of an endpoint."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_webhook_id_id", "webhook_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)  # the log's cursor
    webhook_id: Mapped[str] = mapped_column(String(40), ForeignKey("webhooks.id", ondelete="CASCADE"))
    message_id: Mapped[str] = mapped_column(String(40), ForeignKey("webhook_messages.id", ondelete="CASCADE"),
                                            index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str] = mapped_column(String(32))  # delivered | failed | gave_up | endpoint_disabled
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebhookDeliveryTotal(Base):
    """Attempts by outcome of the endpoints deleted since (their log rows went with them): with the live log's
    counts, the ``ctpd_webhook_deliveries_total`` counter, which never goes down."""

    __tablename__ = "webhook_delivery_totals"

    outcome: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


# ------------------------------------------------------------------------------------------- scheduling
# app/db/workers.py (who can run what), app/db/tenants.py (per-tenant limits), app/db/jobs.claim_next_job (0006).


class Worker(Base):
    """A live Celery worker that consumes ``train``: what it can run. Upserted at start, refreshed while it runs,
    deleted at a clean shutdown; a killed one's row goes stale (``last_seen_at``) and stops counting."""

    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(200), primary_key=True)  # the Celery node name (train1@host)
    hostname: Mapped[str] = mapped_column(String(255))
    gpus: Mapped[int] = mapped_column(Integer)  # 0: a CPU host (it still runs 1-device jobs, on CPU)
    gpu_memory_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)  # per GPU (the smallest); null: none
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class TenantLimits(Base):
    """An admin's override of one tenant's limits (PUT /v1/tenants/{tenant}/limits); null: the settings' default."""

    __tablename__ = "tenant_limits"

    tenant: Mapped[str] = mapped_column(String(200), primary_key=True)
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_queued: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


# ------------------------------------------------------------------------------------------- preflights
# app/db/preflights.py: a dry run of a job (POST /v1/jobs?dry_run=true), its report written by the API and a worker (0008).


class Preflight(Base):
    """A dry run: the API's part of the report (spec, memory plan, steps) is written at creation; a worker's task
    (``ctpd.preflight``) adds the data part (tokenizers, alignment, truncation) and sets ``finished_at``."""

    __tablename__ = "preflights"
    __table_args__ = (Index("ix_preflights_tenant_created_at", "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # pf_<uuid4 hex>
    tenant: Mapped[str] = mapped_column(String(200))
    # Whether an admin key asked: the worker applies the same path and remote-code policy as to a job.
    submitted_by_admin: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the resolved spec
    status: Mapped[str] = mapped_column(String(16))  # pending (the worker's part is due) | done
    report: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"api": {...}, "data": {...} | absent}
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # the worker's task failed: why (also a report error)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
