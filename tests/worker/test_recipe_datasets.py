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
    with pytest.raises(ValueError, match="no split 'test' .dataset.validation_split.; its splits are train_prefs"):
        split_dataset(_spec(path=str(dataset_dict), split="train_prefs", validation_split="test"), None)


def test_split_fields_the_spec_refuses():
    with pytest.raises(ValidationError, match="dataset.id is an upload"):
        _spec(id="ds_1", split="train")
    with pytest.raises(ValidationError, match="drop validation_split"):
        _spec(path="/data/folder", validation_id="ds_2", validation_split="test")


# ------------------------------------------------------------------------------------------ a whole job


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _conversational_folder(folder: Path, sentences: list[str], system: str) -> Path:
    """OpenAI preference rows with a system turn, from real sentences, saved as a DatasetDict."""
    from datasets import Dataset, DatasetDict

    from tests.conftest import make_pairs

    rows = [{
        "input": {"messages": [{"role": "system", "content": system}, {"role": "user", "content": row["prompt"]}]},
        "preferred_output": [{"role": "assistant", "content": row["chosen"]}],
        "non_preferred_output": [{"role": "assistant", "content": row["rejected"]}],
    } for row in make_pairs(sentences, 24)]
    DatasetDict({"train": Dataset.from_list(rows[:20]), "test": Dataset.from_list(rows[20:])}).save_to_disk(str(folder))
    return folder


def test_a_conversational_job_runs_and_its_prepare_key_follows_the_messages(tiny_student_folder, botchan_sentences,
                                                                          tmp_path):
    """A dpo job on a save_to_disk folder of OpenAI rows, through a student whose tokenizer has a chat template:
    it trains, the same data is served from the cache, and a changed system turn prepares afresh."""
    import shutil

    from transformers import AutoTokenizer

    from ctpd_core.vocab import Stage
    from tests.worker.test_recipe import RecordingObserver, context
    from worker.recipe import run_spec

    student = tmp_path / "student"
    shutil.copytree(tiny_student_folder, student)
    tokenizer = AutoTokenizer.from_pretrained(str(student))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(student))

    def run(name: str, system: str) -> list[tuple]:
        folder = _conversational_folder(tmp_path / f"data-{name}", botchan_sentences, system)
        spec = JobSpec.model_validate({
            "method": "dpo", "student": {"model": str(student)},
            "dataset": {"path": str(folder), "split": "train", "validation_split": "test"},
            "sequence": {"max_response_tokens": 32, "max_prompt_tokens": 48},
            "training": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3},
            "evaluation": {"max_pairs": 4},
        })
        observer = RecordingObserver()
        assert run_spec(spec, context(tmp_path, name, observer)).status == "succeeded"
        return [cached for stage, cached in observer.started if stage == Stage.PREPARE]

    assert run("first", "Be brief.") == [False]
    assert run("again", "Be brief.") == [True]  # the same conversations: the cached prepare stage
    assert run("changed", "Be thorough.") == [False]  # one changed system turn: prepared afresh
