"""Span weights: hand-computed values, clamp bounds, padding, ablation modes, validation."""

from __future__ import annotations

import math

import pytest
import torch

from ctpd_core.weights import random_span_weights, span_weights, uniform_span_weights

# Δ = positive − negative per span: 2.0 (above U = 1.5), −1.0 (below L = −0.5), 0.3 (inside), 0 (padding).
POSITIVE = torch.tensor([[-1.0, -3.0, -2.2, 0.0]])  # [B, K]
NEGATIVE = torch.tensor([[-3.0, -2.0, -2.5, 0.0]])  # [B, K]


def test_chosen_weights_hand_computed_with_both_clamp_bounds() -> None:
    got = span_weights(POSITIVE, NEGATIVE, True)
    expected = torch.tensor([[math.exp(1.5), math.exp(-0.5), math.exp(0.3), math.exp(0.0)]])
    torch.testing.assert_close(got, expected)


def test_rejected_weights_hand_computed_with_both_clamp_bounds() -> None:
    got = span_weights(POSITIVE, NEGATIVE, False)
    expected = torch.tensor([[math.exp(-1.5), math.exp(0.5), math.exp(-0.3), math.exp(0.0)]])
    torch.testing.assert_close(got, expected)


def test_custom_bounds_and_scale() -> None:
    got = span_weights(POSITIVE, NEGATIVE, True, lower=-0.2, upper=0.25, scale=2.0)
    expected = 2.0 * torch.tensor([[math.exp(0.25), math.exp(-0.2), math.exp(0.25), 1.0]])
    torch.testing.assert_close(got, expected)


def test_padding_gets_zero_weight_even_with_garbage_logps() -> None:
    positive = torch.tensor([[-1.0, float("nan")], [0.5, float("inf")]])
    negative = torch.tensor([[-1.0, 0.0], [0.0, float("-inf")]])
    span_mask = torch.tensor([[True, False], [True, False]])
    got = span_weights(positive, negative, True, span_mask=span_mask)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0], [math.exp(0.5), 0.0]]))


def test_per_example_is_chosen_tensor() -> None:
    positive = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    negative = torch.zeros(2, 2)
    got = span_weights(positive, negative, torch.tensor([True, False]))
    expected = torch.tensor([[math.exp(1.0), math.exp(-0.5)], [math.exp(-1.0), math.exp(0.5)]])
    torch.testing.assert_close(got, expected)


def test_weights_are_detached_float32() -> None:
    positive = torch.tensor([[0.1, 0.2]], dtype=torch.float16, requires_grad=True)
    negative = torch.zeros(1, 2, dtype=torch.float16, requires_grad=True)
    got = span_weights(positive, negative, True)
    assert got.dtype == torch.float32
    assert not got.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lower": 1.0, "upper": 1.0}, "lower must be < upper"),
        ({"lower": 2.0, "upper": 1.0}, "lower must be < upper"),
        ({"scale": 0.0}, "scale must be > 0"),
        ({"scale": -1.0}, "scale must be > 0"),
        ({"upper": float("nan")}, "finite"),
    ],
)
def test_bad_hyperparameters_raise(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        span_weights(POSITIVE, NEGATIVE, True, **kwargs)


def test_bad_shapes_and_types_raise() -> None:
    with pytest.raises(ValueError, match="same shape"):
        span_weights(POSITIVE, NEGATIVE[:, :2], True)
    with pytest.raises(ValueError, match="span_mask shape"):
        span_weights(POSITIVE, NEGATIVE, True, span_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        span_weights(POSITIVE, NEGATIVE, True, span_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="is_chosen"):
        span_weights(POSITIVE, NEGATIVE, torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        span_weights(POSITIVE, NEGATIVE, torch.tensor([True, False]))


def test_uniform_weights() -> None:
    span_mask = torch.tensor([[True, True, False], [True, False, False]])
    got = uniform_span_weights(span_mask)
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="bool tensor"):
        uniform_span_weights(span_mask.float())


def test_random_weights_are_seeded_in_range_and_zero_on_padding() -> None:
    span_mask = torch.ones(8, 50, dtype=torch.bool)
    span_mask[:, 40:] = False
    first = random_span_weights(span_mask, seed=123)
    torch.manual_seed(999)  # the global RNG plays no part
    again = random_span_weights(span_mask, seed=123)
    other = random_span_weights(span_mask, seed=124)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    real = first[span_mask]
    assert real.min() >= 0.7
    assert real.max() <= 1.3
    assert real.max() - real.min() > 0.4  # actually spread over the range
    assert torch.all(first[~span_mask] == 0.0)
    assert first.dtype == torch.float32


def test_random_weights_custom_range_and_validation() -> None:
    span_mask = torch.ones(2, 30, dtype=torch.bool)
    got = random_span_weights(span_mask, seed=0, low=2.0, high=3.0)
    assert got.min() >= 2.0
    assert got.max() <= 3.0
    with pytest.raises(ValueError, match="low < high"):
        random_span_weights(span_mask, seed=0, low=1.3, high=0.7)
    with pytest.raises(ValueError, match="low < high"):
        random_span_weights(span_mask, seed=0, low=-0.1, high=0.7)
    with pytest.raises(ValueError, match="seed"):
        random_span_weights(span_mask, seed=1.5)  # type: ignore[arg-type]
