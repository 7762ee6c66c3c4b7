"""Fixtures of the worker tests: a migrated SQLite database built from each module's ``settings`` fixture."""

from __future__ import annotations

import pytest

from app.db.engine import Database


@pytest.fixture
def db(settings):
    database = Database(settings.database_url)
    database.upgrade()
    yield database
    database.dispose()
