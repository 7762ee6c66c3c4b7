"""The API on a shared storage (both backends; S3 is a real server over HTTP): an upload lives in the storage and a
worker with an empty artifact root resolves it; a job's export pushed by a worker on another machine is served
from the storage byte for byte as the same folder on disk (listing, tar, tar.gz, one file, a Range, a resume);
a half-pushed export is not served."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.db import auth as key_rows
from app.db import jobs as job_rows
from app.main import create_app
from app.storage import FOLDER_MARKER, Storage, StorageMirror, export_key
from tests.app.conftest import SPEC
from tests.app.storage.conftest import s3_options
from tests.app.test_artifacts import BIG

ROWS = [{"prompt": "The cat", "chosen": " sat.", "rejected": " flew."}, {"chosen": "Yes.", "rejected": "No."}]


@pytest.fixture
def database_url(migrated_sqlite_template, tmp_path: Path) -> str:
    """SQLite only: what is stored where does not depend on the database (tests/app/test_artifacts.py runs both)."""
    path = tmp_path / "ctpd.db"
    shutil.copyfile(migrated_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def remote_settings(settings, storage_url, tmp_path):
    """An API process on another machine: its own (empty) artifact root, the shared storage configured."""
    url, options = storage_url
    return settings.model_copy(update={"artifact_root": tmp_path / "api-machine" / "artifacts", "storage_url": url,
                                       "storage_options": options})


@pytest.fixture
def remote(remote_settings, db, queue):
    app = create_app(remote_settings, queue=queue)
    key = key_rows.create_api_key(db, "acme", "remote test key")
    yield TestClient(app, headers={"Authorization": f"Bearer {key}"}), app.state.storage
    app.state.db.dispose()


def test_an_upload_lives_in_the_storage_and_a_worker_with_an_empty_root_resolves_it(remote, db, tmp_path):
    from worker.tasks import dataset_resolver

    client, storage = remote
    body = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    created = client.post("/v1/datasets", files={"file": ("pairs.jsonl", body)})
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]
    key = f"datasets/{dataset_id}/pairs.jsonl"
    assert b"".join(storage.read(key, 0, storage.size(key))) == body
    assert not Path(client.app.state.settings.artifact_root, "datasets", dataset_id).exists()  # the storage holds it

    worker_root = tmp_path / "worker-machine" / "artifacts"
    resolved = dataset_resolver(db, "acme", storage, worker_root)(dataset_id)
    assert resolved.is_relative_to(worker_root) and resolved.read_bytes() == body
    assert hashlib.sha256(resolved.read_bytes()).hexdigest() == created.json()["sha256"]

    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert not storage.exists(key)


def _job_with_export(db, worker_root: Path) -> tuple[str, Path]:
    """A succeeded job whose worker (artifact root ``worker_root``) wrote its export as the recipe does."""
    job, _ = job_rows.create_job(db, tenant="acme", spec=SPEC, name=None, metadata={}, idempotency_key=None,
                                 request_hash="h", max_attempts=3)
    folder = worker_root / "jobs" / job.id / "export"
    (folder / "adapter").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(BIG))
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "adapter" / "adapter_config.json").write_text('{"r": 4}\n')
    (folder / ("n" * 120 + ".txt")).write_text("a PAX header\n")
    (folder / "empty.txt").write_bytes(b"")
    assert job_rows.claim_job(db, job.id, "w:1", lease_seconds=60) is not None
    assert job_rows.finish_job(db, job.id, "w:1", "succeeded", export_dir=folder, attempt=1) == "succeeded"
    return job.id, folder


def _downloads(client: TestClient, job_id: str) -> dict[str, object]:
    tar = client.get(f"/v1/jobs/{job_id}/model.tar")
    ranged = client.get(f"/v1/jobs/{job_id}/model.tar", headers={"Range": "bytes=1000-2000000"})
    file_range = client.get(f"/v1/jobs/{job_id}/model/files/model.safetensors", headers={"Range": "bytes=-70000"})
    assert tar.status_code == 200 and ranged.status_code == 206 and file_range.status_code == 206
    return {
        "listing": client.get(f"/v1/jobs/{job_id}/artifacts").json(),
        "tar": tar.content, "tar_length": tar.headers["content-length"],
        "tar.gz": client.get(f"/v1/jobs/{job_id}/artifacts/model.tar.gz").content,
        "config": client.get(f"/v1/jobs/{job_id}/model/files/config.json").content,
        "nested": client.get(f"/v1/jobs/{job_id}/model/files/adapter/adapter_config.json").content,
        "tar_range": (ranged.content, ranged.headers["content-range"]),
        "file_range": (file_range.content, file_range.headers["content-range"], file_range.headers["last-modified"]),
    }


def test_an_export_is_served_from_the_storage_byte_for_byte_as_from_disk(alice, remote, db, settings):
    client, storage = remote
    job_id, folder = _job_with_export(db, settings.artifact_root)
    on_disk = _downloads(alice, job_id)  # the API on the worker's machine: its disk

    StorageMirror(storage).push(folder, folder.relative_to(settings.artifact_root).as_posix(), replace=True)
    assert folder.relative_to(settings.artifact_root).as_posix() == export_key(job_id)
    shutil.rmtree(folder)  # the worker's machine is gone: only the storage has it
    assert _downloads(client, job_id) == on_disk

    # A resume from the storage: the first bytes, then the rest with the ETag
    head = client.get(f"/v1/jobs/{job_id}/model.tar", headers={"Range": "bytes=0-99999"})
    rest = client.get(f"/v1/jobs/{job_id}/model.tar", headers={"Range": "bytes=100000-", "If-Range": head.headers["etag"]})
    assert rest.status_code == 206 and head.content + rest.content == on_disk["tar"]
    assert client.get(f"/v1/jobs/{job_id}/model/files/.ctpd-complete.json").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/model/files/../x").status_code == 404


def test_a_half_pushed_export_is_not_served(remote, db, settings):
    client, storage = remote
    job_id, folder = _job_with_export(db, settings.artifact_root)
    StorageMirror(storage).push(folder, export_key(job_id), replace=True)
    storage.fs.rm_file(storage.path(f"{export_key(job_id)}/{FOLDER_MARKER}"))  # a push cut before its marker
    shutil.rmtree(folder)
    refused = client.get(f"/v1/jobs/{job_id}/model.tar")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "artifacts_unavailable"
    assert client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []


def test_an_unreachable_storage_is_a_503_not_a_500(alice, db, settings):
    job_id, folder = _job_with_export(db, settings.artifact_root)
    shutil.rmtree(folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = {**s3_options(f"http://127.0.0.1:{port}"),
               "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    alice.app.state.storage = Storage.from_url("s3://gone/prefix", options)  # went away after the start-up check
    response = alice.get(f"/v1/jobs/{job_id}/model.tar")
    assert response.status_code == 503 and response.json()["error"]["code"] == "service_unavailable"
    assert response.headers["retry-after"] and "127.0.0.1" not in response.text
