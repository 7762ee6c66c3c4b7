"""Alignment statistics and speed for a real tokenizer pair on real sentences.

    .venv/bin/python bench/alignment_stats.py [--student smollm2-135m-instruct] [--teacher gemma-3-270m] [-n 200]

Prints the pooled span statistics (method §3.3's table: shares of 1:1, 1:n, n:1, n:m spans, written
teacher:student, and tokens per span) for the first N sentences of Botchan (Project Gutenberg, shipped in the
sentencepiece sdist; scripts/setup extracts it), the same for a hard-text set (emoji, CJK, accents), and the
throughput of the batched aligner against the tokenizer calls alone (its peer: alignment should cost little
next to tokenizing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.textdata import read_sentences  # noqa: E402
from ctpd_core.alignment import align_spans, align_texts, alignment_stats, tokenize_with_byte_offsets  # noqa: E402
from ctpd_core.models import load_tokenizer  # noqa: E402

HARD = [
    "Great job 😀👍🏽 — thanks! 🦙",
    "日本語のテキストと English mixed 中文",
    "cafe\u0301 nai\u0308ve déjà vu, Über",
    "a     b\t\tc\n\n d   ",
    "∑ᵢ xᵢ² ≤ ∞ → ∀ε>0 ∃δ",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", default="smollm2-135m-instruct")
    parser.add_argument("--teacher", default="gemma-3-270m")
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args()
    cache = Path(os.environ.get("CTPD_HOME", REPO / ".ctpd")) / "catalog"
    student = load_tokenizer(args.student, cache_dir=cache)
    teacher = load_tokenizer(args.teacher, cache_dir=cache)
    sentences = read_sentences(REPO / ".cache" / "assets" / "botchan.txt")[: args.n]

    stats = alignment_stats(align_texts(student, teacher, sentences))
    print(f"{args.teacher} (teacher) vs {args.student} (student), {len(sentences)} Botchan sentences:")
    print(json.dumps(stats, indent=2))
    print("hard text (emoji, CJK, accents, whitespace, math):")
    print(json.dumps(alignment_stats(align_texts(student, teacher, HARD)), indent=2))

    corpus = sentences * 10
    start = time.perf_counter()
    student_tokens = tokenize_with_byte_offsets(student, corpus)
    teacher_tokens = tokenize_with_byte_offsets(teacher, corpus)
    tokenize_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for s, t, text in zip(student_tokens, teacher_tokens, corpus, strict=True):
        align_spans(s, t, text)
    align_seconds = time.perf_counter() - start
    tokens = sum(s.num_tokens + t.num_tokens for s, t in zip(student_tokens, teacher_tokens, strict=True))
    print(
        f"throughput on {len(corpus)} sentences ({tokens} tokens): tokenizing both sides {tokenize_seconds:.3f} s, "
        f"aligning {align_seconds:.3f} s ({len(corpus) / align_seconds:,.0f} responses/s, "
        f"{align_seconds / tokenize_seconds:.2f}x the tokenizer time)"
    )

if __name__ == "__main__":
    main()
