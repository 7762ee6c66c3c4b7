"""Webhooks: the tenants' endpoints (``webhooks``), the outbox (``webhook_messages``: one row per announced
event and endpoint, written in the event's own transaction), the attempt log (``webhook_deliveries``) and the
deleted endpoints' attempt counts (``webhook_delivery_totals``).

Revision ID: 0004_webhooks
Revises: 0003_progress_detail
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_webhooks"
down_revision = "0003_progress_detail"
branch_labels = None
depends_on = None

# An int64 id that is still SQLite's INTEGER PRIMARY KEY (the only column SQLite autoincrements).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_types", sa.JSON(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("secret", sa.String(100), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("disabled_at", _utc(), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_webhooks"),
    )
    op.create_index("ix_webhooks_tenant", "webhooks", ["tenant"])
    op.create_index("ix_webhooks_tenant_created_at_id", "webhooks", ["tenant", "created_at", "id"])
    op.create_table(
        "webhook_messages",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("webhook_id", sa.String(40), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("retry_from", _utc(), nullable=False),
        sa.Column("attempts_before_window", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", _utc(), nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", _utc(), nullable=True),
        sa.Column("delivered_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_messages"),
        sa.UniqueConstraint("webhook_id", "event_id", name="uq_webhook_messages_webhook_id_event_id"),
        sa.ForeignKeyConstraint(["webhook_id"], ["webhooks.id"], name="fk_webhook_messages_webhook_id_webhooks",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_webhook_messages_job_id_jobs", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["event_id"], ["job_events.id"], name="fk_webhook_messages_event_id_job_events",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_webhook_messages_job_id", "webhook_messages", ["job_id"])
    op.create_index("ix_webhook_messages_status_next_attempt_at", "webhook_messages", ["status", "next_attempt_at"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("webhook_id", sa.String(40), nullable=False),
        sa.Column("message_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("attempted_at", _utc(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
        sa.ForeignKeyConstraint(["webhook_id"], ["webhooks.id"], name="fk_webhook_deliveries_webhook_id_webhooks",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["message_id"], ["webhook_messages.id"],
                                name="fk_webhook_deliveries_message_id_webhook_messages", ondelete="CASCADE"),
    )
    op.create_index("ix_webhook_deliveries_message_id", "webhook_deliveries", ["message_id"])
    op.create_index("ix_webhook_deliveries_webhook_id_id", "webhook_deliveries", ["webhook_id", "id"])
    # The deleted endpoints' attempts by outcome (the metrics counter never goes down), one row per outcome.
    totals = op.create_table(
        "webhook_delivery_totals",
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("outcome", name="pk_webhook_delivery_totals"),
    )
    op.bulk_insert(totals, [{"outcome": outcome, "count": 0}
                            for outcome in ("delivered", "failed", "gave_up", "endpoint_disabled")])


def downgrade() -> None:
    op.drop_table("webhook_delivery_totals")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_messages")
    op.drop_table("webhooks")
