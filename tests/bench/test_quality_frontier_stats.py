"""bench.quality.frontier_stats: the matched-KL comparison on synthetic curves with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.quality.frontier_stats import (
    BEAT,
    BELOW,
    NO_DIFFERENCE,
    NO_OVERLAP,
    MethodPoints,
    compare,
    curve,
    matched_difference,
    overlap,
    verdict,
)


def _points(kls, rewards, seeds: int = 1, prompts: int = 1) -> MethodPoints:
    """Points whose every seed and prompt has exactly the given KL and reward."""
    shape = (len(kls), seeds, prompts)
    return MethodPoints(
        tuple(f"p{i}" for i in range(len(kls))),
        np.broadcast_to(np.asarray(rewards, dtype=float)[:, None, None], shape).copy(),
        np.broadcast_to(np.asarray(kls, dtype=float)[:, None, None], shape).copy(),
    )


def test_a_curve_orders_its_points_by_kl_and_averages_points_at_the_same_kl():
    xs, ys = curve(np.array([0.5, 0.1, 0.5]), np.array([0.2, 0.0, 0.4]))
    assert xs.tolist() == [0.1, 0.5] and ys.tolist() == pytest.approx([0.0, 0.3])


def test_the_matched_difference_integrates_the_interpolated_gap_over_the_overlap_by_hand():
    # A: (0, 0) (1, 1) (2, 1); B: (0.5, 0) (2.5, 0). Overlap [0.5, 2]. A − B = A there: 0.5 at 0.5, 1 at 1, 1 at 2.
    # Integral: (0.5 + 1) / 2 * 0.5 + 1 * 1 = 1.375, over a width of 1.5.
    mean, low, high = matched_difference([0, 1, 2], [0, 1, 1], [0.5, 2.5], [0, 0])
    assert (low, high) == (0.5, 2.0) and mean == pytest.approx(1.375 / 1.5)
    # B rising (0.5, 0) → (2.5, 1): B = (x − 0.5) / 2, so A − B is 0.5, 0.75, 0.25 at 0.5, 1, 2:
    # (0.5 + 0.75) / 2 * 0.5 + (0.75 + 0.25) / 2 * 1 = 0.8125.
    mean, _, _ = matched_difference([0, 1, 2], [0, 1, 1], [0.5, 2.5], [0, 1])
    assert mean == pytest.approx(0.8125 / 1.5)
    # Antisymmetric, and 0 against itself.
    assert matched_difference([0.5, 2.5], [0, 1], [0, 1, 2], [0, 1, 1])[0] == pytest.approx(-0.8125 / 1.5)
    assert matched_difference([0, 1], [0.1, 0.3], [0, 1], [0.1, 0.3])[0] == 0


def test_curves_that_do_not_overlap_are_said_to_and_get_no_number():
    assert overlap(np.array([0.0, 1.0]), np.array([2.0, 3.0])) is None
    assert overlap(np.array([0.0, 1.0]), np.array([1.0, 2.0])) is None  # touching at one KL is no range
    assert matched_difference([0, 1], [0, 1], [2, 3], [5, 5]) is None
    result = compare(_points([0.1, 0.4], [0.1, 0.2]), _points([1.0, 2.0], [0.3, 0.4]))
    assert result["verdict"] == NO_OVERLAP and result["mean"] is None and result["overlap"] is None
    assert result["kl_range"] == [[0.1, 0.4], [1.0, 2.0]]


def test_the_verdict_needs_the_whole_interval_on_one_side_of_zero():
    assert verdict(0.01, 0.2) == BEAT
    assert verdict(-0.2, -0.01) == BELOW
    assert verdict(-0.01, 0.2) == verdict(0.0, 0.0) == NO_DIFFERENCE


def _noisy(rng, kls, rewards, seeds, prompts, noise) -> MethodPoints:
    shape = (len(kls), seeds, prompts)
    return MethodPoints(
        tuple(map(str, kls)),
        np.asarray(rewards, dtype=float)[:, None, None] + rng.normal(0, noise, size=shape),
        np.asarray(kls, dtype=float)[:, None, None] + rng.normal(0, noise, size=shape),
    )


def test_a_method_better_at_every_kl_beats_and_the_other_is_below():
    rng = np.random.default_rng(0)
    kls = [0.2, 0.6, 1.0, 1.4]
    better = _noisy(rng, kls, [0.15, 0.25, 0.3, 0.32], seeds=3, prompts=64, noise=0.1)
    worse = _noisy(rng, [0.3, 0.7, 1.1, 1.5], [0.05, 0.15, 0.2, 0.22], seeds=3, prompts=64, noise=0.1)
    ahead = compare(better, worse, resamples=500)
    assert ahead["verdict"] == BEAT and ahead["low"] > 0 and ahead["overlap_share"] == 1.0
    assert ahead["mean"] == pytest.approx(0.1, abs=0.02)  # the true gap is 0.1 at every KL
    assert ahead["low"] < ahead["mean"] < ahead["high"]
    behind = compare(worse, better, resamples=500)
    assert behind["verdict"] == BELOW and behind["mean"] == pytest.approx(-ahead["mean"])


def test_identical_methods_show_no_detectable_difference():
    rng = np.random.default_rng(1)
    kls, rewards = [0.2, 0.6, 1.0], [0.1, 0.2, 0.25]
    a = _noisy(rng, kls, rewards, seeds=3, prompts=64, noise=0.1)
    b = _noisy(rng, kls, rewards, seeds=3, prompts=64, noise=0.1)
    result = compare(a, b, resamples=500)
    assert result["verdict"] == NO_DIFFERENCE and result["low"] < 0 < result["high"]
    same = compare(a, a, resamples=200)
    assert same["mean"] == 0 and same["low"] == same["high"] == 0 and same["verdict"] == NO_DIFFERENCE


def test_the_bootstrap_resamples_seeds_as_a_whole():
    # No prompt noise; the gap is +0.2 under seed 0 and −0.1 under seed 1 at both points (KLs identical). A draw
    # takes seed 0 twice (0.2), seed 1 twice (−0.1) or one of each (0.05): the 95 % interval is [−0.1, 0.2].
    a = _points([0.0, 1.0], [0.5, 0.5], seeds=2, prompts=4)
    b = _points([0.0, 1.0], [0.5, 0.5], seeds=2, prompts=4)
    b.rewards[:, 0, :] -= 0.2
    b.rewards[:, 1, :] += 0.1
    result = compare(a, b, resamples=2000, seed=3)
    assert result["mean"] == pytest.approx(0.05)
    assert (result["low"], result["high"]) == (pytest.approx(-0.1), pytest.approx(0.2))
    assert result["verdict"] == NO_DIFFERENCE


def test_the_bootstrap_interval_has_the_width_of_the_prompt_noise():
    # One seed, both curves at KL 0 and 1: the matched difference is the mean over prompts of x_p, the average of
    # the prompt's gaps at the two points, so the interval's half-width is ~1.96 sd(x) / sqrt(P).
    rng = np.random.default_rng(2)
    prompts = 400
    a = _points([0.0, 1.0], [0.0, 0.0], prompts=prompts)
    a.rewards[:] = rng.normal(0, 0.3, size=a.rewards.shape)
    b = _points([0.0, 1.0], [0.0, 0.0], prompts=prompts)
    x = (a.rewards[0, 0] + a.rewards[1, 0]) / 2
    result = compare(a, b, resamples=2000)
    assert result["mean"] == pytest.approx(float(x.mean()))
    expected = 1.96 * float(np.std(x)) / math.sqrt(prompts)
    assert (result["high"] - result["low"]) / 2 == pytest.approx(expected, rel=0.15)


def test_points_from_stored_samples_are_per_prompt_means_and_bad_shapes_are_refused():
    points = MethodPoints.from_samples(["a"], [[[[0.1, 0.3], [0.5, 0.5]]]], [[[[1.0, 2.0], [0.0, 0.0]]]])
    assert points.rewards.tolist() == [[[pytest.approx(0.2), 0.5]]] and points.kls.tolist() == [[[1.5, 0.0]]]
    with pytest.raises(ValueError, match="points, seeds, prompts"):
        MethodPoints(("a",), np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="one per point"):
        MethodPoints(("a", "b"), np.zeros((1, 1, 1)), np.zeros((1, 1, 1)))
    with pytest.raises(ValueError, match="same seeds and prompts"):
        compare(_points([0, 1], [0, 0], prompts=2), _points([0, 1], [0, 0], prompts=3))
