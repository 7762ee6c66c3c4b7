"""Dependencies shared by the routers: the database, the queue, the settings and the caller (auth).

Everything comes from ``app.state`` (set by ``create_app``), so a test passes its own settings and a
recording queue to ``create_app`` instead of patching modules.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import ApiError, invalid_request
from app.db.auth import Principal, authenticate
from app.db.engine import Database
from app.queue import TaskQueue
from app.settings import Settings
from app.storage import Storage

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key: `Authorization: Bearer ctpd_...`. Create one with `ctpd keys create --tenant NAME`.",
)

_HOW = "send your API key as 'Authorization: Bearer ctpd_...' (create one with: ctpd keys create --tenant NAME)"


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_queue(request: Request) -> TaskQueue:
    return request.app.state.queue


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage | None:
    """The shared storage (a bucket), or None when everything is under the artifact root."""
    return getattr(request.app.state, "storage", None)


DbDep = Annotated[Database, Depends(get_db)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StorageDep = Annotated[Storage | None, Depends(get_storage)]


def refuse_nul_characters(request: Request) -> None:
    """A NUL (``%00``) in a path or query parameter is a 422 naming it, before any query: no id, cursor or label
    holds one, and PostgreSQL cannot even compare text that contains one (it would be a 500)."""
    params = [*request.path_params.items(), *request.query_params.multi_items()]
    for name, value in params:
        if "\x00" in name or "\x00" in str(value):
            shown = name.replace("\x00", "%00")
            raise invalid_request([(shown, f"{shown}: contains a NUL character (%00), which no id, cursor or label "
                                           "holds; remove it")])


def get_principal(
    db: DbDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials:
        raise ApiError(401, "missing_api_key", f"no API key; {_HOW}", headers=challenge)
    principal = authenticate(db, credentials.credentials)
    if principal is None:
        raise ApiError(401, "invalid_api_key", f"the API key is unknown or revoked; {_HOW}", headers=challenge)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
