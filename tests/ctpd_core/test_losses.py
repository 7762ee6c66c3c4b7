"""Losses: hand-computed numbers, reward stats, the §5.2 identities, gradient flow, validation."""

from __future__ import annotations

import math

import pytest
import torch

from ctpd_core.logprobs import span_logprobs
from ctpd_core.losses import ctpd_loss, dpo_loss, tisdpo_loss
from ctpd_core.weights import uniform_span_weights


def neg_log_sigmoid(x: float) -> float:
    """−log σ(x) = log(1 + e^(−x)), written out by hand."""
    return math.log(1.0 + math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------- DPO


def test_dpo_hand_computed() -> None:
    # pair 0: chosen log-ratio −1 − (−2) = 1.0, rejected −3 − (−2.5) = −0.5 → logit 0.1 · 1.5 = 0.15
    # pair 1: chosen log-ratio −4 − (−3) = −1.0, rejected −1 − (−2) = 1.0 → logit 0.1 · (−2.0) = −0.2
    loss, stats = dpo_loss(t(-1.0, -4.0), t(-3.0, -1.0), t(-2.0, -3.0), t(-2.5, -2.0), beta=0.1)
    expected = (neg_log_sigmoid(0.15) + neg_log_sigmoid(-0.2)) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(stats["chosen_rewards"], t(0.1, -0.1))
    torch.testing.assert_close(stats["rejected_rewards"], t(-0.05, 0.1))
    torch.testing.assert_close(stats["logits"], t(0.15, -0.2))
    torch.testing.assert_close(stats["losses"], t(neg_log_sigmoid(0.15), neg_log_sigmoid(-0.2)))
    torch.testing.assert_close(stats["reward_accuracy"], torch.tensor(0.5))
    torch.testing.assert_close(stats["reward_margin"], torch.tensor((0.15 - 0.2) / 2))
    assert all(not value.requires_grad for value in stats.values())


def test_dpo_at_equal_policy_and_reference_is_log_2() -> None:
    logps = t(-1.0, -2.0, -3.0)
    loss, stats = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))
    torch.testing.assert_close(stats["reward_accuracy"], torch.tensor(0.0))  # ties are not wins


def test_dpo_gradient_hand_computed() -> None:
    # d loss / d policy_chosen_i = −β σ(−logit_i) / B, and the opposite for policy_rejected_i.
    policy_chosen = t(-1.0, -4.0).requires_grad_(True)
    policy_rejected = t(-3.0, -1.0).requires_grad_(True)
    loss, _ = dpo_loss(policy_chosen, policy_rejected, t(-2.0, -3.0), t(-2.5, -2.0), beta=0.1)
    loss.backward()
    sigmoid = [1.0 / (1.0 + math.exp(logit)) for logit in (0.15, -0.2)]  # σ(−logit)
    expected = t(*(-0.1 * s / 2 for s in sigmoid))
    torch.testing.assert_close(policy_chosen.grad, expected)
    torch.testing.assert_close(policy_rejected.grad, -expected)


# ------------------------------------------------------------------------------------------------- TIS-DPO


def test_tisdpo_hand_computed_with_masks() -> None:
    # chosen: mask drops token 0; margin = 2·(−1 − (−2)) + 1·(−2 − (−1)) = 2 − 1 = 1.0
    # rejected: mask drops token 1 (even its NaN); margin = 3·(−1 − (−0.5)) = −1.5
    # logit = 0.2 · (1.0 − (−1.5)) = 0.5
    loss, stats = tisdpo_loss(
        policy_chosen=torch.tensor([[-9.0, -1.0, -2.0]]),
        policy_rejected=torch.tensor([[-1.0, float("nan")]]),
        reference_chosen=torch.tensor([[-1.0, -2.0, -1.0]]),
        reference_rejected=torch.tensor([[-0.5, 0.0]]),
        chosen_weights=torch.tensor([[5.0, 2.0, 1.0]]),
        rejected_weights=torch.tensor([[3.0, 9.0]]),
        chosen_mask=torch.tensor([[False, True, True]]),
        rejected_mask=torch.tensor([[True, False]]),
        beta=0.2,
    )
    torch.testing.assert_close(loss, torch.tensor(neg_log_sigmoid(0.5)))
    torch.testing.assert_close(stats["chosen_rewards"], t(0.2))
    torch.testing.assert_close(stats["rejected_rewards"], t(-0.3))
    torch.testing.assert_close(stats["reward_accuracy"], torch.tensor(1.0))
    torch.testing.assert_close(stats["reward_margin"], torch.tensor(0.5))


