"""The rank side of tests/ctpd_core/test_distributed.py: what each torchrun process runs (gloo, CPU).

``python -m torch.distributed.run --nproc-per-node 2 -m tests.ctpd_core.distributed_ranks SCENARIO OUT_DIR``

* ``suite``: in one process group (one launch: each start costs seconds of imports), the runs the tests compare
  with single-process ones: DDP and FSDP2 trajectories, a stop that only rank 1's token asks for, and resumes
  on 2 ranks from a 2-rank checkpoint and from a single-process one (``OUT_DIR/single-step2``, prepared by the
  test). Rank 0 writes ``OUT_DIR/<run>.json`` (per-step metrics, how the run ended); the checkpoints stay in
  ``OUT_DIR/<run>/``, and a finished run's model, gathered whole after fit, in ``OUT_DIR/<run>.full.safetensors``.
* ``kill``: a DDP run in which rank 1 SIGKILLs itself in the middle of step 2's forward (a failpoint of this
  module, not of ctpd_core); rank 0 writes ``OUT_DIR/finished`` if its fit ever returns (it must not).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ctpd_core.distributed import DistContext, DistStrategy, exit_rank, init_from_env
from ctpd_core.logprobs import IGNORE_INDEX, model_label_logprobs
from ctpd_core.observe import Stopped
from ctpd_core.train import FitConfig, fit
from tests.ctpd_core.test_train import SEQ, RecordingSink, build_model, config, make_items

NUM_ITEMS = 8
# The step after which rank 1's stop token asks to stop (rank 0's never asks); not a checkpoint_every step, so
# the stop writes its own checkpoint.
STOP_AT_STEP = 3
KILL_AT_STEP = 2  # the step in whose forward rank 1 kills itself


def head_nll_loss(
    model: torch.nn.Module, items: Sequence[Mapping[str, Any]]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean next-token NLL the way the recipe's losses compute log-probs: the backbone and the head weight
    applied by hand (``model_label_logprobs``), never ``model(...)``: under DDP and FSDP2 that only trains right
    because fit wraps the whole loss as one forward (``TrainingStep``)."""
    device = next(model.parameters()).device
    input_ids = torch.stack([item["input_ids"] for item in items]).to(device)  # [B, T]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]  # already shifted: position t predicts token t + 1
    logps = model_label_logprobs(model, input_ids, torch.ones_like(input_ids), labels)  # [B, T]
    loss = -logps.sum() / (input_ids.shape[0] * (SEQ - 1))
    return loss, {"tokens": input_ids.shape[0] * (SEQ - 1), "nll": loss.detach()}


def run_config() -> FitConfig:
    """4 steps over 8 items (2 epochs); global batch 4 = 2 ranks x 2 items, each run as 2 micro-batches of 1, so
    gradient accumulation with deferred sync is exercised; a warmup and a decay so the LR changes per step."""
    return config(max_steps=4, batch_size=4, micro_batch_size=1, lr_schedule="cosine", warmup_ratio=0.25,
                  checkpoint_every=2, max_grad_norm=0.5)


class StopAtStep:
    """Rank 1's token: stop once ``step`` steps are done (counted by its polls, one per optimizer step)."""

    def __init__(self, step: int) -> None:
        self.step, self.polls = step, 0

    def should_stop(self) -> bool:
        self.polls += 1
        return self.polls >= self.step


class NeverAsks:
    def should_stop(self) -> bool:
        return False


def record(out: Path, name: str, ctx: DistContext, sink: RecordingSink, ended: dict[str, Any]) -> None:
    if ctx.is_main:
        payload = {"metrics": {str(step): metrics for step, metrics in sink.seen.items()},
                   "checkpoints": [step for step, _ in sink.checkpoints], **ended}
        (out / f"{name}.json").write_text(json.dumps(payload), encoding="utf-8")


def write_full_state(model: torch.nn.Module, ctx: DistContext, path: Path) -> None:
    """The trained model's full weights as the worker gathers them after fit (collective: all ranks call)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path))


def build_lora_model() -> torch.nn.Module:
    """The tiny Llama with LoRA adapters (non-zero B, so step 1 already depends on them): frozen base, trainable
    adapters inside the same FSDP2 units."""
    from peft import LoraConfig, get_peft_model

    base = build_model()
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))


def train(out: Path, name: str, ctx: DistContext, strategy: DistStrategy, stop: Any = None,
          activation_checkpointing: bool = False, lora: bool = False, guard: Any = None) -> None:
    sink = RecordingSink()
    model = build_lora_model() if lora else build_model()
    try:
        result = fit(model, make_items(NUM_ITEMS), head_nll_loss, run_config(), out / name, stage="distill",
                     observer=sink, stop=stop, dist=ctx, strategy=strategy,
                     activation_checkpointing=activation_checkpointing, checkpoint_guard=guard)
        ended: dict[str, Any] = {"ended": "finished", "steps": result.steps, "resumed_from": result.resumed_from,
                                 "checkpoint": str(result.checkpoint)}
        write_full_state(model, ctx, out / f"{name}.full.safetensors")
    except Stopped as stopped:
        ended = {"ended": "stopped", "steps": stopped.step, "checkpoint": str(stopped.checkpoint)}
    # Every rank says where it ended, so the test sees that they agree.
    ended["rank_steps"] = ctx.gather_objects(ended["steps"])
    record(out, name, ctx, sink, ended)


def suite(out: Path, ctx: DistContext) -> None:
    train(out, "ddp", ctx, "ddp")
    train(out, "fsdp", ctx, "fsdp")
    train(out, "fsdp_checkpointed", ctx, "fsdp", activation_checkpointing=True)
    train(out, "lora_fsdp_checkpointed", ctx, "fsdp", activation_checkpointing=True, lora=True)
    # Only rank 1 is asked to stop: both ranks must stop after the same step, with a checkpoint.
    train(out, "stopped", ctx, "fsdp", stop=StopAtStep(STOP_AT_STEP) if ctx.rank == 1 else NeverAsks())
    # This attempt lost the right to write: rank 0's guard (the only one asked) refuses the first checkpoint.
    train(out, "refused", ctx, "ddp", guard=lambda: False)
    if ctx.is_main:  # copies of the 2-rank checkpoint: one resumed here on 2 ranks, one by the test on 1
        for copy in ("resumed_2_ranks", "resume_on_1"):
            shutil.copytree(out / "stopped", out / copy)
    ctx.barrier()
    train(out, "resumed_2_ranks", ctx, "fsdp")
    train(out, "resumed_from_single", ctx, "fsdp")  # the test put a single-process checkpoint there


def kill(out: Path, ctx: DistContext) -> None:
    step_calls = {"count": 0}

    def dying_loss(model: torch.nn.Module, items: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, Any]:
        step_calls["count"] += 1  # 2 micro-batches per step
        if ctx.rank == 1 and step_calls["count"] > 2 * (KILL_AT_STEP - 1):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-step: rank 0 is, or soon will be, inside a collective
        return head_nll_loss(model, items)

    fit(build_model(), make_items(NUM_ITEMS), dying_loss, run_config(), out / "killed", stage="distill",
        dist=ctx, strategy="ddp")
    if ctx.is_main:
        (out / "finished").write_text("rank 0's fit returned", encoding="utf-8")


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    ctx = init_from_env("cpu")
    {"suite": suite, "kill": kill}[scenario](out, ctx)
    exit_rank(0)  # as the worker's ranks end: no interpreter finalization, which can abort a gloo rank


if __name__ == "__main__":
    main()
