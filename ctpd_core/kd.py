"""The paper's SFT and knowledge-distillation baselines as training losses (method §8), for ``fit()``.

Three methods train the student on the **chosen** responses only, as the paper's KD baselines do:

=======  ========================================================================  ===========================
method   loss of one micro-batch                                                   teacher
=======  ========================================================================  ===========================
``sft``  token-mean NLL of the chosen responses (EOS included when it is a span)   none
``uld``  ``(1−κ)·NLL + κ·mean ULD`` over aligned positions (Boizard et al. 2024)  frozen, run live, no grad
``dskd`` ``ctpd_core.dskd.dskd_loss`` (Dual-Space KD, Zhang et al. 2024)          frozen; its projector trains
=======  ========================================================================  ===========================

**ULD** compares two next-token distributions over *different* vocabularies by sorting each one's
probabilities in descending order, zero-padding the shorter vocabulary and taking the L1 distance, the
closed form of the Wasserstein-1 distance between the two sorted distributions (it ignores which token
carries which probability, which is what makes it tokenizer-agnostic). No temperature (T = 1), as in the ULD
paper. Which student position is compared with which teacher position is :func:`aligned_positions`:

* ``"position"`` (the ULD paper's): both responses aligned by their first answer token, token j against j.
* ``"span"`` (ours, the default): the positions that predict the first token of each aligned span. At a span
  boundary both models have read exactly the same text (prompt + the response bytes before the span), so
  their next-token distributions describe the same event; position j drifts as soon as the two tokenizers
  split a word differently.

The student's CE term is :func:`sft_loss` in every method (one code path), so ``κ = 0`` is exactly SFT.
Logits exist only at the positions a term needs: the final hidden states are computed once and the LM head
(with Gemma's ``final_logit_softcapping``) is applied to the selected rows, a chunk at a time, in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import torch
from torch import nn

from ctpd_core.batching import SideBatch
from ctpd_core.inference import collate_responses
from ctpd_core.logprobs import _final_hidden_and_head, _run_chunk, head_logits, label_logprobs_from_hidden
from ctpd_core.records import Side, TrainItem

if TYPE_CHECKING:  # pipeline may come to import this module; the alias is only a type
    from ctpd_core.dskd import DualSpaceStudent
    from ctpd_core.pipeline import LossFn

KdMethod = Literal["sft", "uld", "dskd"]
UldAlignment = Literal["span", "position"]

ULD_CHUNK_SIZE = 128
"""Aligned positions per ULD chunk. Sorting keeps int64 indices beside the fp32 probabilities, and both
models' rows are sorted, so a chunk costs about ``chunk × (V_s + V_t) × 12`` bytes: 0.6 GiB for Gemma-3's
V = 262,144 against Llama-3's 128,256. Chunks run under activation checkpointing, so backward holds one."""


@dataclass(frozen=True)
class KdConfig:
    """The KD baselines' hyperparameters (method §8), validated on construction."""

    kappa: float = 0.5  # weight of the distillation term: (1−κ)·CE + κ·KD (paper: 0.5)
    temperature: float = 2.0  # DSKD's KL temperature (ULD uses none: T = 1, as the ULD paper)
    uld_alignment: UldAlignment = "span"

    def __post_init__(self) -> None:
        _validate_kappa(self.kappa)
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not math.isfinite(
            temperature
        ) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; the paper uses 2.0.")
        _validate_alignment(self.uld_alignment)


def _validate_kappa(kappa: float) -> None:
    if isinstance(kappa, bool) or not isinstance(kappa, int | float) or not 0.0 <= kappa <= 1.0:
        raise ValueError(
            f"kappa must be a number in [0, 1] (the weight of the distillation term), got {kappa!r}; "
            "the paper uses 0.5, and 0 is plain SFT."
        )


def _validate_alignment(alignment: str) -> None:
    if alignment not in get_args(UldAlignment):
        raise ValueError(
            f"uld_alignment must be one of {get_args(UldAlignment)}, got {alignment!r}: 'span' compares the "
            "positions that start each aligned span, 'position' response token j against token j."
        )


