"""fit() on one process against 2 torch.distributed ranks (DDP, FSDP2, FSDP2 + activation checkpointing).

    .venv/bin/python bench/distributed_equivalence.py [--steps 8] [--device cpu|cuda]

The same tiny Llama (built from one seed), the same items and the same global batch; the 2-rank runs are
launched with torchrun (gloo on CPU, NCCL with ``--device cuda`` on a host with 2 GPUs). Prints, per run, the
per-step loss, the largest |loss difference| to the single process over the steps, the largest |difference| of
the final trained weights, and the wall time of fit() itself (rank 0's; process start and imports not counted)
and of the whole launch. The 2-rank runs must follow the single process within float tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from ctpd_core.checkpoint import read_trainable_tensors  # noqa: E402
from ctpd_core.distributed import init_from_env  # noqa: E402
from ctpd_core.observe import NullObserver  # noqa: E402
from ctpd_core.train import FitConfig, fit  # noqa: E402

VOCAB, SEQ, ITEMS = 256, 32, 16  # 2 steps per epoch: the steps revisit the items, so the loss falls
RUNS = (("ddp", "ddp", False), ("fsdp", "fsdp", False), ("fsdp+ac", "fsdp", True))


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
    ))


def make_items() -> list[torch.Tensor]:
    return list(torch.randint(0, VOCAB, (ITEMS, SEQ), generator=torch.Generator().manual_seed(1)))  # [N, T]


def nll_loss(model: torch.nn.Module, items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    device = next(model.parameters()).device
    input_ids = torch.stack(list(items)).to(device)  # [B, T]
    return model(input_ids=input_ids, labels=input_ids).loss, {"tokens": input_ids.shape[0] * (SEQ - 1)}


def fit_config(steps: int, precision: str) -> FitConfig:
    # global batch 8 = 2 ranks x 4 items, as 2 micro-batches of 2 each: accumulation with one sync per step
    return FitConfig(learning_rate=3e-3, lr_schedule="cosine", warmup_ratio=0.25, max_steps=steps, batch_size=8,
                     micro_batch_size=2, max_grad_norm=1.0, precision=precision,  # type: ignore[arg-type]
                     checkpoint_every=steps)


class Losses(NullObserver):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        self.by_step[step] = metrics["loss"]


def train(out: Path, steps: int, precision: str, device: str, **dist_args: Any) -> dict[str, Any]:
    losses = Losses()
    start = time.perf_counter()
    result = fit(build_model(), make_items(), nll_loss, fit_config(steps, precision), out, stage="bench",
                 observer=losses, device=device, **dist_args)
    return {"losses": [losses.by_step[step] for step in sorted(losses.by_step)], "checkpoint": str(result.checkpoint),
            "fit_seconds": time.perf_counter() - start}


def rank_main(strategy: str, activation_checkpointing: bool, out: Path, steps: int, precision: str,
              device: str) -> None:
    torch.set_num_threads(1)
    ctx = init_from_env(device)
    outcome = train(out / "checkpoints", steps, precision, device, dist=ctx, strategy=strategy,
                    activation_checkpointing=activation_checkpointing)
    if ctx.is_main:
        (out / "outcome.json").write_text(json.dumps(outcome), encoding="utf-8")
    torch.distributed.destroy_process_group()


def launch(name: str, strategy: str, checkpointing: bool, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    folder = out / name
    folder.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               __file__, "--rank-run", strategy, "--activation-checkpointing", str(int(checkpointing)),
               "--out", str(folder), "--steps", str(args.steps), "--precision", args.precision,
               "--device", args.device]
    start = time.perf_counter()
    finished = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{name} failed (exit {finished.returncode}):\n{finished.stderr[-4000:]}")
    outcome: dict[str, Any] = json.loads((folder / "outcome.json").read_text(encoding="utf-8"))
    outcome["launch_seconds"] = time.perf_counter() - start
    return outcome


def max_weight_diff(checkpoint: str, reference: Mapping[str, torch.Tensor]) -> float:
    ours = read_trainable_tensors(Path(checkpoint))
    return max(float((ours[name] - tensor).abs().max()) for name, tensor in reference.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32")
    parser.add_argument("--rank-run", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--activation-checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        rank_main(args.rank_run, bool(args.activation_checkpointing), args.out, args.steps, args.precision,
                  args.device)
        return

    torch.set_num_threads(1)  # as each rank has: the wall times compare like with like
    with tempfile.TemporaryDirectory(prefix="ctpd-dist-bench-") as scratch:
        out = Path(scratch)
        single = train(out / "single", args.steps, args.precision, args.device)
        reference = read_trainable_tensors(Path(single["checkpoint"]))
        results = {"single": single} | {name: launch(name, strategy, checkpointing, out, args)
                                        for name, strategy, checkpointing in RUNS}
        rows = []
        for name, outcome in results.items():
            diffs = [abs(a - b) for a, b in zip(outcome["losses"], single["losses"], strict=True)]
            rows.append((name, max(diffs), max_weight_diff(outcome["checkpoint"], reference),
                         outcome["fit_seconds"], outcome.get("launch_seconds")))

    print(f"fit(): tiny Llama ({sum(t.numel() for t in reference.values()):,} parameters, 4 blocks), {ITEMS} items "
          f"of {SEQ} tokens, global batch 8 (2 ranks x 2 micro-batches of 2), {args.steps} steps, "
          f"{args.precision} on {args.device}; 2-rank runs under torchrun ({'nccl' if args.device == 'cuda' else 'gloo'})")
    print()
    print("step  " + "  ".join(f"{name:>12}" for name in results))
    for step in range(args.steps):
        print(f"{step + 1:>4}  " + "  ".join(f"{outcome['losses'][step]:>12.7f}" for outcome in results.values()))
    print()
    print(f"{'run':<9} {'max |Δloss|':>12} {'max |Δweight|':>14} {'fit s':>7} {'launch s':>9}")
    for name, loss_diff, weight_diff, fit_seconds, launch_seconds in rows:
        launch_text = f"{launch_seconds:>9.1f}" if launch_seconds is not None else f"{'-':>9}"
        print(f"{name:<9} {loss_diff:>12.2e} {weight_diff:>14.2e} {fit_seconds:>7.2f} {launch_text}")


if __name__ == "__main__":
    main()
