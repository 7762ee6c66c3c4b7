"""Win rates, seed aggregates and paired comparisons. Pure numpy: no models."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# Two-sided 95 % Student-t quantiles by degrees of freedom (n seeds → n − 1); 1.96 from 30 on.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045}


def _wins(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """1 where ours is higher, 0.5 on an exact tie, 0 where lower."""
    return (ours > theirs) + 0.5 * (ours == theirs)


def preference_accuracy(reward_chosen: np.ndarray, reward_rejected: np.ndarray) -> float:
    """Share of pairs whose chosen reward is higher; an exact tie counts half."""
    chosen, rejected = np.asarray(reward_chosen, dtype=float), np.asarray(reward_rejected, dtype=float)
    if chosen.size == 0:
        return float("nan")
    return float(np.mean(_wins(chosen, rejected)))


def win_rate(rewards: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> float:
    """P(a sample of the model beats a sample of the baseline on the same prompt), ties counting half:
    every sample of one against every sample of the other, per prompt, then averaged over prompts."""
    if len(rewards) != len(baseline):
        raise ValueError(f"{len(rewards)} prompts against {len(baseline)}: the models were not sampled alike")
    per_prompt = []
    for ours, theirs in zip(rewards, baseline, strict=True):
        a, b = np.asarray(ours, dtype=float)[:, None], np.asarray(theirs, dtype=float)[None, :]
        per_prompt.append(float(np.mean(_wins(a, b))))
    return float(np.mean(per_prompt))


def prompt_standard_error(rewards: Sequence[Sequence[float]]) -> float:
    """Sampling noise of a mean reward: the standard error over prompts of the per-prompt means."""
    means = np.asarray([np.mean(row) for row in rewards], dtype=float)
    return float(np.std(means, ddof=1) / math.sqrt(len(means))) if len(means) > 1 else float("nan")


def distinct_ngrams(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over ``texts`` (a collapse shows as a low value)."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and a 95 % t-interval half-width over seeds."""
    array = np.asarray(values, dtype=float)
    n = array.size
    mean = float(np.mean(array)) if n else float("nan")
    std = float(np.std(array, ddof=1)) if n > 1 else 0.0
    half = _T95.get(n - 1, 1.96) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci95": half, "n": n, "values": [float(v) for v in array]}


def paired_difference(ours: Sequence[float], theirs: Sequence[float]) -> dict[str, Any]:
    """Per-seed differences ``ours − theirs`` (same seed = same training data), summarised, and how many of the
    seeds favour ``ours``."""
    if len(ours) != len(theirs):
        raise ValueError("paired differences need the same seeds on both sides")
    diffs = [a - b for a, b in zip(ours, theirs, strict=True)]
    summary = summarize(diffs)
    summary["seeds_better"] = int(sum(d > 0 for d in diffs))
    return summary


def bootstrap_difference(
    ours: Sequence[Sequence[Sequence[float]]],
    theirs: Sequence[Sequence[Sequence[float]]],
    *,
    resamples: int = 4000,
    seed: int = 0,
) -> dict[str, float]:
    """95 % interval of the mean reward difference from a two-level bootstrap: seeds resampled with replacement,
    and prompts resampled (the same prompts for every seed of one draw, since they are shared), so the
    interval carries both the training noise (seeds) and the evaluation noise (which prompts, which samples).

    ``ours[s][p]`` / ``theirs[s][p]``: the rewards of the samples of prompt ``p`` under seed ``s`` (a fixed,
    untrained model repeats its one measurement for every seed).
    """
    diffs = np.asarray(
        [[np.mean(a) - np.mean(b) for a, b in zip(o, t, strict=True)] for o, t in zip(ours, theirs, strict=True)],
        dtype=float,
    )  # [seeds, prompts]
    n_seeds, n_prompts = diffs.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    prompt_draws = rng.integers(0, n_prompts, size=(resamples, n_prompts))
    means = np.asarray([diffs[np.ix_(sd, pd)].mean() for sd, pd in zip(seed_draws, prompt_draws, strict=True)])
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diffs.mean()), "low": float(low), "high": float(high), "resamples": resamples}
