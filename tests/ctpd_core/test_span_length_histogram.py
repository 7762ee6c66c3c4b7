"""The prepare stage's span-length histogram (bytes per aligned span), which the dashboard draws."""

from __future__ import annotations

import numpy as np

from ctpd_core.alignment import align_texts, alignment_stats, span_length_histogram
from ctpd_core.data import load_pairs
from ctpd_core.encoding import EncodingConfig
from ctpd_core.pipeline import prepare


def test_bins_are_labelled_by_their_byte_ranges_and_count_every_span(student_tokenizer, teacher_tokenizer,
                                                                     botchan_sentences):
    alignments = align_texts(student_tokenizer, teacher_tokenizer, botchan_sentences[:40])
    histogram = span_length_histogram(alignments)
    assert histogram["bins"] == ["1", "2", "3-4", "5-8", "9-16", "17-32", "33-64", "65+"]
    assert sum(histogram["spans"]) == alignment_stats(alignments)["spans"]
    # Counted by hand from the spans' byte lengths, bin by bin.
    lengths = np.concatenate([a.span_ends - a.span_starts for a in alignments])
    ranges = [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 10**9)]
    assert histogram["spans"] == [int(((lengths >= lo) & (lengths <= hi)).sum()) for lo, hi in ranges]


def test_no_alignment_gives_empty_bins():
    assert span_length_histogram([]) == {"bins": ["1", "2", "3-4", "5-8", "9-16", "17-32", "33-64", "65+"],
                                         "spans": [0] * 8}


def test_prepare_reports_the_histogram_with_its_stats(tiny_dataset_path, student_tokenizer, teacher_tokenizer):
    pairs = load_pairs(tiny_dataset_path)
    prepared = prepare(pairs[:12], pairs[12:16], student_tokenizer, teacher_tokenizer,
                       EncodingConfig(max_response_tokens=64))
    histogram = prepared.stats["span_length_histogram"]
    assert sum(histogram["spans"]) == prepared.stats["alignment"]["spans"] > 0
