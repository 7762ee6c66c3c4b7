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
these calls) through :class:`ctpd_core.artifacts.StageCache`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from ctpd_core.alignment import AlignmentError, alignment_stats
from ctpd_core.artifacts import load_ragged, save_ragged
from ctpd_core.batching import SideBatch, collate_side, pad_ragged, response_logprobs
from ctpd_core.data import PreferencePair
from ctpd_core.encoding import EncodedResponse, EncodingConfig, PairEncoder
from ctpd_core.logprobs import span_logprobs
from ctpd_core.losses import ctpd_loss, dpo_loss, tisdpo_loss
from ctpd_core.train import Progress, ProgressCallback, autocast_context
from ctpd_core.weights import random_span_weights, span_weights, uniform_span_weights

logger = logging.getLogger(__name__)

Side = Literal["student", "teacher"]
Granularity = Literal["span", "token", "sequence"]
STAGES = ("prepare", "reference", "contrastive", "weights", "distill", "evaluate", "export")


class PipelineObserver(Protocol):
    """What the pipeline reports while it runs (the CLI draws progress bars; the worker writes SQL)."""

    def stage_started(self, stage: str, cached: bool) -> None: ...
    def stage_finished(self, stage: str, seconds: float, cached: bool, summary: Mapping[str, Any]) -> None: ...
    def progress(self, progress: Progress) -> None: ...
    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None: ...
    def checkpoint(self, stage: str, step: int, path: Path) -> None: ...


class NullObserver:
    """An observer that ignores everything (subclass it and override what you need)."""

    def stage_started(self, stage: str, cached: bool) -> None:
        pass

    def stage_finished(self, stage: str, seconds: float, cached: bool, summary: Mapping[str, Any]) -> None:
        pass

    def progress(self, progress: Progress) -> None:
        pass

    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def checkpoint(self, stage: str, step: int, path: Path) -> None:
        pass


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ResponseRecord:
    """One encoded response: both sides' token ids and response-token spans (see ``ctpd_core.encoding``)."""

    student_ids: np.ndarray  # [P_s + R_s]
    student_prompt_length: int
    student_span: np.ndarray  # [R_s]
    teacher_ids: np.ndarray  # [P_t + R_t]
    teacher_prompt_length: int
    teacher_span: np.ndarray  # [R_t]
    num_spans: int
    num_bytes: int  # UTF-8 bytes of the response text (EOS excluded): the unit of bits per byte
    has_eos: bool

    @classmethod
    def from_encoded(cls, encoded: EncodedResponse) -> ResponseRecord:
        return cls(
            student_ids=encoded.student.input_ids,
            student_prompt_length=encoded.student.prompt_length,
            student_span=encoded.student.token_span,
            teacher_ids=encoded.teacher.input_ids,
            teacher_prompt_length=encoded.teacher.prompt_length,
            teacher_span=encoded.teacher.token_span,
            num_spans=encoded.num_spans,
            num_bytes=len(encoded.response.encode("utf-8")),
            has_eos=encoded.num_spans > encoded.alignment.num_spans,
        )

    def ids(self, side: Side) -> np.ndarray:
        return self.student_ids if side == "student" else self.teacher_ids

    def prompt_length(self, side: Side) -> int:
        return self.student_prompt_length if side == "student" else self.teacher_prompt_length

    def span(self, side: Side) -> np.ndarray:
        return self.student_span if side == "student" else self.teacher_span


@dataclass(frozen=True)
class PairRecord:
    chosen: ResponseRecord
    rejected: ResponseRecord

    def swapped(self) -> PairRecord:
        return PairRecord(chosen=self.rejected, rejected=self.chosen)


@dataclass(frozen=True)
class PreparedData:
    train: list[PairRecord]
    validation: list[PairRecord]
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- prepare


def prepare(
    train_pairs: Sequence[PreferencePair],
    validation_pairs: Sequence[PreferencePair],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    encoding: EncodingConfig,
    progress: ProgressCallback | None = None,
) -> PreparedData:
    """Encode and align every pair; returns the records and the alignment statistics."""
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
                chosen, rejected = encoder.encode_responses(pair.prompt, [pair.chosen, pair.rejected])
            except AlignmentError as error:
                logger.warning("dropping a pair that cannot be aligned: %s", error)
                dropped["unalignable"] += 1
                continue
            if chosen.alignment.num_spans == 0 or rejected.alignment.num_spans == 0:
                dropped["empty_response"] += 1
                continue
            alignments += [chosen.alignment, rejected.alignment]
            truncated += int(chosen.truncated) + int(rejected.truncated)
            records.append(PairRecord(ResponseRecord.from_encoded(chosen), ResponseRecord.from_encoded(rejected)))
            if progress and (done % 64 == 0 or done == total):
                progress(progress_of("prepare", done, total, started))
        splits[split] = records
    if not splits["train"]:
        raise ValueError("no training pair survived encoding (all were unalignable or empty); check the dataset")
    stats = {
        "train_pairs": len(splits["train"]),
        "validation_pairs": len(splits["validation"]),
        "dropped": dropped,
        "truncated_responses": truncated,
        "alignment": alignment_stats(alignments),
    }
    return PreparedData(train=splits["train"], validation=splits["validation"], stats=stats)


