"""Content-addressed stage outputs and the small storage formats they use.

A stage's output lives in ``root/<stage>/<key>/`` where ``key`` is the sha256 of everything that determines
it (:func:`content_key`). A folder is complete only once its ``_complete.json`` marker exists; it is
published atomically (:func:`ctpd_core.publish.publish_folder`), so a crash or a concurrent run never leaves
(or reads) half an output. Ragged per-example arrays are stored flat in safetensors with offsets (safe to load: no pickle).

The temporary folder, ``root/<stage>/.<key>.held-<random>``, is held by its builder
(:mod:`ctpd_core.held_paths`) until it is published, so :meth:`StageCache.remove_orphaned_staging` can remove
the ones a killed builder left behind (a SIGKILL runs no cleanup) without touching a build in progress.

Workers on several machines share the cache through a ``mirror`` (:class:`FolderMirror`: a bucket, implemented
outside the core, which stays on local paths): a folder missing here is fetched from it before it is computed, and
one published here is pushed to it. The mirror is a cache too: a failed fetch computes locally, a failed push
leaves the output local only (both logged); the next run that finds it locally pushes it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ctpd_core.held_paths import remove_orphans
from ctpd_core.publish import publish_folder

if TYPE_CHECKING:  # numpy only where arrays are stored: the scheduler image sweeps the cache without it
    import numpy as np

logger = logging.getLogger(__name__)

MARKER = "_complete.json"
_HELD_STAGING = re.compile(r"\.[0-9a-f]{24}\.held-[a-z0-9_]{8}")
# What builds before held staging folders left: ".<key>-<random>", with no lock to ask.
_UNHELD_STAGING = re.compile(r"\.[0-9a-f]{24}-[a-z0-9_]{8}")
# An unheld staging folder is removed only after a week without a change: a stage can compute for a day
# before it writes its first file, so age alone is a weak sign of an orphan.
UNHELD_STAGING_GRACE_SECONDS = 7 * 24 * 3600


def content_key(parts: Mapping[str, Any]) -> str:
    """sha256 of a JSON-serialisable description of a stage's inputs (keys sorted, so order never matters)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class FolderMirror(Protocol):
    """A second home for complete folders, shared by processes that do not share this disk (a bucket). Paths in
    it are relative posix paths; a folder in it is complete only once all of it was pushed."""

    def fetch(self, relative: str, into: Path) -> bool:
        """Copy the complete folder ``relative`` into the existing, empty folder ``into``; False when the mirror
        has no complete copy. Raises OSError when the mirror cannot be read."""
        ...

    def push(self, folder: Path, relative: str, *, replace: bool = False) -> None:
        """Make ``relative`` a complete copy of ``folder``. A complete copy already there is kept unless
        ``replace``. Raises OSError when the mirror cannot be written."""
        ...


