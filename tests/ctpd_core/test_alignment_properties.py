"""Property-based tests (hypothesis) of the alignment invariants on random Unicode text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctpd_core.alignment import TokenizedText, align_spans, tokenize_with_byte_offsets
from tests.ctpd_core.alignment_invariants import check_alignment

# Random text biased toward the hard cases: whitespace runs, combining marks, emoji, CJK, plus anything else
# in Unicode except surrogates (not encodable as UTF-8) and NUL.
hard_characters = st.sampled_from(list(" \t\n\r  \u0301\u0308\u200b😀👍🏽🦙日本語中文éÜñ∑→"))
any_character = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
unicode_text = st.lists(st.one_of(hard_characters, any_character, st.sampled_from(list("abc xyz"))), max_size=80).map(
    "".join
)

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(text=unicode_text)
def test_invariants_random_text_tiny(text, student_tokenizer, teacher_tokenizer):
    _check(text, student_tokenizer, teacher_tokenizer)


@pytest.mark.real_model
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=unicode_text)
def test_invariants_random_text_real(text, real_student_tokenizer, real_teacher_tokenizer):
    _check(text, real_student_tokenizer, real_teacher_tokenizer)


def _check(text, student_tokenizer, teacher_tokenizer):
    (student,) = tokenize_with_byte_offsets(student_tokenizer, [text])
    (teacher,) = tokenize_with_byte_offsets(teacher_tokenizer, [text])
    if (student.num_tokens == 0) != (teacher.num_tokens == 0):
        return  # one tokenizer dropped every character: align_spans refuses this (tested elsewhere)
    check_alignment(align_spans(student, teacher, text), student, teacher)


@st.composite
def tokenizations(draw):
    """Two arbitrary tokenizations of one n-byte text: non-decreasing ends, repeated ends (byte pieces),
    zero-width leading tokens, and sides that stop short of the end (dropped characters)."""
    num_bytes = draw(st.integers(min_value=1, max_value=60))

    def side():
        ends = draw(st.lists(st.integers(min_value=0, max_value=num_bytes), min_size=1, max_size=40))
        ends = sorted(ends)
        if draw(st.booleans()):
            ends[-1] = num_bytes
        if ends[-1] == 0:
            ends[-1] = num_bytes
        return TokenizedText(np.arange(len(ends)), np.asarray(ends, dtype=np.int64), num_bytes)

    return num_bytes, side(), side()


@settings(max_examples=400, deadline=None)
@given(case=tokenizations())
def test_invariants_arbitrary_tokenizations(case):
    num_bytes, student, teacher = case
    text = "a" * num_bytes
    check_alignment(align_spans(student, teacher, text), student, teacher)


@settings(max_examples=200, deadline=None)
@given(case=tokenizations())
def test_alignment_is_symmetric(case):
    """Swapping the roles of student and teacher gives the same spans."""
    num_bytes, student, teacher = case
    forward = align_spans(student, teacher, "a" * num_bytes)
    backward = align_spans(teacher, student, "a" * num_bytes)
    assert forward.span_ends.tolist() == backward.span_ends.tolist()
    assert forward.student_span.tolist() == backward.teacher_span.tolist()
