"""Fixtures for the control-plane tests: the real app on a real database, SQLite and PostgreSQL.

``database_url`` is parametrized over both backends. SQLite: a migrated file per test. PostgreSQL: one
fresh database per test session (``CREATE DATABASE ctpd_test_<random>`` through the ``test`` database,
dropped at the end), migrated once and truncated before each test. The queue is a recording fake: these
tests are about the API and SQL, not the broker (the worker tests run a real one end to end).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from app.db import auth as key_rows
from app.db.engine import Database
from app.db.models import Base
from app.main import create_app
from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_ADMIN_URL = os.environ.get("CTPD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# webhooks: with their outbox and log; webhook_delivery_totals: the deleted endpoints' counts behind /metrics
# Every table of the schema, emptied before each PostgreSQL test: a table left out carries one test's rows into the
# next (a tenant's max_queued set by one test refused the next test's submissions with a 429).
TABLES = tuple(table.name for table in Base.metadata.sorted_tables)

# A valid spec whose files lie outside the artifact root (so no upload is needed).
SPEC = {
    "teacher": {"model": "gemma-3-270m"},
    "student": {"model": "smollm2-135m-instruct"},
    "dataset": {"path": "/data/pairs.jsonl"},
}


class RecordingQueue:
    """A TaskQueue that records what it was asked to enqueue (and can be told to fail)."""

    def __init__(self) -> None:
        self.jobs: list[str] = []
        self.reaper_calls = 0
        self.checkpoint_models: list[tuple[str, str]] = []
        self.preflights: list[str] = []
        self.fail_with: Exception | None = None
        self.on_enqueue = None  # optional callback(job_id), e.g. to look at the database at that moment

    def enqueue_job(self, job_id: str) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if self.on_enqueue is not None:
            self.on_enqueue(job_id)
        self.jobs.append(job_id)

    def enqueue_reaper(self) -> None:
        self.reaper_calls += 1

    def enqueue_checkpoint_model(self, job_id: str, checkpoint_id: str) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.checkpoint_models.append((job_id, checkpoint_id))

    def enqueue_preflight(self, preflight_id: str) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.preflights.append(preflight_id)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"ctpd_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as error:
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable ({error}); start it (.ci/run does)")
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def migrated_postgres(postgres_database: str) -> str:
    database = Database(postgres_database)
    database.upgrade()
    database.dispose()
    return postgres_database


@pytest.fixture(scope="session")
def migrated_sqlite_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "ctpd.db"
    database = Database(f"sqlite:///{path}")
    database.upgrade()
    with database.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    database.dispose()
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        path = tmp_path / "ctpd.db"
        shutil.copyfile(request.getfixturevalue("migrated_sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("migrated_postgres")
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    home = tmp_path / "home"
    return Settings(
        home=home, database_url=database_url, broker_url="memory://", artifact_root=home / "artifacts",
        model_cache=home / "catalog", lease_seconds=60, max_attempts=3, requeue_after_seconds=300,
        max_upload_bytes=1024 * 1024,
        preflight_wait_seconds=0,  # no worker answers a dry run here: a 202 at once (tests/app/test_dry_run.py)
        # Most tests are about the API's shape and use server paths as the embedded single-user service allows;
        # the multi-tenant default (off) is what tests/app/test_policy.py checks.
        allow_server_paths=True,
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    yield database
    database.dispose()


@pytest.fixture
def queue() -> RecordingQueue:
    return RecordingQueue()


@pytest.fixture
def app(settings: Settings, queue: RecordingQueue):
    application = create_app(settings, queue=queue)
    yield application
    application.state.db.dispose()


@pytest.fixture
def client(app) -> TestClient:
    """No API key."""
    return TestClient(app)


def _client_for(app, db: Database, tenant: str, is_admin: bool = False) -> TestClient:
    key = key_rows.create_api_key(db, tenant, f"{tenant} test key", is_admin=is_admin)
    test_client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    test_client.api_key = key  # type: ignore[attr-defined]
    return test_client


@pytest.fixture
def alice(app, db: Database) -> TestClient:
    """A client of tenant ``acme``."""
    return _client_for(app, db, "acme")


@pytest.fixture
def bob(app, db: Database) -> TestClient:
    """A client of tenant ``globex``."""
    return _client_for(app, db, "globex")


@pytest.fixture
def admin(app, db: Database) -> TestClient:
    """An admin client of tenant ``acme``."""
    return _client_for(app, db, "acme", is_admin=True)
