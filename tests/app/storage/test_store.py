"""app/storage against both backends (a local folder; a real S3-compatible server, moto's server mode over HTTP):
files and ranges, folders complete only once their marker is written last, replacement, and settings that fail
at start-up with the setting named (and no secret shown)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from app.settings import Settings
from app.storage import FOLDER_MARKER, Storage, StorageConfigError, configured_storage
from app.storage import store as store_module
from tests.app.storage.conftest import SECRET, s3_options


def _storage(storage_url) -> Storage:
    url, options = storage_url
    storage = Storage.from_url(url, options)
    storage.check()
    return storage


def _folder(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "weights.bin").write_bytes(os.urandom(70_001))
    (root / "config.json").write_text('{"a": 1}\n')
    (root / "sub" / "deeper" / "x.txt").write_text("deep\n")
    (root / "empty").write_bytes(b"")
    os.utime(root / "config.json", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_folder_round_trips_with_its_bytes_and_mtimes(storage_url, tmp_path):
    storage = _storage(storage_url)
    source = _folder(tmp_path / "source")
    assert storage.put_folder(source, "stage/abc", replace=False)
    into = tmp_path / "into"
    into.mkdir()
    assert storage.get_folder("stage/abc", into)
    assert _tree(into) == _tree(source)
    listed = storage.list("stage/abc")
    assert sorted(listed) == sorted([*_tree(source), FOLDER_MARKER])
    assert listed["weights.bin"].size == 70_001


def test_a_folder_without_its_marker_is_never_read(storage_url, tmp_path):
    """A push cut short before its marker (every file there, the marker not): absent to every reader."""
    storage = _storage(storage_url)
    source = _folder(tmp_path / "source")
    for path in source.rglob("*"):
        if path.is_file():
            storage.put_file(path, f"stage/half/{path.relative_to(source).as_posix()}")
    assert storage.folder_manifest("stage/half") is None
    into = tmp_path / "into"
    into.mkdir()
    assert not storage.get_folder("stage/half", into)
    assert list(into.iterdir()) == []


def test_a_complete_folder_is_kept_unless_replaced_and_a_replacement_drops_old_files(storage_url, tmp_path):
    storage = _storage(storage_url)
    first = _folder(tmp_path / "first")
    second = tmp_path / "second"
    second.mkdir()
    (second / "config.json").write_text('{"a": 2}\n')
    assert storage.put_folder(first, "jobs/j/export", replace=False)
    assert not storage.put_folder(second, "jobs/j/export", replace=False)  # content-addressed: the first stays
    assert storage.folder_manifest("jobs/j/export").files.keys() == _tree(first).keys()
    assert storage.put_folder(second, "jobs/j/export", replace=True)
    assert sorted(storage.list("jobs/j/export")) == [FOLDER_MARKER, "config.json"]
    into = tmp_path / "into"
    into.mkdir()
    assert storage.get_folder("jobs/j/export", into)
    assert (into / "config.json").read_text() == '{"a": 2}\n'
    storage.delete("jobs/j/export")
    assert storage.list("jobs/j/export") == {} and storage.folder_manifest("jobs/j/export") is None


def test_files_ranges_and_sizes(storage_url, tmp_path, monkeypatch):
    storage = _storage(storage_url)
    data = os.urandom(10_000)
    (tmp_path / "f.bin").write_bytes(data)
    storage.put_file(tmp_path / "f.bin", "datasets/ds_1/f.bin")
    assert storage.exists("datasets/ds_1/f.bin") and not storage.exists("datasets/ds_1/nope")
    assert storage.size("datasets/ds_1/f.bin") == 10_000
    monkeypatch.setattr(store_module, "READ_CHUNK", 777)  # several ranged reads for one range
    assert b"".join(storage.read("datasets/ds_1/f.bin", 123, 9_001)) == data[123:9_001]
    storage.get_file("datasets/ds_1/f.bin", tmp_path / "back" / "f.bin")
    assert (tmp_path / "back" / "f.bin").read_bytes() == data
    with pytest.raises(FileNotFoundError):
        storage.get_file("datasets/ds_1/nope", tmp_path / "back" / "nope")
    assert not (tmp_path / "back" / "nope").exists() and sorted(p.name for p in (tmp_path / "back").iterdir()) == ["f.bin"]


def test_a_read_of_an_object_rewritten_since_the_layout_fails(storage_url, tmp_path):
    storage = _storage(storage_url)
    (tmp_path / "f").write_bytes(b"one version")
    storage.put_file(tmp_path / "f", "k/f")
    seen = storage.info("k/f")
    (tmp_path / "f").write_bytes(b"another one")
    storage.put_file(tmp_path / "f", "k/f")
    with pytest.raises(OSError, match="changed"):
        b"".join(storage.read("k/f", 0, 5, expect=seen))


def test_keys_never_leave_the_root(tmp_path):
    storage = Storage.from_url(f"file://{tmp_path}")
    for key in ("../x", "a/../../x", "/etc/passwd", "a//b", ""):
        with pytest.raises(ValueError):
            storage.path(key)


# ------------------------------------------------------------------------------------------- settings


def _settings(tmp_path: Path, url: str, options: dict | None = None) -> Settings:
    return Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'x.db'}", broker_url="memory://",
                    storage_url=url, storage_options=options or {})


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_no_storage_url_or_the_artifact_root_itself_means_no_shared_storage(tmp_path):
    assert configured_storage(_settings(tmp_path, "")) is None
    settings = _settings(tmp_path, "")
    assert configured_storage(_settings(tmp_path, f"file://{settings.artifact_root}")) is None


@pytest.mark.parametrize("url, says", [
    ("ftp://host/folder", "unsupported scheme (ftp)"),
    ("bucket-without-scheme", "unsupported scheme (none)"),
    ("file://relative/folder", "absolute folder"),
    ("s3://", "names a bucket"),
])
def test_a_url_this_cannot_use_fails_at_startup_naming_the_setting(tmp_path, url, says):
    from app.main import create_app

    with pytest.raises(StorageConfigError) as raised:
        create_app(_settings(tmp_path, url))
    message = str(raised.value)
    assert message.startswith(f"CTPD_STORAGE_URL={url}: ") and says in message
    assert "unset CTPD_STORAGE_URL" in message


def test_an_unreachable_endpoint_fails_at_startup_without_showing_the_secret(tmp_path, caplog):
    from app.main import create_app
    from worker.celery_app import create_celery

    options = s3_options(f"http://127.0.0.1:{_closed_port()}")
    options["config_kwargs"] = {"connect_timeout": 2, "retries": {"max_attempts": 1}}
    settings = _settings(tmp_path, "s3://some-bucket/prefix", options)
    caplog.set_level(logging.DEBUG)
    for start in (create_app, create_celery):  # the API and a worker alike
        with pytest.raises(StorageConfigError) as raised:
            start(settings)
        message = str(raised.value)
        assert message.startswith("CTPD_STORAGE_URL=s3://some-bucket/prefix: the storage cannot be used")
        assert "endpoint_url" in message and "unset CTPD_STORAGE_URL" in message
        assert SECRET not in message
    assert SECRET not in caplog.text and SECRET not in repr(settings)


def test_a_missing_bucket_fails_at_startup(tmp_path, s3_endpoint):
    with pytest.raises(StorageConfigError, match="CTPD_STORAGE_URL=s3://no-such-bucket: the storage cannot be used"):
        configured_storage(_settings(tmp_path, "s3://no-such-bucket", s3_options(s3_endpoint)))


def test_an_option_the_filesystem_does_not_take_fails_at_startup(tmp_path, s3_endpoint):
    options = {**s3_options(s3_endpoint), "not_an_option": 1}
    with pytest.raises(StorageConfigError, match="CTPD_STORAGE_URL=s3://b"):
        configured_storage(_settings(tmp_path, "s3://b", options))
