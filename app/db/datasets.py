"""The dataset rows: uploaded files (under the artifact root) a tenant names by ``dataset.id``."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from sqlalchemy import select

from app.db.engine import Database
from app.db.models import Dataset, utcnow

logger = logging.getLogger(__name__)


def new_dataset_id() -> str:
    return f"ds_{uuid.uuid4().hex}"


def create_dataset(
    db: Database,
    *,
    tenant: str,
    filename: str,
    format: str,
    num_rows: int,
    sha256: str,
    size_bytes: int,
    path: str | Path,
    dataset_id: str | None = None,
) -> Dataset:
    row = Dataset(
        id=dataset_id or new_dataset_id(), tenant=tenant, filename=filename, format=format, num_rows=num_rows,
        sha256=sha256, size_bytes=size_bytes, path=str(path), created_at=utcnow(),
    )
    with db.write() as session:
        session.add(row)
    return row


def get_dataset(db: Database, dataset_id: str, tenant: str | None = None) -> Dataset | None:
    """The dataset, or None; ``tenant=None`` only for the worker (which reads the job's own tenant's data)."""
    with db.read() as session:
        query = select(Dataset).where(Dataset.id == dataset_id)
        if tenant is not None:
            query = query.where(Dataset.tenant == tenant)
        return session.scalars(query).one_or_none()
