"""Plain-text corpora shipped inside registry packages (shared/assets.md), turned into sentences.

Used by the tests (to train tiny tokenizers on real text), the alignment benchmark and the example-dataset
builder. Pure string work: no I/O beyond reading the file it is given.
"""

from __future__ import annotations

import re
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
