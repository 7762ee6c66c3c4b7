"""Shared storage for artefacts, the stage cache and uploaded datasets: a local folder or an S3-compatible bucket,
on fsspec (:mod:`app.storage.store`), built from the settings in one place (:mod:`app.storage.configured`), and
the mirror the stage cache and the export push to and fetch from (:mod:`app.storage.mirror`). Torch-free: the API
and the workers both use it."""

from app.storage.configured import StorageConfigError, configured_storage
from app.storage.mirror import StorageMirror, export_key, fetch_upload, store_upload, upload_key
from app.storage.store import FOLDER_MARKER, FolderManifest, ObjectInfo, Storage, StorageError

__all__ = [
    "FOLDER_MARKER", "FolderManifest", "ObjectInfo", "Storage", "StorageConfigError", "StorageError", "StorageMirror",
    "configured_storage", "export_key", "fetch_upload", "store_upload", "upload_key",
]