def progress_of(stage: str, step: int, total: int, started: float) -> Progress:
    elapsed = time.monotonic() - started
    eta = elapsed / step * (total - step) if step else None
    return Progress(stage=stage, step=step, total=total, eta_seconds=eta)


_RECORD_ARRAYS = ("student_ids", "student_span", "teacher_ids", "teacher_span")
_RECORD_SCALARS = ("student_prompt_length", "teacher_prompt_length", "num_spans", "num_bytes", "has_eos")


def save_prepared(folder: Path, data: PreparedData) -> None:
    for split, records in (("train", data.train), ("validation", data.validation)):
        columns: dict[str, list[np.ndarray]] = {}
        for which in ("chosen", "rejected"):
            responses = [getattr(record, which) for record in records]
            for name in _RECORD_ARRAYS:
                columns[f"{which}.{name}"] = [getattr(r, name).astype(np.int64) for r in responses]
            for name in _RECORD_SCALARS:
                columns[f"{which}.{name}"] = [np.asarray([int(getattr(r, name))], dtype=np.int64) for r in responses]
        save_ragged(folder / f"{split}.safetensors", columns)
    (folder / "stats.json").write_text(json.dumps(data.stats, indent=2))


def load_prepared(folder: Path) -> PreparedData:
    splits = {}
    for split in ("train", "validation"):
        columns = load_ragged(folder / f"{split}.safetensors")
        count = len(columns["chosen.student_ids"])

        def response(which: str, index: int, columns: dict[str, list[np.ndarray]] = columns) -> ResponseRecord:
            values: dict[str, Any] = {name: columns[f"{which}.{name}"][index] for name in _RECORD_ARRAYS}
            for name in _RECORD_SCALARS:
                values[name] = int(columns[f"{which}.{name}"][index][0])
            values["has_eos"] = bool(values["has_eos"])
            return ResponseRecord(**values)

        splits[split] = [PairRecord(response("chosen", i), response("rejected", i)) for i in range(count)]
    stats = json.loads((folder / "stats.json").read_text())
    return PreparedData(train=splits["train"], validation=splits["validation"], stats=stats)


# ------------------------------------------------------------------------------------ per-token log-probs


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def collate_responses(responses: Sequence[ResponseRecord], side: Side, pad_id: int) -> SideBatch:
    return collate_side(
        [r.ids(side) for r in responses],
        [r.prompt_length(side) for r in responses],
        [r.span(side) for r in responses],
        pad_id,
        num_spans=[r.num_spans for r in responses],
    )


@dataclass(frozen=True)
class TokenLogprobs:
    """Per-token log-probs of every chosen and rejected response of a split, on one side's tokens."""

    chosen: list[np.ndarray]  # each [R]
    rejected: list[np.ndarray]


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def token_logprobs(
    model: nn.Module,
    records: Sequence[PairRecord],
    side: Side,
    pad_id: int,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    stage: str = "reference",
    progress: ProgressCallback | None = None,
) -> TokenLogprobs:
    """A frozen model's log-prob of every response token (no grad, inference mode, batched)."""
    model.eval()
    chosen, rejected = [], []
    started, total = time.monotonic(), len(records)
    done = 0
    for batch in batches(records, batch_size):
        responses = [r.chosen for r in batch] + [r.rejected for r in batch]
        side_batch = collate_responses(responses, side, pad_id).to(device)
        with autocast_context(device, precision):
            logps = response_logprobs(model, side_batch).float().cpu().numpy()  # [2b, R]
        lengths = side_batch.response_mask.sum(dim=1).tolist()
        rows = [logps[i, : lengths[i]].copy() for i in range(len(responses))]
        chosen += rows[: len(batch)]
        rejected += rows[len(batch) :]
        done += len(batch)
        if progress:
            progress(progress_of(stage, done, total, started))
    return TokenLogprobs(chosen=chosen, rejected=rejected)


