"""bench.quality.stats: the numbers the verdict is made of."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.quality.stats import distinct_ngrams, paired_difference, preference_accuracy, summarize, win_rate


def test_win_rate_counts_every_sample_pair_per_prompt_and_ties_half():
    # prompt 1: 0.9 beats both of 0.1/0.5, 0.1 loses to 0.5 and ties 0.1 -> (1 + 1 + 0.5 + 0) / 4
    # prompt 2: all equal -> 0.5
    assert win_rate([[0.9, 0.1], [0.0, 0.0]], [[0.1, 0.5], [0.0, 0.0]]) == pytest.approx((0.625 + 0.5) / 2)


def test_win_rate_is_antisymmetric_and_half_against_itself():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)).round(1).tolist(), rng.normal(size=(5, 4)).round(1).tolist()
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)
    assert win_rate(a, a) == pytest.approx(0.5)


def test_win_rate_refuses_models_sampled_on_other_prompts():
    with pytest.raises(ValueError, match="not sampled alike"):
        win_rate([[0.1]], [[0.1], [0.2]])


def test_preference_accuracy_counts_ties_half_so_an_untrained_model_scores_one_half():
    assert preference_accuracy(np.zeros(4), np.zeros(4)) == 0.5
    assert preference_accuracy(np.array([1.0, 0.0, -1.0]), np.array([0.0, 0.0, 0.0])) == pytest.approx(0.5)
    assert preference_accuracy(np.array([2.0, 3.0]), np.array([1.0, 1.0])) == 1.0


def test_summarize_gives_the_t_interval_over_seeds():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    assert s["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    one = summarize([0.4])
    assert one["std"] == 0.0 and math.isnan(one["ci95"])


def test_paired_difference_pairs_by_seed_and_counts_the_seeds_in_favour():
    d = paired_difference([0.3, 0.1, 0.2], [0.1, 0.2, 0.0])
    assert d["values"] == pytest.approx([0.2, -0.1, 0.2])
    assert d["seeds_better"] == 2
    with pytest.raises(ValueError):
        paired_difference([0.1], [0.1, 0.2])


def test_distinct_ngrams_shows_a_collapse():
    assert distinct_ngrams(["a b c", "d e f"], 2) == 1.0
    assert distinct_ngrams(["a b a b a b"], 2) == pytest.approx(2 / 5)
    assert distinct_ngrams([""], 2) == 0.0
