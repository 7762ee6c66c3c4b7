"""The checkpoint layout the API reads without torch: ids, live and kept checkpoints, what counts as complete, and
the move after the export (renamed first, stripped after, so a crash never leaves a live checkpoint that cannot
resume)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ctpd_core import checkpoint as checkpoint_module
from ctpd_core.checkpoint_layout import (
    RESUME_ONLY_FILES,
    STATE_FILE,
    TRAINABLE_FILE,
    checkpoint_id,
    find_checkpoint,
    folder_bytes,
    keep_checkpoints,
    parse_checkpoint_id,
    stored_checkpoints,
)


def _checkpoint(folder: Path, *, complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / TRAINABLE_FILE).write_bytes(b"w" * 100)
    if complete:
        (folder / STATE_FILE).write_text(json.dumps({"step": 1}))
    for name in RESUME_ONLY_FILES:
        (folder / name).write_bytes(b"o" * 200)
    return folder


def test_ids_are_stable_and_only_name_listed_stages():
    assert checkpoint_id("distill", 40) == "distill-00000040"
    assert parse_checkpoint_id("distill-00000040") == ("distill", 40)
    for other in ("contrastive-00000001", "distill-40", "distill-000000040", "../distill-00000040", "DISTILL-00000040"):
        assert parse_checkpoint_id(other) is None, other


def test_the_torch_side_uses_the_same_names():
    assert checkpoint_module.TRAINABLE_FILE == TRAINABLE_FILE and checkpoint_module.STATE_FILE == STATE_FILE
    assert checkpoint_module.CHECKPOINT_PREFIX == "step-"


def test_live_and_kept_checkpoints_are_found_complete_ones_only(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "distill" / "step-00000002")
    _checkpoint(run / "distill" / "step-00000003", complete=False)  # no state: not a checkpoint
    _checkpoint(run / "distill" / ".staging-step-00000004")  # a save in progress
    _checkpoint(run / "checkpoints" / "distill-00000001")
    (run / "checkpoints" / "not-an-id").mkdir()
    found = stored_checkpoints(run, "distill")
    assert [(c.id, c.kept) for c in found] == [("distill-00000001", True), ("distill-00000002", False)]
    assert find_checkpoint(run, "distill", 3) is None and find_checkpoint(run, "distill", 9) is None
    assert found[1].size_bytes() == 100 + len(json.dumps({"step": 1})) + 3 * 200
    (found[1].folder / "model").mkdir()
    (found[1].folder / "model" / "config.json").write_text("{}")
    assert found[1].model_ready() and found[1].size_bytes() == 100 + len(json.dumps({"step": 1})) + 3 * 200
    assert folder_bytes(found[1].model_folder) == 2


def test_keeping_moves_then_strips(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for step in (3, 4):
        _checkpoint(run / "distill" / f"step-{step:08d}")
    _checkpoint(run / "checkpoints" / "distill-00000004")  # an earlier attempt's: replaced by this one's
    kept = keep_checkpoints(run, "distill")
    assert [path.name for path in kept] == ["distill-00000003", "distill-00000004"]
    assert not (run / "distill").exists()
    for path in kept:
        assert sorted(child.name for child in path.iterdir()) == [STATE_FILE, TRAINABLE_FILE]

    # A crash right after the first rename: the live folder still holds only complete, resumable checkpoints.
    for step in (5, 6):
        _checkpoint(run / "distill" / f"step-{step:08d}")
    real_replace, calls = os.replace, []

    def crash_after_first(source, target):
        calls.append(source)
        real_replace(source, target)
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        keep_checkpoints(run, "distill")
    monkeypatch.setattr(os, "replace", real_replace)
    (remaining,) = (run / "distill").iterdir()
    assert all((remaining / name).is_file() for name in RESUME_ONLY_FILES)
    assert [c.step for c in stored_checkpoints(run, "distill")] == [3, 4, 5, 6]
