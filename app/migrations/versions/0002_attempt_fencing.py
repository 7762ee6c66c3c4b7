"""Attempt fencing and hand-backs: ``jobs.handoffs``, ``jobs.submitted_by_admin``, and the writing attempt on
every event and metric point.

* ``handoffs`` counts the attempts a job handed back on SIGTERM (a deploy, not a failure): the reaper fails a
  job only when ``attempt - handoffs`` reaches ``max_attempts``.
* ``submitted_by_admin`` records whether the key that submitted the job was an admin's, so the worker, which
  opens the files, applies the same path and remote-code policy as the API did.
* ``job_events.attempt`` / ``metric_points.attempt``: the attempt that wrote the row (null for rows the API
  writes), so a stale attempt's writes are refused and the history shows who wrote what.

Revision ID: 0002_attempt_fencing
Revises: 0001_initial
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_attempt_fencing"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("handoffs", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch.add_column(
            sa.Column("submitted_by_admin", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=True))
    with op.batch_alter_table("metric_points") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("metric_points") as batch:
        batch.drop_column("attempt")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("attempt")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("submitted_by_admin")
        batch.drop_column("handoffs")
