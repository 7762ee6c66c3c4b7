"""0006_scheduling on both backends: jobs stored before it become normal-priority one-GPU jobs, the claim's index
and the scheduling tables come and go with upgrade and downgrade."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from app.db.engine import Database, alembic_config
from tests.app.test_migrations import empty_database  # noqa: F401 (the fixture)


def _downgrade(database: Database, revision: str) -> None:
    config = alembic_config()
    with database._write_engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_0006_backfills_old_jobs_and_downgrades_cleanly(empty_database: Database):  # noqa: F811
    empty_database.upgrade("0005_scrape_indexes")
    with empty_database.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO jobs (id, tenant, status, attempt, max_attempts, spec, metadata, request_hash, created_at, "
            "updated_at) VALUES ('job_old', 't', 'queued', 0, 3, '{}', '{}', 'h', '2026-01-01 00:00:00', "
            "'2026-01-01 00:00:00')"))
    empty_database.upgrade()
    found = inspect(empty_database.engine)
    assert {"workers", "tenant_limits"} <= set(found.get_table_names())
    assert "ix_jobs_status_priority_created_at" in {index["name"] for index in found.get_indexes("jobs")}
    with empty_database.engine.connect() as connection:
        assert connection.execute(text("SELECT priority, gpus_required FROM jobs")).one() == (1, 1)

    _downgrade(empty_database, "0005_scrape_indexes")
    found = inspect(empty_database.engine)
    assert not {"workers", "tenant_limits"} & set(found.get_table_names())
    assert not {"priority", "gpus_required"} & {column["name"] for column in found.get_columns("jobs")}
    with empty_database.engine.connect() as connection:
        assert connection.execute(text("SELECT id FROM jobs")).scalar() == "job_old"  # the rows stay
    empty_database.upgrade()  # and up again
    with empty_database.engine.connect() as connection:
        assert connection.execute(text("SELECT priority FROM jobs")).scalar() == 1
