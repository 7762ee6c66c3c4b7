"""fit(): a tiny Llama on random tokens; schedule by hand; accumulation, clipping, exact resume, checkpoints, LoRA."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import LlamaConfig, LlamaForCausalLM

from ctpd_core.checkpoint import checkpoint_steps
from ctpd_core.observe import NullObserver, Progress, Stopped
from ctpd_core.train import FitConfig, FitResult, build_scheduler, lr_multiplier, parameter_groups, plan_steps
from ctpd_core.train import fit as train_fit

VOCAB, SEQ = 64, 8
CHECKPOINT_FILES = {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json", "metrics.json"}


def build_model(attention_dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)  # same init every call: a "freshly built model" for resume
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=attention_dropout,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def make_items(count: int, seed: int = 1) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (count, SEQ), generator=generator)  # [N, T]
    return [{"index": index, "input_ids": row} for index, row in enumerate(tokens)]


def nll_loss(
    model: torch.nn.Module, items: Sequence[Mapping[str, Any]]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean next-token NLL of the items; every item has SEQ − 1 predicted tokens."""
    device = next(model.parameters()).device
    input_ids = torch.stack([item["input_ids"] for item in items]).to(device)  # [B, T]
    loss = model(input_ids=input_ids, labels=input_ids).loss
    return loss, {"tokens": input_ids.shape[0] * (SEQ - 1), "nll": loss.detach()}


def noisy_nll_loss(
    model: torch.nn.Module, items: Sequence[Mapping[str, Any]]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """NLL with labels masked by the global torch RNG and a numpy-drawn scale: the trajectory depends on the
    RNG states, so an exact resume must restore them."""
    device = next(model.parameters()).device
    input_ids = torch.stack([item["input_ids"] for item in items]).to(device)  # [B, T]
    labels = input_ids.clone()
    labels[:, 1:][torch.rand(labels[:, 1:].shape) < 0.3] = -100
    loss = model(input_ids=input_ids, labels=labels).loss * (1.0 + 0.1 * float(np.random.rand()))
    return loss, {"tokens": int((labels[:, 1:] != -100).sum())}


def fit(*args: Any, stage: str = "distill", **kwargs: Any) -> FitResult:
    """fit() under a stage name, which every call needs and few of these tests care about."""
    return train_fit(*args, stage=stage, **kwargs)


class RecordingSink(NullObserver):
    """An observer that keeps every step's metrics, checkpoint, progress report and replayed history."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, float]] = {}  # step -> metrics
        self.checkpoints: list[tuple[int, Path]] = []
        self.reports: list[Progress] = []
        self.replayed: list[list[tuple[int, dict[str, float]]]] = []

    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        self.seen[step] = dict(metrics)

    def checkpoint(self, stage: str, step: int, path: Path) -> None:
        self.checkpoints.append((step, path))

    def progress(self, progress: Progress) -> None:
        self.reports.append(progress)

    def replay_metrics(self, stage: str, history: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        self.replayed.append([(step, dict(metrics)) for step, metrics in history])

    def series(self, name: str) -> list[float]:
        return [self.seen[step][name] for step in sorted(self.seen)]


class StopAfter:
    """Says stop once the sink has seen ``steps`` steps, however often it is polled."""

    def __init__(self, sink: RecordingSink, steps: int) -> None:
        self.sink, self.steps, self.polls = sink, steps, 0

    def should_stop(self) -> bool:
        self.polls += 1
        return len(self.sink.seen) >= self.steps


def config(**overrides: Any) -> FitConfig:
    values: dict[str, Any] = {
        "learning_rate": 1e-3,
        "lr_schedule": "constant",
        "warmup_ratio": 0.0,
        "batch_size": 4,
        "micro_batch_size": 2,
        "precision": "fp32",
    }
    return FitConfig(**(values | overrides))


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


class GradientsAtStep:
    """Captures the gradients the optimizer sees (after accumulation and clipping) with torch's global hook."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []

    def __enter__(self) -> GradientsAtStep:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            grads = [p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]]
            self.steps.append(grads)

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------------------ learning


