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
