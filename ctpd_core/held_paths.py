"""Files and folders held by their writer, so that a cleaner can tell an orphan from work in progress.

A writer creates its temporary file (an upload being received) or folder (a stage output being built) and
takes an exclusive ``flock`` on it at once, keeping it until the path is published or removed. The kernel
drops the lock when the writer's process dies in any way (SIGKILL included), so "no one holds the lock"
means "no live writer", with none of the traps of recording pids: reused pids, and pid namespaces (the
docker-compose API, worker and scheduler containers share the artifact volume but not their pids). flock
conflicts between open file descriptions, so it works between threads and processes alike.

The race between creating a path and locking it is closed from both sides: the cleaner removes a path only
while holding its lock (and only if the path still names the inode it locked), and the writer, once it holds
the lock, checks that its path still names its inode and starts over if a cleaner removed it in between.

Where ``flock`` is refused (a filesystem without locks, or folders on NFS), the lock cannot tell, and a path
counts as orphaned only once nothing in it changed for ``grace_seconds``. Torch-free: the API uses it too.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

_CREATE_ATTEMPTS = 5


def _lock(fd: int, *, wait: bool) -> bool:
    """Take the exclusive lock; False if another holder has it. OSError if this filesystem cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _still_names(path: Path, fd: int) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _hold(path: Path, fd: int) -> bool:
    """Lock a path the caller just created; False if a cleaner removed it before the lock was taken."""
    try:
        _lock(fd, wait=True)
    except OSError as error:  # no locks on this filesystem: the grace period is the only protection
        logger.warning("cannot lock %s (%s); a cleaner will only remove it after its grace period", path, error)
        return True
    return _still_names(path, fd)


def create_held_file(folder: Path, prefix: str, suffix: str) -> tuple[Path, BinaryIO]:
    """A new empty file ``folder/<prefix><random><suffix>``, open for writing and held until it is closed."""
    for _ in range(_CREATE_ATTEMPTS):
        path = folder / f"{prefix}{uuid.uuid4().hex}{suffix}"
        # Not mkstemp: its mode 0600 would outlive the rename; this one follows the umask like any output.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if _hold(path, fd):
            return path, os.fdopen(fd, "wb")
        os.close(fd)
    raise OSError(f"could not create a held file in {folder}: each new file was removed before it was locked; "
                  "is another process deleting files there?")


def make_held_dir(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new empty folder ``parent/<prefix><random>`` and the descriptor that holds it; ``os.close`` it after
    the folder is published (renaming the folder keeps the hold: the lock is on the inode, not the name)."""
    for _ in range(_CREATE_ATTEMPTS):
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        if _hold(path, fd):
            return path, fd
        os.close(fd)
    raise OSError(f"could not create a held folder in {parent}: each new folder was removed before it was "
                  "locked; is another process deleting folders there?")


def remove_orphans(candidates: Iterable[tuple[Path, bool]], *, grace_seconds: float) -> list[Path]:
    """:func:`remove_if_orphaned` over ``(path, held)`` pairs; returns what was removed. One path that cannot be
    checked or removed is logged and skipped: it must not stop a sweep."""
    removed: list[Path] = []
    for path, held in candidates:
        try:
            if remove_if_orphaned(path, grace_seconds=grace_seconds, held=held):
                removed.append(path)
        except OSError as error:
            logger.warning("could not check or remove %s: %s", path, error)
    return removed


def _newest_change(path: Path) -> float:
    """The latest mtime of the path and, for a folder, of anything inside it."""
    newest = os.stat(path, follow_symlinks=False).st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with suppress(FileNotFoundError):
                    newest = max(newest, os.stat(os.path.join(root, name), follow_symlinks=False).st_mtime)
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_if_orphaned(path: Path, *, grace_seconds: float, held: bool = True) -> bool:
    """Remove ``path`` if it is certainly orphaned; True if it was removed.

    ``held=True`` (made by :func:`create_held_file` / :func:`make_held_dir`): orphaned when no live process
    holds its lock. ``held=False`` (written by code that takes no lock, e.g. an older version) or a filesystem
    that cannot lock: orphaned when nothing in it changed for ``grace_seconds``.
    """
    try:
        mode = os.stat(path, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            return False  # never ours: writers create plain files and folders
        flags = os.O_RDONLY | os.O_DIRECTORY if stat.S_ISDIR(mode) else os.O_RDWR  # RDWR: NFS locks need it
        fd = os.open(path, flags | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False  # published or removed meanwhile
    try:
        try:
            locked = _lock(fd, wait=False)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
            held = False  # the lock cannot tell; fall back to age
            locked = True
        if not locked:
            return False  # a live writer holds it
        if not held and time.time() - _newest_change(path) < grace_seconds:
            return False
        if not _still_names(path, fd):
            return False
        _remove(path)
        return True
    finally:
        os.close(fd)