def test_loss_goes_down_on_a_fixed_batch(tmp_path: Path) -> None:
    sink = RecordingSink()
    result = fit(
        build_model(),
        make_items(4),
        nll_loss,
        config(learning_rate=1e-2, max_steps=20),
        tmp_path,
        observer=sink,
    )
    losses = sink.series("loss")
    assert result.steps == result.total_steps == 20 and result.resumed_from is None
    assert len(losses) == 20
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)  # a random init predicts ~uniformly
    assert losses[-1] < losses[0] - 1.0
    assert sum(losses[-5:]) < sum(losses[:5])


def test_step_metrics(tmp_path: Path) -> None:
    sink = RecordingSink()
    fit(
        build_model(),
        make_items(8),
        nll_loss,
        config(max_steps=2, batch_size=8, micro_batch_size=2),
        tmp_path,
        observer=sink,
    )
    metrics = sink.seen[1]
    expected = {
        "loss",
        "nll",
        "tokens",
        "grad_norm",
        "learning_rate",
        "epoch",
        "step_seconds",
        "tokens_per_second",
    }
    assert set(metrics) == expected
    assert all(isinstance(value, float) for value in metrics.values())
    assert metrics["tokens"] == 8 * (SEQ - 1)  # a count: summed over the 4 micro-batches, not averaged
    assert metrics["nll"] == pytest.approx(metrics["loss"], rel=1e-6)  # the micro-batch mean of the stat
    assert metrics["learning_rate"] == pytest.approx(1e-3)
    assert metrics["epoch"] == 1.0 and sink.seen[2]["epoch"] == 2.0
    assert metrics["tokens_per_second"] == pytest.approx(metrics["tokens"] / metrics["step_seconds"])
    assert metrics["grad_norm"] > 0


def test_plan_steps() -> None:
    plan = plan_steps(config(epochs=1.5), 10)  # 10 items, batch 4: 2 steps per epoch, 2 items dropped
    assert (plan.batch_size, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (4, 2, 3, 0)
    assert plan_steps(config(epochs=3.0, max_steps=7), 10).total_steps == 7  # max_steps wins
    assert plan_steps(config(max_steps=20, warmup_ratio=0.1), 10).warmup_steps == 2
    tiny = plan_steps(config(epochs=2.0, batch_size=16), 3)  # smaller than one batch: used whole
    assert (tiny.batch_size, tiny.steps_per_epoch, tiny.total_steps) == (3, 1, 2)


def test_each_epoch_is_a_seeded_permutation_with_drop_last(tmp_path: Path) -> None:
    seen: list[int] = []

    def recording_loss(
        model: torch.nn.Module, items: Sequence[Mapping[str, Any]]
    ) -> tuple[torch.Tensor, dict]:
        seen.extend(item["index"] for item in items)
        return nll_loss(model, items)

    fit(build_model(), make_items(10), recording_loss, config(epochs=2.0, seed=3), tmp_path)
    expected = []
    for epoch in range(2):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        expected += order[:8]  # 2 batches of 4; the incomplete third batch is dropped
    assert seen == expected


# ------------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # warmup 2 of 10 steps: 1/3, 2/3, then the peak at step 2; the decay spans steps 2..10 (progress (s−2)/8)
        ("cosine", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 9: 0.5 * (1 + math.cos(math.pi * 7 / 8)), 10: 0.0}),
        ("linear", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 0.75, 6: 0.5, 9: 0.125, 10: 0.0}),
        ("constant", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 6: 1.0, 10: 1.0}),
    ],
)  # fmt: skip
def test_lr_multiplier_by_hand(schedule: str, expected: dict[int, float]) -> None:
    for step, value in expected.items():
        got = lr_multiplier(step, schedule=schedule, warmup_steps=2, total_steps=10)
        assert got == pytest.approx(value, abs=1e-12), f"step {step}"


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_never_rises_after_the_end(schedule: str) -> None:
    # The authors' π⁻ run went 50% past total_steps and the HF cosine climbed back up (method §9.7).
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, schedule=schedule, warmup_steps=3, total_steps=20)
    rates = []
    for _ in range(60):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[3] == pytest.approx(0.1)  # the peak, right after warmup
    assert all(later <= earlier for earlier, later in zip(rates[3:], rates[4:], strict=False))
    assert rates[20:] == [0.0] * 40


