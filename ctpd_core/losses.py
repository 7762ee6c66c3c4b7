"""DPO, TIS-DPO and CTPD losses: one weighted Bradley–Terry objective on three kinds of units.

All three are ``mean(−log σ(β · (r_chosen − r_rejected)))`` with an implicit reward
``r = Σ_u w_u · (log π_θ(u) − log π_ref(u))`` summed over units u:

=========  ===================================  ==========================  ===============================
loss       unit u                               reference                   weights w_u
=========  ===================================  ==========================  ===============================
DPO        the whole response (sequence sum)    student SFT                 1
TIS-DPO    student token (method §8)            student SFT                 per token, from student π⁺/π⁻
CTPD       aligned span (method §5.1)           frozen SFT **teacher**      per span, from teacher π⁺/π⁻
=========  ===================================  ==========================  ===============================

so they share one private core and differ only in how their inputs are shaped and masked. Reference
log-probs and weights are constants: the core detaches them, so gradients reach the policy only. No label
smoothing, SFT term or KL term (TIS-DPO's optional ``token_level`` KL is off, as in the paper's runs).

Every loss returns ``(loss, stats)``: ``loss`` is a scalar; ``stats`` holds detached tensors:
``chosen_rewards`` / ``rejected_rewards`` [B] (β · weighted log-ratio), ``logits`` [B] (their difference),
``losses`` [B] (per-example loss), ``reward_accuracy`` and ``reward_margin`` (scalars).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _validate_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}; the paper uses 0.1.")


def _validate_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; they must match."
        )


def _validate_float(name: str, tensor: torch.Tensor, dim: int) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != dim:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        dtype = tensor.dtype if isinstance(tensor, torch.Tensor) else None
        expected = "[B]" if dim == 1 else "[B, N]"
        raise ValueError(f"{name} must be a float tensor {expected}, got {shape} of dtype {dtype}.")


def _validate_pair(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    dim: int,
) -> None:
    _validate_float("policy_chosen", policy_chosen, dim)
    _validate_float("policy_rejected", policy_rejected, dim)
    _validate_float("reference_chosen", reference_chosen, dim)
    _validate_float("reference_rejected", reference_rejected, dim)
    _validate_same_shape("policy_chosen", policy_chosen, "reference_chosen", reference_chosen)
    _validate_same_shape("policy_rejected", policy_rejected, "reference_rejected", reference_rejected)
    if policy_chosen.shape[0] != policy_rejected.shape[0]:
        raise ValueError(
            f"chosen batch size {policy_chosen.shape[0]} != rejected batch size {policy_rejected.shape[0]}; "
            "each chosen response needs its rejected partner."
        )
    if policy_chosen.shape[0] == 0:
        raise ValueError("the batch is empty (B = 0); the loss is a mean over pairs and needs at least one.")


def _weighted_log_ratio(policy: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_u w_u (policy_u − reference_u)`` over the last axis; units with weight 0 are dropped entirely.

    Dropping (``where``) rather than multiplying by 0 keeps padded units harmless even when their log-probs
    are non-finite. Reference and weights are detached: they are constants of the objective.
    """
    dtype = torch.promote_types(policy.dtype, torch.float32)
    weights = weights.detach().to(dtype)  # [B, N]
    terms = weights * (policy.to(dtype) - reference.detach().to(dtype))  # [B, N]
    return torch.where(weights != 0, terms, 0.0).sum(dim=-1)  # [B]


def _preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_weights: torch.Tensor,
    rejected_weights: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The shared weighted Bradley–Terry core; inputs are ``[B, N]`` units (N may differ chosen/rejected)."""
    chosen_log_ratio = _weighted_log_ratio(policy_chosen, reference_chosen, chosen_weights)  # [B]
    rejected_log_ratio = _weighted_log_ratio(policy_rejected, reference_rejected, rejected_weights)  # [B]
    logits = beta * (chosen_log_ratio - rejected_log_ratio)  # [B]
    losses = -F.logsigmoid(logits)  # [B]
    chosen_rewards = (beta * chosen_log_ratio).detach()  # [B]
    rejected_rewards = (beta * rejected_log_ratio).detach()  # [B]
    stats = {
        "chosen_rewards": chosen_rewards,  # [B]
        "rejected_rewards": rejected_rewards,  # [B]
        "logits": logits.detach(),  # [B]
        "losses": losses.detach(),  # [B]
        "reward_accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),  # []
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),  # []
    }
    return losses.mean(), stats


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023): ``mean(−log σ(β[(π_θ − π_ref)(y_w) − (π_θ − π_ref)(y_l)]))``.

    Args:
        policy_chosen, policy_rejected: ``[B]`` sequence log-probs of the policy (sum over response tokens).
        reference_chosen, reference_rejected: ``[B]`` sequence log-probs of the reference (constants).
        beta: inverse temperature β > 0 (paper: 0.1).

    Returns:
        ``(loss, stats)``; see the module docstring for ``stats``.
    """
    _validate_beta(beta)
    _validate_pair(policy_chosen, policy_rejected, reference_chosen, reference_rejected, dim=1)
    ones = torch.ones_like(policy_chosen).unsqueeze(1)  # [B, 1]
    return _preference_loss(
        policy_chosen.unsqueeze(1),  # [B, 1]
        policy_rejected.unsqueeze(1),  # [B, 1]
        reference_chosen.unsqueeze(1),  # [B, 1]
        reference_rejected.unsqueeze(1),  # [B, 1]
        ones,
        ones,
        beta,
    )


def tisdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_weights: torch.Tensor,
    rejected_weights: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TIS-DPO (Liu et al. 2025; method §8), token-level weighted DPO, ``token_level`` KL term off.

    ``loss = mean(−log σ(β[Σ_t m_t w_t Δ_t(y_w) − Σ_t m_t w_t Δ_t(y_l)]))`` with
    ``Δ_t = log π_θ(y_t | ·) − log π_ref(y_t | ·)`` on the student's own tokens.

    Args:
        policy_chosen, policy_rejected: ``[B, T_w]`` / ``[B, T_l]`` per-token policy log-probs.
        reference_chosen, reference_rejected: same shapes, per-token reference log-probs (constants).
        chosen_weights, rejected_weights: same shapes, per-token weights (constants; e.g. from
            :func:`ctpd_core.weights.span_weights` applied to single-token spans).
        chosen_mask, rejected_mask: same shapes, bool, True on response tokens; False positions are ignored
            whatever their log-probs or weights hold.
        beta: β > 0.

    Returns:
        ``(loss, stats)``; see the module docstring for ``stats``.
    """
    _validate_beta(beta)
    _validate_pair(policy_chosen, policy_rejected, reference_chosen, reference_rejected, dim=2)
    for side, policy, weights, mask in (
        ("chosen", policy_chosen, chosen_weights, chosen_mask),
        ("rejected", policy_rejected, rejected_weights, rejected_mask),
    ):
        _validate_float(f"{side}_weights", weights, 2)
        _validate_same_shape(f"policy_{side}", policy, f"{side}_weights", weights)
        _validate_same_shape(f"policy_{side}", policy, f"{side}_mask", mask)
        if mask.dtype != torch.bool:
            raise ValueError(f"{side}_mask must be a bool tensor, got {mask.dtype}; use mask.bool().")
    return _preference_loss(
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        torch.where(chosen_mask, chosen_weights.detach(), 0.0),  # [B, T_w]
        torch.where(rejected_mask, rejected_weights.detach(), 0.0),  # [B, T_l]
        beta,
    )


def ctpd_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_weights: torch.Tensor,
    rejected_weights: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CTPD (method §5.1): span-weighted DPO with the frozen SFT teacher as the reference.

    ``margin = Σ_k w_k (log π_θ(p^k) − log π_T(p^k))`` per response, where the student and teacher span
    log-probs are each summed over their own tokens of the same aligned span;
    ``loss = mean(−log σ(β (margin_w − margin_l)))``.

    Args:
        policy_chosen, policy_rejected: ``[B, K_w]`` / ``[B, K_l]`` student span log-probs.
        reference_chosen, reference_rejected: same shapes, teacher span log-probs (constants).
        chosen_weights, rejected_weights: same shapes, span weights (constants), **0 on padding spans**:
            spans with weight 0 drop out, whatever their log-probs hold.
        beta: β > 0 (paper: 0.1).

    Returns:
        ``(loss, stats)``; see the module docstring for ``stats``.
    """
    _validate_beta(beta)
    _validate_pair(policy_chosen, policy_rejected, reference_chosen, reference_rejected, dim=2)
    _validate_float("chosen_weights", chosen_weights, 2)
    _validate_float("rejected_weights", rejected_weights, 2)
    _validate_same_shape("policy_chosen", policy_chosen, "chosen_weights", chosen_weights)
    _validate_same_shape("policy_rejected", policy_rejected, "rejected_weights", rejected_weights)
    return _preference_loss(
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        chosen_weights,
        rejected_weights,
        beta,
    )
