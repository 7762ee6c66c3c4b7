"""The reward-against-KL frontier: curves, reward at matched KL, and a bootstrap over seeds and prompts.
Pure numpy: no models.

A method's *curve* on one held-out source is its grid points (one per β or learning rate), each at its mean KL
from the initial student and its mean reward, averaged over seeds and prompts, joined in order of KL. Two curves
are compared where both are defined: over the KL range where they overlap, each curve's reward is interpolated
linearly between its points, and the difference is averaged over that range (the integral of the difference
divided by the range's width, exact for piecewise-linear curves). The 95 % interval resamples seeds and prompts
(the same draw for both methods, since a seed is the same training data and a prompt the same text for both) and
recomputes everything per draw: the points, the curves, the overlap and the average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

BEAT, BELOW, NO_DIFFERENCE, NO_OVERLAP = "beat", "below", "no detectable difference", "no overlap"


@dataclass(frozen=True)
class MethodPoints:
    """One method's grid points on one source, per seed and prompt.

    ``rewards[g, s, p]`` / ``kls[g, s, p]``: the mean over the samples of prompt ``p`` of the reward / the KL from
    the initial student, for grid point ``g`` trained with seed ``s`` (the same seeds, in the same order, for every
    method compared, and the same prompts)."""

    labels: tuple[str, ...]
    rewards: np.ndarray  # [G, S, P]
    kls: np.ndarray  # [G, S, P]

    def __post_init__(self) -> None:
        if self.rewards.ndim != 3 or self.rewards.shape != self.kls.shape:
            raise ValueError(
                f"rewards {self.rewards.shape} and kls {self.kls.shape} must both be [points, seeds, prompts]"
            )
        if self.rewards.shape[0] != len(self.labels) or min(self.rewards.shape) == 0:
            raise ValueError(f"{len(self.labels)} labels for rewards of shape {self.rewards.shape}: one per point, "
                             "and at least one seed and prompt")

    @classmethod
    def from_samples(cls, labels, rewards, kls) -> MethodPoints:
        """From per-sample values ``[point][seed][prompt][sample]`` (as stored): the per-prompt means."""
        def means(values) -> np.ndarray:
            return np.asarray([[[float(np.mean(p)) for p in seed] for seed in point] for point in values], dtype=float)

        return cls(tuple(labels), means(rewards), means(kls))

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """Each point's mean KL and mean reward over seeds and prompts: ``[G]``, ``[G]``."""
        return self.kls.mean(axis=(1, 2)), self.rewards.mean(axis=(1, 2))


def curve(kl: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points ordered by KL, as a function of KL: points at the same KL are averaged into one."""
    kl, reward = np.asarray(kl, dtype=float), np.asarray(reward, dtype=float)
    order = np.argsort(kl, kind="stable")
    xs, inverse = np.unique(kl[order], return_inverse=True)
    ys = np.bincount(inverse, weights=reward[order]) / np.bincount(inverse)
    return xs, ys


def overlap(kl_a: np.ndarray, kl_b: np.ndarray) -> tuple[float, float] | None:
    """The KL range both curves span, or None when it is empty or a single point."""
    low, high = max(float(np.min(kl_a)), float(np.min(kl_b))), min(float(np.max(kl_a)), float(np.max(kl_b)))
    return (low, high) if high > low else None


def matched_difference(kl_a, reward_a, kl_b, reward_b) -> tuple[float, float, float] | None:
    """Mean over the overlapping KL range of ``reward_a(KL) − reward_b(KL)``, each curve linear between its
    points; ``(mean, low, high)`` with the range, or None without overlap. Exact: the difference is linear
    between the two curves' merged breakpoints, so the trapezoid rule on them is its integral."""
    xa, ya = curve(kl_a, reward_a)
    xb, yb = curve(kl_b, reward_b)
    span = overlap(xa, xb)
    if span is None:
        return None
    low, high = span
    xs = np.unique(np.concatenate([[low, high], xa[(xa > low) & (xa < high)], xb[(xb > low) & (xb < high)]]))
    diff = np.interp(xs, xa, ya) - np.interp(xs, xb, yb)
    area = float(np.sum((diff[1:] + diff[:-1]) * np.diff(xs)) / 2)
    return area / (high - low), low, high


def verdict(low: float, high: float) -> str:
    """"beat" only when the whole interval lies above 0, "below" when under it, else no detectable difference."""
    if low > 0:
        return BEAT
    if high < 0:
        return BELOW
    return NO_DIFFERENCE


def _draw_weights(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``resamples`` draws with replacement, over ``n``:
    ``[resamples, n]``, rows summing to 1, so that a weighted mean is the resample's mean."""
    draws = rng.integers(0, n, size=(resamples, n))
    return np.stack([np.bincount(row, minlength=n) for row in draws]).astype(float) / n


def compare(a: MethodPoints, b: MethodPoints, *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Reward of ``a`` minus reward of ``b`` at matched KL, with its 95 % bootstrap interval over seeds and
    prompts and the verdict. Draws whose curves do not overlap are left out of the interval (their share is
    reported as ``overlap_share``)."""
    if a.rewards.shape[1:] != b.rewards.shape[1:]:
        raise ValueError(
            f"the methods were measured on {a.rewards.shape[1:]} and {b.rewards.shape[1:]} (seeds, prompts): compare "
            "them on the same seeds and prompts"
        )
    point = matched_difference(*a.means(), *b.means())
    result: dict[str, Any] = {"points": [len(a.labels), len(b.labels)], "seeds": a.rewards.shape[1],
                              "prompts": a.rewards.shape[2], "resamples": resamples}
    kl_a, kl_b = a.means()[0], b.means()[0]
    result["kl_range"] = [[float(kl_a.min()), float(kl_a.max())], [float(kl_b.min()), float(kl_b.max())]]
    if point is None:
        return {**result, "overlap": None, "mean": None, "low": None, "high": None, "overlap_share": 0.0,
                "verdict": NO_OVERLAP}
    rng = np.random.default_rng(seed)
    seed_weights = _draw_weights(rng, a.rewards.shape[1], resamples)  # [D, S]
    prompt_weights = _draw_weights(rng, a.rewards.shape[2], resamples)  # [D, P]

    def drawn(values: np.ndarray) -> np.ndarray:  # [G, S, P] -> each draw's point means [D, G]
        return np.einsum("ds,gsp,dp->dg", seed_weights, values, prompt_weights)

    ra, ka, rb, kb = drawn(a.rewards), drawn(a.kls), drawn(b.rewards), drawn(b.kls)
    diffs = [matched_difference(ka[d], ra[d], kb[d], rb[d]) for d in range(resamples)]
    means = np.asarray([d[0] for d in diffs if d is not None], dtype=float)
    low, high = (float(v) for v in np.percentile(means, [2.5, 97.5])) if means.size else (math.nan, math.nan)
    mean, span_low, span_high = point
    return {
        **result, "overlap": [span_low, span_high], "mean": mean, "low": low, "high": high,
        "overlap_share": means.size / resamples, "verdict": verdict(low, high) if means.size else NO_OVERLAP,
    }

