"""The local CLI: `ctpd run` on a tiny spec, `ctpd models list`, clear errors."""

from __future__ import annotations

import json

from ctpd_cli.main import main


def test_run_prints_stages_and_the_evaluation_table(tmp_path, capsys, monkeypatch, tiny_student_folder,
                                                    tiny_teacher_folder, tiny_dataset_path):
    monkeypatch.setenv("CTPD_HOME", str(tmp_path / "home"))
    spec = {
        "method": "ctpd",
        "teacher": {"model": str(tiny_teacher_folder)},
        "student": {"model": str(tiny_student_folder)},
        "dataset": {"path": str(tiny_dataset_path)},
        "weights": {"source": "uniform"},
        "training": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2},
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    assert main(["run", str(spec_path), "--artifacts", str(tmp_path / "art"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for stage in ("prepare", "reference", "weights", "distill", "evaluate", "export"):
        assert f"[{stage}] done in" in out
    assert "preference_accuracy" in out and "status: succeeded" in out
    # Second run: the teacher stages are cached, and distill finds its finished checkpoint.
    assert main(["run", str(spec_path), "--artifacts", str(tmp_path / "art"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "[prepare] cached" in out and "[reference] cached" in out


def test_run_with_a_bad_spec_is_a_clear_error(tmp_path, capsys):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("student: {model: x}\ndataset: {path: d.jsonl}\ntraining: {batch_size: 3, micro_batch_size: 2}\n")
    assert main(["run", str(spec_path)]) == 2
    err = capsys.readouterr().err
    assert "must be a multiple of training.micro_batch_size" in err


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma-3-270m" in out
