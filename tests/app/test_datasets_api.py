"""/v1/datasets: validated uploads (JSONL, JSON, Parquet), all or nothing, per tenant."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from app.db import datasets as dataset_rows
from app.db.models import Dataset
from tests.app.conftest import SPEC

ROWS = [
    {"prompt": "The cat", "chosen": " sat on the mat.", "rejected": " flew to the moon."},
    {"prompt": "Water is", "chosen": " wet.", "rejected": " dry."},
    {"chosen": "Paris is in France.", "rejected": "Paris is in Spain."},  # implicit prompt
]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _parquet(rows) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def _stored_files(settings) -> list[Path]:
    root = Path(settings.artifact_root) / "datasets"
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


def _count(db) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(Dataset))


def test_upload_jsonl_json_and_parquet(alice, db, settings):
    conversational = [{"prompt": [{"role": "user", "content": "Hi?"}],
                       "chosen": [{"role": "assistant", "content": "Hello!"}],
                       "rejected": [{"role": "assistant", "content": "Go away."}]}]
    uploads = {
        "pairs.jsonl": (_jsonl(ROWS), "jsonl", 3),
        "pairs.json": (json.dumps({"data": ROWS[:2]}).encode(), "json", 2),
        "chat.json": (json.dumps(conversational).encode(), "json", 1),
        "pairs.parquet": (_parquet(ROWS[:2]), "parquet", 2),
    }
    for filename, (content, file_format, rows) in uploads.items():
        response = alice.post("/v1/datasets", files={"file": (filename, content, "application/octet-stream")})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["id"].startswith("ds_") and body["object"] == "dataset" and "path" not in body
        assert (body["format"], body["num_rows"], body["filename"]) == (file_format, rows, filename)
        assert body["size_bytes"] == len(content) and body["sha256"] == hashlib.sha256(content).hexdigest()
        assert alice.get(f"/v1/datasets/{body['id']}").json() == body

        row = dataset_rows.get_dataset(db, body["id"])
        stored = Path(row.path)
        assert stored == Path(settings.artifact_root) / "datasets" / body["id"] / filename
        assert stored.read_bytes() == content
    # nothing half-written is left next to the datasets
    assert not [p for p in (Path(settings.artifact_root) / "datasets").iterdir() if p.name.startswith(".")]

    # an uploaded dataset is referenced by id
    dataset_id = alice.post("/v1/datasets", files={"file": ("x.jsonl", _jsonl(ROWS))}).json()["id"]
    job = alice.post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset_id}})
    assert job.status_code == 201 and job.json()["spec"]["dataset"]["id"] == dataset_id


def test_row_errors_name_the_lines_and_store_nothing(alice, db, settings):
    lines = (
        json.dumps(ROWS[0]) + "\n"
        + "\n"  # blank lines are skipped, but still counted
        + '{"prompt": "x", "chosen": " same", "rejected": ""}\n'  # line 3
        + "{broken\n"  # line 4
        + json.dumps(ROWS[1]) + "\n"
        + '{"prompt": "y", "rejected": " r"}\n'  # line 6
    ).encode()
    response = alice.post("/v1/datasets", files={"file": ("bad.jsonl", lines)})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset" and error["param"] == "file" and error["total_errors"] == 3
    assert [item["row"] for item in error["errors"]] == [3, 4, 6]
    assert "rejected is empty" in error["errors"][0]["message"] and "invalid JSON" in error["errors"][1]["message"]
    assert "chosen" in error["errors"][2]["message"] and "row 3" in error["message"]

    bad_json = json.dumps([ROWS[0], {"prompt": "p", "chosen": "", "rejected": "r"}]).encode()
    rows = alice.post("/v1/datasets", files={"file": ("bad.json", bad_json)}).json()["error"]["errors"]
    assert rows == [{"row": 2, "message": rows[0]["message"]}] and "empty" in rows[0]["message"]
    parquet = alice.post("/v1/datasets", files={"file": ("bad.parquet", _parquet([ROWS[0], {**ROWS[1], "chosen": " "}]))})
    assert parquet.status_code == 422 and parquet.json()["error"]["errors"][0]["row"] == 2
    assert alice.post("/v1/datasets", files={"file": ("empty.jsonl", b"")}).status_code == 422
    assert alice.post("/v1/datasets", files={"file": ("junk.parquet", b"not parquet")}).status_code == 422

    assert _count(db) == 0 and _stored_files(settings) == []


def test_upload_requests_that_are_refused(alice, client, db, settings):
    csv = alice.post("/v1/datasets", files={"file": ("pairs.csv", b"a,b\n")})
    assert csv.status_code == 422 and csv.json()["error"]["param"] == "file" and ".jsonl" in csv.json()["error"]["message"]
    missing = alice.post("/v1/datasets", data={"other": "x"})
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "file"
    too_big = _jsonl(ROWS * 20000)  # > the 1 MiB cap of these tests
    assert len(too_big) > settings.max_upload_bytes
    response = alice.post("/v1/datasets", files={"file": ("big.jsonl", too_big)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    just_over = b" " * (settings.max_upload_bytes + 10)  # under the Content-Length guard: caught while copying
    assert alice.post("/v1/datasets", files={"file": ("big.jsonl", just_over)}).status_code == 413
    assert client.post("/v1/datasets", files={"file": ("p.jsonl", _jsonl(ROWS))}).status_code == 401
    assert _count(db) == 0 and _stored_files(settings) == []


def test_an_unsafe_filename_stays_inside_the_dataset_folder(alice, db, settings):
    body = alice.post("/v1/datasets", files={"file": ("../../etc/evil name.jsonl", _jsonl(ROWS))}).json()
    assert body["filename"] == "evil_name.jsonl"
    assert Path(dataset_rows.get_dataset(db, body["id"]).path).parent == Path(settings.artifact_root) / "datasets" / body["id"]


def test_datasets_are_private_to_their_tenant(alice, bob):
    dataset_id = alice.post("/v1/datasets", files={"file": ("p.jsonl", _jsonl(ROWS))}).json()["id"]
    assert alice.get(f"/v1/datasets/{dataset_id}").status_code == 200
    response = bob.get(f"/v1/datasets/{dataset_id}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def _upload_with_file(alice, db) -> tuple[str, Path]:
    dataset_id = alice.post("/v1/datasets", files={"file": ("p.jsonl", _jsonl(ROWS))}).json()["id"]
    return dataset_id, Path(dataset_rows.get_dataset(db, dataset_id).path)


def test_a_job_submitted_while_a_delete_runs_keeps_its_dataset(alice, db, monkeypatch):
    """The race of a delete with a submission: the job is validated and created after the delete request looked at
    the dataset and before its row goes. The in-use check inside the delete's transaction sees the job (409), and
    the job keeps its dataset (a delete that missed it would leave a queued job failing on a missing file)."""
    dataset_id, path = _upload_with_file(alice, db)
    submitted: list[str] = []
    real_delete = dataset_rows.delete_dataset

    def delete_after_a_submission(*args, **kwargs):
        job = alice.post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset_id}})
        assert job.status_code == 201, job.text  # validated: the dataset is still there
        submitted.append(job.json()["id"])
        return real_delete(*args, **kwargs)

    monkeypatch.setattr(dataset_rows, "delete_dataset", delete_after_a_submission)
    refused = alice.delete(f"/v1/datasets/{dataset_id}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "dataset_in_use"
    assert submitted and submitted[0] in refused.json()["error"]["message"]
    assert dataset_rows.get_dataset(db, dataset_id) is not None and path.is_file()

    monkeypatch.undo()
    assert alice.post(f"/v1/jobs/{submitted[0]}/cancel").status_code in (200, 202)
    # Cancelled while queued: no longer active, so the dataset can go (the row and its folder).
    deleted = alice.delete(f"/v1/datasets/{dataset_id}")
    assert deleted.status_code == 204 and dataset_rows.get_dataset(db, dataset_id) is None and not path.exists()
    assert alice.delete(f"/v1/datasets/{dataset_id}").status_code == 404


def test_a_dataset_deleted_after_the_submissions_check_is_a_422_and_no_job(alice, db, monkeypatch):
    """The other order of the race: the submission checked the dataset, then the delete committed, then the job's
    insert ran. The insert re-reads the dataset under a share lock in its own transaction, finds it gone, and
    stores nothing (a queued job on a deleted dataset would only fail on the worker)."""
    from app.db import jobs as job_rows

    dataset_id, path = _upload_with_file(alice, db)
    real_create = job_rows.create_job

    def delete_then_create(*args, **kwargs):
        assert kwargs["dataset_ids"] == [dataset_id]
        assert dataset_rows.delete_dataset(db, dataset_id, "acme") is not None  # committed before the insert
        return real_create(*args, **kwargs)

    monkeypatch.setattr(job_rows, "create_job", delete_then_create)
    refused = alice.post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset_id}})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["param"] == "dataset.id" and "was deleted while this job was submitted" in error["message"]
    assert job_rows.list_jobs(db, "acme", limit=10)[0] == []


def test_a_job_committed_after_the_delete_locked_the_row_is_seen(alice, db, monkeypatch):
    """PostgreSQL (READ COMMITTED): the delete locks the row, and its in-use check reads after the lock, so a job
    another connection commits in between is seen. (SQLite: the delete's BEGIN IMMEDIATE keeps any other writer
    out of that gap.)"""
    if db.is_sqlite:
        pytest.skip("SQLite serialises writers: no job can be committed inside the delete's transaction")
    from app.db import jobs as job_rows

    dataset_id, path = _upload_with_file(alice, db)
    real_check = dataset_rows._active_jobs_using
    created: list[str] = []

    def a_job_commits_first(session, *args):
        if not created:  # another connection, while this transaction holds the row's lock
            job, _ = job_rows.create_job(db, tenant="acme", spec={**SPEC, "dataset": {"id": dataset_id}}, name=None,
                                         metadata={}, idempotency_key=None, request_hash="h", max_attempts=3)
            created.append(job.id)
        return real_check(session, *args)

    monkeypatch.setattr(dataset_rows, "_active_jobs_using", a_job_commits_first)
    with pytest.raises(dataset_rows.DatasetInUse) as refused:
        dataset_rows.delete_dataset(db, dataset_id, "acme")
    assert refused.value.job_ids == created
    assert dataset_rows.get_dataset(db, dataset_id) is not None and path.is_file()
