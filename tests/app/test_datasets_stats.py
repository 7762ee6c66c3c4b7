"""A dataset's statistics: counted by the upload's validator, stored in datasets.stats, shown on the dataset and
at GET /v1/datasets/{id}/stats with the token lengths preflights record; every example format uploads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.db import datasets as dataset_rows

FORMATS = Path(__file__).resolve().parents[2] / "examples" / "data" / "formats"


def _upload(client, filename: str, content: bytes) -> dict:
    response = client.post("/v1/datasets", files={"file": (filename, content, "application/octet-stream")})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize("name", sorted(path.name for path in FORMATS.glob("*.jsonl")))
def test_every_example_format_uploads_with_its_shape_counted(alice, name):
    body = _upload(alice, name, (FORMATS / name).read_bytes())
    stats = body["stats"]
    assert stats["counted"] and stats["missing"] is None and stats["rows"] == body["num_rows"] == 3
    assert stats["shapes"] == {name.removesuffix(".jsonl"): 3}
    conversational = not name.startswith("standard")
    assert (stats["system_turn_rows"], stats["multi_turn_rows"]) == ((2, 1) if conversational else (0, 0))
    assert alice.get(f"/v1/datasets/{body['id']}/stats").json() == stats
    assert stats["object"] == "dataset.stats" and stats["dataset_id"] == body["id"] and stats["token_lengths"] == {}


def test_duplicates_identical_pairs_and_lengths_are_counted(alice):
    rows = [
        {"prompt": "Q1", "chosen": " yes", "rejected": " no"},
        {"prompt": "Q1", "chosen": " yes", "rejected": " no"},  # a duplicate row
        {"prompt": "Q1", "chosen": " same", "rejected": " same"},  # the same prompt; identical responses (valid)
        {"prompt": "Q22", "chosen": " yes!", "rejected": " no"},
    ]
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    stats = _upload(alice, "pairs.jsonl", content)["stats"]
    assert (stats["duplicate_rows"], stats["duplicate_prompts"], stats["identical_pairs"]) == (1, 2, 1)
    assert stats["length_chars"]["prompt"] == {"min": 2, "mean": 2.25, "p50": 2, "p90": 3, "p99": 3, "max": 3}
    assert stats["length_chars"]["chosen"]["max"] == 5


def test_parquet_statistics_are_counted_from_the_file(alice):
    rows = [json.loads(line) for line in (FORMATS / "conversational_implicit.jsonl").read_text().splitlines()]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    stats = _upload(alice, "prefs.parquet", buffer.getvalue())["stats"]
    assert stats["shapes"] == {"conversational_implicit": 3} and stats["system_turn_rows"] == 2


def test_token_lengths_recorded_by_a_preflight_are_shown(alice, db):
    body = _upload(alice, "pairs.jsonl", (FORMATS / "standard_explicit.jsonl").read_bytes())
    lengths = {"prompt": {"max": 7}, "chosen": {"max": 21}}
    dataset_rows.record_token_lengths(db, body["id"], "smollm2-135m-instruct", lengths)
    stats = alice.get(f"/v1/datasets/{body['id']}/stats").json()
    assert stats["token_lengths"] == {"smollm2-135m-instruct": lengths} and stats["rows"] == 3
    assert alice.get(f"/v1/datasets/{body['id']}").json()["stats"] == stats


def test_a_dataset_stored_before_statistics_says_how_to_get_them(alice, db):
    row = dataset_rows.create_dataset(db, tenant="acme", filename="old.jsonl", format="jsonl", num_rows=3,
                                      sha256="0" * 64, size_bytes=10, path="/nowhere/old.jsonl")  # stats NULL
    stats = alice.get(f"/v1/datasets/{row.id}/stats").json()
    assert stats["counted"] is False and stats["rows"] is None and "upload the file again" in stats["missing"]
    assert alice.get(f"/v1/datasets/{row.id}").json()["stats"] == stats
    dataset_rows.record_token_lengths(db, row.id, "gemma-3-270m", {"prompt": {"max": 9}})
    stats = alice.get(f"/v1/datasets/{row.id}/stats").json()
    assert stats["counted"] is False and stats["token_lengths"] == {"gemma-3-270m": {"prompt": {"max": 9}}}


def test_statistics_are_private_to_their_tenant(alice, bob):
    body = _upload(alice, "pairs.jsonl", (FORMATS / "standard_explicit.jsonl").read_bytes())
    refused = bob.get(f"/v1/datasets/{body['id']}/stats")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert alice.get("/v1/datasets/ds_missing/stats").status_code == 404


def test_a_bad_conversational_row_is_a_422_naming_it(alice):
    rows = [json.loads(line) for line in (FORMATS / "openai_preference.jsonl").read_text().splitlines()]
    rows[1]["input"]["messages"].append({"role": "assistant", "content": "dangling"})
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    response = alice.post("/v1/datasets", files={"file": ("prefs.jsonl", content)})
    assert response.status_code == 422
    (error,) = response.json()["error"]["errors"]
    assert error["row"] == 2 and error["message"].startswith("input.messages must end with a user turn")


def test_unknown_query_parameters_are_refused(alice):
    """As on GET /v1/jobs: a typo must not answer as if it had not been asked."""
    body = _upload(alice, "pairs.jsonl", (FORMATS / "standard_explicit.jsonl").read_bytes())
    for url in ("/v1/datasets?limt=5", f"/v1/datasets/{body['id']}?x=1", f"/v1/datasets/{body['id']}/stats?=1"):
        refused = alice.get(url)
        assert refused.status_code == 422 and "unknown query parameter" in refused.json()["error"]["message"], url
    assert alice.get("/v1/datasets?limit=5").status_code == 200
