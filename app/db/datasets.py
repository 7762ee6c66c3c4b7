"""The dataset rows: uploaded files (under the artifact root) a tenant names by ``dataset.id``."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.engine import Database, newest_first_page
from app.db.models import Dataset, Job, utcnow
from ctpd_core.vocab import ACTIVE_STATUSES

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
    stats: dict[str, Any] | None = None,
) -> Dataset:
    row = Dataset(
        id=dataset_id or new_dataset_id(), tenant=tenant, filename=filename, format=format, num_rows=num_rows,
        sha256=sha256, size_bytes=size_bytes, path=str(path), created_at=utcnow(), stats=stats,
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


class DatasetGone(Exception):
    """The dataset was deleted (or never existed) when its token lengths came to be recorded."""

    def __init__(self, dataset_id: str) -> None:
        self.dataset_id = dataset_id
        super().__init__(f"dataset {dataset_id} does not exist (deleted?); its token lengths were not recorded")


def record_token_lengths(db: Database, dataset_id: str, tokenizer: str, lengths: dict[str, Any]) -> None:
    """Merge ``stats["token_lengths"][tokenizer] = lengths`` into the dataset's stats in one transaction (a
    dataset stored before 0007_dataset_stats, stats NULL, gets ``{"token_lengths": {tokenizer: lengths}}``);
    another tokenizer's lengths and the upload's counts are kept, the same tokenizer's are replaced.

    The row is locked first (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises
    writers), so two preflights recording two tokenizers at once both land: neither overwrites the other's
    read-modify-write. :class:`DatasetGone` when there is no such dataset."""
    with db.write() as session:
        row = session.scalars(select(Dataset).where(Dataset.id == dataset_id).with_for_update()).one_or_none()
        if row is None:
            raise DatasetGone(dataset_id)
        stats = dict(row.stats or {})
        token_lengths = dict(stats.get("token_lengths") or {})
        token_lengths[tokenizer] = lengths
        stats["token_lengths"] = token_lengths
        # A new object: the JSON column does not track changes made inside the old one.
        row.stats = stats


def list_datasets(db: Database, tenant: str, *, limit: int, after: str | None = None) -> tuple[list[Dataset], bool]:
    """The tenant's datasets, newest first; ``after`` is the id of the last dataset of the previous page."""
    with db.read() as session:
        query = select(Dataset).where(Dataset.tenant == tenant)
        return newest_first_page(session, query, Dataset, tenant, limit=limit, after=after, noun="dataset")


class DatasetInUse(Exception):
    """An active job names the dataset (the API's 409 ``dataset_in_use``)."""

    def __init__(self, dataset_id: str, job_ids: list[str]) -> None:
        self.dataset_id, self.job_ids = dataset_id, job_ids
        super().__init__(f"dataset {dataset_id} is used by active job(s) {', '.join(job_ids)}")


def active_jobs_using(db: Database, dataset_id: str, tenant: str) -> list[str]:
    """The tenant's queued, running or cancelling jobs whose spec names the dataset (as ``dataset.id`` or
    ``dataset.validation_id``): a worker will open its file. Read from the specs in Python: a tenant has few
    active jobs, and JSON paths differ between SQLite and PostgreSQL."""
    with db.read() as session:
        return _active_jobs_using(session, dataset_id, tenant)


def _active_jobs_using(session: Session, dataset_id: str, tenant: str) -> list[str]:
    rows = session.execute(
        select(Job.id, Job.spec).where(Job.tenant == tenant, Job.status.in_(ACTIVE_STATUSES))
    ).all()
    using = []
    for job_id, spec in rows:
        dataset = (spec or {}).get("dataset") or {}
        if dataset_id in (dataset.get("id"), dataset.get("validation_id")):
            using.append(job_id)
    return sorted(using)


def delete_dataset(db: Database, dataset_id: str, tenant: str) -> Dataset | None:
    """Delete the row unless an active job names it (:class:`DatasetInUse`, nothing deleted); the deleted row, or
    None when the tenant has no such dataset. The caller removes the file afterwards: a crash in between leaves a
    file without a row, never a row without its file.

    The in-use check and the delete are one write transaction, the row locked first (``SELECT ... FOR UPDATE`` on
    PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises writers), and the check reads after the lock (a new
    snapshot per statement under READ COMMITTED): a job committed at any time before the check, however recently,
    is seen, and two deletes of one dataset take turns. A submission that read the dataset before this commits
    but inserts its job after it finds the row gone: job creation re-reads the datasets it names under a share
    lock in its insert's transaction (``app.db.jobs.create_job``, ``DatasetsGone``: the API's 422)."""
    with db.write() as session:
        row = session.scalars(
            select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant == tenant).with_for_update()
        ).one_or_none()
        if row is None:
            return None
        using = _active_jobs_using(session, dataset_id, tenant)
        if using:
            raise DatasetInUse(dataset_id, using)  # rolls the transaction back: nothing deleted
        session.execute(delete(Dataset).where(Dataset.id == dataset_id))
        return row
