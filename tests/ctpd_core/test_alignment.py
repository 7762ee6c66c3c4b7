"""Aligned span projection: hand-computed cases, hard text with tiny and real tokenizers, the batch API, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctpd_core.alignment import (
    AlignmentError,
    TokenizedText,
    TokenizerOffsetsError,
    align_spans,
    align_texts,
    alignment_stats,
    tokenize_with_byte_offsets,
)
from tests.ctpd_core.alignment_invariants import check_alignment

HARD_TEXTS = {
    "ascii": "Hello world, distillation of preferences!",
    "emoji": "Great job 😀👍🏽 — thanks! 🦙🦙",
    "cjk": "日本語のテキストと English mixed 中文",
    "combining_accents": "cafe\u0301 nai\u0308ve Z\u0335\u0321a\u0336lgo",
    "precomposed_accents": "Über naïve café, déjà vu",
    "runs_of_spaces": "a     b          c  d",
    "tabs_and_newlines": "line one\n\nline\ttwo\t\t\n\t end\r\n",
    "leading_trailing_spaces": "   padded on both sides   ",
    "only_whitespace": " \n\t ",
    "single_char": "x",
    "empty": "",
    "math_and_symbols": "∑ᵢ xᵢ² ≤ ∞ → ∀ε>0 ∃δ",
}


def _tokens(ends: list[int], num_bytes: int) -> TokenizedText:
    return TokenizedText(
        token_ids=np.arange(len(ends), dtype=np.int64), byte_ends=np.asarray(ends, dtype=np.int64), num_bytes=num_bytes
    )


def test_hand_computed_spans():
    # text "abcde": student splits a|bc|de ... as ends [1, 3, 3, 5] (token 2 is a second piece of "c");
    # teacher splits ab|c|de as ends [2, 3, 5]. Shared ends: {3, 5}.
    alignment = align_spans(_tokens([1, 3, 3, 5], 5), _tokens([2, 3, 5], 5), "abcde")
    assert alignment.span_ends.tolist() == [3, 5]
    assert alignment.student_span.tolist() == [0, 0, 0, 1]
    assert alignment.teacher_span.tolist() == [0, 0, 1]
    assert alignment.span_texts() == ["abc", "de"]
    stats = alignment.stats()
    # span 0: 2 teacher vs 3 student tokens (n:m); span 1: 1 vs 1 (1:1).
    assert stats["share_1:1"] == 0.5 and stats["share_n:m"] == 0.5
    assert stats["student_tokens_per_span"] == 2.0 and stats["teacher_tokens_per_span"] == 1.5


def test_unequal_coverage_stretches_the_shorter_side():
    # The teacher dropped the last byte (a character it cannot represent): it joins the last span.
    alignment = align_spans(_tokens([2, 4, 5], 5), _tokens([2, 4], 5), "abcd!")
    assert alignment.span_ends.tolist() == [2, 5]
    assert alignment.teacher_span.tolist() == [0, 1]
    assert alignment.student_span.tolist() == [0, 1, 1]


def test_zero_width_leading_token_joins_the_first_span():
    alignment = align_spans(_tokens([0, 2, 4], 4), _tokens([2, 4], 4), "abcd")
    assert alignment.student_span.tolist() == [0, 0, 1]
    assert alignment.span_ends.tolist() == [2, 4]


def test_empty_response_has_no_spans():
    alignment = align_spans(_tokens([], 0), _tokens([], 0), "")
    assert alignment.num_spans == 0
    assert alignment.to_json() == {"text": "", "spans": [], "stats": alignment_stats([alignment])}


def test_one_side_without_tokens_is_an_error():
    with pytest.raises(AlignmentError, match="teacher tokenizer produced no tokens"):
        align_spans(_tokens([1, 2], 2), _tokens([], 2), "ab")


def test_different_texts_are_an_error():
    with pytest.raises(AlignmentError, match="different texts"):
        align_spans(_tokens([1], 1), _tokens([2], 2), "a")


def test_tiny_tokenizers_are_genuinely_different(student_tokenizer, teacher_tokenizer, botchan_sentences):
    """Guard: the fixtures would test nothing if both tokenizers split text the same way."""
    different = 0
    for sentence in botchan_sentences[:50]:
        (alignment,) = align_texts(student_tokenizer, teacher_tokenizer, [sentence])
        counts = (alignment.student_tokens_per_span(), alignment.teacher_tokens_per_span())
        different += int(not (np.all(counts[0] == 1) and np.all(counts[1] == 1)))
    assert different >= 40
    stats = alignment_stats(align_texts(student_tokenizer, teacher_tokenizer, botchan_sentences[:50]))
    assert stats["share_1:1"] < 0.9


@pytest.mark.parametrize("name", sorted(HARD_TEXTS))
def test_invariants_on_hard_text_tiny(name, student_tokenizer, teacher_tokenizer):
    _check_text(HARD_TEXTS[name], student_tokenizer, teacher_tokenizer)


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(HARD_TEXTS))
def test_invariants_on_hard_text_real(name, real_student_tokenizer, real_teacher_tokenizer):
    _check_text(HARD_TEXTS[name], real_student_tokenizer, real_teacher_tokenizer)


def _check_text(text, student_tokenizer, teacher_tokenizer):
    (student,) = tokenize_with_byte_offsets(student_tokenizer, [text])
    (teacher,) = tokenize_with_byte_offsets(teacher_tokenizer, [text])
    alignment = align_spans(student, teacher, text)
    check_alignment(alignment, student, teacher)
    if text.strip():
        assert alignment.num_spans >= 1
    return alignment


def test_long_response_tiny(student_tokenizer, teacher_tokenizer, botchan_text):
    text = botchan_text[5000:25000]
    assert len(text) == 20000
    alignment = _check_text(text, student_tokenizer, teacher_tokenizer)
    assert alignment.covered_bytes >= len(text.encode()) - 4


@pytest.mark.real_model
def test_long_response_real(real_student_tokenizer, real_teacher_tokenizer, botchan_text):
    text = botchan_text[5000:25000]
    alignment = _check_text(text, real_student_tokenizer, real_teacher_tokenizer)
    assert alignment.covered_bytes == len(text.encode())
    # Both are untrimmed subword tokenizers of English: almost every span is one token on each side.
    assert alignment.stats()["share_1:1"] > 0.7


@pytest.mark.real_model
def test_real_pair_splits_emoji_into_byte_pieces(real_student_tokenizer, real_teacher_tokenizer):
    """The case the authors' character histogram gets wrong (method §3.6): SmolLM2 splits 😀 into three
    byte pieces that share one character offset, Gemma keeps it whole; they must form one span."""
    text = "Emoji 😀 and 日本語 mixed"
    alignment = _check_text(text, real_student_tokenizer, real_teacher_tokenizer)
    texts = alignment.span_texts()
    emoji_span = next(i for i, t in enumerate(texts) if "😀" in t)
    assert alignment.student_tokens_per_span()[emoji_span] >= 2
    assert alignment.teacher_tokens_per_span()[emoji_span] == 1


def test_trimmed_offsets_give_the_same_spans(tiny_corpus, teacher_tokenizer):
    """A tokenizer that trims leading spaces from its offsets leaves gaps; closing them (only ends matter)
    must give exactly the spans of the untrimmed tokenizer."""
    from tokenizers import processors

    from tests.conftest import _train_byte_level_bpe

    untrimmed = _train_byte_level_bpe(tiny_corpus[:300], vocab_size=500)
    trimmed = _train_byte_level_bpe(tiny_corpus[:300], vocab_size=500)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    text = "He said   that the  school was far away."
    gaps = trimmed(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(start > previous_end for (_, previous_end), (start, _) in zip(gaps, gaps[1:], strict=False))
    (a,) = align_texts(untrimmed, teacher_tokenizer, [text])
    (b,) = align_texts(trimmed, teacher_tokenizer, [text])
    assert a.span_ends.tolist() == b.span_ends.tolist()
    assert a.student_span.tolist() == b.student_span.tolist()


def test_batch_api_equals_one_by_one(student_tokenizer, teacher_tokenizer, botchan_sentences):
    texts = botchan_sentences[:20] + list(HARD_TEXTS.values())
    batch = align_texts(student_tokenizer, teacher_tokenizer, texts)
    for text, aligned in zip(texts, batch, strict=True):
        (single,) = align_texts(student_tokenizer, teacher_tokenizer, [text])
        assert aligned.span_ends.tolist() == single.span_ends.tolist()
        assert aligned.student_span.tolist() == single.student_span.tolist()
        assert aligned.teacher_span.tolist() == single.teacher_span.tolist()


def test_dataset_stats_pool_spans(student_tokenizer, teacher_tokenizer, botchan_sentences):
    alignments = align_texts(student_tokenizer, teacher_tokenizer, botchan_sentences[:30])
    stats = alignment_stats(alignments)
    assert stats["examples"] == 30
    assert stats["spans"] == sum(a.num_spans for a in alignments)
    assert stats["student_tokens"] == sum(a.student_span.size for a in alignments)
    shares = sum(stats[f"share_{name}"] for name in ("1:1", "1:n", "n:1", "n:m"))
    assert shares == pytest.approx(1.0)
    assert stats["student_tokens_per_span"] == pytest.approx(stats["student_tokens"] / stats["spans"])


class _SlowCharTokenizer:
    """Stands in for a slow (pure-Python) tokenizer: transformers reports ``is_fast = False`` for them."""

    is_fast = False


def test_slow_tokenizer_is_refused():
    with pytest.raises(TokenizerOffsetsError, match="slow tokenizer"):
        tokenize_with_byte_offsets(_SlowCharTokenizer(), ["hello"], role="teacher tokenizer")


def test_real_slow_tokenizer_is_refused(tmp_path):
    """A genuine transformers Python-backend tokenizer (no Rust backend, so no offsets)."""
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):
        def __init__(self, **kwargs):
            self._vocab = {chr(i): i for i in range(32, 127)}
            super().__init__(**kwargs)

        @property
        def vocab_size(self):
            return len(self._vocab)

        def get_vocab(self):
            return dict(self._vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self._vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return chr(index)

    slow = CharTokenizer()
    assert slow.is_fast is False
    with pytest.raises(TokenizerOffsetsError, match="cannot report token offsets"):
        align_texts(slow, slow, ["hello"])


def test_invalid_unicode_is_a_clear_error(student_tokenizer):
    with pytest.raises(AlignmentError, match="lone surrogate"):
        tokenize_with_byte_offsets(student_tokenizer, ["bad \ud800 text"])


def test_cli_json_document(tmp_path, capsys, student_tokenizer, teacher_tokenizer):
    from ctpd_cli.main import main

    student_file, teacher_file = tmp_path / "student.json", tmp_path / "teacher.json"
    student_tokenizer.backend_tokenizer.save(str(student_file))
    teacher_tokenizer.backend_tokenizer.save(str(teacher_file))
    text = "Naïve 😀 tokens"
    assert main(["align", "--student", str(student_file), "--teacher", str(teacher_file), "--json", text]) == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document) == {"text", "spans", "stats"}
    assert document["text"] == text
    data = text.encode()
    previous_end = 0
    student_seen, teacher_seen = [], []
    for span in document["spans"]:
        assert set(span) == {"start", "end", "text", "student", "teacher"}
        assert span["start"] == previous_end < span["end"]
        assert data[span["start"] : span["end"]].decode() == span["text"]
        assert span["student"] and span["teacher"]
        student_seen += span["student"]
        teacher_seen += span["teacher"]
        previous_end = span["end"]
    assert previous_end == len(data)
    n_student = len(student_tokenizer(text, add_special_tokens=False)["input_ids"])
    n_teacher = len(teacher_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert student_seen == list(range(n_student)) and teacher_seen == list(range(n_teacher))
    assert document["stats"]["spans"] == len(document["spans"])


def test_cli_table_and_errors(tmp_path, capsys, student_tokenizer):
    from ctpd_cli.main import main

    tokenizer_file = tmp_path / "tok.json"
    student_tokenizer.backend_tokenizer.save(str(tokenizer_file))
    assert main(["align", "--student", str(tokenizer_file), "--teacher", str(tokenizer_file), "a\tb"]) == 0
    out = capsys.readouterr().out
    assert "span" in out and "\\t" in out and "1:1 100.0%" in out
    assert main(["align", "--student", str(tmp_path / "missing"), "--teacher", str(tokenizer_file), "x"]) == 2
    assert "not a catalog model" in capsys.readouterr().err


@pytest.mark.real_model
def test_cli_with_catalog_names(capsys):
    from ctpd_cli.main import main

    assert main(["align", "--student", "smollm2-135m-instruct", "--teacher", "gemma-3-270m", "--json", "Hi 😀"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [span["text"] for span in document["spans"]][-1].endswith("😀")
