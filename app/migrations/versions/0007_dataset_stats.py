"""A dataset's statistics: ``datasets.stats`` (JSON), what the upload's validator counted (rows, the shape of
the rows, duplicates, identical chosen/rejected, text lengths) and, keyed by tokenizer, the token lengths a
preflight or a prepare stage measured. Datasets stored before this revision have none (NULL): their page says
the statistics are not known and how to get them (upload the file again).

Revision ID: 0007_dataset_stats
Revises: 0006_scheduling
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_dataset_stats"
down_revision = "0006_scheduling"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("stats", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("stats")
