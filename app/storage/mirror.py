"""The shared storage as the stage cache's and the export's mirror, and as the home of uploaded datasets.

The bucket mirrors the artifact root's layout: ``<stage>/<key>/`` (the stage cache), ``jobs/<id>/export/`` (a
job's student), ``datasets/<id>/<filename>`` (an upload). :class:`StorageMirror` is what ``ctpd_core.artifacts``
calls a ``FolderMirror`` (the core takes it structurally: it never imports this package, nor any network code).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from app.storage.store import Storage, StorageError
from app.storage_gc import new_incoming_file

logger = logging.getLogger(__name__)


def export_key(job_id: str) -> str:
    """Where a job's exported folder lives: ``run_dir/export`` relative to the artifact root (worker.recipe)."""
    return f"jobs/{job_id}/export"


def upload_key(dataset_id: str, filename: str) -> str:
    return f"datasets/{dataset_id}/{filename}"


class StorageMirror:
    """Complete folders pushed to and fetched from a :class:`Storage` (its marker written last, read first)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def fetch(self, relative: str, into: Path) -> bool:
        """Copy the complete folder ``relative`` into the empty folder ``into``; False if the storage has none."""
        return self.storage.get_folder(relative, into)

    def push(self, folder: Path, relative: str, *, replace: bool = False) -> None:
        """Make ``relative`` a complete copy of ``folder``; one already there is kept unless ``replace``."""
        self.storage.put_folder(folder, relative, replace=replace)


def store_upload(storage: Storage, local: Path, dataset_id: str) -> str:
    """Put a received upload in the storage; returns its key."""
    key = upload_key(dataset_id, local.name)
    storage.put_file(local, key)
    return key


def fetch_upload(storage: Storage, artifact_root: Path, dataset_id: str, filename: str, sha256: str) -> Path | None:
    """The upload as a local file under ``artifact_root/datasets/<id>/``: there already, or downloaded from the
    storage (checked against the sha256 the API recorded). None when the storage does not have it."""
    key = upload_key(dataset_id, filename)
    local = Path(artifact_root) / key
    if local.is_file() and _sha256(local) == sha256:
        return local
    # Received through a held file in datasets/, as the API receives an upload: a worker killed mid-download leaves
    # one that the orphan sweep (app.storage_gc) removes.
    staging, hold = new_incoming_file(Path(artifact_root) / "datasets")
    try:
        storage.get_file(key, local, staging=staging)
    except FileNotFoundError:
        return None
    finally:
        hold.close()
    if _sha256(local) != sha256:
        local.unlink(missing_ok=True)
        raise StorageError(f"storage {storage.url}: {key} does not have the sha256 recorded at upload ({sha256}); "
                           "upload the dataset again")
    logger.info("dataset %s fetched from %s", dataset_id, storage.url)
    return local


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
