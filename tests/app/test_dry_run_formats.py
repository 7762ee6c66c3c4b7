"""The whole dry run through the API (its checks, then the real worker task answering at once) on the dataset
shapes people have: a conversational file and a Hugging Face save_to_disk folder with named splits are ``ok``
(the API's reference checks accept a folder as ``dataset.path``, the worker reads its splits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.main import create_app
from tests.app.conftest import RecordingQueue, _client_for
from tests.conftest import catalog_cache

FORMATS = Path(__file__).resolve().parents[2] / "examples" / "data" / "formats"


def _folder(tmp_path: Path) -> Path:
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (FORMATS / "conversational_explicit.jsonl").read_text().splitlines()]
    folder = tmp_path / "conversational-folder"
    DatasetDict({"train": Dataset.from_list(rows * 2), "test": Dataset.from_list(rows[:1])}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("source", ["conversational_implicit.jsonl", "save_to_disk"])
def test_a_dry_run_on_each_shape_is_ok_end_to_end(source, settings, db, tiny_student_folder, tiny_teacher_folder,
                                                   tmp_path):
    from worker.preflight import run_preflight

    worker_settings = settings.model_copy(update={"model_cache": catalog_cache()})

    class AnsweringQueue(RecordingQueue):
        def enqueue_preflight(self, preflight_id: str) -> None:
            super().enqueue_preflight(preflight_id)
            run_preflight(db, worker_settings, preflight_id)

    dataset = ({"path": str(_folder(tmp_path)), "split": "train", "validation_split": "test"}
               if source == "save_to_disk" else {"path": str(FORMATS / source), "validation_fraction": 0.3})
    spec = {"method": "ctpd", "student": {"model": str(tiny_student_folder)},
            "teacher": {"model": str(tiny_teacher_folder)}, "dataset": dataset,
            "sequence": {"max_prompt_tokens": 64, "max_response_tokens": 32},
            "training": {"batch_size": 2, "micro_batch_size": 1}}
    app = create_app(settings.model_copy(update={"preflight_wait_seconds": 30}), queue=AnsweringQueue())
    try:
        response = _client_for(app, db, "acme").post("/v1/jobs?dry_run=true", json=spec)
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["ok"] is True, report["errors"]
        assert report["dataset"]["conversations"]["untried_rows"] == 0
        assert report["dataset"]["train_pairs"] == (6 if source == "save_to_disk" else 2)
    finally:
        app.state.db.dispose()
