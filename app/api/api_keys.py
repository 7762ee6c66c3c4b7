"""/v1/api-keys: list, create and revoke API keys; admin keys only (anyone else gets a 403 ``admin_required``).

The plaintext of a key is in the answer to its creation and nowhere else, ever: listings show ``prefix`` (its
first 8 characters) to tell keys apart. A revoked key is refused (401 ``invalid_api_key``) from the next request.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import DbDep, PrincipalDep
from app.api.errors import ApiError, error_responses, invalid_request
from app.db.auth import MAX_KEY_NAME, MAX_TENANT, Principal
from app.db.models import ApiKey as ApiKeyRow
from app.services import api_keys as key_service

logger = logging.getLogger(__name__)


def require_admin(principal: PrincipalDep) -> Principal:
    try:
        key_service.require_admin(principal)
    except key_service.AdminRequired as error:
        raise ApiError(403, "admin_required", str(error)) from None
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]

router = APIRouter(
    prefix="/v1/api-keys", tags=["api-keys"],
    responses=error_responses((401, 403, 422, 503), {403: "The API key is not an admin's (`admin_required`)."}),
)


class ApiKey(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: str
    tenant: str
    name: str
    prefix: str = Field(description="The key's first 8 characters, to tell keys apart; the key itself is never shown again.")
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None = Field(description="When the key was revoked; it authenticates as nobody since.")


class CreatedApiKey(ApiKey):
    key: str = Field(description="The key itself (`ctpd_...`), shown this once: store it now.")


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKey]
    has_more: bool = False


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=MAX_TENANT, description="The tenant the key acts for.")
    name: str = Field(default="api", max_length=MAX_KEY_NAME, description="A label, e.g. who or what uses the key.")
    is_admin: bool = Field(default=False, description="An admin key: manages keys and may name server paths.")


def key_object(row: ApiKeyRow) -> ApiKey:
    return ApiKey(id=row.id, tenant=row.tenant, name=row.name, prefix=row.prefix, is_admin=row.is_admin,
                  created_at=row.created_at, revoked_at=row.revoked_at)


@router.get("", operation_id="list_api_keys", response_model=ApiKeyList, summary="List API keys",
            description="Every key, oldest first, revoked ones included; `tenant` lists one tenant's.")
def list_api_keys(
    principal: AdminDep,
    db: DbDep,
    tenant: Annotated[str | None, Query(min_length=1, max_length=MAX_TENANT, description="Only this tenant's keys.")]
    = None,
) -> ApiKeyList:
    return ApiKeyList(data=[key_object(row) for row in key_service.list_keys(db, principal, tenant=tenant)])


@router.post("", operation_id="create_api_key", status_code=201, response_model=CreatedApiKey,
             summary="Create an API key",
             description="The answer carries the key itself in `key`: the only time it is shown.")
def create_api_key(body: ApiKeyCreate, principal: AdminDep, db: DbDep) -> CreatedApiKey:
    try:
        created = key_service.create_key(db, principal, tenant=body.tenant, name=body.name, is_admin=body.is_admin)
    except ValueError as error:
        raise invalid_request([("tenant", str(error))]) from None
    return CreatedApiKey(**key_object(created.row).model_dump(), key=created.plaintext)


@router.delete("/{key_id}", operation_id="revoke_api_key", response_model=ApiKey, summary="Revoke an API key",
               description="The key is refused from the next request on; revoking a revoked key changes nothing.",
               responses=error_responses((404,), {404: "No such API key (`not_found`)."}))
def revoke_api_key(key_id: str, principal: AdminDep, db: DbDep) -> ApiKey:
    try:
        return key_object(key_service.revoke_key(db, principal, key_id))
    except key_service.NoSuchKey as error:
        raise ApiError(404, "not_found", str(error), "key_id") from None
