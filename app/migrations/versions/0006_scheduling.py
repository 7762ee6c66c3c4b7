"""Scheduling across many workers: the claim order and placement columns of ``jobs``, the ``workers`` that
advertise what they can run, and the admins' per-tenant ``tenant_limits``.

* ``jobs.priority``: the spec's priority as a rank (0 high, 1 normal, 2 low); ``jobs.gpus_required``: the GPUs
  one worker must have. Jobs stored before this revision had neither in their spec: they are normal-priority
  one-GPU jobs (the server defaults backfill them).
* ``ix_jobs_status_priority_created_at``: the claim reads the queued jobs in (priority, created_at) order.

Revision ID: 0006_scheduling
Revises: 0005_scrape_indexes
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_scheduling"
down_revision = "0005_scrape_indexes"
branch_labels = None
depends_on = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), server_default=sa.text("1"), nullable=False))
        batch.add_column(sa.Column("gpus_required", sa.Integer(), server_default=sa.text("1"), nullable=False))
    op.create_index("ix_jobs_status_priority_created_at", "jobs", ["status", "priority", "created_at"])
    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("gpu_memory_mb", sa.Integer(), nullable=True),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("last_seen_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name="pk_workers"),
    )
    op.create_index("ix_workers_last_seen_at", "workers", ["last_seen_at"])
    op.create_table(
        "tenant_limits",
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("max_running", sa.Integer(), nullable=True),
        sa.Column("max_queued", sa.Integer(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", name="pk_tenant_limits"),
    )


def downgrade() -> None:
    op.drop_table("tenant_limits")
    op.drop_index("ix_workers_last_seen_at", table_name="workers")
    op.drop_table("workers")
    op.drop_index("ix_jobs_status_priority_created_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("gpus_required")
        batch.drop_column("priority")