def save_token_values(path: Path, values: Mapping[str, TokenLogprobs]) -> None:
    columns = {}
    for split, split_values in values.items():
        columns[f"{split}.chosen"] = [v.astype(np.float32) for v in split_values.chosen]
        columns[f"{split}.rejected"] = [v.astype(np.float32) for v in split_values.rejected]
    save_ragged(path, columns)


def load_token_values(path: Path) -> dict[str, TokenLogprobs]:
    columns = load_ragged(path)
    splits = {name.split(".")[0] for name in columns}
    return {s: TokenLogprobs(chosen=columns[f"{s}.chosen"], rejected=columns[f"{s}.rejected"]) for s in splits}


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
    seed: int = 0,
    low: float = 0.7,
    high: float = 1.3,
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


# ------------------------------------------------------------------------------------------ training items


@dataclass(frozen=True)
class TrainItem:
    """What one pair contributes to a training step: the records, the stored reference log-probs (on the
    reference side) and the weights (None for plain DPO)."""

    record: PairRecord
    reference_chosen: np.ndarray  # [R_ref]
    reference_rejected: np.ndarray
    weights_chosen: np.ndarray | None = None  # [K] (span) or [R_s] (token)
    weights_rejected: np.ndarray | None = None

    def swapped(self) -> TrainItem:
        """The same pair with chosen and rejected exchanged, everything attached to them included."""
        return replace(
            self,
            record=self.record.swapped(),
            reference_chosen=self.reference_rejected,
            reference_rejected=self.reference_chosen,
            weights_chosen=self.weights_rejected,
            weights_rejected=self.weights_chosen,
        )


def build_items(
    records: Sequence[PairRecord], reference: TokenLogprobs, weights: TokenLogprobs | None = None
) -> list[TrainItem]:
    if len(reference.chosen) != len(records):
        raise ValueError(f"{len(records)} pairs but {len(reference.chosen)} reference rows; rebuild the reference stage")
    return [
        TrainItem(
            record=record,
            reference_chosen=reference.chosen[i],
            reference_rejected=reference.rejected[i],
            weights_chosen=None if weights is None else weights.chosen[i],
            weights_rejected=None if weights is None else weights.rejected[i],
        )
        for i, record in enumerate(records)
    ]


def swap_pairs(items: Sequence[TrainItem]) -> list[TrainItem]:
    """π− is trained by DPO on these: every pair's chosen and rejected exchanged (method §9.2)."""
    return [item.swapped() for item in items]


LossFn = Callable[[nn.Module, Sequence[TrainItem]], tuple[torch.Tensor, dict[str, Any]]]


def _policy_logps(
    model: nn.Module, items: Sequence[TrainItem], side: Side, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, SideBatch]:
    responses = [item.record.chosen for item in items] + [item.record.rejected for item in items]
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
        policy, batch = _policy_logps(model, items, policy_side, pad_id, device)  # [2b, R]
        reference = pad_ragged([i.reference_chosen for i in items] + [i.reference_rejected for i in items]).to(device)
        if method == "dpo":
            sequence_policy, sequence_reference = policy.sum(dim=1), reference.sum(dim=1)  # [2b]
            loss, stats = dpo_loss(sequence_policy[:b], sequence_policy[b:], sequence_reference[:b], sequence_reference[b:], beta)
        elif method == "tisdpo":
            weights = pad_ragged([i.weights_chosen for i in items] + [i.weights_rejected for i in items]).to(device)
            width = policy.shape[1]
            reference, weights = _fit_width(reference, width), _fit_width(weights, width)
            mask = batch.response_mask
            loss, stats = tisdpo_loss(
                policy[:b], policy[b:], reference[:b], reference[b:], weights[:b], weights[b:], mask[:b], mask[b:], beta
            )
        else:
            responses = [i.record.chosen for i in items] + [i.record.rejected for i in items]
            num_spans = max(r.num_spans for r in responses)
            policy_spans = span_logprobs(policy, batch.token_span, num_spans)  # [2b, K]
            reference_spans = span_logprobs(
                reference, _padded_spans(responses, reference_side, reference.shape[1]).to(device), num_spans
            )  # [2b, K]
            weights = _fit_width(
                pad_ragged([i.weights_chosen for i in items] + [i.weights_rejected for i in items]).to(device), num_spans
            )
            loss, stats = ctpd_loss(
                policy_spans[:b], policy_spans[b:], reference_spans[:b], reference_spans[b:], weights[:b], weights[b:], beta
            )
        stats = dict(stats)
        stats["tokens"] = float(batch.attention_mask.sum())
        return loss, stats

    return loss_fn


def _fit_width(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pad with zeros or cut to ``width`` columns (stored rows are only as wide as their longest member)."""
    if values.shape[1] >= width:
        return values[:, :width]
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))
