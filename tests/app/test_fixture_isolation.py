"""The service tests' database fixture: each test starts on an empty database, whatever the test before it wrote
(the PostgreSQL database is shared by the session and emptied per test; SQLite is a fresh copy)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from app.db.models import Base

SEEDED = {"webhook_delivery_totals"}  # rows the migrations write (a counter per outcome), not a test's

@pytest.mark.parametrize("round_", [1, 2])  # the second round sees what the first one wrote, were it kept
def test_every_table_starts_empty_and_this_test_leaves_rows_behind(database_url, round_):
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            counts = {table.name: connection.execute(select(func.count()).select_from(table)).scalar_one()
                      for table in Base.metadata.sorted_tables}
            assert {name: count for name, count in counts.items() if count and name not in SEEDED} == {}
            # A row in a table nothing references (so no TRUNCATE ... CASCADE reaches it by accident).
            tenant_limits = Base.metadata.tables["tenant_limits"]
            connection.execute(tenant_limits.insert().values(tenant=f"leak-{round_}", max_running=1, max_queued=1,
                                                             updated_at=func.now()))
    finally:
        engine.dispose()