# ---------------------------------------------------------------------------------------------------- CTPD


def test_ctpd_hand_computed_with_padding_span() -> None:
    # chosen: 2·(−1 − (−1.5)) + 0.5·(−2 − (−1)) + 0·(padding) = 1.0 − 0.5 = 0.5
    # rejected: 0.25·(−3 − (−2)) + 1.5·(−1 − (−2)) = −0.25 + 1.5 = 1.25
    # logit = 0.1 · (0.5 − 1.25) = −0.075
    loss, stats = ctpd_loss(
        policy_chosen=torch.tensor([[-1.0, -2.0, 0.0]]),
        policy_rejected=torch.tensor([[-3.0, -1.0]]),
        reference_chosen=torch.tensor([[-1.5, -1.0, 0.0]]),
        reference_rejected=torch.tensor([[-2.0, -2.0]]),
        chosen_weights=torch.tensor([[2.0, 0.5, 0.0]]),
        rejected_weights=torch.tensor([[0.25, 1.5]]),
        beta=0.1,
    )
    torch.testing.assert_close(loss, torch.tensor(neg_log_sigmoid(-0.075)))
    torch.testing.assert_close(stats["chosen_rewards"], t(0.05))
    torch.testing.assert_close(stats["rejected_rewards"], t(0.125))
    torch.testing.assert_close(stats["reward_accuracy"], torch.tensor(0.0))
    torch.testing.assert_close(stats["reward_margin"], torch.tensor(-0.075))


def random_response(
    generator: torch.Generator, num_tokens: int, num_spans: int, prompt: int, width: int
) -> torch.Tensor:
    """Span index per position: ``prompt`` × −1, ``num_tokens`` tokens cut into ``num_spans`` contiguous
    non-empty spans at random cut points, then −1 padding up to ``width``."""
    cuts = torch.randperm(num_tokens - 1, generator=generator)[: num_spans - 1].sort().values + 1
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([num_tokens])]))
    spans = torch.repeat_interleave(torch.arange(num_spans), lengths)
    return torch.cat([torch.full((prompt,), -1), spans, torch.full((width - prompt - num_tokens,), -1)])


