"""Did the distilled student learn the examples' task? Before → after on held-out prompts, in plain words.

The examples dataset teaches one thing: continue a sentence **positively** (examples/data/README.md). This
samples continuations of held-out sentence openings (from the part of Botchan the dataset never prompted from,
``bench.quality.heldout``) from the untrained student and from the distilled one, with the same random numbers
for both, and scores each continuation's text with VADER, the lexicon that labelled the pairs:

    positive share   the share of continuations VADER calls positive (compound >= 0.05, VADER's own threshold)
    mean sentiment   the mean compound score, -1 .. 1

with a 95 % bootstrap interval of the change over prompts. The quickstart (scripts/quickstart) runs it after its
job; by hand:

    .venv/bin/python examples/sentiment_before_after.py --model .ctpd/artifacts/exports/<job id>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: bench/ and ctpd_core/ are the repository's
    sys.path.insert(0, str(REPO))

POSITIVE = 0.05  # VADER's documented threshold for "positive" (compound >= 0.05)


def _interval(after: np.ndarray, before: np.ndarray) -> tuple[float, float]:
    """95 % interval of the mean change over prompts (``[prompts, samples]`` scores on each side): the quality
    benchmark's bootstrap, with this one trained model as its one seed."""
    from bench.quality.stats import bootstrap_difference

    change = bootstrap_difference([after.tolist()], [before.tolist()])
    return change["low"], change["high"]


def _measure(model: Any, tokenizer: Any, prompts: list[Any], args: argparse.Namespace, device: Any,
             reward: Any) -> dict[str, Any]:
    from bench.quality.heldout import build_eval_set
    from bench.quality.sampling import SamplingConfig, sample_continuations

    eval_set = build_eval_set(tokenizer, prompts, [], max_prompt_tokens=args.max_prompt_tokens,
                              max_response_tokens=args.max_new_tokens)
    sampling = SamplingConfig(num_samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              batch_size=16)
    samples = sample_continuations(model, tokenizer, eval_set.prompts, eval_set.prompt_ids, sampling, device=device)
    scores = np.asarray([[reward(s.text) for s in row] for row in samples])  # [prompts, samples]
    return {"scores": scores, "texts": [[s.text for s in row] for row in samples]}


def compare(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as transformers_logging

    from bench.quality.heldout import heldout_prompts
    from bench.quality.measure import vader_scorer
    from ctpd_core.models import load_causal_lm

    transformers_logging.disable_progress_bar()  # a bar per model load would bury the report
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device("cpu")
    cache = Path(os.environ.get("CTPD_HOME", REPO / ".ctpd")) / "catalog"
    reward = vader_scorer()
    prompts = heldout_prompts(args.prompts)
    measured = {}
    for role, reference in (("before", args.initial), ("after", str(model_dir))):
        model, tokenizer = load_causal_lm(reference, cache_dir=cache)
        model.eval().requires_grad_(False)
        measured[role] = _measure(model, tokenizer, prompts, args, device, reward)
        del model
    before, after = measured["before"]["scores"], measured["after"]["scores"]
    positive_before, positive_after = (before >= POSITIVE).astype(float), (after >= POSITIVE).astype(float)
    example = int(np.argmax(after.mean(axis=1) - before.mean(axis=1)))  # the prompt whose sentiment rose most
    return {
        "prompts": len(prompts),
        "samples_per_prompt": args.samples,
        "positive_share": {"before": float(positive_before.mean()), "after": float(positive_after.mean()),
                           "change_ci95": _interval(positive_after, positive_before)},
        "mean_sentiment": {"before": float(before.mean()), "after": float(after.mean()),
                           "change_ci95": _interval(after, before)},
        "example": {"prompt": prompts[example].prompt, "before": measured["before"]["texts"][example][0],
                    "after": measured["after"]["texts"][example][0]},
    }


def _verdict(low: float, high: float) -> str:
    if low > 0:
        return "better: the whole 95 % interval is above 0"
    if high < 0:
        return "worse: the whole 95 % interval is below 0"
    return "no change we can tell from noise (the 95 % interval includes 0)"


def report(result: dict[str, Any]) -> str:
    share, sentiment = result["positive_share"], result["mean_sentiment"]
    low, high = share["change_ci95"]
    s_low, s_high = sentiment["change_ci95"]
    example = result["example"]
    return "\n".join([
        f"held-out check: {result['prompts']} sentence openings the dataset never used, "
        f"{result['samples_per_prompt']} sampled continuations each, before and after (same random numbers)",
        f"  positive continuations: {share['before']:.0%} -> {share['after']:.0%} "
        f"({100 * (share['after'] - share['before']):+.0f} points, 95 % interval "
        f"[{100 * low:+.0f}, {100 * high:+.0f}]): {_verdict(low, high)}",
        f"  mean sentiment (VADER, -1..1): {sentiment['before']:+.3f} -> {sentiment['after']:+.3f} "
        f"(95 % interval of the change [{s_low:+.3f}, {s_high:+.3f}])",
        f"  e.g. {example['prompt']!r}",
        f"     before: {example['before']!r}",
        f"     after:  {example['after']!r}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the distilled student's folder (a job's export)")
    parser.add_argument("--initial", default="smollm2-135m-instruct", help="the untrained student (catalog name or folder)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts (default 64)")
    parser.add_argument("--samples", type=int, default=4, help="continuations per prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-prompt-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a model folder (no config.json): pass a job's export folder")
    result = compare(args.model, args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
