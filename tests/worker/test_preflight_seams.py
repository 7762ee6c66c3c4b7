"""Where the preflight meets the datasets and the prepare stage: a clean preflight must mean the job runs, and the
preflight counts a conversational prompt as prepare feeds it (each model's chat template), on both sides.

Real parts throughout: the real ``ctpd.preflight`` task body on a migrated SQLite database, then the real job
(``worker.recipe.run_spec``) on the tiny in-test models, whose tokenizers are given chat templates here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from ctpd_core.data import load_pairs
from ctpd_core.encoding import PairEncoder
from ctpd_core.spec import JobSpec
from tests.conftest import catalog_cache
from tests.worker.test_preflight_task import _errors, _preflight
from tests.worker.test_recipe import RecordingObserver, context
from worker.preflight import data_report
from worker.recipe import encoding_config, run_spec

FORMATS = Path(__file__).resolve().parents[2] / "examples" / "data" / "formats"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BRACKETS = CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]")
# Gemma's way of refusing a conversation it cannot render.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", broker_url="memory://", allow_server_paths=True,
                    model_cache=catalog_cache())


def _templated(source: Path, folder: Path, template: str) -> Path:
    """A copy of a tiny model folder whose tokenizer carries ``template`` as its chat template."""
    from transformers import AutoTokenizer

    shutil.copytree(source, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture
def chat_student(tiny_student_folder: Path, tmp_path: Path) -> Path:
    return _templated(tiny_student_folder, tmp_path / "chat-student", CHAT_TEMPLATE)


@pytest.fixture
def chat_teacher(tiny_teacher_folder: Path, tmp_path: Path) -> Path:
    return _templated(tiny_teacher_folder, tmp_path / "chat-teacher", BRACKETS)


def _spec(student: Path, teacher: Path, dataset: dict[str, Any], **sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "method": "ctpd", "student": {"model": str(student)}, "teacher": {"model": str(teacher)},
        "dataset": {"validation_fraction": 0.3, **dataset},
        "sequence": {"max_prompt_tokens": 64, "max_response_tokens": 32},
        "contrastive": {"max_steps": 1, "learning_rate": 1e-3},
        "training": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 1, "learning_rate": 1e-3},
        "evaluation": {"max_pairs": 2},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def _saved_dataset_dict(folder: Path) -> Path:
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (FORMATS / "conversational_implicit.jsonl").read_text().splitlines()]
    DatasetDict({"train_prefs": Dataset.from_list(rows * 2), "test_prefs": Dataset.from_list(rows[:1])}) \
        .save_to_disk(str(folder))
    return folder


DATASETS = [*sorted(path.name for path in FORMATS.glob("*.jsonl")), "save_to_disk"]


@pytest.mark.parametrize("method", ["ctpd", "dpo"])
@pytest.mark.parametrize("source", DATASETS)
def test_a_clean_preflight_means_the_job_succeeds(source, method, db, settings, chat_student, chat_teacher,
                                                  tiny_student_folder, tmp_path):
    """Every shipped format (and a save_to_disk folder with named splits): ctpd through two chat templates (text
    prompts too: prompt_format chat_template), and dpo on a student without one (raw text, the plain rendering). The preflight reports no error, then the real job on the
    same spec runs every stage to the end."""
    if source == "save_to_disk":
        dataset = {"path": str(_saved_dataset_dict(tmp_path / "folder")), "split": "train_prefs",
                   "validation_split": "test_prefs"}
    else:
        dataset = {"path": str(FORMATS / source)}
    spec = _spec(chat_student, chat_teacher, dataset, sequence={"prompt_format": "chat_template"}) \
        if method == "ctpd" else \
        {**_spec(tiny_student_folder, tiny_student_folder, dataset), "method": "dpo", "teacher": None}
    report = _preflight(db, settings, spec)
    assert _errors(report) == [], report["issues"]
    assert report["sample"]["kept_pairs"] == report["sample"]["pairs"]
    result = run_spec(JobSpec.model_validate(spec), context(tmp_path, source, RecordingObserver()))
    assert result.status == "succeeded"


def test_conversational_prompts_are_counted_as_each_template_renders_them(settings, chat_student, chat_teacher):
    """The plain rendering ("System: ...\\n\\nUser: ...") is not what either model reads: the counts are those of
    the prompt ids prepare builds, per side, and the truncation decision is the counting side's."""
    from transformers import AutoTokenizer

    path = FORMATS / "conversational_explicit.jsonl"
    spec = _spec(chat_student, chat_teacher, {"path": str(path), "validation_fraction": 0.0},
                 sequence={"max_prompt_tokens": 40})
    report, lengths = data_report(JobSpec.model_validate(spec), model_cache=settings.model_cache,
                                  dataset_resolver=None, sample_pairs=settings.preflight_sample_pairs)
    student, teacher = (AutoTokenizer.from_pretrained(str(folder)) for folder in (chat_student, chat_teacher))
    encoder = PairEncoder(student, teacher, encoding_config(JobSpec.model_validate(spec)))
    pairs = load_pairs(path)
    assert all(pair.messages is not None for pair in pairs)
    fed = {role: [len(encoder.prompt_ids(pair.prompt, role, pair.messages)) for pair in pairs]
           for role in ("student", "teacher")}
    plain = [len(student(pair.prompt, add_special_tokens=False)["input_ids"]) for pair in pairs]
    assert fed["student"] != plain  # the test would catch counting the plain rendering
    truncation = report["sample"]["truncation"]
    assert truncation["prompt_tokens"]["max"] == max(fed["student"])
    assert truncation["truncated_prompts"] == sum(n > 40 for n in fed["student"]) == 2
    (warning,) = [entry for entry in report["issues"] if entry["code"] == "prompts_truncated"]
    assert "loses its oldest exchanges first" in warning["message"] and "to 81" in warning["fix"]
    assert lengths[str(chat_student)]["prompt"]["max"] == max(fed["student"])
    assert lengths[str(chat_teacher)]["prompt"]["max"] == max(fed["teacher"])