def random_side(
    generator: torch.Generator, batch: int, num_spans: list[int], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Garbage-filled log-probs [B, width] and a random segmentation of each row's response into spans."""
    rows = []
    for b in range(batch):
        prompt = int(torch.randint(0, 4, (1,), generator=generator))
        num_tokens = int(torch.randint(num_spans[b], width - prompt + 1, (1,), generator=generator))
        rows.append(random_response(generator, num_tokens, num_spans[b], prompt, width))
    return -3 * torch.rand(batch, width, generator=generator), torch.stack(rows)


def in_span_sum(token_logps: torch.Tensor, token_span: torch.Tensor) -> torch.Tensor:
    return torch.where(token_span >= 0, token_logps, 0.0).sum(dim=1)  # [B]


@pytest.mark.parametrize("seed", range(12))
def test_uniform_ctpd_over_any_partition_equals_dpo_with_teacher_reference(seed: int) -> None:
    """Method §5.2: with w = 1 span sums telescope, so CTPD = DPO on sequence sums (teacher as reference),
    whatever the spans are and however differently the student and teacher tokenize them."""
    generator = torch.Generator().manual_seed(seed)
    batch = 3
    chosen_spans = [int(k) for k in torch.randint(1, 6, (batch,), generator=generator)]
    rejected_spans = [int(k) for k in torch.randint(1, 6, (batch,), generator=generator)]
    student_chosen, student_chosen_span = random_side(generator, batch, chosen_spans, width=14)
    student_rejected, student_rejected_span = random_side(generator, batch, rejected_spans, width=12)
    teacher_chosen, teacher_chosen_span = random_side(generator, batch, chosen_spans, width=10)
    teacher_rejected, teacher_rejected_span = random_side(generator, batch, rejected_spans, width=16)
    k_chosen, k_rejected = max(chosen_spans), max(rejected_spans)
    chosen_mask = torch.arange(k_chosen) < torch.tensor(chosen_spans).unsqueeze(1)  # [B, K_w]
    rejected_mask = torch.arange(k_rejected) < torch.tensor(rejected_spans).unsqueeze(1)  # [B, K_l]

    beta = 0.1 + seed / 10
    loss, stats = ctpd_loss(
        span_logprobs(student_chosen, student_chosen_span, k_chosen),
        span_logprobs(student_rejected, student_rejected_span, k_rejected),
        span_logprobs(teacher_chosen, teacher_chosen_span, k_chosen),
        span_logprobs(teacher_rejected, teacher_rejected_span, k_rejected),
        uniform_span_weights(chosen_mask),
        uniform_span_weights(rejected_mask),
        beta=beta,
    )
    expected_loss, expected_stats = dpo_loss(
        in_span_sum(student_chosen, student_chosen_span),
        in_span_sum(student_rejected, student_rejected_span),
        in_span_sum(teacher_chosen, teacher_chosen_span),
        in_span_sum(teacher_rejected, teacher_rejected_span),
        beta=beta,
    )
    torch.testing.assert_close(loss, expected_loss)
    for name in ("chosen_rewards", "rejected_rewards", "reward_accuracy", "reward_margin", "logits"):
        torch.testing.assert_close(stats[name], expected_stats[name], msg=name)


@pytest.mark.parametrize("seed", range(6))
def test_tisdpo_with_unit_weights_equals_dpo(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    batch = 4
    policy_chosen, chosen_span = random_side(generator, batch, [1] * batch, width=9)
    policy_rejected, rejected_span = random_side(generator, batch, [1] * batch, width=11)
    reference_chosen = -3 * torch.rand(batch, 9, generator=generator)
    reference_rejected = -3 * torch.rand(batch, 11, generator=generator)
    chosen_mask, rejected_mask = chosen_span >= 0, rejected_span >= 0
    loss, stats = tisdpo_loss(
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        torch.ones(batch, 9),
        torch.ones(batch, 11),
        chosen_mask,
        rejected_mask,
        beta=0.1,
    )
    expected_loss, expected_stats = dpo_loss(
        in_span_sum(policy_chosen, chosen_span),
        in_span_sum(policy_rejected, rejected_span),
        in_span_sum(reference_chosen, chosen_span),
        in_span_sum(reference_rejected, rejected_span),
        beta=0.1,
    )
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(stats["chosen_rewards"], expected_stats["chosen_rewards"])
    torch.testing.assert_close(stats["rejected_rewards"], expected_stats["rejected_rewards"])


def test_zero_weight_padding_spans_change_nothing() -> None:
    generator = torch.Generator().manual_seed(3)
    policy_chosen = (-torch.rand(2, 3, generator=generator)).requires_grad_(True)
    policy_rejected = (-torch.rand(2, 2, generator=generator)).requires_grad_(True)
    reference_chosen, reference_rejected = (
        -torch.rand(2, 3, generator=generator),
        -torch.rand(2, 2, generator=generator),
    )
    chosen_weights, rejected_weights = (
        torch.rand(2, 3, generator=generator) + 0.5,
        torch.rand(2, 2, generator=generator) + 0.5,
    )
    loss, stats = ctpd_loss(
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        chosen_weights,
        rejected_weights,
        0.1,
    )
    loss.backward()

    # Pad both sides with extra spans holding garbage log-probs and weight 0.
    garbage = torch.tensor([[float("nan"), 5.0], [float("-inf"), -2.0]])
    padded_policy_chosen = policy_chosen.detach().clone().requires_grad_(True)
    padded_policy_rejected = policy_rejected.detach().clone().requires_grad_(True)
    padded_loss, padded_stats = ctpd_loss(
        torch.cat([padded_policy_chosen, garbage], dim=1),
        torch.cat([padded_policy_rejected, garbage], dim=1),
        torch.cat([reference_chosen, garbage], dim=1),
        torch.cat([reference_rejected, garbage], dim=1),
        torch.cat([chosen_weights, torch.zeros(2, 2)], dim=1),
        torch.cat([rejected_weights, torch.zeros(2, 2)], dim=1),
        0.1,
    )
    padded_loss.backward()
    torch.testing.assert_close(padded_loss, loss)
    torch.testing.assert_close(padded_stats["chosen_rewards"], stats["chosen_rewards"])
    torch.testing.assert_close(padded_policy_chosen.grad, policy_chosen.grad)
    torch.testing.assert_close(padded_policy_rejected.grad, policy_rejected.grad)


# ----------------------------------------------------------------------------------------------- gradients


def leaf(values: list[list[float]] | list[float]) -> torch.Tensor:
    return torch.tensor(values).requires_grad_(True)


def assert_policy_only_gradients(policy: list[torch.Tensor], constants: list[torch.Tensor]) -> None:
    for tensor in policy:
        assert tensor.grad is not None
        assert tensor.grad.abs().sum() > 0
    for tensor in constants:
        assert tensor.grad is None


def test_gradients_reach_the_policy_only() -> None:
    policy = [leaf([[-1.0, -2.0]]), leaf([[-0.5, -3.0]])]
    reference = [leaf([[-1.5, -1.0]]), leaf([[-1.0, -2.0]])]
    weights = [leaf([[2.0, 0.5]]), leaf([[0.3, 1.2]])]
    loss, _ = ctpd_loss(*policy, *reference, *weights, beta=0.1)
    loss.backward()
    assert_policy_only_gradients(policy, reference + weights)

    policy = [leaf([[-1.0, -2.0]]), leaf([[-0.5, -3.0]])]
    reference = [leaf([[-1.5, -1.0]]), leaf([[-1.0, -2.0]])]
    weights = [leaf([[2.0, 0.5]]), leaf([[0.3, 1.2]])]
    masks = [torch.tensor([[True, True]]), torch.tensor([[True, False]])]
    loss, _ = tisdpo_loss(*policy, *reference, *weights, *masks, beta=0.1)
    loss.backward()
    assert_policy_only_gradients(policy, reference + weights)

    policy = [leaf([-1.0, -2.0]), leaf([-0.5, -3.0])]
    reference = [leaf([-1.5, -1.0]), leaf([-1.0, -2.0])]
    loss, _ = dpo_loss(*policy, *reference, beta=0.1)
    loss.backward()
    assert_policy_only_gradients(policy, reference)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_beta_raises(beta: object) -> None:
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), beta=beta)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        ctpd_loss(*(torch.zeros(1, 2),) * 6, beta=beta)  # type: ignore[arg-type]


