"""A Hugging Face save_to_disk folder as a job's dataset: a server path, so the deployment's policy decides who
may name it (app/policy.py), and its splits are kept in the resolved spec for the worker."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from app.db import auth as key_rows
from app.main import create_app
from tests.app.conftest import SPEC

FORMATS = Path(__file__).resolve().parents[2] / "examples" / "data" / "formats"


def _saved_folder(tmp_path: Path) -> Path:
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (FORMATS / "conversational_explicit.jsonl").read_text().splitlines()]
    folder = tmp_path / "prefs"
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(str(folder))
    return folder


def test_where_server_paths_are_allowed_a_saved_folder_and_its_splits_are_a_job(alice, tmp_path):
    dataset = {"path": str(_saved_folder(tmp_path)), "split": "train", "validation_split": "test"}
    response = alice.post("/v1/jobs", json={**SPEC, "dataset": dataset})
    assert response.status_code == 201, response.text
    resolved = response.json()["spec"]["dataset"]
    assert (resolved["path"], resolved["split"], resolved["validation_split"]) == (
        dataset["path"], "train", "test")


def test_a_locked_deployment_refuses_a_tenants_folder_but_not_an_admins(settings, queue, db, tmp_path):
    locked = create_app(settings.model_copy(update={"allow_server_paths": False}), queue=queue)
    try:
        dataset = {"path": str(_saved_folder(tmp_path)), "split": "train"}
        for is_admin, expected in ((False, 422), (True, 201)):
            key = key_rows.create_api_key(db, "acme", "key", is_admin=is_admin)
            client = TestClient(locked, headers={"Authorization": f"Bearer {key}"})
            response = client.post("/v1/jobs", json={**SPEC, "dataset": dataset})
            assert response.status_code == expected, response.text
            if expected == 422:
                assert response.json()["error"]["param"] == "dataset.path"
                assert "POST /v1/datasets" in response.json()["error"]["message"]
    finally:
        locked.state.db.dispose()


def test_a_split_of_an_upload_is_refused_at_submission(alice):
    upload = alice.post("/v1/datasets", files={"file": ("p.jsonl", (FORMATS / "standard_explicit.jsonl").read_bytes())})
    response = alice.post("/v1/jobs", json={**SPEC, "dataset": {"id": upload.json()["id"], "split": "train"}})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "dataset.split" and "drop split" in response.json()["error"]["message"]
