"""`ctpd submit` against the real API served over HTTP (uvicorn in a thread, this suite's app)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from app.db import datasets as dataset_rows
from ctpd_cli.main import main
from tests.app.conftest import SPEC
from tests.live_service import serving

ROWS = [
    {"prompt": "The cat", "chosen": " sat on the mat.", "rejected": " flew to the moon."},
    {"prompt": "Water is", "chosen": " wet.", "rejected": " dry."},
    {"prompt": "Fire is", "chosen": " hot.", "rejected": " cold."},
]


@pytest.fixture
def server(app) -> Iterator[str]:
    with serving(app) as url:
        yield url


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_submit_upload_uploads_the_validation_file_too(server, alice, db, tmp_path, capsys):
    """The bug: --upload replaced dataset.path by the upload's id and dropped dataset.validation_path, so the job
    silently held out a fraction of the training rows instead of the user's validation set."""
    train = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    validation = _write_jsonl(tmp_path / "heldout.jsonl", ROWS[:2])
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({**SPEC, "dataset": {"path": train, "validation_path": validation}}))
    assert main(["submit", str(spec_path), "--url", server, "--key", alice.api_key, "--upload", train]) == 0
    out = capsys.readouterr().out
    job_id = out.split("submitted job ", 1)[1].split()[0]

    dataset = alice.get(f"/v1/jobs/{job_id}").json()["spec"]["dataset"]
    assert dataset["path"] is None and dataset["validation_path"] is None
    assert dataset["id"] and dataset["validation_id"] and dataset["id"] != dataset["validation_id"]
    uploaded = dataset_rows.get_dataset(db, dataset["id"], "acme")
    held_out = dataset_rows.get_dataset(db, dataset["validation_id"], "acme")
    assert (uploaded.num_rows, held_out.num_rows) == (3, 2)
    assert f"validation dataset {dataset['validation_id']}" in out


def test_submit_upload_without_a_validation_file_holds_out_a_fraction(server, alice, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({**SPEC, "dataset": {"path": "/elsewhere/pairs.jsonl"}}))
    assert main(["submit", str(spec_path), "--url", server, "--key", alice.api_key, "--upload", train]) == 0
    job_id = capsys.readouterr().out.split("submitted job ", 1)[1].split()[0]
    dataset = alice.get(f"/v1/jobs/{job_id}").json()["spec"]["dataset"]
    assert dataset["id"] and dataset["path"] is None and dataset["validation_id"] is None
