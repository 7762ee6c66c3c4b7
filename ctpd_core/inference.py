"""Batched inference with frozen models: the one batch loop, with its progress, stop checks and precision.

Every stage that runs a model without training it goes through :func:`batched`: the reference and weights
stages' per-token log-probs (:func:`token_logprobs`), the held-out evaluation, and the benchmark's free-text
scoring and sampling. After each batch, the last one included, it reports progress and asks the stop token,
so a cancel is honoured between any two batches and never lets a stage run on into the next one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
from torch import nn

from ctpd_core.batching import SideBatch, collate_side, response_logprobs
from ctpd_core.observe import NeverStop, NullObserver, Observer, StopToken, check_stop, progress_of
from ctpd_core.records import PairRecord, ResponseRecord, Side, TokenLogprobs

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad, else its EOS, else 0 (padding is masked out anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """``"auto"`` is bf16 autocast on CUDA and fp32 on CPU; ``"bf16"`` autocasts anywhere; ``"fp32"`` never."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision={precision!r} needs bf16, which this GPU lacks; use precision='fp32'.")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """The forward-pass context of ``precision`` on ``device`` (bf16 autocast, or none), for inference too."""
    return autocast_factory(precision, device)()


def batched(
    items: Sequence[Item],
    batch_size: int,
    *,
    stage: str,
    observer: Observer | None = None,
    stop: StopToken | None = None,
) -> Iterator[Sequence[Item]]:
    """``items`` in consecutive batches of ``batch_size``, in order. Once the caller is done with a batch (when
    it asks for the next one, or the loop ends) progress is reported in items and the stop token asked: a
    stop raises :class:`~ctpd_core.observe.Stopped`, after the last batch too."""
    observer, stop = observer or NullObserver(), stop or NeverStop()
    started, total, done = time.monotonic(), len(items), 0
    for start in range(0, total, batch_size):
        batch = items[start : start + batch_size]
        yield batch
        done += len(batch)
        observer.progress(progress_of(stage, done, total, started))
        check_stop(stop, stage, done)


def collate_responses(responses: Sequence[ResponseRecord], side: Side, pad_id: int) -> SideBatch:
    """One padded batch of ``side``'s token ids of ``responses`` (prompt and response, spans attached)."""
    return collate_side(
        [r.ids(side) for r in responses],
        [r.prompt_length(side) for r in responses],
        [r.span(side) for r in responses],
        pad_id,
        num_spans=[r.num_spans for r in responses],
    )


def pair_responses(batch: Sequence[PairRecord]) -> list[ResponseRecord]:
    """The chosen responses of ``batch`` then its rejected ones: the row order of every pair batch."""
    return [r.chosen for r in batch] + [r.rejected for r in batch]


@torch.inference_mode()
def token_logprobs(
    model: nn.Module,
    records: Sequence[PairRecord],
    side: Side,
    pad_id: int,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    stage: str,
    observer: Observer | None = None,
    stop: StopToken | None = None,
) -> TokenLogprobs:
    """A frozen model's log-prob of every response token (no grad, inference mode, batched).

    Two passes, the chosen responses then the rejected ones, reported as ``<stage>:chosen`` and
    ``<stage>:rejected`` (the job's ``progress.detail``), so a client can say which half runs. A forward still
    holds ``2 * batch_size`` responses, as when a batch held both responses of ``batch_size`` pairs."""
    model.eval()
    values: dict[str, list[Any]] = {}
    for which in ("chosen", "rejected"):
        rows: list[Any] = []
        for batch in batched(records, 2 * batch_size, stage=f"{stage}:{which}", observer=observer, stop=stop):
            responses = [getattr(pair, which) for pair in batch]
            side_batch = collate_responses(responses, side, pad_id).to(device)
            with autocast_context(device, precision):
                logps = response_logprobs(model, side_batch).float().cpu().numpy()  # [2b, R]
            lengths = side_batch.response_mask.sum(dim=1).tolist()
            rows += [logps[i, : lengths[i]].copy() for i in range(len(responses))]
        values[which] = rows
    return TokenLogprobs(chosen=values["chosen"], rejected=values["rejected"])
