"""The deployment's storage, from CTPD_STORAGE_URL and CTPD_STORAGE_OPTIONS: built (and checked) in one place.

Unset, or naming the artifact root itself, there is no shared storage: everything stays under
CTPD_ARTIFACT_ROOT, as on one machine. Set, every API process and worker checks it when it starts
(:func:`configured_storage` with ``check=True``: a probe object written, read and deleted), so a wrong scheme, an
unreachable endpoint or refused credentials stop the process with a message naming the setting and the fix,
instead of failing the first job or download. The options (credentials) are never logged or shown.
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.settings import Settings
from app.storage.store import Storage, StorageError

logger = logging.getLogger(__name__)

_UNSET = "or unset CTPD_STORAGE_URL to keep artefacts under CTPD_ARTIFACT_ROOT on this machine only"


class StorageConfigError(RuntimeError):
    """CTPD_STORAGE_URL / CTPD_STORAGE_OPTIONS name a storage this process cannot use."""


def configured_storage(settings: Settings, *, check: bool = True) -> Storage | None:
    """The shared storage the settings name, or None (the artifact root alone). ``check``: probe it now and raise
    :class:`StorageConfigError` if it cannot be used (what processes do at start-up)."""
    url = settings.storage_url.strip()
    if not url or _is_artifact_root(url, settings.artifact_root):
        return None
    try:
        storage = Storage.from_url(url, settings.storage_options)
    except (ValueError, TypeError) as error:  # TypeError: an option the filesystem does not take
        raise StorageConfigError(f"CTPD_STORAGE_URL={url}: {error}; fix CTPD_STORAGE_URL (and "
                                 f"CTPD_STORAGE_OPTIONS), {_UNSET}") from None
    if check:
        try:
            storage.check()
        except TypeError as error:  # s3fs passes unknown options on to its session when it first connects
            raise StorageConfigError(f"CTPD_STORAGE_URL={url}: CTPD_STORAGE_OPTIONS has an option the storage does "
                                     f"not take ({error}); fix CTPD_STORAGE_OPTIONS, {_UNSET}") from None
        except StorageError as error:
            raise StorageConfigError(f"CTPD_STORAGE_URL={url}: the storage cannot be used: {error}. Check the "
                                     "bucket exists and CTPD_STORAGE_OPTIONS (endpoint_url, key, secret), "
                                     f"{_UNSET}") from None
        logger.info("shared storage: %s", url)
    return storage


def _is_artifact_root(url: str, artifact_root: Path) -> bool:
    if not url.startswith("file://"):
        return False
    return Path(url[len("file://"):]).expanduser().absolute() == Path(artifact_root).absolute()
