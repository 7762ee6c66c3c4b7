"""The worker's part of a preflight (worker/preflight.py, the body of ``ctpd.preflight``), run for real: the real
task function on a migrated SQLite database, the tiny in-test tokenizers and models (tests/conftest.py), and for
the closing examples the packaged SmolLM2 / Gemma-3 pair on examples/data/sentiment-pairs.jsonl.

Each refusal test is a job that would fail on a worker (the failure named in the test) and must instead be an
error in the report, with its fix, and never a failed task."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from app.db import datasets as dataset_rows
from app.db import preflights as preflight_rows
from app.settings import Settings
from ctpd_core.spec import JobSpec, read_spec_data
from tests.conftest import catalog_cache
from worker.preflight import run_preflight

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    home = tmp_path / "home"
    return Settings(home=home, broker_url="memory://", allow_server_paths=True, model_cache=catalog_cache())


def _tiny_spec(student: Path, teacher: Path, dataset: Path, **sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "method": "ctpd", "student": {"model": str(student)}, "teacher": {"model": str(teacher)},
        "dataset": {"path": str(dataset), "validation_fraction": 0.1},
        "sequence": {"max_prompt_tokens": 32, "max_response_tokens": 32},
        "training": {"batch_size": 4, "micro_batch_size": 2},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def _preflight(db, settings: Settings, spec: dict[str, Any], tenant: str = "acme") -> dict[str, Any]:
    """A pending row as the API stores it, the task body run on it, and the stored data part."""
    resolved = JobSpec.model_validate(spec).model_dump(mode="json")
    row = preflight_rows.create_preflight(db, tenant=tenant, spec=resolved, api_report={"issues": []},
                                          submitted_by_admin=False, needs_worker=True)
    assert run_preflight(db, settings, row.id) == "done"
    stored = preflight_rows.get_preflight(db, row.id)
    assert stored is not None and stored.status == preflight_rows.DONE and stored.finished_at is not None
    return stored.report["data"]


def _errors(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry for entry in report["issues"] if entry["level"] == "error"]


def _codes(report: dict[str, Any], level: str) -> list[str]:
    return [entry["code"] for entry in report["issues"] if entry["level"] == level]


def test_a_clean_tiny_job_reports_tokenizers_alignment_and_the_steps_fit_will_take(
        db, settings, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    report = _preflight(db, settings, _tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path))
    assert _errors(report) == []
    assert report["tokenizers"]["student"]["offsets"] and report["tokenizers"]["teacher"]["offsets"]
    assert report["models"]["student"]["loadable"] and report["models"]["teacher"]["max_position_embeddings"] == 512
    # 40 rows, 10 % held out (4), the rest trains: 36 pairs, batch 4, one epoch -> 9 steps for pi+, pi- and distill.
    assert report["dataset"] == {"valid": True, "train_pairs": 36, "validation_pairs": 4}
    assert report["steps"]["distill"]["total_steps"] == 9
    assert report["steps"]["contrastive"] == {"total_steps": 9, "steps_per_epoch": 9, "batch_size": 4,
                                              "warmup_steps": 1, "runs": 2}
    assert report["steps"]["evaluate"] == {"pairs": 4, "batches": 1}
    sample = report["sample"]
    assert sample["pairs"] == 40 and sample["kept_pairs"] == 40  # the whole (small) dataset is the sample
    alignment = sample["alignment"]
    assert alignment["examples"] == 80 and 0 < alignment["share_1:1"] <= 1
    assert sum(sample["span_length_histogram"]["spans"]) == alignment["spans"]
    assert sample["spans_per_response"]["count"] == 80
    # Spans as the loss sees them: the aligned ones plus the EOS span of each response the budget did not cut.
    with_eos = 80 - sample["truncation"]["truncated_responses"]
    assert sample["spans_per_response"]["mean"] == pytest.approx((alignment["spans"] + with_eos) / 80, abs=0.01)


def test_truncation_is_measured_on_the_uncut_text_and_the_warning_names_the_budget_that_fits(
        db, settings, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, student_tokenizer):
    spec = _tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, sequence={"max_response_tokens": 4})
    report = _preflight(db, settings, spec)
    rows = [json.loads(line) for line in tiny_dataset_path.read_text().splitlines()]
    lengths = [len(student_tokenizer(row[side], add_special_tokens=False)["input_ids"])
               for row in rows for side in ("chosen", "rejected")]
    cut = [n - 4 for n in lengths if n > 4]
    truncation = report["sample"]["truncation"]
    assert truncation["truncated_responses"] == len(cut) and truncation["responses"] == 80
    assert truncation["tokens_cut_max"] == max(cut)
    assert truncation["tokens_cut_mean"] == pytest.approx(sum(cut) / len(cut), abs=0.01)
    (warning,) = [entry for entry in report["issues"] if entry["code"] == "responses_truncated"]
    p95 = sorted(lengths)[math.ceil(0.95 * (len(lengths) - 1))]
    assert warning["param"] == "sequence.max_response_tokens"
    assert f"raise sequence.max_response_tokens to {p95}" in warning["fix"]
    assert f"{100 * len(cut) / len(lengths):.0f} % of responses are truncated" in warning["message"]
    assert _errors(report) == []  # truncation is a warning: the job runs


def test_rows_that_fail_validation_are_an_error_naming_each_row_and_the_fix(
        db, settings, tmp_path, tiny_student_folder, tiny_teacher_folder):
    """A job on this file fails at prepare with invalid_dataset after its worker started."""
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text("\n".join([
        json.dumps({"prompt": "The cat", "chosen": " sat.", "rejected": " flew."}),
        json.dumps({"prompt": "Water is", "chosen": " wet."}),
        '{"prompt": "Fire is", "chosen": " hot.",',
    ]) + "\n")
    report = _preflight(db, settings, _tiny_spec(tiny_student_folder, tiny_teacher_folder, dataset))
    (error,) = _errors(report)
    assert error["code"] == "invalid_dataset" and error["param"] == "dataset"
    assert "row 2: missing field(s) rejected" in error["message"] and "row 3: invalid JSON" in error["message"]
    assert "fix or remove the rows listed" in error["fix"]
    assert report["dataset"]["valid"] is False and report["dataset"]["total_errors"] == 2


def test_a_prompt_format_the_tokenizers_cannot_render_is_an_error_with_its_fix(
        db, settings, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    """The tiny tokenizers have no chat template: the prepare stage would raise before encoding a pair."""
    spec = _tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path,
                      sequence={"prompt_format": "chat_template"})
    (error,) = _errors(_preflight(db, settings, spec))
    assert error["code"] == "encoding_refused" and "has no chat template" in error["message"]
    assert error["fix"] == "set sequence.prompt_format: raw"


def test_a_model_folder_without_safetensors_is_an_error_not_a_failed_task(
        db, settings, tmp_path, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    pickled = tmp_path / "pickled-student"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_student_folder / name).exists():
            (pickled / name).write_bytes((tiny_student_folder / name).read_bytes())
    report = _preflight(db, settings, _tiny_spec(pickled, tiny_teacher_folder, tiny_dataset_path))
    (error,) = _errors(report)
    assert error["code"] == "model_not_found" and error["param"] == "student.model"
    assert "no *.safetensors weights" in error["message"] and "a folder with config.json and *.safetensors" in error["fix"]


def test_a_tokenizer_larger_than_its_models_embedding_is_an_error(
        db, settings, tmp_path, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    """Token ids past the embedding fail the first forward pass (an index error deep in the reference stage)."""
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    for path in tiny_student_folder.iterdir():
        (mismatched / path.name).write_bytes(path.read_bytes())
    config = json.loads((mismatched / "config.json").read_text())
    config["vocab_size"] = 100
    (mismatched / "config.json").write_text(json.dumps(config))
    (error,) = _errors(_preflight(db, settings, _tiny_spec(mismatched, tiny_teacher_folder, tiny_dataset_path)))
    assert error["code"] == "tokenizer_mismatch" and "embedding has 100" in error["message"]


def test_lora_targets_the_student_lacks_are_an_error_naming_its_linear_layers(
        db, settings, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    """peft refuses them in distill, after prepare, reference and contrastive have run."""
    spec = _tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path,
                      lora={"enabled": True, "target_modules": ["q_proj", "query_key_value"]})
    (error,) = _errors(_preflight(db, settings, spec))
    assert error["code"] == "lora_targets_missing" and "['query_key_value']" in error["message"]
    assert "q_proj" in error["fix"] and "v_proj" in error["fix"]
    fine = _tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path,
                      lora={"enabled": True, "target_modules": ["q_proj", "v_proj"]})
    assert _errors(_preflight(db, settings, fine)) == []


def test_an_uploaded_dataset_gets_the_measured_token_lengths_of_each_tokenizer(
        db, settings, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    row = dataset_rows.create_dataset(db, tenant="acme", filename="pairs.jsonl", format="jsonl", num_rows=40,
                                      sha256="0" * 64, size_bytes=tiny_dataset_path.stat().st_size,
                                      path=tiny_dataset_path)
    spec = _tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path)
    spec["dataset"] = {"id": row.id, "validation_fraction": 0.1}
    report = _preflight(db, settings, spec)
    assert _errors(report) == []
    stats = dataset_rows.get_dataset(db, row.id).stats
    measured = stats["token_lengths"]
    assert set(measured) == {str(tiny_student_folder), str(tiny_teacher_folder)}
    student = measured[str(tiny_student_folder)]
    assert student["sampled_pairs"] == 40 and student["chosen"]["count"] == 40
    assert student["chosen"]["max"] == report["sample"]["truncation"]["response_tokens"]["max"] or \
        student["rejected"]["max"] == report["sample"]["truncation"]["response_tokens"]["max"]


def test_another_tenants_dataset_is_never_opened(db, settings, tiny_student_folder, tiny_teacher_folder,
                                                  tiny_dataset_path):
    row = dataset_rows.create_dataset(db, tenant="globex", filename="pairs.jsonl", format="jsonl", num_rows=40,
                                      sha256="0" * 64, size_bytes=1, path=tiny_dataset_path)
    spec = _tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path)
    spec["dataset"] = {"id": row.id}
    report = _preflight(db, settings, spec, tenant="acme")
    (error,) = _errors(report)  # the job's own resolver refuses it, as it would the job's
    assert error["code"] == "invalid_dataset" and "does not exist for tenant 'acme'" in error["message"]
    assert "sample" not in report
    assert dataset_rows.get_dataset(db, row.id).stats is None  # nothing measured on it


def test_a_duplicate_delivery_keeps_the_first_report(db, settings, tiny_student_folder, tiny_teacher_folder,
                                                    tiny_dataset_path):
    resolved = JobSpec.model_validate(_tiny_spec(tiny_student_folder, tiny_teacher_folder,
                                                 tiny_dataset_path)).model_dump(mode="json")
    row = preflight_rows.create_preflight(db, tenant="acme", spec=resolved, api_report={"issues": []},
                                          submitted_by_admin=False, needs_worker=True)
    assert run_preflight(db, settings, row.id) == "done"
    assert run_preflight(db, settings, row.id) == "skipped"
    assert run_preflight(db, settings, "pf_missing") == "skipped"


# ------------------------------------------------------------------------------------- the packaged real models


@pytest.mark.real_model
def test_the_quickstart_on_the_examples_dataset_has_no_errors(db, settings):
    spec = read_spec_data(REPO / "examples" / "service-quickstart.yaml")
    spec["dataset"]["path"] = str(REPO / "examples" / "data" / "sentiment-pairs.jsonl")
    report = _preflight(db, settings, spec)
    assert _errors(report) == [], report["issues"]
    assert report["tokenizers"]["student"]["tokens"] == 49152 and report["tokenizers"]["teacher"]["tokens"] == 262144
    assert report["sample"]["kept_pairs"] == report["sample"]["pairs"]
    assert report["sample"]["alignment"]["share_1:1"] > 0.5
    assert report["steps"]["distill"]["total_steps"] >= 1


@pytest.mark.real_model
def test_a_dataset_every_response_of_which_is_cut_to_one_token_is_refused_with_the_fix(db, settings, tmp_path):
    """Responses that the budget truncates all the way and rows that fail validation: a job would fail."""
    spec = read_spec_data(REPO / "examples" / "service-quickstart.yaml")
    rows = [json.loads(line) for line in (REPO / "examples" / "data" / "sentiment-pairs.jsonl").read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in [*rows[:20], {"prompt": "x", "chosen": "y"}]))
    spec["dataset"]["path"] = str(bad)
    report = _preflight(db, settings, spec)
    assert [entry["code"] for entry in _errors(report)] == ["invalid_dataset"]
    assert "row 21: missing field(s) rejected" in _errors(report)[0]["message"]
