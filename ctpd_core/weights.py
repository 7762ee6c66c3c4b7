"""Span importance weights (method §4): TIS-DPO's importance weights, computed per aligned span.

Why: real preference data is noisy at the span level; TIS-DPO re-weights each unit by an estimate of its
reward, ``w = k · exp(μ · clamp(log π⁺ − log π⁻, L, U))``, with π⁺ / π⁻ the forward / reverse DPO
contrastive models. CTPD applies it to aligned spans, with π⁺ / π⁻ run on the **teacher** tokens and their
log-probs summed over each span (§4.2), so one weight per span serves both the teacher and the student.

All weights are constants of the CTPD loss: every function here returns detached tensors.

Deliberate difference from the authors' code: they round weights to 2 decimals and store them as float16;
we keep full float32 precision (rounding only adds quantisation noise, up to ±0.005 absolute).

The ablation modes of §4.3 are here too: :func:`uniform_span_weights` (w = 1, which turns CTPD into DPO with
the teacher as reference, §5.2) and :func:`random_span_weights` (U(0.7, 1.3) per span, seeded).
"""

from __future__ import annotations

import math

import torch

from ctpd_core.spec import WeightsSpec

# The paper's values, as the JobSpec's defaults (the one place they live), for callers that use this module
# without a spec.
DEFAULT_LOWER: float = WeightsSpec.model_fields["lower"].default
DEFAULT_UPPER: float = WeightsSpec.model_fields["upper"].default
DEFAULT_SCALE: float = WeightsSpec.model_fields["scale"].default
DEFAULT_RANDOM_LOW: float = WeightsSpec.model_fields["random_low"].default
DEFAULT_RANDOM_HIGH: float = WeightsSpec.model_fields["random_high"].default


def _validate_span_mask(span_mask: torch.Tensor, name: str = "span_mask") -> None:
    if span_mask.dtype != torch.bool or span_mask.dim() != 2:
        raise ValueError(
            f"{name} must be a bool tensor [B, K] (True on real spans), got dtype {span_mask.dtype} and "
            f"shape {tuple(span_mask.shape)}."
        )


def _chosen_sign(is_chosen: bool | torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """μ per example: +1.0 for chosen responses, -1.0 for rejected ones."""
    if isinstance(is_chosen, bool):
        return torch.full((batch_size, 1), 1.0 if is_chosen else -1.0, device=device)  # [B, 1]
    if not isinstance(is_chosen, torch.Tensor) or is_chosen.dtype != torch.bool:
        raise ValueError(
            f"is_chosen must be a bool or a bool tensor [B], got {type(is_chosen).__name__}"
            + (f" of dtype {is_chosen.dtype}" if isinstance(is_chosen, torch.Tensor) else "")
            + "; pass True/False or a torch.bool tensor."
        )
    if tuple(is_chosen.shape) != (batch_size,):
        raise ValueError(
            f"is_chosen tensor must have shape [B]=[{batch_size}], got {tuple(is_chosen.shape)}."
        )
    return torch.where(is_chosen, 1.0, -1.0).to(device=device, dtype=torch.float32).unsqueeze(1)  # [B, 1]


def span_weights(
    positive_span_logps: torch.Tensor,
    negative_span_logps: torch.Tensor,
    is_chosen: bool | torch.Tensor,
    lower: float = DEFAULT_LOWER,
    upper: float = DEFAULT_UPPER,
    scale: float = DEFAULT_SCALE,
    *,
    span_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CTPD span weights ``w_k = scale · exp(μ · clamp(Δ_k, lower, upper))`` (method §4.2).

    Args:
        positive_span_logps: ``[B, K]`` span log-probs under π⁺ (sums over the span's teacher tokens).
        negative_span_logps: ``[B, K]`` span log-probs under π⁻, same spans.
        is_chosen: μ = +1 for chosen responses, −1 for rejected; a bool for the whole batch or a bool
            tensor ``[B]`` per example.
        lower, upper: clamp bounds L < U of the log-ratio Δ = log π⁺ − log π⁻ (paper: −0.5, 1.5). With the
            defaults chosen weights lie in [e^−0.5, e^1.5] and rejected ones in [e^−1.5, e^0.5].
        scale: the normaliser k > 0 (paper: 1; no per-sequence normalisation).
        span_mask: optional ``[B, K]`` bool, True on real spans; padding gets weight 0 (so it drops out of
            the loss even if its log-probs are garbage).

    Returns:
        ``[B, K]`` float32 weights, detached, unrounded (the authors round to 2 decimals; we do not).
    """
    if tuple(positive_span_logps.shape) != tuple(negative_span_logps.shape) or positive_span_logps.dim() != 2:
        raise ValueError(
            f"positive_span_logps {tuple(positive_span_logps.shape)} and negative_span_logps "
            f"{tuple(negative_span_logps.shape)} must both be [B, K] with the same shape."
        )
    for name, value in (("lower", lower), ("upper", upper), ("scale", scale)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if not lower < upper:
        raise ValueError(
            f"lower must be < upper, got lower={lower}, upper={upper}; the paper uses -0.5 and 1.5."
        )
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}; the paper uses 1.0.")
    batch_size = positive_span_logps.shape[0]
    if span_mask is not None:
        _validate_span_mask(span_mask)
        if tuple(span_mask.shape) != tuple(positive_span_logps.shape):
            raise ValueError(
                f"span_mask shape {tuple(span_mask.shape)} must equal the span log-prob shape "
                f"{tuple(positive_span_logps.shape)}."
            )
    sign = _chosen_sign(is_chosen, batch_size, positive_span_logps.device)  # [B, 1]

    log_ratio = positive_span_logps.detach().float() - negative_span_logps.detach().float()  # [B, K]
    weights = scale * torch.exp(sign * log_ratio.clamp(min=lower, max=upper))  # [B, K]
    if span_mask is not None:
        weights = torch.where(span_mask, weights, 0.0)  # [B, K]
    return weights


def uniform_span_weights(span_mask: torch.Tensor) -> torch.Tensor:
    """Weight 1 on every real span, 0 on padding (ablation; CTPD then equals DPO with a teacher reference).

    Args:
        span_mask: ``[B, K]`` bool, True on real spans.

    Returns:
        ``[B, K]`` float32.
    """
    _validate_span_mask(span_mask)
    return span_mask.to(torch.float32)  # [B, K]


def random_span_weights(
    span_mask: torch.Tensor, *, seed: int, low: float = DEFAULT_RANDOM_LOW, high: float = DEFAULT_RANDOM_HIGH
) -> torch.Tensor:
    """Independent U(low, high) weights per real span, 0 on padding (the "random weight" ablation, §4.3).

    Draws from a private CPU ``torch.Generator`` seeded with ``seed``, so the result depends only on the seed
    and the mask shape (not on the global RNG or the device), then moves to ``span_mask``'s device.

    Args:
        span_mask: ``[B, K]`` bool, True on real spans.
        seed: RNG seed; derive it from the job seed and the batch/example index for reproducible runs.
        low, high: 0 <= low < high (authors' code: 0.7, 1.3).

    Returns:
        ``[B, K]`` float32.
    """
    _validate_span_mask(span_mask)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if not 0 <= low < high:
        raise ValueError(f"need 0 <= low < high, got low={low}, high={high}; the authors use 0.7 and 1.3.")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    uniform = torch.rand(tuple(span_mask.shape), generator=generator, dtype=torch.float32)  # [B, K]
    weights = (low + (high - low) * uniform).to(span_mask.device)  # [B, K]
    return torch.where(span_mask, weights, 0.0)  # [B, K]
