"""Fixtures of the worker tests: a migrated SQLite database built from each module's ``settings`` fixture."""

from __future__ import annotations

import pytest

from app.db import repository


@pytest.fixture
def db(settings):
    database = repository.Database(settings.database_url)
    database.upgrade()
    yield database
    database.dispose()
