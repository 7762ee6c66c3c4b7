"""The memory planner's estimates against measured GPU peaks: one training step, one frozen pass.

    .venv/bin/python bench/memory_plan_check.py [--cases qwen0.5b-full llama1b-full ...] [--json FILE]

Why: ``ctpd_core.memory_plan`` refuses jobs at submission from an estimate (16 bytes per trainable parameter,
bf16 copies, activations, log-prob chunks). This measures what a step really holds on this GPU, for model shapes
from the planner's own table of hub ids (random weights built from the config on the GPU: nothing downloaded),
so the constants can be checked, and a case the plan says does not fit this GPU is run too, to see it fail.

How: each case runs in a fresh subprocess (an allocator that served one case cannot flatter the next, and an
out-of-memory error ends only its case). A training case builds the model in fp32 (the master weights), runs two
steps the way ``ctpd_core.train.fit`` does (bf16 autocast around the forward and the chunked log-probs of
``ctpd_core.logprobs.model_label_logprobs``, backward, AdamW, ``zero_grad(set_to_none=True)``); the second step
has AdamW's state, so its backward is the steady-state peak. A frozen case runs one inference-mode forward of
16 sequences (the reference pass's batch). Measured: ``torch.cuda.max_memory_allocated()`` over the case, above
what was allocated before the model; ``max_memory_reserved()`` shows the caching allocator's extra. Every sequence
is ``--tokens`` long (default 512, the spec's 128 + 384); a training forward holds 2 × micro-batch 2 of them.

``--device cpu`` runs one tiny case end to end without measuring (a smoke test of this script on a CPU machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctpd_core import memory_plan  # noqa: E402  (torch-free)

GiB = memory_plan.GiB
# name: (hub id in the planner's table, kind, LoRA, activation checkpointing)
CASES: dict[str, tuple[str, str, bool, bool]] = {
    "qwen0.5b-full": ("Qwen/Qwen2.5-0.5B", "train", False, False),
    "llama1b-full": ("meta-llama/Llama-3.2-1B", "train", False, False),
    "llama1b-full-ac": ("meta-llama/Llama-3.2-1B", "train", False, True),
    "llama1b-frozen": ("meta-llama/Llama-3.2-1B", "frozen", False, False),
    "llama8b-lora": ("meta-llama/Llama-3.1-8B", "train", True, False),
    "llama8b-full": ("meta-llama/Llama-3.1-8B", "train", False, False),
    "qwen14b-frozen": ("Qwen/Qwen2.5-14B", "frozen", False, False),
}
TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False,
        "head_dim": 16}
LORA_RANK = 16
MICRO_BATCH = 2  # pairs: 4 sequences per forward (chosen and rejected)
FROZEN_SEQUENCES = 2 * memory_plan.INFERENCE_BATCH_PAIRS


def planned(config: dict[str, Any], kind: str, lora: bool, ac: bool, tokens: int) -> int:
    shape = memory_plan.shape_from_config(config)
    if kind == "frozen":
        parts = memory_plan.frozen_components([("model", shape, memory_plan.FROZEN_WEIGHT_BYTES)],
                                              sequences=FROZEN_SEQUENCES, tokens=tokens, precision="bf16")
    else:
        load = memory_plan.TrainingLoad(sequences=2 * MICRO_BATCH, tokens=tokens, precision="bf16",
                                        lora_rank=LORA_RANK if lora else None)
        parts = memory_plan.training_components(shape, load, world_size=1, strategy="ddp",
                                                activation_checkpointing=ac)
    return sum(part.bytes for part in parts)


def run_case(config: dict[str, Any], kind: str, lora: bool, ac: bool, tokens: int, device_name: str) -> dict[str, Any]:
    """In the child process: build, run, measure."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ctpd_core.logprobs import IGNORE_INDEX, model_label_logprobs

    device = torch.device(device_name)
    on_cuda = device.type == "cuda"
    fields = {key: value for key, value in config.items() if key != "model_type"}
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.config.use_cache = False
    sequences = FROZEN_SEQUENCES if kind == "frozen" else 2 * MICRO_BATCH
    input_ids = torch.randint(0, hf_config.vocab_size, (sequences, tokens), device=device)  # [B, T]
    attention_mask = torch.ones_like(input_ids)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda)
    if kind == "frozen":
        model.requires_grad_(False)
        model.eval()
        with torch.inference_mode(), autocast:
            model_label_logprobs(model, input_ids, attention_mask, labels)
    else:
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        if ac:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for _ in range(2):  # the second step holds AdamW's state: the steady-state peak
            with autocast:
                loss = -model_label_logprobs(model, input_ids, attention_mask, labels).sum() / sequences
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if not on_cuda:
        return {"measured_bytes": None, "reserved_bytes": None}
    torch.cuda.synchronize(device)
    return {"measured_bytes": torch.cuda.max_memory_allocated(device) - base,
            "reserved_bytes": torch.cuda.max_memory_reserved(device)}


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:.1f}"


def gpu_memory(device_name: str) -> int | None:
    import torch

    if not device_name.startswith("cuda"):
        return None
    return int(torch.cuda.get_device_properties(torch.device(device_name)).total_memory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sequence (default 512 = 128 + 384)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case = json.loads(args.child)
        print(json.dumps(run_case(case["config"], case["kind"], case["lora"], case["ac"], args.tokens, args.device)))
        return 0

    cases = args.cases if args.device.startswith("cuda") else ["tiny"]
    memory = gpu_memory(args.device)
    budget = int(memory * (1 - memory_plan.HEADROOM)) if memory else None
    print(f"device {args.device}: {memory / GiB:.1f} GiB" if memory else f"device {args.device}: not measured "
          "(a smoke run of the script)")
    header = f"{'case':<18}{'plan GiB':>10}{'measured':>10}{'reserved':>10}{'meas/plan':>10}  plan on this GPU / outcome"
    print(header)
    print("-" * len(header))
    rows = []
    for name in cases:
        if name == "tiny":
            config, kind, lora, ac = TINY, "train", True, True
        else:
            reference, kind, lora, ac = CASES[name]
            config = memory_plan.KNOWN_HUB_MODELS[reference]
        plan = planned(config, kind, lora, ac, args.tokens)
        verdict = "-" if budget is None else ("fits" if plan <= budget else "does NOT fit")
        child = json.dumps({"config": config, "kind": kind, "lora": lora, "ac": ac})
        done = subprocess.run([sys.executable, __file__, "--child", child, "--device", args.device,
                               "--tokens", str(args.tokens)], capture_output=True, text=True)
        row: dict[str, Any] = {"case": name, "plan_bytes": plan, "plan_verdict": verdict}
        if done.returncode == 0:
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            row["outcome"] = "ran"
        else:
            oom = "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr
            row.update({"measured_bytes": None, "reserved_bytes": None,
                        "outcome": "out of memory" if oom else f"failed: {done.stderr.strip().splitlines()[-1:]}"})
        rows.append(row)
        measured, reserved = row["measured_bytes"], row["reserved_bytes"]
        ratio = f"{measured / plan:.2f}" if measured else "-"
        print(f"{name:<18}{plan / GiB:>10.1f}{_gib(measured):>10}{_gib(reserved):>10}{ratio:>10}  "
              f"{verdict} / {row['outcome']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
