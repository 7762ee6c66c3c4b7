"""/v1/datasets: validated uploads (JSONL, JSON, Parquet), all or nothing, per tenant."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
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
        + '{"prompt": "x", "chosen": " same", "rejected": " same"}\n'  # line 3
        + "{broken\n"  # line 4
        + json.dumps(ROWS[1]) + "\n"
        + '{"prompt": "y", "rejected": " r"}\n'  # line 6
    ).encode()
    response = alice.post("/v1/datasets", files={"file": ("bad.jsonl", lines)})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset" and error["param"] == "file" and error["total_errors"] == 3
    assert [item["row"] for item in error["errors"]] == [3, 4, 6]
    assert "identical" in error["errors"][0]["message"] and "invalid JSON" in error["errors"][1]["message"]
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
