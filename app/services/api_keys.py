"""Managing API keys (admin keys only): list them, create one (its plaintext is returned this once), revoke one.

A revoked key authenticates as nobody from the next request on (``app.db.auth.authenticate``); its row stays,
so listings show who had access and when it ended. Key hashes never leave this layer's callers: the routes
show ``prefix`` (the first 8 characters) to tell keys apart.
"""

from __future__ import annotations

import logging

from app.db import auth as key_rows
from app.db.auth import CreatedKey, Principal
from app.db.engine import Database
from app.db.models import ApiKey

logger = logging.getLogger(__name__)


class AdminRequired(PermissionError):
    """The caller's key is not an admin's."""

    def __init__(self) -> None:
        super().__init__("managing API keys needs an admin key; create one on the server with "
                         "`ctpd keys create --tenant NAME --admin`")


class NoSuchKey(LookupError):
    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"no API key {key_id!r}; GET /v1/api-keys lists them")


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise AdminRequired()


def list_keys(db: Database, principal: Principal, *, tenant: str | None = None) -> list[ApiKey]:
    """Every key (or one tenant's), oldest first, revoked ones included."""
    require_admin(principal)
    return key_rows.list_api_keys(db, tenant)


def create_key(db: Database, principal: Principal, *, tenant: str, name: str, is_admin: bool = False) -> CreatedKey:
    """A new key for ``tenant``; raises ``ValueError`` for a bad tenant or name (nothing stored)."""
    require_admin(principal)
    created = key_rows.issue_api_key(db, tenant, name, is_admin=is_admin)
    logger.info("API key %s (%s) created for tenant %s by key %s", created.row.id, created.row.prefix,
                created.row.tenant, principal.key_id)
    return created


def revoke_key(db: Database, principal: Principal, key_id: str) -> ApiKey:
    """Revoke the key (revoking a revoked key changes nothing) and return its row."""
    require_admin(principal)
    if key_rows.revoke_api_key(db, key_id):
        logger.info("API key %s revoked by key %s", key_id, principal.key_id)
    row = key_rows.get_api_key(db, key_id)
    if row is None:
        raise NoSuchKey(key_id)
    return row