# ---------------------------------------------------------------------------------------------- SFT


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean NLL: ``−Σ_{b,j} m_bj · log p_bj / Σ m_bj`` over every response token of the micro-batch.

    Args:
        token_logps: ``[B, R]`` log-probs of the chosen response tokens (response-aligned, EOS included when
            it is a span: :func:`ctpd_core.batching.response_logprobs`).
        mask: ``[B, R]`` bool, True on response tokens; other entries are ignored whatever they hold.

    Returns:
        ``(loss, {"nll": loss.detach()})``.
    """
    if not isinstance(token_logps, torch.Tensor) or not token_logps.is_floating_point() or token_logps.dim() != 2:
        shape = tuple(token_logps.shape) if isinstance(token_logps, torch.Tensor) else type(token_logps).__name__
        raise ValueError(f"token_logps must be a float tensor [B, R], got {shape}.")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(token_logps.shape):
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"mask must be a bool tensor of token_logps' shape {tuple(token_logps.shape)}, got {got}; "
            "pass the batch's response_mask."
        )
    count = mask.sum()
    if int(count) == 0:
        raise ValueError("the mask selects no response token; the NLL is a mean over tokens and needs one.")
    # where, not a product: a non-finite value on a padded entry must not reach the sum.
    nll = -torch.where(mask, token_logps.float(), 0.0).sum() / count  # []
    return nll, {"nll": nll.detach()}


# ---------------------------------------------------------------------------------------------- ULD


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:  # [N]
    """ULD per position: ``Σ_i |sort↓(p_s)_i − sort↓(p_t)_i|``, the shorter vocabulary zero-padded.

    Args:
        student_logits: ``[N, V_s]`` logits (any float dtype; softmax and sort run in fp32).
        teacher_logits: ``[N, V_t]`` logits of the same N positions; **detached** (a constant of the loss).

    Returns:
        ``[N]`` float32 distances in ``[0, 2]``, differentiable with respect to ``student_logits``.
    """
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{name} must be a float tensor [N, V], got {shape}.")
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"student_logits has {student_logits.shape[0]} positions but teacher_logits "
            f"{teacher_logits.shape[0]}; gather both at the same aligned positions (aligned_positions)."
        )
    student_sorted = torch.softmax(student_logits.float(), dim=-1).sort(dim=-1, descending=True).values  # [N, V_s]
    teacher_sorted = torch.softmax(teacher_logits.detach().float(), dim=-1).sort(dim=-1, descending=True).values
    # Zero padding, without allocating it: past the shorter vocabulary |p − 0| = p, so the longer side's tail
    # adds its own mass.
    shared = min(student_sorted.shape[1], teacher_sorted.shape[1])
    head = (student_sorted[:, :shared] - teacher_sorted[:, :shared]).abs().sum(dim=-1)  # [N]
    tail = student_sorted[:, shared:].sum(dim=-1) + teacher_sorted[:, shared:].sum(dim=-1)  # [N]
    return head + tail


def _kd_mix(
    ce_logps: torch.Tensor, mask: torch.Tensor, distances: torch.Tensor, kappa: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(1−κ)·sft_loss + κ·mean(distances)``; a mean over no position contributes 0."""
    nll, stats = sft_loss(ce_logps, mask)
    uld = distances.float().sum() / max(distances.shape[0], 1)  # []
    loss = (1.0 - kappa) * nll + kappa * uld
    return loss, {**stats, "uld": uld.detach()}


