"""The records stages hand on, and their storage: encoded pairs, per-token values, training items.

A :class:`PairRecord` is one preference pair as both tokenizers see it (the prepare stage's output);
:class:`TokenLogprobs` holds one float per response token (or span) of every chosen and rejected response of
a split, on one side's tokens (the reference stage's log-probs, the weights stage's weights); a
:class:`TrainItem` is what one pair contributes to a training step. Stored as ragged safetensors columns
(:func:`ctpd_core.artifacts.save_ragged`: no pickle).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ctpd_core.artifacts import load_ragged, save_ragged
from ctpd_core.encoding import EncodedResponse

Side = Literal["student", "teacher"]


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


@dataclass(frozen=True)
class TokenLogprobs:
    """Per-token log-probs of every chosen and rejected response of a split, on one side's tokens."""

    chosen: list[np.ndarray]  # each [R]
    rejected: list[np.ndarray]


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
