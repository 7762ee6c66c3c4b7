"""Preflights: ``POST /v1/jobs?dry_run=true`` stores a dry run's report here (the API's part at once, a worker's
data part when its ``ctpd.preflight`` task has run), so a client that was answered 202 polls
``GET /v1/preflights/{id}``. Nothing else reads or writes them; a job is never created from one.

Revision ID: 0008_preflights
Revises: 0007_dataset_stats
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_preflights"
down_revision = "0007_dataset_stats"
branch_labels = None
depends_on = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "preflights",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("submitted_by_admin", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_preflights"),
    )
    op.create_index("ix_preflights_tenant_created_at", "preflights", ["tenant", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_preflights_tenant_created_at", table_name="preflights")
    op.drop_table("preflights")
