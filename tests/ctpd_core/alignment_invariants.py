"""The invariants every alignment must satisfy (method §3.7), shared by the example and property tests."""

from __future__ import annotations

import numpy as np

from ctpd_core.alignment import SpanAlignment, TokenizedText


def check_alignment(alignment: SpanAlignment, student: TokenizedText, teacher: TokenizedText) -> None:
    text_bytes = alignment.text.encode("utf-8")
    k = alignment.num_spans
    # Every token of each side lands in exactly one span, in order (spans are contiguous runs of tokens).
    assert alignment.student_span.shape == (student.num_tokens,)
    assert alignment.teacher_span.shape == (teacher.num_tokens,)
    for token_span in (alignment.student_span, alignment.teacher_span):
        if token_span.size:
            assert token_span.min() >= 0 and token_span.max() < k
            assert np.all(np.diff(token_span) >= 0)
    if student.num_tokens == 0 and teacher.num_tokens == 0:
        assert k == 0
        return
    # No span is empty on either side.
    assert np.all(alignment.student_tokens_per_span() >= 1)
    assert np.all(alignment.teacher_tokens_per_span() >= 1)
    # Spans tile the covered text exactly: contiguous, strictly increasing, from 0 to the longer side's end.
    assert np.all(np.diff(alignment.span_ends) > 0)
    assert alignment.covered_bytes == max(student.covered_bytes, teacher.covered_bytes) <= len(text_bytes)
    assert "".join(alignment.span_texts()).encode("utf-8") == text_bytes[: alignment.covered_bytes]
    # Each span ends where the last token assigned to it ends, on both sides (the last span: where the
    # longer side ends; the shorter side's last tokens are stretched to it).
    for tokens, token_span in ((student, alignment.student_span), (teacher, alignment.teacher_span)):
        last_end = np.zeros(k, dtype=np.int64)
        np.maximum.at(last_end, token_span, tokens.byte_ends)
        assert np.array_equal(last_end[:-1], alignment.span_ends[:-1])
        assert last_end[-1] == tokens.covered_bytes
