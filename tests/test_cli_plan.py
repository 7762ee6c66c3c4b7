"""`ctpd plan SPEC`: the memory plan printed, exit status 1 when a stage does not fit."""

from __future__ import annotations

import json

from ctpd_cli.main import main


def _write_spec(tmp_path, student: str) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"method": "dpo", "student": {"model": student}, "dataset": {"path": "pairs.jsonl"}}))
    return str(path)


def test_plan_refuses_an_8b_full_fine_tune_on_one_80gb_gpu_and_names_the_fixes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CTPD_GPU_MEMORY_GB", raising=False)
    spec = _write_spec(tmp_path, "meta-llama/Llama-3.1-8B")
    assert main(["plan", spec]) == 1
    out = capsys.readouterr().out
    assert "CTPD_GPU_MEMORY_GB=80" in out and "distill" in out and "does NOT fit" in out
    assert "AdamW states (2 x fp32)" in out and "fix: training.devices 2 with training.strategy fsdp" in out
    assert main(["plan", spec, "--set", "training.devices=2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    distill = next(stage for stage in plan["stages"] if stage["stage"] == "distill")
    assert plan["fits"] and distill["strategy"] == "fsdp" and distill["world_size"] == 2


def test_plan_on_cpu_or_with_a_catalog_model_fits(tmp_path, capsys):
    assert main(["plan", _write_spec(tmp_path, "meta-llama/Llama-3.1-70B"), "--gpu-memory-gb", "0"]) == 0
    assert "none to check against" in capsys.readouterr().out
    assert main(["plan", _write_spec(tmp_path, "smollm2-135m-instruct"), "--gpu-memory-gb", "24"]) == 0
    assert "catalog model smollm2-135m-instruct" in capsys.readouterr().out
