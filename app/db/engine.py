"""The database: one engine and its sessions per URL, the migrations, and what counts as "unreachable".

SQLite: write transactions start with ``BEGIN IMMEDIATE`` (a deferred transaction that reads and then
writes can fail with SQLITE_BUSY when another writer got there first); reads use a plain ``BEGIN``.
Sessions never expire what they loaded (``expire_on_commit=False``), so the rows the table modules return
are safe to read after their transaction ends.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Executable, Select, and_, create_engine, event, or_, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
_MIGRATION_LOCK_ID = 7_453_001  # pg_advisory_xact_lock key: one `upgrade` at a time per database


class Database:
    """Owns the engine and sessions of one database URL. Creating it connects to nothing."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.engine: Engine = _make_engine(url, echo=echo)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def ping(self) -> None:
        """``SELECT 1``; raises when the database is unreachable."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def upgrade(self, revision: str = "head") -> None:
        """Run the Alembic migrations up to ``revision`` (from any working directory)."""
        from alembic import command

        config = alembic_config()
        with self._write_engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_ID})
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str | None = None):
    """An Alembic ``Config`` for app/migrations, built without an ini file."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _make_engine(url: str, *, echo: bool) -> Engine:
    if not url.startswith("sqlite"):
        connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
        return create_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args)
    memory = url in ("sqlite://", "sqlite:///:memory:")
    if not memory:
        database = url.split("///", 1)[-1].split("?", 1)[0]
        if database:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=echo,
        connect_args={"check_same_thread": False, "timeout": 30},
        **({"poolclass": StaticPool} if memory else {}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def is_unavailable(error: BaseException) -> bool:
    """A database error that means "not reachable now" (connection refused or dropped, pool timeout), as
    opposed to a bug or bad data (a bad statement, a constraint, a NUL in a text column): only these are worth
    waiting out."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(error, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def escape_nul(value: Any) -> Any:
    """``value`` with NUL characters escaped, recursively: PostgreSQL text and JSON cannot hold U+0000, and an
    event or error message quoting user input (a model's config, a file name) may carry one."""
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if isinstance(value, Mapping):
        return {escape_nul(key): escape_nul(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [escape_nul(item) for item in value]
    return value


def updated_rows(session: Session, statement: Executable) -> int:
    """Run an UPDATE in ``session`` and return how many rows it changed: a compare-and-set's answer.
    ``Session.execute`` is typed as returning a plain ``Result``; for an UPDATE it is a ``CursorResult``."""
    return cast("CursorResult[Any]", session.execute(statement)).rowcount


class InvalidCursor(ValueError):
    """``after`` names no row of this listing."""


def newest_first_page(session: Session, query: Select[Any], model: Any, tenant: str, *, limit: int,
                      after: str | None, noun: str) -> tuple[list[Any], bool]:
    """One page of ``query`` (rows of ``model``, already narrowed to ``tenant``) newest first by (created_at, id):
    the rows after the tenant's row ``after`` (the last id of the previous page), and whether more follow.
    Raises :class:`InvalidCursor` when ``after`` is not one of the tenant's ``noun``s."""
    if after is not None:
        cursor = session.execute(
            select(model.created_at, model.id).where(model.tenant == tenant, model.id == after)
        ).one_or_none()
        if cursor is None:
            raise InvalidCursor(f"after={after!r} is not one of your {noun}s; pass the id of the last {noun} of a page")
        query = query.where(or_(model.created_at < cursor.created_at,
                                and_(model.created_at == cursor.created_at, model.id < cursor.id)))
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