def test_dpo_shape_errors() -> None:
    with pytest.raises(ValueError, match="reference_chosen"):
        dpo_loss(t(-1.0, -2.0), t(-2.0, -1.0), t(-1.0), t(-2.0, -1.0), beta=0.1)
    with pytest.raises(ValueError, match="batch size"):
        dpo_loss(t(-1.0, -2.0), t(-2.0), t(-1.0, -2.0), t(-2.0), beta=0.1)
    with pytest.raises(ValueError, match=r"\[B\]"):
        dpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), beta=0.1)
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(t(), t(), t(), t(), beta=0.1)
    with pytest.raises(ValueError, match="float"):
        dpo_loss(torch.tensor([1]), t(-1.0), t(-1.0), t(-1.0), beta=0.1)


def test_ctpd_shape_errors() -> None:
    ok = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="chosen_weights"):
        ctpd_loss(ok, ok, ok, ok, torch.zeros(2, 2), ok, beta=0.1)
    with pytest.raises(ValueError, match="reference_rejected"):
        ctpd_loss(ok, ok, ok, torch.zeros(2, 4), ok, ok, beta=0.1)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        ctpd_loss(torch.zeros(2), ok, ok, ok, ok, ok, beta=0.1)
    # Chosen and rejected may have different span counts.
    loss, _ = ctpd_loss(ok, torch.zeros(2, 5), ok, torch.zeros(2, 5), ok, torch.zeros(2, 5), beta=0.1)
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))


def test_tisdpo_mask_errors() -> None:
    ok = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool"):
        tisdpo_loss(ok, ok, ok, ok, ok, ok, torch.ones(1, 3), mask, beta=0.1)
    with pytest.raises(ValueError, match="rejected_mask"):
        tisdpo_loss(ok, ok, ok, ok, ok, ok, mask, torch.ones(1, 2, dtype=torch.bool), beta=0.1)
    with pytest.raises(ValueError, match="chosen_weights"):
        tisdpo_loss(ok, ok, ok, ok, torch.ones(1, 2), ok, mask, mask, beta=0.1)
