"""Unfinished uploads: where they are written, and removing the ones a killed API process left behind.

An upload is received into ``<artifact root>/datasets/.incoming-<random>.held``, a file its API process holds
(``ctpd_core.held_paths``: an flock the kernel drops when the process dies) until it is renamed to
``datasets/<id>/<filename>`` or removed. A SIGKILL runs no cleanup, so :func:`remove_orphaned_uploads` runs at
API start-up (``app.main``), at worker start-up and in every reaper pass (``worker.orphan_sweep``): it removes
the files no live process holds. ``.incoming-*`` files without the ``.held`` suffix were written by a
version that took no lock; they are removed only once unchanged for ``upload_orphan_grace_seconds``.
A worker that downloads an upload from the shared storage (``app.storage.fetch_upload``) receives it through
the same held files, so one killed mid-download is swept the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

from app.settings import Settings
from ctpd_core.held_paths import create_held_file, remove_if_orphaned

logger = logging.getLogger(__name__)

INCOMING_PREFIX = ".incoming-"
HELD_SUFFIX = ".held"


def datasets_dir(settings: Settings) -> Path:
    return Path(settings.artifact_root) / "datasets"


def new_incoming_file(folder: Path) -> tuple[Path, BinaryIO]:
    """A fresh held file for one upload; it stays held until the returned handle is closed."""
    folder.mkdir(parents=True, exist_ok=True)
    return create_held_file(folder, INCOMING_PREFIX, HELD_SUFFIX)


def remove_orphaned_uploads(settings: Settings) -> list[Path]:
    """Remove the unfinished uploads whose writer is gone; returns what was removed. Never raises for a
    file it cannot check (it logs it), so a start-up or a reaper pass never fails on one."""
    folder = datasets_dir(settings)
    removed: list[Path] = []
    try:
        entries = sorted(folder.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(INCOMING_PREFIX):
            continue
        try:
            size = entry.stat().st_size
            held = entry.name.endswith(HELD_SUFFIX)
            if remove_if_orphaned(entry, grace_seconds=settings.upload_orphan_grace_seconds, held=held):
                removed.append(entry)
                reason = ("no live process holds it" if held else
                          f"written without a lock and unchanged for {settings.upload_orphan_grace_seconds} s")
                logger.info("removed the unfinished upload %s (%d bytes): %s", entry, size, reason)
        except FileNotFoundError:
            continue  # published or removed meanwhile
        except OSError as error:
            logger.warning("could not check or remove the unfinished upload %s: %s; check its permissions",
                           entry, error)
    return removed
