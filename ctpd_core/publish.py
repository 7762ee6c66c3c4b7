"""Publishing a folder atomically: write it under a sibling temporary name, flush it, rename it into place.

Every output that must never be seen half-written goes through :func:`publish_folder`: training checkpoints,
stage cache entries, converted catalog models and the exported student. A crash leaves at most a staging
folder (``<prefix><random>`` next to the target, which its owner sweeps), never a partial target; a rename
within one filesystem is atomic, so a reader sees the old folder or the new one.

Torch-free and numpy-free: the scheduler image sweeps the stage cache with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from ctpd_core.held_paths import make_held_dir

logger = logging.getLogger(__name__)

# A job's student is staged as ``<run_dir>/.export-<attempt>-<random>`` (held by its writer) before it is renamed
# to ``export``; the orphan sweep (worker/orphan_sweep.py) removes the ones a killed worker left.
EXPORT_STAGING_PREFIX = ".export-"


def _flush_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder deepest first and ``folder`` itself, so the rename
    publishes data and directory entries that are on disk (a power loss after the rename must not leave a
    complete-looking folder of empty files, nor a ``model/`` subfolder whose entries were never written)."""
    folders = []
    file_mode = 0o666 & _default_folder_mode()
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_file():
            with path.open("rb") as handle:
                # A library that writes through a temporary file (transformers' safetensors shards) leaves it
                # 0600: widened to what the umask gives any new file, so an API process of another user that
                # shares the artifact volume can serve the export.
                mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
                if mode | file_mode != mode:
                    os.chmod(path, mode | file_mode)
                os.fsync(handle.fileno())
        elif path.is_dir():
            folders.append(path)
    for sub in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(sub)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError as error:  # a filesystem that cannot open folders: the rename is still atomic, less durable
        logger.debug("cannot open %s to fsync it: %s", folder, error)
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        logger.debug("cannot fsync %s: %s", folder, error)
    finally:
        os.close(descriptor)


def _default_folder_mode() -> int:
    """The mode ``mkdir`` would give a new folder under this process's umask (mkdtemp's is always 0700, which
    would make a published export unreadable to anyone but its writer)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def publish_folder(
    target: Path,
    write: Callable[[Path], object],  # its return value is ignored
    *,
    staging_prefix: str,
    may_publish: Callable[[], bool] | None = None,
    keep_existing: Callable[[Path], bool] | None = None,
    held: bool = False,
) -> bool:
    """Run ``write(staging)`` into a fresh folder next to ``target``, then rename it to ``target``.

    * ``may_publish()`` is asked last, right before the rename (so the window in which another attempt can take
      over is smallest); False discards the staging folder and returns False: nothing was published.
    * An existing ``target`` is replaced, unless ``keep_existing(target)`` says it already holds a complete
      output (another process won the race): then the staging folder is discarded and ``target`` kept.
    * ``held``: the staging folder is held by this process (:mod:`ctpd_core.held_paths`) until it is
      published, so a sweep can tell a killed builder's leftover from a build in progress.

    Returns True when ``target`` now holds a published folder. On any error the staging folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    hold: int | None = None
    if held:
        staging, hold = make_held_dir(target.parent, prefix=staging_prefix)
    else:
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix, dir=target.parent))
    try:
        os.chmod(staging, _default_folder_mode())
        write(staging)
        _flush_tree(staging)
        if may_publish is not None and not may_publish():
            shutil.rmtree(staging, ignore_errors=True)
            return False
        if target.exists():  # a crash's leftover, an earlier attempt's output, or another process's
            if keep_existing is not None and keep_existing(target):
                shutil.rmtree(staging)
                return True
            shutil.rmtree(target)
        os.replace(staging, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if hold is not None:
            os.close(hold)  # after the rename: a published folder needs no hold, a staging one had it throughout
    return True
