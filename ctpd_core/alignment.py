"""Aligned span projection between two tokenizations of the same response (method §3).

Everything here works in UTF-8 **byte** offsets. The authors' histogram of character offsets breaks on
characters that a byte-level BPE splits into several tokens (all pieces share one character offset, method
§3.6); in bytes, and with the pieces of one character merged into one unit, that cannot happen.

The algorithm (method §3.3 / §3.7):

1. Tokenize the response alone, without special tokens, and take each token's *end* offset in bytes.
   Only ends are used: a token's extent is (previous end, own end], so each side tiles the text
   contiguously by construction, and gaps left by tokenizers that trim leading spaces from offsets are
   closed. Tokens that share an end (the byte pieces of one character, or an overlapping piece such as
   SmolLM2's ``Ġæ`` + ``Ĺ`` + ``¥`` for " 日") form one unit and always land in the same span.
2. The last unit of each side is stretched to the longer side's covered end, so a tail that one tokenizer
   cannot represent (it dropped the characters) joins the last span instead of being lost.
3. Span boundaries are the intersection of the two sides' unit ends; token i belongs to the first span
   whose end is >= its own end (``searchsorted``). Every boundary is some token's end on *both* sides, so
   no span is empty on either side, every token lands in exactly one span, and the spans tile the covered
   text exactly.

No per-token Python loop: each example costs a handful of numpy calls, and :func:`align_texts` tokenizes a
whole batch in one call of the Rust tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Span types are written teacher:student, the order of the journal's table in method §3.3
# ("n:1" = several teacher tokens against one student token).
SPAN_TYPES = ("1:1", "1:n", "n:1", "n:m")


class AlignmentError(ValueError):
    """A response cannot be aligned (for example one tokenizer produced no tokens for non-empty text)."""


class TokenizerOffsetsError(ValueError):
    """The tokenizer cannot report offsets (a slow, pure-Python tokenizer)."""


@dataclass(frozen=True)
class TokenizedText:
    """One text under one tokenizer: token ids and each token's UTF-8 byte end.

    ``byte_ends`` is non-decreasing; a token covers (previous token's end, its end]. ``num_bytes`` is the
    length of the text in bytes (the tokenizer may cover less of it: ``covered_bytes``).
    """

    token_ids: np.ndarray  # [n] int64
    byte_ends: np.ndarray  # [n] int64
    num_bytes: int

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def covered_bytes(self) -> int:
        return int(self.byte_ends[-1]) if self.num_tokens else 0


def _char_to_byte_offsets(text: str) -> np.ndarray:
    """[len(text) + 1] byte offset of each character index, vectorised over the code points."""
    try:
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError as error:
        raise AlignmentError(
            f"the text is not valid Unicode (a lone surrogate at character {error.start}); "
            "clean the dataset so every response is valid UTF-8"
        ) from error
    # UTF-8 length of a code point: 1 byte below U+0080, 2 below U+0800, 3 below U+10000, else 4.
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    offsets = np.zeros(len(code_points) + 1, dtype=np.int64)
    np.cumsum(widths, out=offsets[1:])
    return offsets


def require_offsets(tokenizer: Any, role: str = "tokenizer") -> None:
    """Raise :class:`TokenizerOffsetsError` unless ``tokenizer`` is a fast tokenizer that reports offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerOffsetsError(
            f"the {role} ({type(tokenizer).__name__}) is a slow tokenizer and cannot report token offsets, "
            "which aligned span projection needs; use a fast tokenizer (a folder with tokenizer.json, "
            "or convert it with transformers' AutoTokenizer.from_pretrained(..., use_fast=True))"
        )


def tokenize_with_byte_offsets(tokenizer: Any, texts: Sequence[str], role: str = "tokenizer") -> list[TokenizedText]:
    """Tokenize each text alone (no special tokens) and return token ids with byte end offsets.

    One batched call to the (Rust) fast tokenizer; the char-to-byte conversion is vectorised per text.
    """
    require_offsets(tokenizer, role)
    texts = list(texts)
    if not texts:
        return []
    char_to_byte_maps = [_char_to_byte_offsets(text) for text in texts]  # validates the text first
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    results = []
    for text, char_to_byte, ids, offsets in zip(
        texts, char_to_byte_maps, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        token_ids = np.asarray(ids, dtype=np.int64)
        if len(offsets):
            char_ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
            char_ends = np.clip(char_ends, 0, len(text))
            # cummax: a normaliser can report an end that steps back; a unit never ends before its predecessor.
            byte_ends = np.maximum.accumulate(char_to_byte[char_ends])
        else:
            byte_ends = np.zeros(0, dtype=np.int64)
        results.append(TokenizedText(token_ids=token_ids, byte_ends=byte_ends, num_bytes=int(char_to_byte[-1])))
    return results


@dataclass(frozen=True)
class SpanAlignment:
    """Aligned spans of one response: span k covers bytes [span_starts[k], span_ends[k]) on both sides."""

    text: str
    span_ends: np.ndarray  # [K] int64, strictly increasing byte offsets
    student_span: np.ndarray  # [n] int64, the span of each student token
    teacher_span: np.ndarray  # [m] int64, the span of each teacher token

    @property
    def num_spans(self) -> int:
        return int(self.span_ends.shape[0])

    @property
    def span_starts(self) -> np.ndarray:  # [K]
        return np.concatenate([np.zeros(1, dtype=np.int64), self.span_ends[:-1]]) if self.num_spans else self.span_ends

    @property
    def covered_bytes(self) -> int:
        return int(self.span_ends[-1]) if self.num_spans else 0

    def student_tokens_per_span(self) -> np.ndarray:  # [K]
        return np.bincount(self.student_span, minlength=self.num_spans)

    def teacher_tokens_per_span(self) -> np.ndarray:  # [K]
        return np.bincount(self.teacher_span, minlength=self.num_spans)

    def span_texts(self) -> list[str]:
        """The text of each span (boundaries come from character offsets, so they never split a character)."""
        data = self.text.encode("utf-8")
        return [
            data[start:end].decode("utf-8")
            for start, end in zip(self.span_starts.tolist(), self.span_ends.tolist(), strict=True)
        ]

    def stats(self) -> dict[str, float | int]:
        return alignment_stats([self])

    def to_json(self) -> dict[str, Any]:
        """The ``ctpd align --json`` document: byte offsets into the UTF-8 text, token indices from 0."""
        student_order = np.argsort(self.student_span, kind="stable")
        teacher_order = np.argsort(self.teacher_span, kind="stable")
        student_groups = np.split(student_order, np.cumsum(self.student_tokens_per_span())[:-1])
        teacher_groups = np.split(teacher_order, np.cumsum(self.teacher_tokens_per_span())[:-1])
        spans = []
        if self.num_spans:
            for start, end, text, student, teacher in zip(
                self.span_starts.tolist(),
                self.span_ends.tolist(),
                self.span_texts(),
                student_groups,
                teacher_groups,
                strict=True,
            ):
                spans.append(
                    {"start": start, "end": end, "text": text, "student": student.tolist(), "teacher": teacher.tolist()}
                )
        return {"text": self.text, "spans": spans, "stats": self.stats()}


def _stretch_last_unit(byte_ends: np.ndarray, covered: int) -> np.ndarray:
    """Copy of ``byte_ends`` with zero-width leading tokens moved into the first unit and the last unit
    stretched to ``covered`` bytes."""
    ends = byte_ends.copy()
    last = ends[-1]
    ends[ends == last] = covered
    positive = ends[ends > 0]
    if positive.size:
        ends[ends == 0] = positive[0]
    return ends


def align_spans(student: TokenizedText, teacher: TokenizedText, text: str) -> SpanAlignment:
    """Aligned spans of one response tokenized by the student and the teacher (see the module docstring)."""
    if student.num_bytes != teacher.num_bytes:
        raise AlignmentError(
            f"the two tokenizations are of different texts ({student.num_bytes} vs {teacher.num_bytes} bytes); "
            "tokenize the identical response string with both tokenizers"
        )
    empty = np.zeros(0, dtype=np.int64)
    if student.num_tokens == 0 and teacher.num_tokens == 0:
        return SpanAlignment(text=text, span_ends=empty, student_span=empty, teacher_span=empty)
    if student.num_tokens == 0 or teacher.num_tokens == 0:
        side = "student" if student.num_tokens == 0 else "teacher"
        raise AlignmentError(
            f"the {side} tokenizer produced no tokens for a non-empty response ({text[:40]!r}); "
            "drop the example or use a tokenizer that covers its characters"
        )
    covered = max(student.covered_bytes, teacher.covered_bytes)
    student_ends = _stretch_last_unit(student.byte_ends, covered)
    teacher_ends = _stretch_last_unit(teacher.byte_ends, covered)
    span_ends = np.intersect1d(student_ends, teacher_ends)  # sorted, unique, always contains `covered`
    return SpanAlignment(
        text=text,
        span_ends=span_ends.astype(np.int64),
        student_span=np.searchsorted(span_ends, student_ends, side="left").astype(np.int64),
        teacher_span=np.searchsorted(span_ends, teacher_ends, side="left").astype(np.int64),
    )


def align_texts(student_tokenizer: Any, teacher_tokenizer: Any, texts: Sequence[str]) -> list[SpanAlignment]:
    """Batch API: tokenize every text with both tokenizers (one batched call each) and align them."""
    texts = list(texts)
    student = tokenize_with_byte_offsets(student_tokenizer, texts, role="student tokenizer")
    teacher = tokenize_with_byte_offsets(teacher_tokenizer, texts, role="teacher tokenizer")
    return [align_spans(s, t, text) for s, t, text in zip(student, teacher, texts, strict=True)]


# Span lengths in bytes, binned by powers of two: a span is a run of bytes both tokenizations end a token on, so
# its length says how coarse the common segmentation is (1-4 bytes: about word pieces; 33+: whole phrases).
SPAN_BYTES_BIN_STARTS = (1, 2, 3, 5, 9, 17, 33, 65)


def span_length_histogram(alignments: Sequence[SpanAlignment]) -> dict[str, list[str] | list[int]]:
    """How many spans of ``alignments`` fall in each span-length bin (bytes): ``{"bins": ["1", "2", "3-4", ...,
    "65+"], "spans": [count, ...]}``, the counts summing to the number of spans."""
    lengths = [a.span_ends - a.span_starts for a in alignments if a.num_spans]
    span_bytes = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)  # [spans]
    starts = np.asarray(SPAN_BYTES_BIN_STARTS)
    counts = np.bincount(np.searchsorted(starts, span_bytes, side="right") - 1, minlength=starts.size)
    bins = [str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(starts[:-1], starts[1:], strict=True)]
    return {"bins": [*bins, f"{starts[-1]}+"], "spans": [int(count) for count in counts]}


def alignment_stats(alignments: Sequence[SpanAlignment]) -> dict[str, float | int]:
    """Span statistics pooled over all spans of ``alignments`` (one example or a whole dataset).

    ``share_1:1`` etc. are fractions of spans by type, written teacher:student; ``*_tokens_per_span`` are
    token counts divided by span counts; ``mean_span_bytes`` is the mean span length in bytes.
    """
    teacher_counts = [a.teacher_tokens_per_span() for a in alignments if a.num_spans]
    student_counts = [a.student_tokens_per_span() for a in alignments if a.num_spans]
    teacher_per_span = np.concatenate(teacher_counts) if teacher_counts else np.zeros(0, dtype=np.int64)
    student_per_span = np.concatenate(student_counts) if student_counts else np.zeros(0, dtype=np.int64)
    num_spans = int(teacher_per_span.size)
    covered = sum(a.covered_bytes for a in alignments)
    teacher_one, student_one = teacher_per_span == 1, student_per_span == 1
    type_masks = {
        "1:1": teacher_one & student_one,
        "1:n": teacher_one & ~student_one,
        "n:1": ~teacher_one & student_one,
        "n:m": ~teacher_one & ~student_one,
    }
    stats: dict[str, float | int] = {
        "examples": len(alignments),
        "spans": num_spans,
        "student_tokens": int(student_per_span.sum()),
        "teacher_tokens": int(teacher_per_span.sum()),
        "covered_bytes": int(covered),
    }
    for name in SPAN_TYPES:
        stats[f"share_{name}"] = float(type_masks[name].mean()) if num_spans else 0.0
    stats["student_tokens_per_span"] = float(student_per_span.mean()) if num_spans else 0.0
    stats["teacher_tokens_per_span"] = float(teacher_per_span.mean()) if num_spans else 0.0
    stats["mean_span_bytes"] = float(covered / num_spans) if num_spans else 0.0
    return stats
