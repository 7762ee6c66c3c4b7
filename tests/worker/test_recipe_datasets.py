"""The recipe's dataset loading: a Hugging Face DatasetDict folder, its training and held-out splits named in
the spec; conversational rows keep their messages for the prepare stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from ctpd_core.spec import JobSpec
from worker.recipe import split_dataset

FORMATS = Path(__file__).resolve().parents[2] / "examples" / "data" / "formats"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FORMATS / name).read_text(encoding="utf-8").splitlines()]


def _spec(**dataset) -> JobSpec:
    return JobSpec.model_validate({"method": "dpo", "student": {"model": "smollm2-135m-instruct"}, "dataset": dataset})


@pytest.fixture
def dataset_dict(tmp_path: Path) -> Path:
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "ultrafeedback-like"
    DatasetDict({
        "train_prefs": Dataset.from_list(_rows("conversational_implicit.jsonl") * 2),
        "test_prefs": Dataset.from_list(_rows("conversational_implicit.jsonl")[:1]),
    }).save_to_disk(str(folder))
    return folder


def test_train_and_held_out_splits_of_one_folder(dataset_dict: Path):
    train, validation = split_dataset(_spec(path=str(dataset_dict), split="train_prefs",
                                            validation_split="test_prefs"), None)
    assert len(train) == 6 and len(validation) == 1
    assert validation[0].messages == (("user", "What is the capital of France?"),)
    assert train[4].messages is not None and train[4].messages[0][0] == "system"


def test_a_split_is_held_out_by_fraction_without_validation_split(dataset_dict: Path):
    train, validation = split_dataset(_spec(path=str(dataset_dict), split="train_prefs", validation_fraction=0.5),
                                      None)
    assert (len(train), len(validation)) == (3, 3)


def test_an_unnamed_split_of_a_dataset_dict_is_a_clear_error(dataset_dict: Path):
    with pytest.raises(ValueError, match="splits train_prefs, test_prefs; choose one with dataset.split"):
        split_dataset(_spec(path=str(dataset_dict)), None)


def test_split_fields_the_spec_refuses():
    with pytest.raises(ValidationError, match="dataset.id is an upload"):
        _spec(id="ds_1", split="train")
    with pytest.raises(ValidationError, match="drop validation_split"):
        _spec(path="/data/folder", validation_id="ds_2", validation_split="test")
