"""``jobs.progress_detail``: the sub-stage the progress columns count (``positive`` / ``negative`` for π+ / π−
in the contrastive stage, ``chosen`` / ``rejected`` in a log-prob pass), so a client can name it.

Revision ID: 0003_progress_detail
Revises: 0002_attempt_fencing
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_progress_detail"
down_revision = "0002_attempt_fencing"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("progress_detail", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("progress_detail")
