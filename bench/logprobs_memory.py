"""Peak memory and time: chunked ``label_logprobs_from_hidden`` vs the naive full fp32 log-softmax.

Why: preference training needs one log-prob per position, but the naive way (full ``[B, T, V]`` logits, fp32
``log_softmax``, gather) costs several ``T·V·4``-byte tensors, which for Gemma-3's 262,144-token vocabulary is
1 GiB per copy at T = 1,000. This benchmark shows what the chunked, checkpointed version saves and what it
costs in time, at Gemma-3-270M's head size (V = 262,144, H = 640), B = 1, T = 1,000 and 2,000, in
inference mode (forward only) and with a backward pass to the hidden states and the head weight (full
fine-tuning: the head is trained).

How it measures: each (variant, pass, T) runs in a fresh subprocess, so one run's allocator state cannot
flatter the next. A worker allocates its inputs, does one tiny warm-up call, reads its current RSS, runs the
computation once, and reports ``peak RSS (ru_maxrss) − RSS before the computation`` plus wall time. CPU,
fp32 (which, if anything, favours the naive way: its ``.float()`` is then free). The two variants' sums of
log-probs are compared as a correctness check.

Run (about 2 minutes on 2 cores)::

    .venv/bin/python bench/logprobs_memory.py

Options: ``--seq-lens 1000 2000``, ``--chunk-size 512`` (default: the library default).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCAB_SIZE = 262_144  # Gemma-3
HIDDEN_SIZE = 640  # Gemma-3-270M
PASSES = ("forward", "forward+backward")
VARIANTS = ("naive", "chunked")


def _current_rss_bytes() -> int:
    """Resident set size now (Linux /proc); falls back to the peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
        return resident_pages * resource.getpagesize()
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _worker(variant: str, pass_name: str, seq_len: int, chunk_size: int) -> dict[str, float]:
    """Run one measurement in this (fresh) process and return its numbers."""
    repo_root = str(Path(__file__).resolve().parents[1])
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    import torch
    import torch.nn.functional as F

    from ctpd_core.logprobs import label_logprobs_from_hidden

    def naive(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, weight).float()  # [B, T, V]
        return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]

    def chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return label_logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk_size)  # [B, T]

    compute = naive if variant == "naive" else chunked
    is_backward = pass_name == "forward+backward"
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, seq_len, HIDDEN_SIZE, generator=generator)  # [B, T, H]
    weight = torch.randn(VOCAB_SIZE, HIDDEN_SIZE, generator=generator) * 0.05  # [V, H]
    labels = torch.randint(0, VOCAB_SIZE, (1, seq_len), generator=generator)  # [B, T]
    hidden.requires_grad_(is_backward)
    weight.requires_grad_(is_backward)
    with torch.inference_mode():  # warm-up: first-call kernel setup stays out of the timing
        compute(hidden[:, :8].detach(), weight.detach(), labels[:, :8])

    baseline = _current_rss_bytes()
    start = time.perf_counter()
    if is_backward:
        logps = compute(hidden, weight, labels)
        logps.sum().backward()
        checksum = float(logps.detach().sum())
    else:
        with torch.inference_mode():
            checksum = float(compute(hidden, weight, labels).sum())
    seconds = time.perf_counter() - start
    return {"peak_mib": (_peak_rss_bytes() - baseline) / 2**20, "seconds": seconds, "checksum": checksum}


def _measure(variant: str, pass_name: str, seq_len: int, chunk_size: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", variant, pass_name, str(seq_len), str(chunk_size)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {variant} {pass_name} T={seq_len} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="default: ctpd_core's DEFAULT_CHUNK_SIZE"
    )
    parser.add_argument(
        "--worker", nargs=4, metavar=("VARIANT", "PASS", "T", "CHUNK"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.worker:
        variant, pass_name, seq_len, chunk_size = args.worker
        print(json.dumps(_worker(variant, pass_name, int(seq_len), int(chunk_size))))
        return

    chunk_size = args.chunk_size
    if chunk_size is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from ctpd_core.logprobs import DEFAULT_CHUNK_SIZE

        chunk_size = DEFAULT_CHUNK_SIZE
    print(
        f"label log-probs, V={VOCAB_SIZE:,}, H={HIDDEN_SIZE}, B=1, fp32 on CPU, chunk_size={chunk_size} "
        f"(one fp32 chunk = {chunk_size * VOCAB_SIZE * 4 / 2**20:.0f} MiB); peak RSS above the inputs, "
        "one fresh process per cell"
    )
    header = (
        f"{'T':>5}  {'pass':<17} {'[T,V] fp32':>10} {'naive MiB':>10} {'chunked MiB':>12} {'naive/chunked':>14}"
        f" {'naive s':>8} {'chunked s':>10} {'time ratio':>11}  {'checksums agree':>15}"
    )
    print(header)
    print("-" * len(header))
    started = time.perf_counter()
    for seq_len in args.seq_lens:
        for pass_name in PASSES:
            naive, chunked = (_measure(v, pass_name, seq_len, chunk_size) for v in VARIANTS)
            agree = abs(naive["checksum"] - chunked["checksum"]) <= 1e-4 * abs(naive["checksum"])
            print(
                f"{seq_len:>5}  {pass_name:<17} {seq_len * VOCAB_SIZE * 4 / 2**20:>10.0f}"
                f" {naive['peak_mib']:>10.0f} {chunked['peak_mib']:>12.0f}"
                f" {naive['peak_mib'] / chunked['peak_mib']:>13.1f}x"
                f" {naive['seconds']:>8.2f} {chunked['seconds']:>10.2f}"
                f" {chunked['seconds'] / naive['seconds']:>10.2f}x  {'yes' if agree else 'NO':>15}",
                flush=True,
            )
    print(f"time ratio = chunked / naive; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
