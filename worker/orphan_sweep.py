"""Removing what killed processes left in the artifact root: unfinished uploads, stage staging folders and
half-written exports.

A SIGKILL (the OOM killer, ``docker kill``, a lost node) runs no cleanup, so an API process killed mid-upload
leaves ``datasets/.incoming-*``, a worker killed mid-stage leaves a staging folder in the stage cache, and one
killed while writing the student leaves ``jobs/<id>/.export-*`` (a whole model's size). All are held by their writer while it lives (``ctpd_core.held_paths``), so this sweep removes exactly the
ones no live process holds: safe to run at any time, from any process that shares the artifact root.

It runs when a worker starts (connected to ``celeryd_after_setup`` here) and in every reaper pass
(``worker.tasks.reap``, every 30 s); the API sweeps uploads when it starts (``app.main``). Torch- and
numpy-free, like the scheduler image that runs the reaper.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.signals import celeryd_after_setup

from app.storage_gc import remove_orphaned_uploads
from ctpd_core.artifacts import UNHELD_STAGING_GRACE_SECONDS, StageCache
from ctpd_core.held_paths import remove_orphans
from ctpd_core.publish import EXPORT_STAGING_PREFIX

if TYPE_CHECKING:
    from app.settings import Settings

logger = logging.getLogger(__name__)


def sweep_orphans(settings: Settings) -> int:
    """One sweep; returns how many paths it removed. Never raises for the filesystem: a sweep that cannot
    read a folder logs it and leaves the reaper's other work alone."""
    removed = 0
    try:
        removed += len(remove_orphaned_uploads(settings))
        removed += len(StageCache(settings.artifact_root).remove_orphaned_staging())
        removed += len(remove_orphaned_exports(settings.artifact_root / "jobs"))
    except OSError as error:
        logger.warning("orphan sweep of %s stopped: %s; check that this process can read and write it",
                       settings.artifact_root, error)
    return removed


def remove_orphaned_exports(jobs_dir: Path) -> list[Path]:
    """Remove the export staging folders (``<job>/.export-*``) no live worker holds; returns what was removed."""
    if not jobs_dir.is_dir():
        return []
    # Every export is staged under a hold, so only a dead writer's folder is unlocked; on a filesystem that
    # cannot lock, only a folder unchanged for the stage cache's long grace goes.
    staging = sorted(jobs_dir.glob(f"*/{EXPORT_STAGING_PREFIX}*"))
    removed = remove_orphans([(path, True) for path in staging], grace_seconds=UNHELD_STAGING_GRACE_SECONDS)
    if removed:
        logger.info("removed %d export staging folder(s) left by killed workers: %s", len(removed),
                    ", ".join(str(path) for path in removed))
    return removed


@celeryd_after_setup.connect
def _sweep_at_worker_start(sender: Any = None, instance: Any = None, **_: Any) -> None:
    from app.settings import get_settings

    app = getattr(instance, "app", None)
    settings = getattr(app, "ctpd_settings", None) or get_settings()
    removed = sweep_orphans(settings)
    if removed:
        logger.info("worker start: removed %d path(s) left by killed processes", removed)