def test_fit_follows_the_schedule_with_warmup(tmp_path: Path) -> None:
    sink = RecordingSink()
    run = config(learning_rate=1e-3, lr_schedule="cosine", warmup_ratio=0.2, max_steps=10)  # warmup 2
    fit(build_model(), make_items(4), nll_loss, run, tmp_path, observer=sink)
    expected = [
        1e-3 * lr_multiplier(step, schedule="cosine", warmup_steps=2, total_steps=10) for step in range(10)
    ]
    torch.testing.assert_close(sink.series("learning_rate"), expected, rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------------ gradients


def test_gradient_accumulation_matches_the_full_batch(tmp_path: Path) -> None:
    items = make_items(4)
    reference = build_model()  # the gradient of the 4-item batch mean, computed directly
    nll_loss(reference, items)[0].backward()
    reference_grads = [p.grad for p in reference.parameters()]

    final_parameters, norms = {}, {}
    for micro in (1, 2, 4):
        model, sink = build_model(), RecordingSink()
        with GradientsAtStep() as captured:
            run = config(max_steps=2, micro_batch_size=micro, max_grad_norm=math.inf)
            fit(model, items, nll_loss, run, tmp_path / f"micro{micro}", observer=sink)
        torch.testing.assert_close(captured.steps[0], reference_grads, rtol=1e-4, atol=1e-6)
        final_parameters[micro], norms[micro] = parameters(model), sink.series("grad_norm")
    for micro in (1, 2):
        torch.testing.assert_close(final_parameters[micro], final_parameters[4], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(norms[micro], norms[4], rtol=1e-4, atol=0)


def test_grad_clipping_caps_the_norm(tmp_path: Path) -> None:
    sink = RecordingSink()
    with GradientsAtStep() as captured:
        fit(
            build_model(),
            make_items(4),
            nll_loss,
            config(max_steps=3, max_grad_norm=0.05),
            tmp_path,
            observer=sink,
        )
    for grads, reported in zip(captured.steps, sink.series("grad_norm"), strict=True):
        applied = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        assert reported > 0.05  # the metric is the norm before clipping
        assert applied == pytest.approx(0.05, rel=1e-4)


# ------------------------------------------------------------------------------------------------ resume


def test_exact_resume_after_a_stop(tmp_path: Path) -> None:
    # 14 items, batch 4: 3 steps per epoch, so steps 1..10 cross three epoch boundaries; stopping after
    # step 4 resumes mid-epoch. The cosine with warmup makes the learning rate differ at every step.
    items = make_items(14)
    run = config(lr_schedule="cosine", warmup_ratio=0.2, max_steps=10, checkpoint_every=3)

    straight_sink = RecordingSink()
    straight_model = build_model()
    straight = fit(
        straight_model, items, noisy_nll_loss, run, tmp_path / "straight", observer=straight_sink
    )
    assert straight.steps == 10

    first_sink = RecordingSink()
    with pytest.raises(Stopped) as first:
        fit(
            build_model(), items, noisy_nll_loss, run, tmp_path / "resumed",
            observer=first_sink, stop=StopAfter(first_sink, 4),
        )  # fmt: skip
    assert first.value.step == 4 and first.value.checkpoint == tmp_path / "resumed" / "step-00000004"
    assert [step for step, _ in checkpoint_steps(tmp_path / "resumed")] == [3, 4]

    torch.manual_seed(1234)  # disturb every RNG: the resume must restore them, not rely on them
    np.random.seed(1234)
    resumed_model, second_sink = build_model(), RecordingSink()
    second = fit(resumed_model, items, noisy_nll_loss, run, tmp_path / "resumed", observer=second_sink)
    assert second.resumed_from == 4 and second.steps == 10
    assert sorted(second_sink.seen) == list(range(5, 11))

    for name in ("loss", "grad_norm", "learning_rate", "tokens"):
        resumed_series = first_sink.series(name) + second_sink.series(name)
        torch.testing.assert_close(resumed_series, straight_sink.series(name), rtol=0, atol=0)  # exact
    torch.testing.assert_close(parameters(resumed_model), parameters(straight_model), rtol=0, atol=0)
    assert second.last_metrics["loss"] == straight.last_metrics["loss"]


def test_a_finished_run_returns_at_once_with_the_trained_weights(tmp_path: Path) -> None:
    trained = build_model()
    done = fit(trained, make_items(4), nll_loss, config(max_steps=3), tmp_path)
    again_model, sink = build_model(), RecordingSink()
    again = fit(again_model, make_items(4), nll_loss, config(max_steps=3), tmp_path, observer=sink)
    assert again.resumed_from == 3 and again.steps == 3 and sink.seen == {}
    assert again.last_metrics == done.last_metrics and again.checkpoint == done.checkpoint
    torch.testing.assert_close(parameters(again_model), parameters(trained), rtol=0, atol=0)


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    items = make_items(8)
    fit(build_model(), items, nll_loss, config(max_steps=2), tmp_path)
    with pytest.raises(
        ValueError, match=r"learning_rate: checkpoint 0\.001, now 0\.002.*fresh checkpoint_dir"
    ):
        fit(build_model(), items, nll_loss, config(max_steps=2, learning_rate=2e-3), tmp_path)
    with pytest.raises(ValueError, match="max_steps: checkpoint 2, now 3"):
        fit(build_model(), items, nll_loss, config(max_steps=3), tmp_path)
    with pytest.raises(ValueError, match="number of train_items: checkpoint 8, now 12"):
        fit(build_model(), make_items(12), nll_loss, config(max_steps=2), tmp_path)
    # how often checkpoints are written or kept doesn't change the trajectory: accepted
    result = fit(
        build_model(), items, nll_loss, config(max_steps=2, checkpoint_every=7, keep_checkpoints=5), tmp_path
    )
    assert result.resumed_from == 2


def test_resume_refuses_a_model_with_other_trainable_parameters(tmp_path: Path) -> None:
    fit(build_model(), make_items(4), nll_loss, config(max_steps=1), tmp_path)
    model = build_model()
    model.lm_head.requires_grad_(False)
    with pytest.raises(ValueError, match="trains other parameters than this model"):
        fit(model, make_items(4), nll_loss, config(max_steps=1), tmp_path)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_are_complete_and_pruned(tmp_path: Path) -> None:
    (tmp_path / ".staging-step-crashed").mkdir()  # what a crash during a save leaves behind
    sink = RecordingSink()
    run = config(max_steps=7, checkpoint_every=2, keep_checkpoints=2)
    model = build_model()
    result = fit(model, make_items(8), nll_loss, run, tmp_path, observer=sink)
    saved = sink.checkpoints

    assert [step for step, _ in saved] == [2, 4, 6, 7]  # every 2 steps and at the end
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000006", "step-00000007"]
    assert result.checkpoint == saved[-1][1] == tmp_path / "step-00000007"
    folder = result.checkpoint
    assert {path.name for path in folder.iterdir()} == CHECKPOINT_FILES

    state = json.loads((folder / "state.json").read_text())
    assert (state["step"], state["epoch"], state["position"], state["fit_version"]) == (7, 3, 1, 1)
    assert state["config"]["max_steps"] == 7 and state["config"]["learning_rate"] == 1e-3
    tensors = load_file(str(folder / "trainable.safetensors"))
    torch.testing.assert_close(
        tensors, parameters(model), rtol=0, atol=0
    )  # full fine-tuning: every parameter
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(folder / name, weights_only=True)  # plain tensors and containers only


def test_stop_signal_stops_between_steps_and_checkpoints(tmp_path: Path) -> None:
    calls: list[int] = []

    def counting_loss(
        model: torch.nn.Module, items: Sequence[Mapping[str, Any]]
    ) -> tuple[torch.Tensor, dict]:
        calls.append(len(items))
        return nll_loss(model, items)

    class StopNow:
        def should_stop(self) -> bool:
            return True

    sink = RecordingSink()
    run = config(max_steps=10, checkpoint_every=1)
    with pytest.raises(Stopped) as stopped:
        fit(build_model(), make_items(8), counting_loss, run, tmp_path, observer=sink, stop=StopNow())
    assert (stopped.value.stage, stopped.value.step) == ("distill", 1)
    assert calls == [2, 2]  # both micro-batches of step 1 ran: no stop mid-accumulation
    assert sorted(sink.seen) == [1]
    # the periodic checkpoint of step 1 is the stop checkpoint; not written twice
    assert [step for step, _ in sink.checkpoints] == [1]
    assert stopped.value.checkpoint == tmp_path / "step-00000001" and stopped.value.checkpoint.is_dir()


def test_progress_reports_every_step(tmp_path: Path) -> None:
    sink = RecordingSink()
    fit(build_model(), make_items(4), nll_loss, config(max_steps=5), tmp_path, stage="teacher_positive", observer=sink)
    reports = sink.reports
    assert reports[0] == Progress("teacher_positive", 0, 5, None)
    assert [(report.stage, report.step, report.total) for report in reports[1:]] == [
        ("teacher_positive", step, 5) for step in range(1, 6)
    ]
    assert all(report.eta_seconds is not None and report.eta_seconds >= 0 for report in reports[1:])
    assert reports[-1].eta_seconds == 0.0


# ------------------------------------------------------------------------------------------------ LoRA, precision


def test_lora_trains_and_checkpoints_only_the_adapters(tmp_path: Path) -> None:
    model = get_peft_model(build_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 2 and all(
        "lora_" in name for name in trainable
    )  # layers × modules × A/B

    result = fit(model, make_items(4), nll_loss, config(learning_rate=1e-2, max_steps=3), tmp_path)
    after = parameters(model)
    for name, value in frozen_before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)
    assert all(
        not torch.equal(after[name], value) for name, value in adapters_before.items() if "lora_B" in name
    )
    tensors = load_file(str(result.checkpoint / "trainable.safetensors"))
    assert set(tensors) == trainable


def test_bf16_autocasts_the_forward_and_keeps_fp32_master_weights(tmp_path: Path) -> None:
    autocast_seen: list[bool] = []

    def probing_loss(model: torch.nn.Module, items: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, dict]:
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return nll_loss(model, items)

    model = build_model()
    fit(model, make_items(4), probing_loss, config(max_steps=1, precision="bf16"), tmp_path / "bf16")
    assert autocast_seen == [True, True]
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    autocast_seen.clear()
    fit(build_model(), make_items(4), probing_loss, config(max_steps=1, precision="auto"), tmp_path / "auto")
    assert autocast_seen == [False, False]  # auto is fp32 on CPU


# ------------------------------------------------------------------------------------------------ edges, validation


def test_a_dataset_smaller_than_one_batch_still_trains(tmp_path: Path) -> None:
    sizes: list[int] = []

    def recording_loss(
        model: torch.nn.Module, items: Sequence[Mapping[str, Any]]
    ) -> tuple[torch.Tensor, dict]:
        sizes.append(len(items))
        return nll_loss(model, items)

    model, sink = build_model(), RecordingSink()
    before = parameters(model)
    result = fit(
        model,
        make_items(3),
        recording_loss,
        FitConfig(learning_rate=1e-3, epochs=2.0),
        tmp_path,
        observer=sink,
    )
    assert result.steps == result.total_steps == 2
    assert sizes == [2, 1, 2, 1]  # the whole dataset per step, in micro-batches of 2
    assert sink.series("tokens") == [3.0 * (SEQ - 1)] * 2
    assert any(not torch.equal(parameters(model)[name], value) for name, value in before.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0, got 0.0"),
        ({"learning_rate": math.nan}, "learning_rate must be a finite number > 0"),
        ({"lr_schedule": "step"}, "lr_schedule must be one of cosine, linear, constant, got 'step'"),
        ({"warmup_ratio": 1.5}, r"warmup_ratio must be a number in \[0, 1\], got 1.5"),
        ({"epochs": 0}, "epochs must be a finite number > 0"),
        ({"max_steps": 0}, "max_steps must be None"),
        (
            {"batch_size": 6, "micro_batch_size": 4},
            r"batch_size 6 is not a multiple of micro_batch_size 4; .*\(e\.g\. 3\)",
        ),
        ({"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1, got 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"precision": "fp16"}, "precision must be one of auto, fp32, bf16, got 'fp16'.*use bf16"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ({"checkpoint_every": 0}, "checkpoint_every must be an integer >= 1"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be an integer >= 1"),
    ],
)
def test_bad_config_values_raise(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_bad_fit_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train_items is empty"):
        fit(build_model(), [], nll_loss, config(), tmp_path)
    frozen = build_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True.*LoRA"):
        fit(frozen, make_items(4), nll_loss, config(), tmp_path)
    with pytest.raises(ValueError, match="keeps master weights in float32"):
        fit(build_model().to(torch.bfloat16), make_items(4), nll_loss, config(), tmp_path)

    def per_token_loss(model: torch.nn.Module, items: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        return torch.ones(3, requires_grad=True), {}

    with pytest.raises(ValueError, match=r"scalar tensor .* got \(3,\) at step 0"):
        fit(build_model(), make_items(4), per_token_loss, config(), tmp_path)
    assert checkpoint_steps(tmp_path) == []  # nothing was written by the failed calls


def test_active_dropout_is_reported_not_rewritten(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = build_model(attention_dropout=0.1)
    with caplog.at_level(logging.WARNING, logger="ctpd_core.train"):
        fit(model, make_items(4), nll_loss, config(max_steps=1), tmp_path)
    assert "config.attention_dropout=0.1" in caplog.text and "dropout disabled" in caplog.text
    assert model.config.attention_dropout == 0.1


def test_a_stop_during_the_last_step_is_not_ignored(tmp_path: Path) -> None:
    """Issue 9.5: the stop check used to be skipped on the last step, so a cancel then let the run 'finish'."""
    sink = RecordingSink()
    with pytest.raises(Stopped) as stopped:
        fit(build_model(), make_items(8), nll_loss, config(max_steps=3, checkpoint_every=1), tmp_path,
            observer=sink, stop=StopAfter(sink, 3))
    assert stopped.value.step == 3
    assert stopped.value.checkpoint == tmp_path / "step-00000003"  # the final state is saved: a resume returns at once


def test_a_checkpoint_of_a_newer_attempt_is_never_replaced(tmp_path: Path) -> None:
    """Issue 9.4: attempt 1, paused mid-step and woken after attempt 2 checkpointed that step, must not
    overwrite attempt 2's checkpoint."""
    newer = fit(build_model(), make_items(8), nll_loss, config(max_steps=2, checkpoint_every=1), tmp_path / "a",
                generation=2)
    held = newer.checkpoint
    assert json.loads((held / "state.json").read_text())["attempt"] == 2
    before = (held / "trainable.safetensors").read_bytes()

    stale_dir = tmp_path / "b"

    def attempt_two_checkpoints_meanwhile() -> bool:  # asked before each of attempt 1's saves
        if not (stale_dir / held.name).exists():
            shutil.copytree(held, stale_dir / held.name)
        return True

    with pytest.raises(Stopped) as stopped:
        fit(build_model(), make_items(8), noisy_nll_loss, config(max_steps=2, checkpoint_every=1), stale_dir,
            generation=1, checkpoint_guard=attempt_two_checkpoints_meanwhile)
    assert stopped.value.step == 2  # its step-2 save was refused, so fit stopped
    assert (stale_dir / held.name / "trainable.safetensors").read_bytes() == before
    assert json.loads((stale_dir / held.name / "state.json").read_text())["attempt"] == 2


def test_a_refused_guard_discards_the_checkpoint_and_stops(tmp_path: Path) -> None:
    sink = RecordingSink()
    with pytest.raises(Stopped) as stopped:
        fit(build_model(), make_items(8), nll_loss, config(max_steps=5, checkpoint_every=1), tmp_path,
            generation=1, checkpoint_guard=lambda: len(sink.checkpoints) < 2, observer=sink)
    assert stopped.value.step == 3 and [step for step, _ in sink.checkpoints] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]  # nothing half-written


def test_a_resume_replays_the_metrics_of_the_steps_before_its_checkpoint(tmp_path: Path) -> None:
    """What an attempt that died with its metric writes unflushed lost, its successor restores from the
    checkpoint (issue 9.7: an outage longer than the lease)."""
    first = RecordingSink()
    with pytest.raises(Stopped):
        fit(build_model(), make_items(8), nll_loss, config(max_steps=5, checkpoint_every=1), tmp_path,
            observer=first, stop=StopAfter(first, 3))
    second = RecordingSink()
    result = fit(build_model(), make_items(8), nll_loss, config(max_steps=5, checkpoint_every=1), tmp_path,
                 observer=second)
    replayed = second.replayed
    assert result.resumed_from == 3 and sorted(second.seen) == [4, 5]
    assert len(replayed) == 1 and [step for step, _ in replayed[0]] == [1, 2, 3]
    assert dict(replayed[0]) == {step: first.seen[step] for step in (1, 2, 3)}


# ------------------------------------------------------------------------------------- per-group learning rates


class GroupRatesAtStep:
    """The optimizer's groups at every step (names of their parameters and the rate each uses), by torch's
    global pre-step hook, so the test sees what fit's own optimizer does."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = {id(parameter): name for name, parameter in model.named_parameters()}
        self.steps: list[list[tuple[frozenset[str], float]]] = []

    def __enter__(self) -> GroupRatesAtStep:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.steps.append([
                (frozenset(self.names[id(p)] for p in group["params"]), float(group["lr"]))
                for group in optimizer.param_groups
            ])

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


HEAD_RATE = 1e-2


def test_a_group_learns_at_its_own_rate_and_the_schedule_scales_every_group(tmp_path: Path) -> None:
    model = build_model()
    every = {name for name, _ in model.named_parameters()}
    run = config(learning_rate=1e-3, lr_schedule="cosine", warmup_ratio=0.2, max_steps=10,
                 group_learning_rates=(("lm_head.", HEAD_RATE),))  # warmup 2
    sink = RecordingSink()
    with GroupRatesAtStep(model) as seen:
        fit(model, make_items(4), nll_loss, run, tmp_path, observer=sink)
    assert len(seen.steps) == 10
    for step, groups in enumerate(seen.steps):
        factor = lr_multiplier(step, schedule="cosine", warmup_steps=2, total_steps=10)
        (base_names, base_rate), (head_names, head_rate) = groups  # the base group first, then the head's
        assert head_names == {"lm_head.weight"} and base_names == every - {"lm_head.weight"}
        assert base_rate == pytest.approx(1e-3 * factor, rel=1e-12)
        assert head_rate == pytest.approx(HEAD_RATE * factor, rel=1e-12)
    # after warmup (step 2) each group is at its own peak; the reported rate is the base group's
    assert seen.steps[2][0][1] == pytest.approx(1e-3) and seen.steps[2][1][1] == pytest.approx(HEAD_RATE)
    torch.testing.assert_close(sink.series("learning_rate"), [groups[0][1] for groups in seen.steps], rtol=0, atol=0)


def test_a_group_rate_moves_its_parameters_further(tmp_path: Path) -> None:
    """AdamW's first step moves every weight by about lr (the update is m/√v ≈ ±1): the head, at 10× the base
    rate, moves about 10× as far as it does in a run without the group, and the other weights do not change."""
    plain, grouped = build_model(), build_model()
    before = parameters(plain)
    one_step = {"max_steps": 1, "weight_decay": 0.0}
    fit(plain, make_items(4), nll_loss, config(**one_step), tmp_path / "plain")
    fit(grouped, make_items(4), nll_loss, config(**one_step, group_learning_rates=(("lm_head.", HEAD_RATE),)),
        tmp_path / "grouped")
    moved_plain = (parameters(plain)["lm_head.weight"] - before["lm_head.weight"]).abs().mean()
    moved_grouped = (parameters(grouped)["lm_head.weight"] - before["lm_head.weight"]).abs().mean()
    assert float(moved_grouped / moved_plain) == pytest.approx(10.0, rel=1e-3)
    for name, value in parameters(grouped).items():
        if name != "lm_head.weight":
            torch.testing.assert_close(value, parameters(plain)[name], rtol=0, atol=0)


def test_a_resume_keeps_the_groups_and_their_rates(tmp_path: Path) -> None:
    items = make_items(14)
    run = config(lr_schedule="cosine", warmup_ratio=0.2, max_steps=8, checkpoint_every=3,
                 group_learning_rates=(("lm_head.", HEAD_RATE), ("model.embed_tokens.", 3e-3)))
    straight_model = build_model()
    with GroupRatesAtStep(straight_model) as straight:
        fit(straight_model, items, noisy_nll_loss, run, tmp_path / "straight")

    first_sink = RecordingSink()
    with pytest.raises(Stopped):
        fit(build_model(), items, noisy_nll_loss, run, tmp_path / "resumed", observer=first_sink,
            stop=StopAfter(first_sink, 4))
    resumed_model = build_model()
    with GroupRatesAtStep(resumed_model) as resumed:
        result = fit(resumed_model, items, noisy_nll_loss, run, tmp_path / "resumed")
    assert result.resumed_from == 4
    assert resumed.steps == straight.steps[4:]  # same groups, same members, same rates at every step
    # step 4 of 8 after 2 warmup steps: cosine progress 1/3, factor (1 + cos(π/3)) / 2 = 0.75 on every group
    assert [rate for _, rate in resumed.steps[0]] == pytest.approx([0.75e-3, 0.75 * HEAD_RATE, 0.75 * 3e-3])
    # the optimizer state went back into the right groups: the trajectory is the uninterrupted one, exactly
    torch.testing.assert_close(parameters(resumed_model), parameters(straight_model), rtol=0, atol=0)
    assert result.checkpoint is not None
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["config"]["group_learning_rates"] == [["lm_head.", HEAD_RATE], ["model.embed_tokens.", 3e-3]]
    with pytest.raises(ValueError, match="group_learning_rates: checkpoint .*, now"):
        fit(build_model(), items, noisy_nll_loss, config(lr_schedule="cosine", warmup_ratio=0.2, max_steps=8,
            checkpoint_every=3, group_learning_rates=(("lm_head.", 2e-2),)), tmp_path / "resumed")


def test_without_groups_the_checkpoint_config_is_what_it_was(tmp_path: Path) -> None:
    """No groups: one optimizer group, and no new key in state.json, so checkpoints written before the field
    existed still resume."""
    model = build_model()
    with GroupRatesAtStep(model) as seen:
        result = fit(model, make_items(4), nll_loss, config(max_steps=1), tmp_path)
    assert len(seen.steps[0]) == 1 and seen.steps[0][0][0] == {name for name, _ in model.named_parameters()}
    assert result.checkpoint is not None
    assert "group_learning_rates" not in json.loads((result.checkpoint / "state.json").read_text())["config"]


def test_with_every_parameter_in_a_group_the_reported_rate_is_still_the_base_one(tmp_path: Path) -> None:
    model, sink = build_model(), RecordingSink()
    run = config(learning_rate=1e-3, lr_schedule="linear", warmup_ratio=0.0, max_steps=4,
                 group_learning_rates=(("model.", 2e-3), ("lm_head.", HEAD_RATE)))
    with GroupRatesAtStep(model) as seen:
        fit(model, make_items(4), nll_loss, run, tmp_path, observer=sink)
    assert [rate for _, rate in seen.steps[1]] == pytest.approx([0.75 * 2e-3, 0.75 * HEAD_RATE])  # two groups
    assert sink.series("learning_rate") == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def test_parameter_groups_by_longest_prefix_with_the_base_group_first() -> None:
    names = ["student.a", "projector.query.weight", "projector.t2s.weight", "student.b"]
    groups = parameter_groups(names, 1e-4, (("projector.", 1e-3), ("projector.query.", 5e-3)))
    assert groups == [
        {"names": ["student.a", "student.b"], "lr": 1e-4},
        {"names": ["projector.t2s.weight"], "lr": 1e-3},
        {"names": ["projector.query.weight"], "lr": 5e-3},
    ]
    everything = parameter_groups(names, 1e-4, (("student.", 2e-4), ("projector.", 1e-3)))
    assert [group["lr"] for group in everything] == [2e-4, 1e-3]  # no empty base group
    assert parameter_groups(names, 1e-4, ()) == [{"names": names, "lr": 1e-4}]
    with pytest.raises(ValueError, match="prefix 'projecter.' matches no trainable parameter.*student.a"):
        parameter_groups(names, 1e-4, (("projecter.", 1e-3),))


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ((("projector.", 0.0),), "learning rate of group 'projector.' must be a finite number > 0, got 0.0"),
        ((("projector.", math.inf),), "learning rate of group 'projector.' must be a finite number > 0"),
        ((("", 1e-3),), "prefix '' must be a non-empty string"),
        ((("projector.", 1e-3), ("projector.", 2e-3)), "names the prefix 'projector.' twice"),
        ((("projector.",),), "is not a \\(prefix, learning rate\\) pair"),
        ("projector.", "must be a tuple of \\(parameter-name prefix, learning rate\\) pairs"),
    ],
)
def test_bad_group_learning_rates_raise(groups: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(group_learning_rates=groups)


def test_a_group_prefix_that_names_nothing_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prefix 'lm_haed.' matches no trainable parameter"):
        fit(build_model(), make_items(4), nll_loss, config(group_learning_rates=(("lm_haed.", 1e-2),)), tmp_path)
    assert checkpoint_steps(tmp_path) == []
