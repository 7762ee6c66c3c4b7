"""The stage cache shared through the storage (both backends; S3 is a real server over HTTP): a stage built by
worker A is reused by worker B, on another artifact root, without recompute; a half-pushed folder is never read;
an unreachable storage costs a recompute, never a failed stage."""

from __future__ import annotations

import json
import logging
import socket

from app.storage import FOLDER_MARKER, Storage, StorageMirror
from ctpd_core.artifacts import MARKER, StageCache, content_key
from tests.app.storage.conftest import s3_options

PARTS = {"stage": "reference", "teacher": "t", "data": "d"}
KEY = content_key(PARTS)


class Builder:
    """A stage's write function that counts its calls (a recompute is a call)."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.calls = payload, 0

    def __call__(self, out) -> None:
        self.calls += 1
        (out / "logprobs.safetensors").write_bytes(self.payload)
        (out / "nested").mkdir()
        (out / "nested" / "stats.json").write_text(json.dumps({"pairs": 3}))


def _mirror(storage_url) -> StorageMirror:
    url, options = storage_url
    return StorageMirror(Storage.from_url(url, options))


def test_a_stage_built_by_worker_a_is_reused_by_worker_b_without_recompute(storage_url, tmp_path):
    mirror = _mirror(storage_url)
    worker_a = StageCache(tmp_path / "machine-a" / "artifacts", mirror=mirror)
    worker_b = StageCache(tmp_path / "machine-b" / "artifacts", mirror=mirror)  # another disk, empty
    built = Builder(b"\x01" * 5000)
    folder_a = worker_a.build("reference", KEY, PARTS, built)
    assert built.calls == 1
    assert mirror.storage.folder_manifest(worker_a.relative("reference", KEY)) is not None

    assert worker_b.is_complete("reference", KEY)  # fetched from the storage
    again = Builder(b"never written")
    folder_b = worker_b.build("reference", KEY, PARTS, again)
    assert again.calls == 0
    assert folder_b == tmp_path / "machine-b" / "artifacts" / "reference" / KEY[:24]
    for name in ("logprobs.safetensors", "nested/stats.json", MARKER):
        assert (folder_b / name).read_bytes() == (folder_a / name).read_bytes()
    assert not [entry for entry in folder_b.parent.iterdir() if entry.name.startswith(".")]  # no staging left


def test_a_half_pushed_folder_is_never_read(storage_url, tmp_path):
    """Worker A died mid-push: its files are in the storage, its marker is not. Worker B computes the stage (and
    its push replaces the leftovers)."""
    mirror = _mirror(storage_url)
    worker_a = StageCache(tmp_path / "a", mirror=None)
    folder_a = worker_a.build("reference", KEY, PARTS, Builder(b"half"))
    relative = worker_a.relative("reference", KEY)
    for path in folder_a.rglob("*"):
        if path.is_file():
            mirror.storage.put_file(path, f"{relative}/{path.relative_to(folder_a).as_posix()}")

    worker_b = StageCache(tmp_path / "b", mirror=mirror)
    assert not worker_b.is_complete("reference", KEY)
    computed = Builder(b"whole")
    folder_b = worker_b.build("reference", KEY, PARTS, computed)
    assert computed.calls == 1 and (folder_b / "logprobs.safetensors").read_bytes() == b"whole"
    manifest = mirror.storage.folder_manifest(relative)
    assert manifest is not None and manifest.files["logprobs.safetensors"].size == len(b"whole")
    assert FOLDER_MARKER not in manifest.files


def test_a_stage_complete_here_but_not_in_the_storage_is_pushed_on_its_next_use(storage_url, tmp_path):
    mirror = _mirror(storage_url)
    local_only = StageCache(tmp_path / "a", mirror=None)
    local_only.build("reference", KEY, PARTS, Builder(b"x"))  # built before the storage was configured
    relative = local_only.relative("reference", KEY)
    assert mirror.storage.folder_manifest(relative) is None
    StageCache(tmp_path / "a", mirror=mirror).build("reference", KEY, PARTS, Builder(b"never"))
    assert mirror.storage.folder_manifest(relative) is not None


def test_an_unreachable_storage_costs_a_recompute_not_the_stage(tmp_path, caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = {**s3_options(f"http://127.0.0.1:{port}"),
               "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    cache = StageCache(tmp_path / "a", mirror=StorageMirror(Storage.from_url("s3://gone/prefix", options)))
    caplog.set_level(logging.WARNING, logger="ctpd_core.artifacts")
    assert not cache.is_complete("reference", KEY)
    built = Builder(b"local")
    folder = cache.build("reference", KEY, PARTS, built)
    assert built.calls == 1 and (folder / MARKER).exists()
    assert "could not fetch" in caplog.text and "could not push" in caplog.text
    assert "test-secret" not in caplog.text
