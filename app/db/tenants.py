"""Per-tenant limits (docs/service-contract.md, "Scheduling"): the settings' defaults, an admin's overrides.

``max_running`` bounds the tenant's running (and cancelling) jobs and is enforced by the claim
(:func:`app.db.jobs.claim_next_job`); ``max_queued`` bounds its queued jobs and is enforced by the insert
(:func:`app.db.jobs.create_job`). A row holds an admin's override; a null column, or no row, is the default.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.engine import Database
from app.db.models import Job, TenantLimits, utcnow
from ctpd_core.vocab import HELD_STATUSES, JobStatus


@dataclass(frozen=True)
class Limits:
    """One tenant's effective limits, and the overrides they came from (None: the default applies)."""

    tenant: str
    max_running: int
    max_queued: int
    max_running_override: int | None = None
    max_queued_override: int | None = None


def effective_limits(session: Session, tenants: Iterable[str], default_running: int,
                     default_queued: int) -> dict[str, Limits]:
    names = sorted(set(tenants))
    rows = {row.tenant: row for row in session.scalars(
        select(TenantLimits).where(TenantLimits.tenant.in_(names)))} if names else {}
    limits = {}
    for tenant in names:
        row = rows.get(tenant)
        running = row.max_running if row is not None else None
        queued = row.max_queued if row is not None else None
        limits[tenant] = Limits(tenant, running if running is not None else default_running,
                                queued if queued is not None else default_queued, running, queued)
    return limits


def get_limits(db: Database, tenant: str, default_running: int, default_queued: int) -> Limits:
    with db.read() as session:
        return effective_limits(session, [tenant], default_running, default_queued)[tenant]


def set_limits(db: Database, tenant: str, max_running: int | None, max_queued: int | None,
               default_running: int, default_queued: int) -> Limits:
    """Replace the tenant's overrides (None: back to the default); returns the effective limits."""
    with db.write() as session:
        row = session.get(TenantLimits, tenant)
        if row is None:
            row = TenantLimits(tenant=tenant)
            session.add(row)
        row.max_running, row.max_queued, row.updated_at = max_running, max_queued, utcnow()
        session.flush()
        return effective_limits(session, [tenant], default_running, default_queued)[tenant]


def job_counts(session: Session, tenant: str | None = None) -> dict[str, tuple[int, int]]:
    """``tenant -> (running, queued)``: running counts cancelling jobs too (they still hold a worker)."""
    query = (select(Job.tenant, Job.status, func.count()).where(Job.status.in_([*HELD_STATUSES, JobStatus.QUEUED]))
             .group_by(Job.tenant, Job.status))
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    counts: dict[str, list[int]] = {}
    for name, status, count in session.execute(query):
        pair = counts.setdefault(name, [0, 0])
        pair[0 if status in HELD_STATUSES else 1] += int(count)
    return {name: (running, queued) for name, (running, queued) in counts.items()}
