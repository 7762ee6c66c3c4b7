"""The API keys: created with their plaintext shown once, stored only as a sha256 hash, revocable.

A key is ``ctpd_<43 urlsafe chars>``; its first 8 characters (``prefix``) are kept for display. Authenticating
hashes the presented key and looks the hash up; a revoked key authenticates as nobody.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select, update

from app.db.engine import Database, updated_rows
from app.db.models import ApiKey, utcnow

logger = logging.getLogger(__name__)

MAX_TENANT, MAX_KEY_NAME = 200, 200


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str
    is_admin: bool


@dataclass(frozen=True)
class CreatedKey:
    """A new key's row and its plaintext: the only time the plaintext exists outside the caller's hands."""

    row: ApiKey
    plaintext: str


def hash_api_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def issue_api_key(db: Database, tenant: str, name: str, is_admin: bool = False) -> CreatedKey:
    """A new key for ``tenant``: its row and its plaintext (``ctpd_<43 urlsafe chars>``), which is never stored."""
    if not tenant or not tenant.strip() or len(tenant.strip()) > MAX_TENANT:
        raise ValueError(f"a key needs a tenant name of 1 to {MAX_TENANT} characters (e.g. --tenant research), "
                         f"got {tenant!r}")
    if len(name) > MAX_KEY_NAME:
        raise ValueError(f"a key's name has at most {MAX_KEY_NAME} characters, got {len(name)}")
    plaintext = f"ctpd_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        id=f"key_{uuid.uuid4().hex}", tenant=tenant.strip(), name=name, key_hash=hash_api_key(plaintext),
        prefix=plaintext[:8], is_admin=is_admin, created_at=utcnow(),
    )
    with db.write() as session:
        session.add(row)
    return CreatedKey(row=row, plaintext=plaintext)


def create_api_key(db: Database, tenant: str, name: str, is_admin: bool = False) -> str:
    """A new key for ``tenant``; returns the plaintext (``ctpd_<43 urlsafe chars>``), which is never stored."""
    return issue_api_key(db, tenant, name, is_admin=is_admin).plaintext


def authenticate(db: Database, plaintext: str) -> Principal | None:
    """The key's principal, or None for an unknown or revoked key."""
    with db.read() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_api_key(plaintext))).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(tenant=row.tenant, key_id=row.id, is_admin=row.is_admin)


def list_api_keys(db: Database, tenant: str | None = None) -> list[ApiKey]:
    """Every key (``tenant=None``) or a tenant's, oldest first, revoked ones included."""
    with db.read() as session:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if tenant is not None:
            query = query.where(ApiKey.tenant == tenant)
        return list(session.scalars(query))


def get_api_key(db: Database, key_id: str) -> ApiKey | None:
    with db.read() as session:
        return session.get(ApiKey, key_id)


def revoke_api_key(db: Database, key_id: str) -> bool:
    """Revoke the key; False if there is no such key or it was already revoked."""
    with db.write() as session:
        return bool(updated_rows(session,
            update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
        ))
