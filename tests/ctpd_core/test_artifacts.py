"""The stage cache and ragged storage."""

from __future__ import annotations

import numpy as np
import pytest

from ctpd_core.artifacts import StageCache, content_key, load_ragged, save_ragged


def test_content_key_ignores_order_and_sees_values():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_stage_cache_builds_once_and_never_publishes_a_failed_build(tmp_path):
    cache = StageCache(tmp_path)
    calls = []

    def write(folder):
        calls.append(folder)
        (folder / "out.txt").write_text("x")

    key = content_key({"k": 1})
    assert not cache.is_complete("prepare", key)
    path = cache.build("prepare", key, {"k": 1}, write)
    assert (path / "out.txt").read_text() == "x" and cache.is_complete("prepare", key)
    assert cache.build("prepare", key, {"k": 1}, write) == path and len(calls) == 1

    def crash(folder):
        (folder / "half.txt").write_text("partial")
        raise RuntimeError("killed")

    other = content_key({"k": 2})
    with pytest.raises(RuntimeError):
        cache.build("prepare", other, {"k": 2}, crash)
    assert not cache.is_complete("prepare", other)
    assert not cache.path("prepare", other).exists()
    assert [p.name for p in (tmp_path / "prepare").iterdir()] == [path.name]


def test_ragged_round_trip(tmp_path):
    columns = {"ids": [np.arange(3), np.arange(0), np.arange(5)], "logps": [np.ones(2, np.float32), np.zeros(0, np.float32), np.ones(1, np.float32)]}
    save_ragged(tmp_path / "r.safetensors", columns)
    loaded = load_ragged(tmp_path / "r.safetensors")
    for name, arrays in columns.items():
        assert [a.tolist() for a in loaded[name]] == [a.tolist() for a in arrays]