class StageCache:
    """``root/<stage>/<key>/`` folders, each built once (see the module docstring)."""

    def __init__(self, root: Path, mirror: FolderMirror | None = None) -> None:
        self.root = Path(root)
        self.mirror = mirror

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:24]

    def relative(self, stage: str, key: str) -> str:
        """The folder's path in the mirror: the same as under ``root``."""
        return f"{stage}/{key[:24]}"

    def is_complete(self, stage: str, key: str) -> bool:
        """Whether the output is here, fetching it from the mirror first when it is only there."""
        return (self.path(stage, key) / MARKER).exists() or self._fetch(stage, key)

    def build(self, stage: str, key: str, parts: Mapping[str, Any], write: Callable[[Path], object]) -> Path:
        """Run ``write(folder)`` into a fresh temporary folder and publish it as the output for ``key``."""
        target = self.path(stage, key)
        if self.is_complete(stage, key):
            self._push(stage, key)  # a no-op when the mirror has it; heals a push that failed before
            return target

        def write_with_marker(staging: Path) -> None:
            write(staging)
            (staging / MARKER).write_text(json.dumps({"stage": stage, "key": key, "inputs": parts}, indent=2, default=str))

        # An existing complete folder means another run finished first (keep it); an incomplete one is a crash's.
        publish_folder(target, write_with_marker, staging_prefix=f".{target.name}.held-", held=True,
                       keep_existing=lambda existing: (existing / MARKER).exists())
        self._push(stage, key)
        return target

    def _fetch(self, stage: str, key: str) -> bool:
        """Publish the mirror's copy here (staged and renamed like a build); False when it has none."""
        if self.mirror is None:
            return False
        mirror, relative, target = self.mirror, self.relative(stage, key), self.path(stage, key)
        fetched = False

        def copy(staging: Path) -> None:
            nonlocal fetched
            fetched = mirror.fetch(relative, staging) and (staging / MARKER).exists()

        try:
            published = publish_folder(target, copy, staging_prefix=f".{target.name}.held-", held=True,
                                       may_publish=lambda: fetched,
                                       keep_existing=lambda existing: (existing / MARKER).exists())
        except OSError as error:
            logger.warning("stage cache: could not fetch %s from the shared storage (%s); computing it here",
                           relative, error)
            return False
        if published:
            logger.info("stage cache: %s fetched from the shared storage", relative)
        return published

    def _push(self, stage: str, key: str) -> None:
        if self.mirror is None:
            return
        try:
            self.mirror.push(self.path(stage, key), self.relative(stage, key))
        except OSError as error:
            logger.warning("stage cache: could not push %s to the shared storage (%s); other machines will "
                           "compute it again until a run here pushes it", self.relative(stage, key), error)

    def remove_orphaned_staging(self, *, grace_seconds: float = UNHELD_STAGING_GRACE_SECONDS) -> list[Path]:
        """Remove the staging folders no live builder holds (and unheld ones unchanged for ``grace_seconds``);
        returns what was removed. Safe to run at any time, from any process sharing the cache."""
        if not self.root.is_dir():
            return []
        candidates = []
        for stage_dir in sorted(self.root.iterdir()):
            if stage_dir.name.startswith(".") or not stage_dir.is_dir() or stage_dir.is_symlink():
                continue
            for entry in stage_dir.iterdir():
                held = _HELD_STAGING.fullmatch(entry.name) is not None
                if held or _UNHELD_STAGING.fullmatch(entry.name) is not None:
                    candidates.append((entry, held))
        removed = remove_orphans(candidates, grace_seconds=grace_seconds)
        if removed:
            logger.info("stage cache: removed %d staging folder(s) left by killed builders: %s",
                        len(removed), ", ".join(str(path) for path in removed))
        return removed


def save_ragged(path: Path, columns: Mapping[str, Sequence[np.ndarray]]) -> None:
    """Save named lists of 1-D arrays (one per example) as flat safetensors columns plus offsets."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for name, arrays in columns.items():
        lengths = np.asarray([len(a) for a in arrays], dtype=np.int64)
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate([np.asarray(a) for a in arrays]) if len(arrays) else np.zeros(0)
        tensors[f"{name}.values"] = np.ascontiguousarray(flat)
        tensors[f"{name}.offsets"] = offsets
    save_file(tensors, str(path))


def load_ragged(path: Path) -> dict[str, list[np.ndarray]]:
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    columns = {}
    for key in tensors:
        if key.endswith(".offsets"):
            name = key[: -len(".offsets")]
            values, offsets = tensors[f"{name}.values"], tensors[key]
            columns[name] = [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return columns


def file_sha256(path: Path, cache: dict[str, Any] | None = None) -> str:
    """sha256 of a file, memoised in ``cache`` by (path, size, mtime) so big weights are hashed once."""
    stat = path.stat()
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if cache is not None and memo_key in cache:
        return cache[memo_key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if cache is not None:
        cache[memo_key] = digest.hexdigest()
    return digest.hexdigest()


def folder_fingerprint(folder: Path, memo_file: Path | None = None) -> str:
    """Content fingerprint of a model folder: its config and the sha256 of every weight file."""
    memo: dict[str, Any] = {}
    if memo_file is not None and memo_file.exists():
        try:
            memo = json.loads(memo_file.read_text())
        except json.JSONDecodeError:
            memo = {}
    parts: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in (".safetensors", ".json") and path.is_file() and path.name != MARKER:
            parts[path.name] = file_sha256(path, memo)
    if memo_file is not None:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        memo_file.write_text(json.dumps(memo))
    return content_key(parts)
