"""Plain-text corpora shipped inside registry packages (shared/assets.md), turned into sentences.

Used by the tests (to train tiny tokenizers on real text), the alignment benchmark and the example-dataset
builder. Pure string work: no I/O beyond reading the file it is given.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

_GUTENBERG_START = re.compile(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n")
_GUTENBERG_END = re.compile(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG")
# A sentence ends at . ! or ? (optionally followed by closing quotes) before whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def gutenberg_body(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (the licence boilerplate removed)."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text)
    return text[start.end() if start else 0 : end.start() if end else len(text)]


def paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines, with hard line wraps joined into single spaces."""
    blocks = re.split(r"\n\s*\n", text.replace("\r\n", "\n").lstrip("\ufeff"))
    return [" ".join(block.split()) for block in blocks if block.strip()]


def sentences(text: str, min_words: int = 4, max_words: int = 60) -> list[str]:
    """Sentences of the prose paragraphs of ``text``, in order, with ``min_words``..``max_words`` words."""
    found = []
    for paragraph in paragraphs(text):
        for sentence in _SENTENCE_END.split(paragraph):
            if min_words <= len(sentence.split()) <= max_words:
                found.append(sentence.strip())
    return found


def read_sentences(path: Path, **limits: int) -> list[str]:
    return sentences(gutenberg_body(Path(path).read_text(encoding="utf-8")), **limits)


# ------------------------------------------------------------------------------------- continuation prompts
# Prompts for the sentiment-continuation task (examples/build_sentiment_pairs.py builds its training pairs
# from the first part of a book, bench/quality/ evaluates on the held-out rest): the opening words of a
# sentence, with the real rest of the sentence as the human continuation.

_CHAPTER = re.compile(r"\bCHAPTER [IVXLC]+\b")


def story_start(sentences_: list[str]) -> int:
    """Index of the first sentence of the story proper (the first chapter heading); 0 if there is none."""
    return next((i for i, s in enumerate(sentences_) if _CHAPTER.search(s)), 0)


def word_prefix(sentence: str, n_words: int) -> str:
    """The first ``n_words`` whitespace-separated words of ``sentence``, with their original spacing/punctuation."""
    match = re.match(r"\s*(?:\S+\s+){" + str(n_words - 1) + r"}\S+", sentence)
    if match is None:
        raise ValueError(f"sentence has fewer than {n_words} words: {sentence!r}")
    return match.group(0).strip()


def skip_reason(index: int, sentence: str, story_start_index: int, min_sentence_words: int) -> str | None:
    """Why a sentence is not used as a prompt source, or None when it is."""
    if index < story_start_index:
        return "front_matter"
    if _CHAPTER.search(sentence):
        return "chapter_heading"  # a heading glued onto the chapter's first sentence by paragraph joining
    if "[" in sentence or "]" in sentence:
        return "bracketed_note"  # [Footnote n: ...], and transcriber's markers such as [A] or [1]
    letters = [c for c in sentence if c.isalpha()]
    if letters and all(c.isupper() for c in letters):
        return "all_caps"
    if len(sentence.split()) < min_sentence_words:
        return "too_short"
    return None


@dataclass(frozen=True)
class ContinuationPrompt:
    sentence_index: int
    prompt: str  # the sentence's first words
    rest: str  # the rest of the sentence as written (leading space kept): the human continuation


def continuation_prompts(
    sentences_: list[str],
    start: int,
    stop: int,
    rng: random.Random,
    *,
    min_prompt_words: int = 6,
    max_prompt_words: int = 12,
) -> tuple[list[ContinuationPrompt], dict[str, int]]:
    """Prompts from the eligible sentences in ``sentences_[start:stop]``, in ``rng``-shuffled order.

    Each prompt is a strict prefix of its sentence of ``min_prompt_words``..``max_prompt_words`` words (drawn
    from ``rng`` after the shuffle, in the shuffled order: the order of draws is part of the dataset's
    reproducibility). Returns the prompts and the count of skipped sentences by reason.
    """
    first_story = story_start(sentences_)
    min_sentence_words = min_prompt_words + 1
    skipped: dict[str, int] = {}
    pool: list[tuple[int, str]] = []
    for index in range(start, stop):
        reason = skip_reason(index, sentences_[index], first_story, min_sentence_words)
        if reason is None:
            pool.append((index, sentences_[index]))
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    rng.shuffle(pool)
    prompts = []
    for index, sentence in pool:
        n_words = min(rng.randint(min_prompt_words, max_prompt_words), len(sentence.split()) - 1)
        prompt = word_prefix(sentence, n_words)
        prompts.append(ContinuationPrompt(index, prompt, sentence[len(prompt) :]))
    return prompts, skipped
