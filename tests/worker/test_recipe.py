"""The whole pipeline through worker/recipe.py on tiny models: every method, the cache, stop and resume,
LoRA export, and (marked real_model) the packaged SmolLM2 student with the Gemma-3 teacher."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import ctpd_core.models as models_module
from ctpd_core.dskd import PROJECTOR_PREFIX
from ctpd_core.observe import NullObserver
from ctpd_core.spec import JobSpec
from worker import recipe as recipe_module
from worker.recipe import RunContext, run_spec

CPU = torch.device("cpu")


def tiny_spec(student_folder, teacher_folder, dataset_path, **overrides):
    data = {
        "method": "ctpd",
        "student": {"model": str(student_folder)},
        "teacher": {"model": str(teacher_folder)},
        "dataset": {"path": str(dataset_path), "validation_fraction": 0.2},
        "sequence": {"max_response_tokens": 32, "max_prompt_tokens": 32},
        "contrastive": {"max_steps": 3, "learning_rate": 1e-3},
        "training": {"max_steps": 4, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 2},
        "evaluation": {"max_pairs": 8},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(data)


class RecordingObserver(NullObserver):
    def __init__(self):
        self.started, self.finished, self.metric_rows, self.progress_rows = [], [], [], []

    def stage_started(self, stage, cached):
        self.started.append((stage, cached))

    def stage_finished(self, stage, seconds, cached, summary):
        self.finished.append((stage, cached, dict(summary)))

    def metrics(self, stage, step, metrics):
        self.metric_rows.append((stage, step, dict(metrics)))

    def progress(self, progress):
        self.progress_rows.append(progress)


def context(tmp_path, name, observer=None, stop_signal=None):
    return RunContext(
        artifact_root=tmp_path / "artifacts", run_dir=tmp_path / "runs" / name, model_cache=tmp_path / "catalog",
        device=CPU, observer=observer or RecordingObserver(), stop_signal=stop_signal, inference_batch_size=4,
    )


@pytest.fixture
def folders(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    return tiny_student_folder, tiny_teacher_folder, tiny_dataset_path


def test_ctpd_end_to_end_then_cached(folders, tmp_path, monkeypatch):
    student, teacher, dataset = folders
    spec = tiny_spec(student, teacher, dataset)
    observer = RecordingObserver()
    result = run_spec(spec, context(tmp_path, "first", observer))
    assert result.status == "succeeded"
    assert [stage for stage, _ in observer.started] == [
        "prepare", "reference", "contrastive", "weights", "distill", "evaluate", "export"
    ]
    for name in ("preference_accuracy", "reward_margin", "teacher_agreement", "bits_per_byte_chosen",
                 "kl_from_initial_per_token"):
        assert math.isfinite(result.metrics[name]), name
    assert result.metrics["kl_from_initial_per_token"] > 0  # the student moved
    distill_rows = [row for stage, _, row in observer.metric_rows if stage == "distill"]
    assert len(distill_rows) == 4 and all(math.isfinite(row["loss"]) for row in distill_rows)
    assert {"reward_accuracy", "reward_margin", "grad_norm", "learning_rate", "tokens_per_second"} <= set(distill_rows[0])
    assert {p.stage for p in observer.progress_rows} >= {"prepare", "reference:chosen", "reference:rejected", "distill",
                                                         "evaluate"}

    exported = result.export_dir
    run_dir = tmp_path / "runs" / "first"
    assert not (run_dir / "distill").exists()  # resume state is dropped once the export is written
    assert not list((run_dir / "contrastive").glob("*/step-*"))  # and once π± are published in the cache
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert model.config.model_type == "llama"
    assert json.loads((exported / "metrics.json").read_text())["pairs"] == result.metrics["pairs"]
    assert json.loads((exported / "ctpd_spec.json").read_text())["weights"]["source"] == "teacher_contrastive"
    assert "Held-out metrics" in (exported / "README.md").read_text()

    # A second job with the same teacher, data and settings (another student learning rate) reuses the
    # teacher stages and never loads the teacher.
    loaded = []
    real_loader = models_module.load_causal_lm

    def counting_loader(reference, **kwargs):
        loaded.append(reference)
        return real_loader(reference, **kwargs)

    monkeypatch.setattr(recipe_module, "load_causal_lm", counting_loader)
    second = RecordingObserver()
    spec2 = tiny_spec(student, teacher, dataset, training={"learning_rate": 5e-4})
    result2 = run_spec(spec2, context(tmp_path, "second", second))
    assert result2.status == "succeeded"
    assert {"prepare", "reference", "contrastive", "weights"} <= set(result2.cached_stages)
    assert str(teacher) not in loaded
    assert not any(p.stage.startswith(("reference", "contrastive", "weights")) for p in second.progress_rows)

    # The "Average weight" ablation reads the same stored weights (averaging them per response) and differs
    # from the run it shares them with only in the distillation.
    third = RecordingObserver()
    averaged = run_spec(
        tiny_spec(student, teacher, dataset, weights={"average": True}), context(tmp_path, "average", third)
    )
    assert averaged.status == "succeeded" and "weights" in averaged.cached_stages
    weights_summary = next(summary for stage, _, summary in third.finished if stage == "weights")
    first_summary = next(summary for stage, _, summary in observer.finished if stage == "weights")
    assert weights_summary["average"] is True
    assert weights_summary["max_weight"] < first_summary["max_weight"]
    assert averaged.metrics["kl_from_initial_per_token"] != result.metrics["kl_from_initial_per_token"]


@pytest.mark.parametrize(
    "method, source",
    [("dpo", None), ("tisdpo", "student_contrastive"), ("tisdpo", "random"), ("ctpd", "uniform"), ("ctpd", "random")],
)
def test_baselines_and_ablations_run(folders, tmp_path, method, source):
    student, teacher, dataset = folders
    overrides = {"method": method, "training": {"max_steps": 2}}
    if source:
        overrides["weights"] = {"source": source}
    if method != "ctpd":
        overrides["teacher"] = None
    spec = tiny_spec(student, teacher, dataset, **overrides)
    result = run_spec(spec, context(tmp_path, f"{method}-{source}"))
    assert result.status == "succeeded"
    assert math.isfinite(result.metrics["preference_accuracy"])
    assert ("teacher_agreement" in result.metrics) == (method == "ctpd")


@pytest.mark.parametrize("method", ["sft", "uld", "dskd"])
def test_the_chosen_response_baselines_run_through_the_job_machinery(folders, tmp_path, method):
    student, teacher, dataset = folders
    observer = RecordingObserver()
    spec = tiny_spec(student, teacher, dataset, method=method, training={"max_steps": 2},
                     teacher=None if method == "sft" else {"model": str(teacher)})
    result = run_spec(spec, context(tmp_path, method, observer))
    assert result.status == "succeeded"
    stages = [stage for stage, _, _ in observer.finished]
    assert stages == ["prepare", "reference", "distill", "evaluate", "export"]  # no π±, no span weights
    distill_rows = [row for stage, _, row in observer.metric_rows if stage == "distill"]
    assert len(distill_rows) == 2 and all(math.isfinite(row["nll"]) for row in distill_rows)
    if method == "uld":
        assert all(row["uld"] > 0 for row in distill_rows)
    assert result.metrics["kl_from_initial_per_token"] > 0  # the student moved
    card = (result.export_dir / "README.md").read_text()
    assert f"**{method}**" in card
    projector_file = result.export_dir / "dskd_projector.safetensors"
    assert projector_file.is_file() == (method == "dskd")
    if method == "dskd":
        from ctpd_core.dskd import load_projector

        projector = load_projector(result.export_dir)
        assert sum(parameter.numel() for parameter in projector.parameters()) > 0


def test_a_dskd_job_resumes_its_projector_from_the_checkpoint(folders, tmp_path):
    # The projector trains with the student: a resume that restored only the student would train a fresh projector
    # from step 3 on, and the losses after the resume would differ from an uninterrupted run's.
    student, teacher, dataset = folders
    spec = tiny_spec(student, teacher, dataset, method="dskd", training={"max_steps": 5, "checkpoint_every": 1})
    straight = RecordingObserver()
    assert run_spec(spec, context(tmp_path, "straight", straight)).status == "succeeded"
    interrupted = RecordingObserver()
    assert run_spec(spec, context(tmp_path, "resumed", interrupted, StopAfter(interrupted, 3))).status == "stopped"
    # The projector trains at its own rate (kd.projector_learning_rate), which the checkpoint's config records.
    states = [json.loads(path.read_text()) for path in (tmp_path / "runs" / "resumed").rglob("step-*/state.json")]
    rates = [state["config"]["group_learning_rates"] for state in states if state["stage"] == "distill"]
    assert rates and all(rate == [[PROJECTOR_PREFIX, spec.kd.projector_learning_rate]] for rate in rates)
    resumed = RecordingObserver()
    assert run_spec(spec, context(tmp_path, "resumed", resumed)).status == "succeeded"

    def losses(observer):
        return [row["loss"] for stage, _, row in observer.metric_rows if stage == "distill"]

    assert losses(interrupted)[:3] + losses(resumed) == pytest.approx(losses(straight), abs=1e-6)


class StopAfter:
    def __init__(self, observer, steps):
        self.observer, self.steps = observer, steps

    def should_stop(self):
        return sum(stage == "distill" for stage, _, _ in self.observer.metric_rows) >= self.steps


def test_stop_then_resume_matches_an_uninterrupted_run(folders, tmp_path):
    student, teacher, dataset = folders
    spec = tiny_spec(student, teacher, dataset, weights={"source": "uniform"}, training={"max_steps": 6})
    straight = RecordingObserver()
    assert run_spec(spec, context(tmp_path, "straight", straight)).status == "succeeded"

    interrupted = RecordingObserver()
    stopped = run_spec(spec, context(tmp_path, "resumed", interrupted, StopAfter(interrupted, 3)))
    assert stopped.status == "stopped"
    resumed = RecordingObserver()
    result = run_spec(spec, context(tmp_path, "resumed", resumed))
    assert result.status == "succeeded"
    distill_summary = next(summary for stage, _, summary in resumed.finished if stage == "distill")
    assert distill_summary["resumed_from"] == 3

    def losses(observer):
        return [row["loss"] for stage, _, row in observer.metric_rows if stage == "distill"]

    assert losses(interrupted)[:3] + losses(resumed) == pytest.approx(losses(straight), abs=1e-6)


def test_lora_exports_merged_weights_and_adapter(folders, tmp_path):
    student, teacher, dataset = folders
    spec = tiny_spec(
        student, teacher, dataset, weights={"source": "uniform"}, training={"max_steps": 2},
        lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    result = run_spec(spec, context(tmp_path, "lora"))
    assert (result.export_dir / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(result.export_dir))
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_evaluation_uses_the_spec_batch_size(folders, tmp_path, monkeypatch):
    """Issue 10's bug: evaluation.batch_size was silently capped at the context's inference batch (8)."""
    student, teacher, dataset = folders
    seen = []
    real = recipe_module.evaluate_student

    def recording(*args, **kwargs):
        seen.append(kwargs["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe_module, "evaluate_student", recording)
    spec = tiny_spec(student, teacher, dataset, weights={"source": "uniform"}, training={"max_steps": 1},
                     evaluation={"batch_size": 16})
    assert run_spec(spec, context(tmp_path, "eval-batch")).status == "succeeded"  # inference batch 4
    assert seen == [16]


def test_a_finished_run_folder_holds_only_the_export(folders, tmp_path):
    """The resume state goes once the export is published, and nothing write-only is left beside it (issue 10:
    a result.json that nothing read): only the export and the kept checkpoints' weights, which the API lists and
    makes into models (issue 11; tests/worker/test_checkpoint_model.py)."""
    student, teacher, dataset = folders
    spec = tiny_spec(student, teacher, dataset, weights={"source": "uniform"}, training={"max_steps": 1})
    run_context = context(tmp_path, "tidy")
    assert run_spec(spec, run_context).status == "succeeded"
    assert sorted(path.name for path in run_context.run_dir.iterdir()) == ["checkpoints", "export"]
    (kept,) = (run_context.run_dir / "checkpoints").iterdir()
    assert sorted(path.name for path in kept.iterdir()) == ["metrics.json", "state.json", "trainable.safetensors"]


def test_bad_dataset_is_a_clear_error(folders, tmp_path):
    student, teacher, _ = folders
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\nnot json\n')
    spec = tiny_spec(student, teacher, bad)
    with pytest.raises(ValueError, match=r"row 1: missing field\(s\) rejected"):
        run_spec(spec, context(tmp_path, "bad"))


@pytest.mark.real_model
def test_real_models_minimal_spec(tmp_path, botchan_sentences):
    """The issue's minimal spec on the packaged models: SmolLM2-135M-Instruct learns from Gemma-3-270M,
    on a few dozen pairs of the examples dataset, a few steps per stage."""
    from pathlib import Path

    from tests.conftest import REPO, catalog_cache

    dataset = REPO / "examples" / "data" / "sentiment-pairs.jsonl"
    if not dataset.exists():
        dataset = tmp_path / "pairs.jsonl"
        from tests.conftest import make_pairs

        dataset.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(botchan_sentences, 24)))
    spec = JobSpec.model_validate(
        {
            "method": "ctpd",
            "teacher": {"model": "gemma-3-270m"},
            "student": {"model": "smollm2-135m-instruct"},
            "dataset": {"path": str(dataset), "max_pairs": 16, "validation_fraction": 0.1},
            "sequence": {"max_response_tokens": 24, "max_prompt_tokens": 24},
            "contrastive": {"max_steps": 1},
            "training": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4},
            "evaluation": {"max_pairs": 4},
        }
    )
    ctx = RunContext(
        artifact_root=tmp_path / "artifacts", run_dir=tmp_path / "run", model_cache=Path(catalog_cache()), device=CPU,
        inference_batch_size=4,
    )
    result = run_spec(spec, ctx)
    assert result.status == "succeeded"
    assert all(math.isfinite(v) for v in result.metrics.values())
    metrics = json.loads((result.export_dir / "metrics.json").read_text())
    assert metrics == pytest.approx(result.metrics)
    model = AutoModelForCausalLM.from_pretrained(str(result.export_dir))
    assert model.config.vocab_size == 49152
