"""The CTPD stages, each a function with explicit inputs and outputs (design.md, "One job, end to end").

prepare -> reference -> contrastive -> weights -> distill -> evaluate -> export

* **prepare**: encode every pair with both tokenizers (text truncation, prompt format, EOS span) and align
  spans; pairs that cannot be aligned, or whose response is empty after truncation, are dropped and counted.
* **reference**: a frozen model's log-prob of every response token on its own tokenization, computed once
  (inference mode, batched) and stored. For ``ctpd`` the reference is the teacher (method §5.1); for the
  ``dpo``/``tisdpo`` baselines it is the initial student. It runs before *contrastive* because the
  contrastive models are trained by DPO against that same frozen reference, so it is computed only once.
* **contrastive**: π+ by DPO and π− by DPO on pairs **swapped for real** (method §9.2: the authors' swap
  was a no-op), both initialised from the reference model.
* **weights**: span weights from π+ / π− on the *same side's* tokens (the teacher's for CTPD: method §9.1,
  the authors fed student tokens to teacher models), summed per span; or token weights for TIS-DPO.
* **distill**, **evaluate**, **export**: see :func:`make_distill_loss`, ``ctpd_core.evaluate`` and
  ``ctpd_core.export``.

Stage outputs are content-addressed and cached by ``worker/recipe.py`` (the one place a JobSpec becomes
these calls) through :class:`ctpd_core.artifacts.StageCache`. The records they hand on are in
``ctpd_core.records``; the frozen-model passes (reference, weights) in ``ctpd_core.inference``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ctpd_core.alignment import AlignmentError, alignment_stats, span_length_histogram
from ctpd_core.batching import SideBatch, pad_ragged, response_logprobs
from ctpd_core.data import PreferencePair
from ctpd_core.encoding import EncodingConfig, PairEncoder
from ctpd_core.inference import collate_responses, pair_responses
from ctpd_core.logprobs import span_logprobs
from ctpd_core.losses import ctpd_loss, dpo_loss, tisdpo_loss
from ctpd_core.observe import NeverStop, NullObserver, Observer, StopToken, check_stop, progress_of
from ctpd_core.records import PairRecord, PreparedData, ResponseRecord, Side, TokenLogprobs, TrainItem
from ctpd_core.vocab import Stage
from ctpd_core.weights import (
    DEFAULT_RANDOM_HIGH,
    DEFAULT_RANDOM_LOW,
    random_span_weights,
    span_weights,
    uniform_span_weights,
)

logger = logging.getLogger(__name__)

Granularity = Literal["span", "token", "sequence"]


# ----------------------------------------------------------------------------------------------- prepare


def prepare(
    train_pairs: Sequence[PreferencePair],
    validation_pairs: Sequence[PreferencePair],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    encoding: EncodingConfig,
    *,
    observer: Observer | None = None,
    stop: StopToken | None = None,
) -> PreparedData:
    """Encode and align every pair; returns the records and the alignment statistics. Progress is reported
    (and the stop token asked) every 64 pairs and after the last one."""
    observer, stop = observer or NullObserver(), stop or NeverStop()
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, encoding)
    total = len(train_pairs) + len(validation_pairs)
    done, started = 0, time.monotonic()
    splits: dict[str, list[PairRecord]] = {}
    dropped = {"unalignable": 0, "empty_response": 0}
    alignments = []
    truncated = 0
    for split, pairs in (("train", train_pairs), ("validation", validation_pairs)):
        records = []
        for pair in pairs:
            done += 1
            try:
                chosen, rejected = encoder.encode_responses(pair.prompt, [pair.chosen, pair.rejected],
                                                            messages=pair.messages)
            except AlignmentError as error:
                logger.warning("dropping a pair that cannot be aligned: %s", error)
                dropped["unalignable"] += 1
            else:
                if chosen.alignment.num_spans == 0 or rejected.alignment.num_spans == 0:
                    dropped["empty_response"] += 1
                else:
                    alignments += [chosen.alignment, rejected.alignment]
                    truncated += int(chosen.truncated) + int(rejected.truncated)
                    records.append(
                        PairRecord(ResponseRecord.from_encoded(chosen), ResponseRecord.from_encoded(rejected))
                    )
            # Also after a dropped pair: a dropped 64th (or last) pair must not skip the report and the stop.
            if done % 64 == 0 or done == total:
                observer.progress(progress_of(Stage.PREPARE, done, total, started))
                check_stop(stop, Stage.PREPARE, done)
        splits[split] = records
    if not splits["train"]:
        raise ValueError("no training pair survived encoding (all were unalignable or empty); check the dataset")
    stats = {
        "train_pairs": len(splits["train"]),
        "validation_pairs": len(splits["validation"]),
        "dropped": dropped,
        "truncated_responses": truncated,
        "alignment": alignment_stats(alignments),
        "span_length_histogram": span_length_histogram(alignments),  # the dashboard's histogram (bytes per span)
    }
    return PreparedData(train=splits["train"], validation=splits["validation"], stats=stats)


# ----------------------------------------------------------------------------------------------- weights


def contrastive_weights(
    records: Sequence[PairRecord],
    positive: TokenLogprobs,
    negative: TokenLogprobs,
    side: Side,
    granularity: Granularity,
    *,
    lower: float,
    upper: float,
    scale: float,
) -> TokenLogprobs:
    """Importance weights w = scale·exp(±clamp(log π+ − log π−, lower, upper)) (method §4.1–4.2).

    ``granularity="span"``: Δ is summed over each aligned span's tokens on ``side`` (CTPD); ``"token"``: one
    weight per token (TIS-DPO). ``+`` for chosen responses, ``−`` for rejected ones.
    """
    out: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}
    for which, is_chosen in (("chosen", True), ("rejected", False)):
        responses = [getattr(r, which) for r in records]
        plus, minus = getattr(positive, which), getattr(negative, which)
        for start in range(0, len(responses), 256):
            chunk = responses[start : start + 256]
            positive_logps = pad_ragged(plus[start : start + len(chunk)])  # [b, R]
            negative_logps = pad_ragged(minus[start : start + len(chunk)])
            mask = pad_ragged([np.ones(len(r.span(side))) for r in chunk]).bool()  # [b, R]
            if granularity == "span":
                spans = _padded_spans(chunk, side, width=positive_logps.shape[1])
                num_spans = max(r.num_spans for r in chunk)
                positive_logps = span_logprobs(positive_logps, spans, num_spans)  # [b, K]
                negative_logps = span_logprobs(negative_logps, spans, num_spans)
                mask = pad_ragged([np.ones(r.num_spans) for r in chunk]).bool()[:, :num_spans]
            weights = span_weights(
                positive_logps, negative_logps, is_chosen, lower=lower, upper=upper, scale=scale, span_mask=mask
            )
            lengths = mask.sum(dim=1).tolist()
            out[which] += [weights[i, : lengths[i]].numpy().copy() for i in range(len(chunk))]
    return TokenLogprobs(chosen=out["chosen"], rejected=out["rejected"])


def averaged_weights(weights: TokenLogprobs) -> TokenLogprobs:
    """Each response's weights replaced by their mean (the "Average weight" ablation, method §4.3): the same
    total weight per response, spread evenly over its spans or tokens."""

    def flat(rows: list[np.ndarray]) -> list[np.ndarray]:
        return [np.full_like(row, row.mean()) if row.size else row.copy() for row in rows]

    return TokenLogprobs(chosen=flat(weights.chosen), rejected=flat(weights.rejected))


def fixed_weights(
    records: Sequence[PairRecord],
    side: Side,
    granularity: Granularity,
    mode: Literal["uniform", "random"],
    *,
    seed: int,
    low: float = DEFAULT_RANDOM_LOW,
    high: float = DEFAULT_RANDOM_HIGH,
) -> TokenLogprobs:
    """Uniform (all 1) or seeded random U(low, high) weights: the ablations of method §4.3."""
    out: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}
    for offset, which in enumerate(("chosen", "rejected")):
        sizes = [r.num_spans if granularity == "span" else len(r.span(side)) for r in (getattr(x, which) for x in records)]
        mask = pad_ragged([np.ones(n) for n in sizes]).bool()
        if mode == "uniform":
            weights = uniform_span_weights(mask)
        else:
            weights = random_span_weights(mask, seed=seed * 2 + offset, low=low, high=high)
        out[which] = [weights[i, :n].numpy().copy() for i, n in enumerate(sizes)]
    return TokenLogprobs(chosen=out["chosen"], rejected=out["rejected"])


def _padded_spans(responses: Sequence[ResponseRecord], side: Side, width: int) -> torch.Tensor:  # [b, R]
    spans = torch.full((len(responses), width), -1, dtype=torch.long)
    for row, response in enumerate(responses):
        span = torch.as_tensor(response.span(side), dtype=torch.long)
        spans[row, : span.shape[0]] = span
    return spans


# ------------------------------------------------------------------------------------------ distill loss


LossFn = Callable[[nn.Module, Sequence[TrainItem]], tuple[torch.Tensor, dict[str, Any]]]


def _policy_logps(
    model: nn.Module, responses: Sequence[ResponseRecord], side: Side, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, SideBatch]:
    batch = collate_responses(responses, side, pad_id).to(device)
    return response_logprobs(model, batch), batch  # [2b, R]


def make_distill_loss(
    method: Literal["ctpd", "dpo", "tisdpo"],
    beta: float,
    *,
    policy_side: Side,
    reference_side: Side,
    pad_id: int,
    device: torch.device,
) -> LossFn:
    """The training loss of one micro-batch of :class:`TrainItem`, for ``fit()``.

    * ``ctpd``: span log-probs of the policy (its own tokens) against the reference's span log-probs (the
      teacher's tokens), weighted per span: :func:`ctpd_loss`.
    * ``dpo``: sequence log-probs (sum over response tokens, EOS included when it is a span):
      :func:`dpo_loss`. Also trains π+ / π− (``policy_side == reference_side``).
    * ``tisdpo``: token log-probs weighted per token, reference on the same tokens: :func:`tisdpo_loss`.
    """

    def loss_fn(model: nn.Module, items: Sequence[TrainItem]) -> tuple[torch.Tensor, dict[str, Any]]:
        b = len(items)
        responses = pair_responses([item.record for item in items])  # chosen rows, then rejected
        policy, batch = _policy_logps(model, responses, policy_side, pad_id, device)  # [2b, R]
        reference = pad_ragged([i.reference_chosen for i in items] + [i.reference_rejected for i in items]).to(device)
        if method == "dpo":
            sequence_policy, sequence_reference = policy.sum(dim=1), reference.sum(dim=1)  # [2b]
            loss, stats = dpo_loss(sequence_policy[:b], sequence_policy[b:], sequence_reference[:b], sequence_reference[b:], beta)
        elif method == "tisdpo":
            weights = pad_ragged(_item_weights(items, method)).to(device)
            width = policy.shape[1]
            reference, weights = _fit_width(reference, width), _fit_width(weights, width)
            mask = batch.response_mask
            loss, stats = tisdpo_loss(
                policy[:b], policy[b:], reference[:b], reference[b:], weights[:b], weights[b:], mask[:b], mask[b:], beta
            )
        else:
            num_spans = max(r.num_spans for r in responses)
            policy_spans = span_logprobs(policy, batch.token_span, num_spans)  # [2b, K]
            reference_spans = span_logprobs(
                reference, _padded_spans(responses, reference_side, reference.shape[1]).to(device), num_spans
            )  # [2b, K]
            weights = _fit_width(pad_ragged(_item_weights(items, method)).to(device), num_spans)
            loss, stats = ctpd_loss(
                policy_spans[:b], policy_spans[b:], reference_spans[:b], reference_spans[b:], weights[:b], weights[b:], beta
            )
        return loss, {**stats, "tokens": float(batch.attention_mask.sum())}

    return loss_fn


def _item_weights(items: Sequence[TrainItem], method: str) -> list[np.ndarray]:
    """Chosen then rejected weights of a batch; ``method`` needs them, so items built without any are refused."""
    weights = [i.weights_chosen for i in items] + [i.weights_rejected for i in items]
    present = [w for w in weights if w is not None]
    if len(present) != len(weights):
        raise ValueError(f"{method} needs span or token weights on every item; build the items with weights")
    return present


def _fit_width(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pad with zeros or cut to ``width`` columns (stored rows are only as wide as their longest member)."""
    if values.shape[1] >= width:
        return values[:, :width]
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))
