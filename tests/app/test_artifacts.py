"""The final model over HTTP: per-file and archive downloads with RFC 9110 Range (a download cut mid-way and
resumed gives identical bytes; 416; a stale If-Range gets the whole body), the deterministic tar's layout against
Python's tarfile, confinement of file paths (no ``..``, no symlinks out), and tenant isolation."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from app.api.artifacts import folder_file, requested_range, tar_layout
from app.api.errors import ApiError
from app.db import jobs as job_rows
from tests.app.conftest import SPEC

BIG = 3 * (1 << 20) + 12345  # a few chunks, and not a multiple of the tar block


def _export_folder(root: Path) -> Path:
    folder = root / "export"
    (folder / "adapter").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(BIG))
    (folder / "config.json").write_text('{"model_type": "llama", "dtype": "bfloat16"}\n')
    (folder / "adapter" / "adapter_config.json").write_text('{"r": 4}\n')
    (folder / ("n" * 120 + ".txt")).write_text("a name longer than ustar's 100 characters (a PAX header)\n")
    (folder / "empty.txt").write_bytes(b"")
    outside = root / "secret.txt"
    outside.write_text("not part of the export\n")
    (folder / "leak.txt").symlink_to(outside)
    return folder


def _succeeded_job(db, tenant: str, export_dir: Path) -> str:
    job, _ = job_rows.create_job(db, tenant=tenant, spec=SPEC, name=None, metadata={}, idempotency_key=None,
                                 request_hash="h", max_attempts=3)
    assert job_rows.claim_job(db, job.id, "w:1", lease_seconds=60) is not None
    assert job_rows.finish_job(db, job.id, "w:1", "succeeded", export_dir=export_dir, attempt=1) == "succeeded"
    return job.id


@pytest.fixture
def exported(db, settings):
    folder = _export_folder(settings.artifact_root / "jobs" / "x")
    return _succeeded_job(db, "acme", folder), folder


def _cut_then_resume(client, url: str, cut: int) -> tuple[bytes, dict]:
    """Read ``cut`` bytes and drop the connection, then ask for the rest with Range and If-Range."""
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["accept-ranges"] == "bytes"
        etag, size = response.headers["etag"], int(response.headers["content-length"])
        head = b""
        for chunk in response.iter_bytes():
            head += chunk
            if len(head) >= cut:
                break
    head = head[:cut]
    rest = client.get(url, headers={"Range": f"bytes={cut}-", "If-Range": etag})
    assert rest.status_code == 206, rest.text
    assert rest.headers["content-range"] == f"bytes {cut}-{size - 1}/{size}"
    assert int(rest.headers["content-length"]) == size - cut
    return head + rest.content, dict(response.headers)


def test_a_file_download_resumes_to_identical_bytes(alice, exported):
    job_id, folder = exported
    url = f"/v1/jobs/{job_id}/model/files/model.safetensors"
    whole = alice.get(url)
    assert whole.status_code == 200 and whole.content == (folder / "model.safetensors").read_bytes()
    assert whole.headers["etag"].startswith('"') and whole.headers["last-modified"].endswith("GMT")
    resumed, _ = _cut_then_resume(alice, url, cut=(1 << 20) + 7)
    assert resumed == whole.content

    # The other range forms, 416, and If-Range.
    assert alice.get(url, headers={"Range": "bytes=10-19"}).content == whole.content[10:20]
    assert alice.get(url, headers={"Range": "bytes=-5"}).content == whole.content[-5:]
    assert alice.get(url, headers={"Range": f"bytes=10-{10 * BIG}"}).content == whole.content[10:]  # clamped
    probe = alice.get(url, headers={"Range": "bytes=0-"})  # how download managers ask whether ranges work
    assert probe.status_code == 206 and probe.headers["content-range"] == f"bytes 0-{BIG - 1}/{BIG}"
    unsatisfiable = alice.get(url, headers={"Range": f"bytes={BIG}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{BIG}"
    assert unsatisfiable.json()["error"]["code"] == "range_not_satisfiable"
    stale = alice.get(url, headers={"Range": "bytes=100-", "If-Range": '"an-older-version"'})
    assert stale.status_code == 200 and stale.content == whole.content  # the validator changed: the whole file
    by_date = alice.get(url, headers={"Range": "bytes=100-", "If-Range": whole.headers["last-modified"]})
    assert by_date.status_code == 206 and by_date.content == whole.content[100:]
    for ignored in ("bytes=0-1,5-9", "lines=1-2", "bytes=9-3"):  # several, another unit, invalid: the whole file
        response = alice.get(url, headers={"Range": ignored})
        assert response.status_code == 200 and response.content == whole.content, ignored

    nested = alice.get(f"/v1/jobs/{job_id}/model/files/adapter/adapter_config.json")
    assert nested.status_code == 200 and nested.json() == {"r": 4}
    empty = alice.get(f"/v1/jobs/{job_id}/model/files/empty.txt")
    assert empty.status_code == 200 and empty.content == b""
    assert alice.get(f"/v1/jobs/{job_id}/model/files/empty.txt", headers={"Range": "bytes=0-"}).status_code == 416


def test_the_archive_is_a_tar_that_resumes_from_any_offset(alice, exported, tmp_path):
    job_id, folder = exported
    url = f"/v1/jobs/{job_id}/model.tar"
    whole = alice.get(url)
    assert whole.status_code == 200
    assert whole.headers["content-type"] == "application/x-tar"
    assert int(whole.headers["content-length"]) == len(whole.content)
    with tarfile.open(fileobj=io.BytesIO(whole.content)) as archive:
        members = {member.name: member for member in archive.getmembers()}
        archive.extractall(tmp_path / "out", filter="data")
    files = {name.removeprefix(f"{job_id}/") for name, member in members.items() if member.isfile()}
    assert files == {"model.safetensors", "config.json", "adapter/adapter_config.json", "n" * 120 + ".txt",
                     "empty.txt"}  # the symlink is left out
    for relative in files:
        assert (tmp_path / "out" / job_id / relative).read_bytes() == (folder / relative).read_bytes()

    # Cut mid-file (inside model.safetensors), mid-header, and at the very end: always the same bytes.
    for cut in ((1 << 20) + 3, 700, len(whole.content) - 1):
        resumed, _ = _cut_then_resume(alice, url, cut=cut)
        assert resumed == whole.content, cut
    assert alice.get(url).content == whole.content  # deterministic: the same bytes every time
    assert alice.get(url, headers={"Range": f"bytes={len(whole.content)}-"}).status_code == 416
    stale = alice.get(url, headers={"Range": "bytes=1000-", "If-Range": '"stale"'})
    assert stale.status_code == 200 and stale.content == whole.content

    # The legacy tar.gz still works (the Job's download_url), and the Job names the resumable archive.
    legacy = alice.get(f"/v1/jobs/{job_id}/artifacts/model.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(legacy.content), mode="r:gz") as archive:
        assert f"{job_id}/config.json" in archive.getnames()
    model = alice.get(f"/v1/jobs/{job_id}").json()["model"]
    assert model["archive_url"] == url and model["download_url"].endswith("model.tar.gz")
    listed = alice.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert {item["path"]: item["download_url"] for item in listed}["adapter/adapter_config.json"] == \
        f"/v1/jobs/{job_id}/model/files/adapter/adapter_config.json"


def test_a_replaced_export_changes_the_etag(alice, exported):
    job_id, folder = exported
    url = f"/v1/jobs/{job_id}/model.tar"
    before = alice.get(url, headers={"Range": "bytes=0-0"}).headers["etag"]
    (folder / "config.json").write_text('{"model_type": "llama", "dtype": "float16"}\n')
    after = alice.get(url)
    assert after.headers["etag"] != before
    resumed = alice.get(url, headers={"Range": "bytes=512-", "If-Range": before})
    assert resumed.status_code == 200 and resumed.content == after.content  # never a mix of two versions


# httpx removes literal dot segments before sending (as browsers do); percent-encoded ones reach the route as
# `..` and `.` (what `curl --path-as-is` sends), so they test the server's own check.
@pytest.mark.parametrize("path", ["%2e%2e/secret.txt", "%2e%2e/%2e%2e/%2e%2e/etc/passwd", "adapter/%2e%2e/config.json",
                                  "%2e/config.json", "leak.txt", "adapter", "adapter//adapter_config.json",
                                  "missing.bin", ".hidden", "config.json%00"])
def test_file_paths_stay_inside_the_folder(alice, exported, path):
    job_id, _ = exported
    response = alice.get(f"/v1/jobs/{job_id}/model/files/{path}")
    assert response.status_code in (404, 422), (path, response.text)  # 422: a NUL is refused before any lookup
    assert "not part of the export" not in response.text


def test_folder_file_refuses_every_way_out(tmp_path):
    folder = _export_folder(tmp_path)
    (folder / "linked").symlink_to(folder / "adapter", target_is_directory=True)  # a symlinked folder, even inside
    for relative in ("../secret.txt", "adapter/../config.json", "./config.json", "/etc/passwd", "leak.txt",
                     "linked/adapter_config.json", "adapter", "", "a\\b"):
        assert folder_file(folder, relative) is None, relative
    assert folder_file(folder, "adapter/adapter_config.json") == folder / "adapter" / "adapter_config.json"


def test_another_tenants_model_is_not_found(alice, bob, exported):
    job_id, _ = exported
    for url in (f"/v1/jobs/{job_id}/model.tar", f"/v1/jobs/{job_id}/model/files/config.json"):
        assert alice.get(url).status_code == 200
        response = bob.get(url)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_a_job_that_has_not_succeeded_has_nothing_to_download(alice, db):
    job, _ = job_rows.create_job(db, tenant="acme", spec=SPEC, name=None, metadata={}, idempotency_key=None,
                                 request_hash="h", max_attempts=3)
    for url in (f"/v1/jobs/{job.id}/model.tar", f"/v1/jobs/{job.id}/model/files/config.json"):
        response = alice.get(url)
        assert response.status_code == 409 and response.json()["error"]["code"] == "job_not_succeeded"


def test_the_tar_layout_matches_tarfile_member_by_member(tmp_path):
    """Every member's data starts where tarfile finds it: the offsets are computed, not guessed."""
    folder = _export_folder(tmp_path)
    layout = tar_layout(folder, "root")
    data = b"".join(layout.stream(0, layout.size - 1))
    assert len(data) == layout.size and layout.size % tarfile.BLOCKSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive.getmembers():
            if member.isfile():
                relative = member.name.removeprefix("root/")
                assert data[member.offset_data:member.offset_data + member.size] == (folder / relative).read_bytes()
    for start, end in ((0, 0), (511, 1024), (layout.size - 1, layout.size - 1), (1000, BIG)):
        assert b"".join(layout.stream(start, end)) == data[start:end + 1]


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-", (0, 99)), ("bytes=0-99", (0, 99)), ("bytes=5-", (5, 99)), ("bytes=5-9", (5, 9)),
    ("bytes=-10", (90, 99)), ("bytes=-1000", (0, 99)), ("bytes=90-1000", (90, 99)), ("Bytes = 1 - 2", (1, 2)),
    ("bytes=1-2,4-5", None), ("bytes=x-", None), ("bytes=-", None), ("bytes=7-3", None),
])
def test_requested_range(header, expected):
    assert requested_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-200", "bytes=-0"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(ApiError) as raised:
        requested_range(header, 100)
    assert raised.value.status == 416 and raised.value.headers == {"Content-Range": "bytes */100",
                                                                  "Accept-Ranges": "bytes"}
