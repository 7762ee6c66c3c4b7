"""/v1/tenants/{tenant}/limits: a tenant's scheduling limits; admin keys only (docs/service-contract.md, "Scheduling").

``max_running`` (jobs running at once, enforced by the claim) and ``max_queued`` (queued jobs, enforced at
submission: a 429) default to the deployment's settings (``CTPD_TENANT_MAX_RUNNING``, ``CTPD_TENANT_MAX_QUEUED``);
a PUT overrides them for one tenant, and null puts a limit back to the default. The tenant must have an API key
(revoked ones count): a misspelt name is a 404, not a silent override for nobody.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from app.api.api_keys import AdminDep
from app.api.deps import DbDep, SettingsDep
from app.api.errors import ApiError, error_responses
from app.api.schemas import TenantLimits
from app.db import auth as key_rows
from app.db import tenants as tenant_rows
from app.db.auth import MAX_TENANT
from app.db.engine import Database

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/tenants", tags=["tenants"],
    responses=error_responses((401, 403, 404, 422, 503), {
        403: "The API key is not an admin's (`admin_required`).",
        404: "No API key was ever created for this tenant (`not_found`).",
    }),
)

TenantPath = Annotated[str, Path(min_length=1, max_length=MAX_TENANT, description="The tenant's name.")]


class TenantLimitsUpdate(BaseModel):
    """Both limits, each an override or null (the deployment's default)."""

    model_config = ConfigDict(extra="forbid")

    max_running: int | None = Field(
        ge=1, le=10_000, description="Jobs running at once; null: the default (CTPD_TENANT_MAX_RUNNING).")
    max_queued: int | None = Field(
        ge=1, le=1_000_000, description="Queued jobs; null: the default (CTPD_TENANT_MAX_QUEUED).")


def _known(db: Database, tenant: str) -> str:
    if not key_rows.list_api_keys(db, tenant):
        raise ApiError(404, "not_found", f"no tenant {tenant!r}: no API key was ever created for it; check the "
                       f"name, or create its first key (POST /v1/api-keys, ctpd keys create --tenant {tenant})",
                       "tenant")
    return tenant


def _view(db: Database, limits: tenant_rows.Limits) -> TenantLimits:
    with db.read() as session:
        running, queued = tenant_rows.job_counts(session, limits.tenant).get(limits.tenant, (0, 0))
    return TenantLimits(tenant=limits.tenant, max_running=limits.max_running, max_queued=limits.max_queued,
                        max_running_override=limits.max_running_override,
                        max_queued_override=limits.max_queued_override, running=running, queued=queued)


@router.get("/{tenant}/limits", operation_id="get_tenant_limits", response_model=TenantLimits,
            summary="Get a tenant's limits")
def get_tenant_limits(tenant: TenantPath, _admin: AdminDep, db: DbDep, settings: SettingsDep) -> TenantLimits:
    limits = tenant_rows.get_limits(db, _known(db, tenant), settings.tenant_max_running, settings.tenant_max_queued)
    return _view(db, limits)


@router.put(
    "/{tenant}/limits", operation_id="set_tenant_limits", response_model=TenantLimits, summary="Set a tenant's limits",
    description="Replaces both overrides (null: back to the default). Lowering a limit below what the tenant "
    "has now stops nothing: running jobs finish and queued jobs stay, but no new job starts (or is accepted) "
    "until the tenant is under it.",
)
def set_tenant_limits(tenant: TenantPath, body: TenantLimitsUpdate, admin: AdminDep, db: DbDep,
                      settings: SettingsDep) -> TenantLimits:
    limits = tenant_rows.set_limits(db, _known(db, tenant), body.max_running, body.max_queued,
                                    settings.tenant_max_running, settings.tenant_max_queued)
    logger.info("tenant %s limits set by %s: max_running %s, max_queued %s", tenant, admin.tenant,
                limits.max_running, limits.max_queued)
    return _view(db, limits)
