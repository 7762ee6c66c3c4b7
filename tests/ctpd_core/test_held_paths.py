"""Held paths and the stage cache's orphans: what a killed builder leaves is removed, a live build never is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ctpd_core import held_paths
from ctpd_core.artifacts import StageCache, content_key
from ctpd_core.held_paths import create_held_file, make_held_dir, remove_if_orphaned

REPO = Path(__file__).resolve().parents[2]
KEY = content_key({"k": "orphans"})

# A builder in its own process: it writes part of its output, says so, and waits to be killed.
BUILDER = """
import sys, time
from pathlib import Path
from ctpd_core.artifacts import StageCache

def write(folder):
    (folder / "partial.bin").write_bytes(b"x" * 1000)
    Path(sys.argv[3]).write_text(str(folder))
    time.sleep(120)

StageCache(Path(sys.argv[1])).build("prepare", sys.argv[2], {}, write)
"""


def _staging(root: Path) -> list[Path]:
    return sorted(p for p in (root / "prepare").iterdir() if p.name.startswith(".")) if (root / "prepare").exists() else []


def _wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, f"the builder exited with {process.returncode}"
        assert time.monotonic() < deadline, "the builder never started writing"
        time.sleep(0.05)


def test_a_sigkilled_builder_leaves_a_staging_folder_that_the_sweep_removes(tmp_path):
    root, ready = tmp_path / "cache", tmp_path / "ready"
    builder = subprocess.Popen([sys.executable, "-c", BUILDER, str(root), KEY, str(ready)], cwd=REPO)
    try:
        _wait_for(ready, builder)
        (staging,) = _staging(root)
        assert staging == Path(ready.read_text()) and (staging / "partial.bin").exists()
        assert StageCache(root).remove_orphaned_staging() == []  # the builder is alive: its folder stays
        assert staging.exists()
        os.kill(builder.pid, signal.SIGKILL)
        builder.wait(timeout=30)
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait()
    assert staging.exists()  # a SIGKILL runs no cleanup
    assert StageCache(root).remove_orphaned_staging() == [staging]
    assert _staging(root) == []
    # and the stage builds normally afterwards
    folder = StageCache(root).build("prepare", KEY, {}, lambda out: (out / "out.txt").write_text("done"))
    assert (folder / "out.txt").read_text() == "done" and StageCache(root).is_complete("prepare", KEY)


def test_a_build_in_progress_in_this_process_is_never_removed(tmp_path):
    cache = StageCache(tmp_path)
    started, release = threading.Event(), threading.Event()

    def write(folder: Path) -> None:
        (folder / "out.txt").write_text("x")
        started.set()
        assert release.wait(30)

    builder = threading.Thread(target=cache.build, args=("prepare", KEY, {}, write))
    builder.start()
    try:
        assert started.wait(30)
        assert cache.remove_orphaned_staging(grace_seconds=0) == [] and len(_staging(tmp_path)) == 1
    finally:
        release.set()
        builder.join()
    assert cache.is_complete("prepare", KEY) and _staging(tmp_path) == []


def test_unheld_staging_folders_go_only_after_the_grace_period_and_nothing_else_is_touched(tmp_path):
    cache = StageCache(tmp_path)
    done = cache.build("prepare", KEY, {}, lambda out: (out / "out.txt").write_text("x"))
    prefix = "." + "ab" * 12
    old, fresh = tmp_path / "prepare" / f"{prefix}-abcd1234", tmp_path / "prepare" / f"{prefix}-wxyz_789"
    unrelated = [tmp_path / "prepare" / ".not-a-staging-folder", tmp_path / "datasets" / ".incoming-x.held"]
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "half.bin").write_bytes(b"x")
    for path in unrelated:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep")
    a_week_ago = time.time() - 8 * 24 * 3600
    for path in (old / "half.bin", old, unrelated[0]):
        os.utime(path, (a_week_ago, a_week_ago))
    assert cache.remove_orphaned_staging() == [old]
    assert fresh.exists() and done.exists() and all(path.exists() for path in unrelated)


def test_a_held_file_is_removed_only_once_its_writer_let_go(tmp_path):
    path, handle = create_held_file(tmp_path, ".incoming-", ".held")
    handle.write(b"data")
    assert remove_if_orphaned(path, grace_seconds=0) is False and path.exists()
    handle.close()
    assert remove_if_orphaned(path, grace_seconds=0) is True and not path.exists()
    assert remove_if_orphaned(path, grace_seconds=0) is False  # already gone: nothing to do

    folder, fd = make_held_dir(tmp_path, ".stage.held-")
    assert remove_if_orphaned(folder, grace_seconds=0) is False
    os.close(fd)
    assert remove_if_orphaned(folder, grace_seconds=0) is True and not folder.exists()


def test_a_writer_whose_new_file_was_swept_before_it_locked_starts_over(tmp_path, monkeypatch):
    """The race between creating and locking: a cleaner may remove the file in between; the writer notices."""
    real_lock, swept = held_paths._lock, []

    def lock_after_a_sweep(fd: int, *, wait: bool) -> bool:
        if wait and not swept:  # the writer's first lock: a cleaner got there first
            (victim,) = list(tmp_path.iterdir())
            assert remove_if_orphaned(victim, grace_seconds=0)
            swept.append(victim)
        return real_lock(fd, wait=wait)

    monkeypatch.setattr(held_paths, "_lock", lock_after_a_sweep)
    path, handle = create_held_file(tmp_path, ".incoming-", ".held")
    with handle:
        assert swept and path != swept[0] and path.exists()
        assert remove_if_orphaned(path, grace_seconds=0) is False


@pytest.mark.parametrize("module", ["ctpd_core.held_paths", "ctpd_core.artifacts"])
def test_sweeping_needs_no_numpy(module):
    """The scheduler image (no numpy) sweeps the stage cache, so importing these must not need it."""
    code = f"import sys, {module}; print(sorted({{'numpy', 'torch'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