def test_a_conversation_a_template_refuses_is_an_error_naming_the_row(db, settings, chat_student, tiny_teacher_folder,
                                                                     tmp_path):
    """The teacher's template refuses a system turn: prepare would raise on that row and fail the job, so the
    preflight names the rows and the fix, even when the row is outside the sample."""
    strict = _templated(tiny_teacher_folder, tmp_path / "strict-teacher", NO_SYSTEM_TEMPLATE)
    spec = _spec(chat_student, strict, {"path": str(FORMATS / "conversational_explicit.jsonl")})
    (error,) = _errors(_preflight(db, settings, spec))
    assert error["code"] == "conversation_refused" and error["param"] == "dataset"
    assert "System role not supported" in error["message"] and error["message"].startswith("2 of 3 pairs")
    assert "'Give me a word that rhymes with cat.'" in error["message"]
    assert "system" in error["fix"]
    with pytest.raises(ValueError, match="System role not supported"):  # what the job would do without it
        run_spec(JobSpec.model_validate(spec), context(tmp_path, "refused"))

    settings.preflight_sample_pairs = 1  # the refused rows are not in the sample: still found
    (error,) = _errors(_preflight(db, settings, spec))
    assert error["code"] == "conversation_refused"


def test_a_system_turn_longer_than_the_prompt_budget_is_an_error(db, settings, chat_student, chat_teacher, tmp_path):
    """truncate_messages keeps the system turn and raises when it leaves no room for the user turn."""
    spec = _spec(chat_student, chat_teacher, {"path": str(FORMATS / "conversational_explicit.jsonl")},
                 sequence={"max_prompt_tokens": 4})
    errors = _errors(_preflight(db, settings, spec))
    assert [error["code"] for error in errors] == ["conversation_refused"]
    assert errors[0]["param"] == "sequence.max_prompt_tokens" and "raise sequence.max_prompt_tokens" in errors[0]["fix"]
    with pytest.raises(ValueError, match="leaves no room for the last user turn"):
        run_spec(JobSpec.model_validate(spec), context(tmp_path, "no-room"))


def test_past_the_shapes_it_renders_the_preflight_says_what_it_left_unchecked(db, settings, chat_student, chat_teacher,
                                                                            monkeypatch):
    """Three conversations of three distinct turn patterns; with room to try one, two are left untried, and the
    report says so instead of passing them as checked."""
    import worker.preflight

    spec = _spec(chat_student, chat_teacher, {"path": str(FORMATS / "conversational_explicit.jsonl")})
    assert _preflight(db, settings, spec)["dataset"]["conversations"] == {"rows": 3, "shapes_tried": 3,
                                                                          "untried_rows": 0}
    monkeypatch.setattr(worker.preflight, "MAX_CONVERSATION_SHAPES", 1)
    report = _preflight(db, settings, spec)
    assert report["dataset"]["conversations"] == {"rows": 3, "shapes_tried": 1, "untried_rows": 2}
    (warning,) = [entry for entry in report["issues"] if entry["code"] == "conversations_unchecked"]
    assert warning["level"] == "warning" and warning["message"].startswith("2 of 3 conversations were not rendered")