def uld_loss(
    ce_logps: torch.Tensor,
    mask: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kappa: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ULD baseline: ``(1−κ)·NLL + κ·mean_n uld_distance_n`` (method §8, κ = 0.5).

    Args:
        ce_logps, mask: ``[B, R]`` student log-probs of the chosen response tokens and their bool mask
            (:func:`sft_loss`).
        student_logits, teacher_logits: ``[N, V_s]`` / ``[N, V_t]`` logits at the N aligned positions of the
            micro-batch (:func:`aligned_positions`); the teacher's are constants.
        kappa: κ in [0, 1].

    Returns:
        ``(loss, {"nll", "uld"})``: the student's token-mean NLL and the mean distance, detached.
    """
    _validate_kappa(kappa)
    return _kd_mix(ce_logps, mask, uld_distance(student_logits, teacher_logits), kappa)


# --------------------------------------------------------------------------------------- alignment


def _first_token_positions(batch: SideBatch, num_spans: int) -> torch.Tensor:  # [B, K]
    """The label position that predicts the first token of each span, -1 where a row lacks the span."""
    in_span = batch.token_span >= 0  # [B, R]
    absent = torch.iinfo(torch.long).max
    positions = torch.where(in_span, batch.label_positions, absent)  # [B, R]
    index = torch.where(in_span, batch.token_span, 0)  # [B, R]
    firsts = torch.full((positions.shape[0], num_spans), absent, dtype=torch.long, device=positions.device)
    # label positions grow with j, so the smallest one of a span is its first token's
    firsts = firsts.scatter_reduce(1, index, positions, reduce="amin")  # [B, K]
    return torch.where(firsts == absent, -1, firsts)


def aligned_positions(
    student: SideBatch, teacher: SideBatch, alignment: UldAlignment
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which student label position is compared with which teacher label position.

    * ``"position"``: response token j of the student against response token j of the teacher, for
      ``j < min(R_s, R_t)`` of each row (the ULD paper's first-answer-token alignment).
    * ``"span"``: for every aligned span k present on both sides of a row, the position that predicts the
      first token of span k on each side (both models have read the same text there).

    Args:
        student, teacher: the two tokenizations of the same responses, row b the same response on both.
        alignment: ``"span"`` or ``"position"``.

    Returns:
        ``(student_at, teacher_at)``, each ``[N, 2]`` long ``(row, position)`` pairs into the ``[B, T, ·]``
        layout of its side (``hidden[at[:, 0], at[:, 1]]``); row n of both is the same row, ordered by row and
        then by j or k.
    """
    _validate_alignment(alignment)
    batch_size = student.response_mask.shape[0]
    if teacher.response_mask.shape[0] != batch_size:
        raise ValueError(
            f"the student batch has {batch_size} rows but the teacher batch {teacher.response_mask.shape[0]}; "
            "collate the same responses on both sides."
        )
    if alignment == "position":
        width = min(student.response_mask.shape[1], teacher.response_mask.shape[1])
        both = student.response_mask[:, :width] & teacher.response_mask[:, :width]  # [B, W]
        rows, columns = both.nonzero(as_tuple=True)  # [N]
        student_positions = student.label_positions[rows, columns]  # [N]
        teacher_positions = teacher.label_positions[rows, columns]
    else:
        num_spans = max(student.num_spans, teacher.num_spans)
        student_firsts = _first_token_positions(student, num_spans)  # [B, K]
        teacher_firsts = _first_token_positions(teacher, num_spans)
        rows, spans = ((student_firsts >= 0) & (teacher_firsts >= 0)).nonzero(as_tuple=True)  # [N]
        student_positions = student_firsts[rows, spans]  # [N]
        teacher_positions = teacher_firsts[rows, spans]
    return torch.stack([rows, student_positions], dim=1), torch.stack([rows, teacher_positions], dim=1)


# ------------------------------------------------------------------------------------ the fit() loss


def _uld_of_hidden_chunk(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    student_softcap: float | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    teacher_softcap: float | None,
) -> torch.Tensor:  # [n]
    student_logits = head_logits(student_hidden, student_weight, student_bias, student_softcap)  # [n, V_s]
    with torch.no_grad():
        teacher_logits = head_logits(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap)  # [n, V_t]
    return uld_distance(student_logits, teacher_logits)


def _response_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None, batch: SideBatch
) -> torch.Tensor:  # [B, R]
    """What :func:`ctpd_core.batching.response_logprobs` gives, from hidden states already computed."""
    position_logps = label_logprobs_from_hidden(
        hidden, weight, batch.labels, output_bias=bias, final_logit_softcapping=softcap
    )  # [B, T]
    return torch.gather(position_logps, 1, batch.label_positions) * batch.response_mask  # [B, R]


