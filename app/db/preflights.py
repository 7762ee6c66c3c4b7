"""The preflight rows: a dry run's report (``POST /v1/jobs?dry_run=true``, ``GET /v1/preflights/{id}``).

The API creates the row with its own part of the report (``report["api"]``) and status ``pending``; the worker's
``ctpd.preflight`` task writes the data part (``report["data"]``) and sets ``done``. A row the API decides needs no
worker (its own checks already refuse the spec, so no file the spec names is opened) is created ``done``.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update

from app.db.engine import Database
from app.db.models import Preflight, utcnow

PENDING, DONE = "pending", "done"


def new_preflight_id() -> str:
    return f"pf_{uuid.uuid4().hex}"


def create_preflight(db: Database, *, tenant: str, spec: dict[str, Any], api_report: dict[str, Any],
                     submitted_by_admin: bool, needs_worker: bool) -> Preflight:
    """The row, committed; ``needs_worker=False`` stores it ``done`` (the API's part is the whole report)."""
    now = utcnow()
    row = Preflight(
        id=new_preflight_id(), tenant=tenant, submitted_by_admin=submitted_by_admin, spec=spec,
        status=PENDING if needs_worker else DONE, report={"api": api_report}, created_at=now,
        finished_at=None if needs_worker else now,
    )
    with db.write() as session:
        session.add(row)
    return row


def get_preflight(db: Database, preflight_id: str, tenant: str | None = None) -> Preflight | None:
    """The row, or None; ``tenant=None`` only for the worker (which reads the row it was sent)."""
    with db.read() as session:
        query = select(Preflight).where(Preflight.id == preflight_id)
        if tenant is not None:
            query = query.where(Preflight.tenant == tenant)
        return session.scalars(query).one_or_none()


def finish_preflight(db: Database, preflight_id: str, data_report: dict[str, Any], error: str | None = None) -> bool:
    """Store the worker's part and mark the row done; False when it was done already (a duplicate delivery: the
    first report stands) or is gone."""
    with db.write() as session:
        row = session.scalars(select(Preflight).where(Preflight.id == preflight_id).with_for_update()).one_or_none()
        if row is None or row.status != PENDING:
            return False
        report = {**(row.report or {}), "data": data_report}
        result = session.execute(
            update(Preflight).where(Preflight.id == preflight_id, Preflight.status == PENDING)
            .values(status=DONE, report=report, error=error, finished_at=utcnow())
        )
        return bool(getattr(result, "rowcount", 0))
