"""publish_folder: the one atomic "write a folder, then rename it into place" of checkpoints, the stage cache,
catalog conversions and the export."""

from __future__ import annotations

import pytest

from ctpd_core.publish import publish_folder


def _write(text: str):
    def write(folder):
        (folder / "data.txt").write_text(text)

    return write


def test_publishes_and_replaces(tmp_path):
    target = tmp_path / "out"
    assert publish_folder(target, _write("one"), staging_prefix=".out-")
    assert publish_folder(target, _write("two"), staging_prefix=".out-")
    assert (target / "data.txt").read_text() == "two"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_a_refusal_right_before_the_rename_publishes_nothing(tmp_path):
    target = tmp_path / "out"
    publish_folder(target, _write("theirs"), staging_prefix=".out-")
    assert not publish_folder(target, _write("mine"), staging_prefix=".out-", may_publish=lambda: False)
    assert (target / "data.txt").read_text() == "theirs"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_keep_existing_keeps_a_complete_target(tmp_path):
    target = tmp_path / "out"
    publish_folder(target, _write("first"), staging_prefix=".out-")
    assert publish_folder(target, _write("second"), staging_prefix=".out-", keep_existing=lambda _: True)
    assert (target / "data.txt").read_text() == "first"


def test_a_failed_write_leaves_no_staging_folder(tmp_path):
    def failing(folder):
        (folder / "half.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_folder(tmp_path / "out", failing, staging_prefix=".out-", held=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("held", [False, True])
def test_a_published_folder_gets_the_umask_mode_not_mkdtemps_0700(tmp_path, held):
    # The export is read by other users (a shared run folder, a different service account downloading it).
    import os

    old = os.umask(0o022)
    try:
        target = tmp_path / "export"
        publish_folder(target, _write("x"), staging_prefix=".export-", held=held)
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o755


def test_a_file_written_0600_through_a_temporary_file_is_published_with_the_umask_mode(tmp_path):
    """transformers writes safetensors shards through a temporary file (0600): published, they are readable by
    the API process of another service account, as every other file of the export is; wider modes stay."""
    import os

    def write(staging):
        (staging / "model.safetensors").write_bytes(b"w")
        os.chmod(staging / "model.safetensors", 0o600)
        (staging / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(staging / "run.sh", 0o755)

    old = os.umask(0o022)
    try:
        target = tmp_path / "export"
        publish_folder(target, write, staging_prefix=".export-")
    finally:
        os.umask(old)
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (target / "run.sh").stat().st_mode & 0o777 == 0o755


def test_every_file_and_every_nested_folder_is_flushed_before_the_rename(tmp_path, monkeypatch):
    import os

    import ctpd_core.publish as publish

    flushed_dirs: list[str] = []
    flushed_files: list[int] = []
    real_fsync_dir = publish._fsync_dir
    monkeypatch.setattr(publish, "_fsync_dir", lambda folder: (flushed_dirs.append(folder.name), real_fsync_dir(folder)))
    real_fsync = os.fsync
    monkeypatch.setattr(publish.os, "fsync", lambda fd: (flushed_files.append(fd), real_fsync(fd)))

    def write(folder):
        (folder / "model" / "shards").mkdir(parents=True)
        (folder / "model" / "shards" / "a.bin").write_bytes(b"a")
        (folder / "_complete.json").write_text("{}")

    publish_folder(tmp_path / "entry", write, staging_prefix=".entry-")
    # deepest first, then the staging folder itself, then (after the rename) the parent
    assert flushed_dirs[:2] == ["shards", "model"] and flushed_dirs[-1] == tmp_path.name
    assert len(flushed_files) >= 2 + 3  # two files, and the three folders (each fsync'd through a descriptor)
