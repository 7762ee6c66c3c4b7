"""Indexes for ``GET /metrics`` (app/metrics.py reads the deployment's figures from SQL at every uncached scrape):
``jobs(status)`` for jobs by status, the queue and the running jobs; ``job_events(type)`` for the stage durations
(``stage_finished``) and lease expiries (``job_restarted``); ``metric_points(name, stage)`` for the training
figures (``step_seconds`` and ``tokens`` by stage). Without them each scrape scans the three tables whole.

Revision ID: 0005_scrape_indexes
Revises: 0004_webhooks
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0005_scrape_indexes"
down_revision = "0004_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_job_events_type", "job_events", ["type"])
    op.create_index("ix_metric_points_name_stage", "metric_points", ["name", "stage"])


def downgrade() -> None:
    op.drop_index("ix_metric_points_name_stage", table_name="metric_points")
    op.drop_index("ix_job_events_type", table_name="job_events")
    op.drop_index("ix_jobs_status", table_name="jobs")
