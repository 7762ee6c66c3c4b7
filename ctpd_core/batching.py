"""Padding encoded sequences into batches, and reading a model's log-probs back per response token.

The canonical per-response layout is **response-aligned**: column j of a ``[B, R]`` tensor is response
token j (the EOS last, when it is a span), padded on the right. Token log-probs, token spans and token
weights all use it, so span sums are one ``span_logprobs`` call and stored per-token arrays (reference
log-probs, TIS-DPO weights) line up with freshly computed ones without any bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ctpd_core.logprobs import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, NO_SPAN, model_label_logprobs


@dataclass(frozen=True)
class SideBatch:
    """One side (student or teacher) of a batch of responses, right-padded."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] shifted: labels[b, t] = input_ids[b, t + 1] on response tokens, else -100
    label_positions: torch.Tensor  # [B, R] position t whose label is response token j (0 on padding)
    response_mask: torch.Tensor  # [B, R] bool
    token_span: torch.Tensor  # [B, R] span of response token j, -1 on padding
    num_spans: int  # K: the largest span count in the batch

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    def to(self, device: torch.device | str) -> SideBatch:
        return SideBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            label_positions=self.label_positions.to(device),
            response_mask=self.response_mask.to(device),
            token_span=self.token_span.to(device),
            num_spans=self.num_spans,
        )


def collate_side(
    input_ids: Sequence[np.ndarray],
    prompt_lengths: Sequence[int],
    token_spans: Sequence[np.ndarray],
    pad_token_id: int,
    num_spans: Sequence[int] | None = None,
) -> SideBatch:
    """Pad sequences (prompt + response) into a :class:`SideBatch`.

    ``token_spans[b]`` has one entry per response token; the response is the last ``len(token_spans[b])``
    tokens of ``input_ids[b]``, starting at ``prompt_lengths[b]`` (which is >= 1: every response token is
    predicted from a previous position).
    """
    batch_size = len(input_ids)
    if batch_size == 0:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(ids) for ids in input_ids]
    response_lengths = [len(spans) for spans in token_spans]
    for length, prompt_length, response_length in zip(lengths, prompt_lengths, response_lengths, strict=True):
        if prompt_length < 1 or prompt_length + response_length != length:
            raise ValueError(
                f"inconsistent sequence: {length} tokens, prompt {prompt_length}, response {response_length}; "
                "every sequence needs at least one prompt token and prompt + response tokens"
            )
    max_length, max_response = max(lengths), max(max(response_lengths), 1)
    ids = torch.full((batch_size, max_length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch_size, max_length), dtype=torch.long)
    labels = torch.full((batch_size, max_length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((batch_size, max_response), dtype=torch.long)
    response_mask = torch.zeros((batch_size, max_response), dtype=torch.bool)
    spans = torch.full((batch_size, max_response), NO_SPAN, dtype=torch.long)
    for row, (sequence, prompt_length, span) in enumerate(zip(input_ids, prompt_lengths, token_spans, strict=True)):
        sequence_ids = torch.as_tensor(np.asarray(sequence), dtype=torch.long)  # [T_row]
        length, response_length = sequence_ids.shape[0], len(span)
        ids[row, :length] = sequence_ids
        mask[row, :length] = 1
        # Response token j sits at prompt_length + j and is predicted from the position before it.
        label_at = torch.arange(prompt_length - 1, prompt_length - 1 + response_length)
        labels[row, label_at] = sequence_ids[prompt_length:]
        positions[row, :response_length] = label_at
        response_mask[row, :response_length] = True
        spans[row, :response_length] = torch.as_tensor(np.asarray(span), dtype=torch.long)
    if num_spans is None:
        largest = int(spans.max()) + 1 if spans.numel() else 0
    else:
        largest = max(num_spans)
    return SideBatch(ids, mask, labels, positions, response_mask, spans, max(largest, 1))


def response_logprobs(
    model: nn.Module, batch: SideBatch, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:  # [B, R]
    """Log-prob of each response token under ``model``, response-aligned, 0.0 on padding."""
    position_logps = model_label_logprobs(
        model, batch.input_ids, batch.attention_mask, batch.labels, chunk_size=chunk_size
    )  # [B, T]
    token_logps = torch.gather(position_logps, 1, batch.label_positions)  # [B, R]
    return token_logps * batch.response_mask


def pad_ragged(arrays: Sequence[np.ndarray], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Right-pad 1-D arrays with zeros into a ``[B, max_len]`` tensor (stored per-token values)."""
    width = max(max((len(a) for a in arrays), default=0), 1)
    out = torch.zeros((len(arrays), width), dtype=dtype)
    for row, array in enumerate(arrays):
        out[row, : len(array)] = torch.as_tensor(np.asarray(array), dtype=dtype)
    return out