def make_kd_loss(
    method: KdMethod,
    config: KdConfig,
    *,
    teacher: nn.Module | None,
    pad_ids: Mapping[Side, int],
    device: torch.device,
) -> LossFn:
    """The ``fit()`` loss of one micro-batch of :class:`TrainItem`, on the chosen responses only.

    * ``sft``: :func:`sft_loss` on the student's tokens; no teacher (passing one is refused: it would only
      hold memory).
    * ``uld``: the student's hidden states once, for the CE term (:func:`sft_loss`) and for its logits at the
      :func:`aligned_positions` of ``config.uld_alignment``; the teacher's under ``torch.no_grad`` at its
      aligned positions; ``(1−κ)·CE + κ·mean ULD``.
    * ``dskd``: ``ctpd_core.dskd.dskd_loss(model, teacher, student_batch, teacher_batch, kappa=,
      temperature=)``.

    The loss receives the plain model (fit wraps model and loss together on ranks) and uses its parts
    (``get_decoder()``, ``get_output_embeddings()``), never ``model(...)``. ``teacher`` must already be on
    ``device``; it is put in eval mode here. Stats (detached, per micro-batch): ``nll``; for ``uld`` also
    ``uld`` (mean distance) and ``aligned_positions`` (per response, a mean so that fit's share-weighted
    average stays one); ``tokens``, the student batch's token count (prompt included, as
    :func:`ctpd_core.pipeline.make_distill_loss` reports it), which fit sums.
    """
    if method not in get_args(KdMethod):
        raise ValueError(f"method must be one of {get_args(KdMethod)} for a KD loss, got {method!r}.")
    if not isinstance(config, KdConfig):
        raise ValueError(f"config must be a KdConfig, got {type(config).__name__}; build one with KdConfig(...).")
    if method == "sft" and teacher is not None:
        raise ValueError("method 'sft' trains on the chosen responses alone; pass teacher=None.")
    if method != "sft" and teacher is None:
        raise ValueError(f"method {method!r} distills a teacher; pass the frozen teacher model as teacher=.")
    sides: tuple[Side, ...] = ("student",) if method == "sft" else ("student", "teacher")
    for side in sides:
        pad = pad_ids.get(side)
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(
                f"pad_ids[{side!r}] must be a token id (int >= 0), got {pad!r}; use "
                "ctpd_core.inference.pad_token_id(tokenizer) of that side's tokenizer."
            )
    if teacher is not None:
        teacher.eval()  # a frozen teacher never trains: no dropout
    frozen_teacher = cast(nn.Module, teacher)  # not None for uld / dskd, the only methods that read it

    def batches(items: Sequence[TrainItem]) -> dict[Side, SideBatch]:
        chosen = [item.record.chosen for item in items]
        return {side: collate_responses(chosen, side, pad_ids[side]).to(device) for side in sides}

    def loss_fn(model: nn.Module, items: Sequence[TrainItem]) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = batches(items)
        student_batch = batch["student"]
        tokens = float(student_batch.attention_mask.sum())
        if method == "dskd":
            # Imported when used: sft and uld jobs never load DSKD's code.
            from ctpd_core.dskd import dskd_loss

            loss, stats = dskd_loss(
                cast("DualSpaceStudent", model), frozen_teacher, student_batch, batch["teacher"], kappa=config.kappa, temperature=config.temperature
            )
            return loss, {**stats, "tokens": tokens}

        hidden, weight, bias, softcap = _final_hidden_and_head(
            model, student_batch.input_ids, student_batch.attention_mask
        )  # hidden [B, T_s, H_s]
        token_logps = _response_token_logps(hidden, weight, bias, softcap, student_batch)  # [B, R_s]
        if method == "sft":
            loss, stats = sft_loss(token_logps, student_batch.response_mask)
            return loss, {**stats, "tokens": tokens}

        teacher_batch = batch["teacher"]
        student_at, teacher_at = aligned_positions(student_batch, teacher_batch, config.uld_alignment)  # [N, 2]
        with torch.no_grad():
            teacher_hidden, teacher_weight, teacher_bias, teacher_softcap = _final_hidden_and_head(
                frozen_teacher, teacher_batch.input_ids, teacher_batch.attention_mask
            )  # [B, T_t, H_t]
            teacher_selected = teacher_hidden[teacher_at[:, 0], teacher_at[:, 1]]  # [N, H_t]
        student_selected = hidden[student_at[:, 0], student_at[:, 1]]  # [N, H_s]
        single = student_selected.shape[0] <= ULD_CHUNK_SIZE
        pieces = [
            _run_chunk(
                _uld_of_hidden_chunk, student_chunk, weight, bias, softcap,
                teacher_chunk, teacher_weight, teacher_bias, teacher_softcap, single=single,
            )  # [n]
            for student_chunk, teacher_chunk in zip(
                student_selected.split(ULD_CHUNK_SIZE), teacher_selected.split(ULD_CHUNK_SIZE), strict=True
            )
        ]
        distances = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)  # [N]
        loss, stats = _kd_mix(token_logps, student_batch.response_mask, distances, config.kappa)
        aligned = student_at.shape[0] / len(items)
        return loss, {**stats, "aligned_positions": aligned, "tokens": tokens}

    return loss_fn
