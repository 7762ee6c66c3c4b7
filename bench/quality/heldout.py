"""What the benchmark evaluates on, none of it trained on.

- **Prompts** for sampling: openings of sentences from the last 30 % of Botchan, which the examples dataset
  never drew a prompt from (``sentence_boundary.heldout_start_index`` in its meta file); the real rest of each
  sentence is the human continuation whose bits per byte each model is scored on.
- **A second source** (the frontier measures on both): openings of sentences of the Jargon File 4.4.7 (public
  domain; Debian's ``jargon-text`` package, fetched by scripts/setup), a text the project never trains on and of
  another kind than the training prompts' novel (hacker-culture definitions and folklore, 1970s-2003).
- **Held-out pairs**: the examples validation file (prompts disjoint from the training file's).

Encoded per tokenizer exactly as training encodes (``PairEncoder``: raw prompt with the tokenizer's own start
tokens, the prompt keeping its end, responses cut to the same budget, EOS after a complete response).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.textdata import ContinuationPrompt, continuation_prompts, read_sentences, sentences
from ctpd_core.data import PreferencePair, load_pairs
from ctpd_core.encoding import EncodingConfig, PairEncoder

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "data"
TRAIN_FILE = EXAMPLES / "sentiment-pairs.jsonl"
VALIDATION_FILE = EXAMPLES / "sentiment-pairs-validation.jsonl"
META_FILE = EXAMPLES / "sentiment-pairs.meta.json"
BOOK = REPO / ".cache" / "assets" / "botchan.txt"
PROMPT_SEED = 20260601  # which held-out sentences, and how many words each prompt keeps
JARGON = REPO / ".cache" / "assets" / "jargon.txt"
# What jargon_sentences finds in the Jargon File 4.4.7 (jargon-text 4.4.7-4.1): another count means another text.
JARGON_SENTENCES = 8435
JARGON_PROMPT_SEED = 20261214
# Entry labels and the abbreviations a sentence splitter at ". " cuts after: a fragment ending in one is no sentence.
_ABBREVIATIONS = frozenset({
    "e.g.", "i.e.", "usu.", "prob.", "esp.", "cf.", "vs.", "etc.", "n.", "v.", "vt.", "vi.", "adj.", "adv.", "obs.",
    "pl.", "Mr.", "Dr.", "St.", "Ms.", "Mrs.", "Jr.", "Sr.", "Inc.", "Co.", "Ltd.", "No.", "approx.", "orig.",
})
_PLAIN_QUOTES = str.maketrans("“”‘’", "\"\"''")
_SENTENCE_CLOSE = re.compile(r"[.!?][\"')]*$")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)+")
# Pronunciation keys (/god·zil'@·gram/), paths, addresses, markup and newsgroup names: not prose to continue.
_NOT_PROSE = re.compile(r"[/@·|<>=_\\]|https?:|\bcomp\.|\balt\.")


def heldout_prompts(count: int, *, book: Path = BOOK, meta_file: Path = META_FILE) -> list[ContinuationPrompt]:
    """``count`` prompts from the held-out part of the book (sentences the dataset never prompted from)."""
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    sentences = read_sentences(book)
    if len(sentences) != meta["sentence_boundary"]["total_sentences"]:
        raise ValueError(
            f"{book} splits into {len(sentences)} sentences, but the dataset was built from "
            f"{meta['sentence_boundary']['total_sentences']}: it is not the same text (rerun scripts/setup)"
        )
    start = meta["sentence_boundary"]["heldout_start_index"]
    words = meta["prompt_selection"]["words"]
    prompts, _ = continuation_prompts(
        sentences, start, len(sentences), random.Random(PROMPT_SEED), min_prompt_words=words[0],
        max_prompt_words=words[1],
    )
    if len(prompts) < count:
        raise ValueError(f"only {len(prompts)} held-out prompts are eligible; ask for at most that many")
    return prompts[:count]


def training_subset(count: int, seed: int, out_file: Path, *, source: Path = TRAIN_FILE) -> Path:
    """A seeded sample of ``count`` training pairs, written as a dataset file (the seed's training data)."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if count > len(lines):
        raise ValueError(f"{source} has {len(lines)} pairs; a run cannot train on {count}")
    chosen = sorted(random.Random(f"train-subset-{seed}").sample(range(len(lines)), count))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("".join(lines[i] + "\n" for i in chosen), encoding="utf-8")
    return out_file


@dataclass(frozen=True)
class EvalSet:
    """The held-out material under one tokenizer."""

    prompts: list[str]
    prompt_ids: list[list[int]]  # sampling and bits-per-byte prompts
    rests: list[str]  # the human continuations
    rest_ids: list[list[int]]
    pair_prompt_ids: list[list[int]]  # held-out pairs
    chosen_ids: list[list[int]]  # with EOS, as trained
    rejected_ids: list[list[int]]


def build_eval_set(
    tokenizer: Any,
    prompts: list[ContinuationPrompt],
    pairs: list[PreferencePair],
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
) -> EvalSet:
    scored = PairEncoder(tokenizer, tokenizer, EncodingConfig(max_prompt_tokens, max_response_tokens))
    # Real text goes on after the sentence: no EOS, and the whole rest is scored.
    plain = PairEncoder(tokenizer, tokenizer, EncodingConfig(max_prompt_tokens, 10_000, eos_span=False))

    def split(encoded) -> tuple[list[int], list[int]]:
        ids, n = encoded.student.input_ids.tolist(), encoded.student.prompt_length
        return ids[:n], ids[n:]

    prompt_ids, rest_ids = [], []
    for prompt in prompts:
        (encoded,) = plain.encode_responses(prompt.prompt, [prompt.rest])
        p, r = split(encoded)
        prompt_ids.append(p)
        rest_ids.append(r)
    pair_prompt_ids, chosen_ids, rejected_ids = [], [], []
    for pair in pairs:
        chosen, rejected = scored.encode_responses(pair.prompt, [pair.chosen, pair.rejected])
        p, c = split(chosen)
        pair_prompt_ids.append(p)
        chosen_ids.append(c)
        rejected_ids.append(split(rejected)[1])
    return EvalSet(
        prompts=[p.prompt for p in prompts],
        prompt_ids=prompt_ids,
        rests=[p.rest for p in prompts],
        rest_ids=rest_ids,
        pair_prompt_ids=pair_prompt_ids,
        chosen_ids=chosen_ids,
        rejected_ids=rejected_ids,
    )


def validation_pairs(count: int, *, source: Path = VALIDATION_FILE) -> list[PreferencePair]:
    pairs = load_pairs(source)
    return pairs[:count]


# ------------------------------------------------------------------------------------------ the second source


def jargon_sentences(text: str) -> list[str]:
    """The prose sentences of the Jargon File's lexicon and appendices (from its ``Glossary`` heading to its
    ``Bibliography``), in order: cross-reference braces (``{foo}`` → ``foo``) and typographic quotes made plain,
    headword lines dropped, and fragments dropped that a split at ". " leaves (ending in an abbreviation or
    initials, starting in lower case, without a closing . ! ?) or that are not prose (pronunciations, paths)."""
    start = re.search(r"^Glossary$", text, re.M)
    end = re.search(r"^Bibliography$", text, re.M)
    if start is None or end is None:
        raise ValueError("no Glossary ... Bibliography section: this is not the Jargon File 4.4.7 (rerun scripts/setup)")
    body = text[start.end() : end.start()].translate(_PLAIN_QUOTES)
    while True:  # cross-references nest ("{{VAX}}"): unwrap until none is left
        unwrapped = re.sub(r"\{([^{}]*)\}", r"\1", body)
        if unwrapped == body:
            break
        body = unwrapped
    found = []
    for block in re.split(r"\n\s*\n", body):
        paragraph = " ".join(block.split())
        if not paragraph or paragraph.startswith(":"):  # ":headword: n." lines
            continue
        for sentence in sentences(paragraph):
            last = sentence.split()[-1].rstrip("\"')")
            if not _SENTENCE_CLOSE.search(sentence) or last in _ABBREVIATIONS or _INITIALS.fullmatch(last):
                continue
            if not (sentence[0].isupper() or sentence[0] in "\"'") or _NOT_PROSE.search(sentence):
                continue
            found.append(sentence)
    return found


def jargon_prompts(count: int, *, text_file: Path = JARGON) -> list[ContinuationPrompt]:
    """``count`` prompts from the Jargon File: sentence openings of 6-12 words (as the Botchan prompts), in a
    fixed seeded order."""
    if not text_file.exists():
        raise ValueError(f"{text_file} is missing: run scripts/setup (it extracts the Jargon File from jargon-text)")
    found = jargon_sentences(text_file.read_text(encoding="utf-8"))
    if len(found) != JARGON_SENTENCES:
        raise ValueError(
            f"{text_file} gives {len(found)} sentences, the Jargon File 4.4.7 {JARGON_SENTENCES}: it is not the same "
            "text (delete it and rerun scripts/setup)"
        )
    prompts, _ = continuation_prompts(found, 0, len(found), random.Random(JARGON_PROMPT_SEED), min_prompt_words=6,
                                      max_prompt_words=12)
    if len(prompts) < count:
        raise ValueError(f"only {len(prompts)} Jargon File prompts are eligible; ask for at most that many")
    return prompts[:count]


@dataclass(frozen=True)
class HeldoutSource:
    """A held-out text the models are sampled on. ``pairs``: whether its measurement also scores the held-out
    preference pairs (they come from the training pairs' own source, so only Botchan's does)."""

    key: str
    label: str
    description: str
    prompts: Callable[[int], list[ContinuationPrompt]]
    pairs: bool


HELDOUT_SOURCES: dict[str, HeldoutSource] = {
    "botchan": HeldoutSource(
        "botchan", "Botchan (held-out 30 %)",
        "openings of sentences from the last 30 % of Botchan (Natsume Sōseki, tr. 1918), which no training prompt "
        "came from; the training prompts are openings from the first 70 %", heldout_prompts, True,
    ),
    "jargon": HeldoutSource(
        "jargon", "Jargon File 4.4.7",
        "openings of sentences of the Jargon File 4.4.7 (public domain, Debian's jargon-text), a text the project "
        "never trains on and of another kind (hacker-culture definitions)", jargon_prompts, False,
    ),
}


def prompts_digest(prompts: list[ContinuationPrompt]) -> str:
    """A short hash of the prompts and their continuations: a stored measurement names the prompts it used."""
    text = json.dumps([[p.prompt, p.rest] for p in prompts], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
