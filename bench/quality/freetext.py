"""Free-text scoring of one model on (prompt ids, response ids) of its own tokenizer: sampled continuations and
real text rather than prepared pairs. The service evaluates prepared pairs (``ctpd_core.evaluate``); only the
quality benchmark scores free text, so this lives here. The batch loop is the core's
(:func:`ctpd_core.inference.batched`)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ctpd_core.batching import SideBatch, collate_side, response_logprobs
from ctpd_core.inference import autocast_context, batched
from ctpd_core.logprobs import model_label_kl
from ctpd_core.observe import StopToken


def _sequence_batches(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int,
    stop: StopToken | None,
) -> Iterator[tuple[SideBatch, list[int]]]:
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    pairs = list(zip(prompt_ids, response_ids, strict=True))
    for batch in batched(pairs, batch_size, stage="score", stop=stop):
        sequences = [np.asarray(list(p) + list(r), dtype=np.int64) for p, r in batch]
        spans = [np.arange(len(r), dtype=np.int64) for _, r in batch]  # one span per token: no alignment here
        yield collate_side(sequences, [len(p) for p, _ in batch], spans, pad_id), [len(r) for _, r in batch]


@torch.inference_mode()
def sequence_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    stop: StopToken | None = None,
) -> list[np.ndarray]:
    """Per-token log-probs of each response given its prompt (an empty response gives an empty array). A fired
    ``stop`` raises :class:`~ctpd_core.observe.Stopped` between batches."""
    model.eval()
    out: list[np.ndarray] = []
    for batch, lengths in _sequence_batches(prompt_ids, response_ids, pad_id, batch_size, stop):
        batch = batch.to(device)
        with autocast_context(device, precision):
            logps = response_logprobs(model, batch).float().cpu().numpy()  # [b, R]
        out += [logps[i, :n].astype(np.float64) for i, n in enumerate(lengths)]
    return out


@torch.inference_mode()
def sequence_kl(
    model: nn.Module,
    reference_model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    stop: StopToken | None = None,
) -> np.ndarray:
    """Σ over response positions of the exact KL(model ‖ reference_model) of the next-token distributions,
    one value per response. On the model's own samples this is the sequence-level KL of the DPO paper's
    reward-KL frontier, without the variance of a log-ratio estimate."""
    model.eval()
    reference_model.eval()
    out: list[float] = []
    for batch, _ in _sequence_batches(prompt_ids, response_ids, pad_id, batch_size, stop):
        batch = batch.to(device)
        with autocast_context(device, precision):
            kl = model_label_kl(model, reference_model, batch.input_ids, batch.attention_mask, batch.labels)  # [b, T]
        out += kl.sum(dim=1).double().cpu().tolist()
    return np.asarray(out, dtype=np.float64)


def bits_per_byte(token_logps: Sequence[np.ndarray], texts: Sequence[str]) -> float:
    """−Σ log p / (ln 2 · UTF-8 bytes): comparable across tokenizers (nanochat's ``evaluate_bpb``)."""
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return -sum(float(np.sum(lp)) for lp in token_logps) / (math.log(2) * max(total_bytes, 1))
