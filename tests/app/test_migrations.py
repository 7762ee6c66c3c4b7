"""``alembic upgrade head`` on an empty database gives exactly the models' schema, on both backends."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, inspect, text
from sqlalchemy.pool import NullPool

from app.db.engine import Database
from app.db.models import Base
from tests.app.conftest import POSTGRES_ADMIN_URL


def _diffs(database: Database, metadata: MetaData) -> list:
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, metadata)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path: Path):
    """A database with no tables at all (not even alembic_version)."""
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'empty.db'}")
        yield database
        database.dispose()
        return
    # A fresh database of its own: the session database is already migrated.
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"ctpd_test_migrate_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    database = Database(admin.url.set(database=name).render_as_string(hide_password=False))
    try:
        yield database
    finally:
        database.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_upgrade_head_matches_the_models(empty_database: Database):
    assert inspect(empty_database.engine).get_table_names() == []
    empty_database.upgrade()
    assert set(inspect(empty_database.engine).get_table_names()) == {*Base.metadata.tables, "alembic_version"}
    assert _diffs(empty_database, Base.metadata) == []

    # The comparison does see a difference when there is one (so the empty list above means something).
    drifted = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    Table("jobs", drifted, Column("not_in_the_migrations", Integer), extend_existing=True)
    assert any(diff[0] == "add_column" and diff[3].name == "not_in_the_migrations" for diff in _diffs(empty_database, drifted))

    empty_database.upgrade()  # at head already: a no-op
    with empty_database.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == _head_revision()


def _head_revision() -> str:
    """The newest revision of app/migrations (the one file no other revision names as its down_revision)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).resolve().parents[2] / "app" / "migrations"))
    heads = ScriptDirectory.from_config(config).get_heads()
    assert len(heads) == 1, f"the migrations have {len(heads)} heads: {heads}; give the newest one a single parent"
    return heads[0]


def test_0002_keeps_the_rows_of_0001(empty_database: Database):
    """A deployment upgraded in place: jobs and events written at 0001 survive, with the new columns' defaults."""
    empty_database.upgrade("0001_initial")
    with empty_database.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO jobs (id, tenant, status, attempt, max_attempts, spec, metadata, request_hash, created_at, "
            "updated_at) VALUES ('job_old', 't', 'running', 1, 3, '{}', '{}', 'h', '2026-01-01 00:00:00', "
            "'2026-01-01 00:00:00')"))
        connection.execute(text(
            "INSERT INTO job_events (job_id, created_at, type, level, message, data) VALUES "
            "('job_old', '2026-01-01 00:00:00', 'job_created', 'info', 'created', '{}')"))
    empty_database.upgrade()
    with empty_database.engine.connect() as connection:
        assert connection.execute(text("SELECT handoffs, submitted_by_admin FROM jobs")).one() == (0, False)
        assert connection.execute(text("SELECT attempt FROM job_events")).scalar() is None


def test_upgrade_runs_from_any_working_directory(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    database = Database(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    database.upgrade()
    assert "jobs" in inspect(database.engine).get_table_names()
    database.dispose()


SCRAPE_INDEXES = {"jobs": "ix_jobs_status", "job_events": "ix_job_events_type",
                  "metric_points": "ix_metric_points_name_stage"}


def test_0005_adds_the_indexes_the_metrics_scrape_reads_by(empty_database: Database):
    """An uncached /metrics scrape filters jobs by status, events by type and metric points by name: 0005 indexes
    them (without it, every scrape scans the three tables whole)."""
    def indexes() -> dict[str, set[str]]:
        found = inspect(empty_database.engine)
        return {table: {index["name"] for index in found.get_indexes(table)} for table in SCRAPE_INDEXES}

    empty_database.upgrade("0004_webhooks")
    assert all(name not in indexes()[table] for table, name in SCRAPE_INDEXES.items())
    empty_database.upgrade("0005_scrape_indexes")
    assert all(name in indexes()[table] for table, name in SCRAPE_INDEXES.items())
