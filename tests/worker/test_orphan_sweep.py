"""The worker's orphan sweep: at worker start and in every reaper pass, both kinds of leftovers go, live ones stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.settings import Settings
from app.storage_gc import new_incoming_file
from ctpd_core.held_paths import make_held_dir
from worker.orphan_sweep import _sweep_at_worker_start, sweep_orphans
from worker.tasks import reap

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'ctpd.db'}", broker_url="memory://")


class NoQueue:
    def enqueue_job(self, job_id: str) -> None:
        raise AssertionError(f"nothing to enqueue, got {job_id}")

    def enqueue_reaper(self) -> None:
        pass


def _leftovers(settings: Settings):
    """One orphan of each kind (their writers let go: as after a SIGKILL) and one live one of each kind."""
    root = Path(settings.artifact_root)
    datasets, stage = root / "datasets", root / "reference"
    stage.mkdir(parents=True)
    orphan_upload, handle = new_incoming_file(datasets)
    handle.close()
    live_upload, live_handle = new_incoming_file(datasets)
    orphan_staging, fd = make_held_dir(stage, "." + "0f" * 12 + ".held-")
    os.close(fd)
    live_staging, live_fd = make_held_dir(stage, "." + "1e" * 12 + ".held-")
    return (orphan_upload, orphan_staging), (live_upload, live_staging), (live_handle, live_fd)


def test_the_reaper_pass_removes_orphans_and_keeps_live_writes(db, settings):
    orphans, live, holds = _leftovers(settings)
    try:
        assert reap(db, settings, NoQueue()) == []
        assert not any(path.exists() for path in orphans)
        assert all(path.exists() for path in live)
    finally:
        holds[0].close()
        os.close(holds[1])
    assert sweep_orphans(settings) == 2  # once their writers let go, they are orphans too


def test_a_worker_start_sweeps(settings):
    orphans, live, holds = _leftovers(settings)
    try:
        _sweep_at_worker_start(instance=SimpleNamespace(app=SimpleNamespace(ctpd_settings=settings)))
        assert not any(path.exists() for path in orphans) and all(path.exists() for path in live)
    finally:
        holds[0].close()
        os.close(holds[1])


def test_a_sweep_of_a_missing_or_unreadable_root_never_raises(settings, tmp_path):
    assert sweep_orphans(settings) == 0  # nothing there yet
    blocked = settings.model_copy(update={"artifact_root": tmp_path / "a-file"})
    (tmp_path / "a-file").write_text("not a folder")
    assert sweep_orphans(blocked) == 0


def test_the_sweep_needs_no_numpy_or_torch():
    """The scheduler image (the reaper) carries neither."""
    code = "import sys, worker.orphan_sweep; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_a_half_written_export_of_a_killed_worker_is_swept_and_a_live_one_kept(settings):
    jobs = Path(settings.artifact_root) / "jobs"
    (jobs / "job_a").mkdir(parents=True)
    (jobs / "job_b").mkdir(parents=True)
    dead, fd = make_held_dir(jobs / "job_a", ".export-1-")
    (dead / "model.safetensors").write_bytes(b"half")
    os.close(fd)  # as after a SIGKILL
    live, live_fd = make_held_dir(jobs / "job_b", ".export-2-")
    published = jobs / "job_b" / "export"
    published.mkdir()
    try:
        assert sweep_orphans(settings) == 1
        assert not dead.exists() and live.exists() and published.exists()
    finally:
        os.close(live_fd)
