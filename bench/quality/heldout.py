"""What the benchmark evaluates on, none of it trained on.

- **Prompts** for sampling: openings of sentences from the last 30 % of Botchan, which the examples dataset
  never drew a prompt from (``sentence_boundary.heldout_start_index`` in its meta file); the real rest of each
  sentence is the human continuation whose bits per byte each model is scored on.
- **Held-out pairs**: the examples validation file (prompts disjoint from the training file's).

Encoded per tokenizer exactly as training encodes (``PairEncoder``: raw prompt with the tokenizer's own start
tokens, the prompt keeping its end, responses cut to the same budget, EOS after a complete response).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.textdata import ContinuationPrompt, continuation_prompts, read_sentences
from ctpd_core.data import PreferencePair, load_pairs
from ctpd_core.encoding import EncodingConfig, PairEncoder

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "data"
TRAIN_FILE = EXAMPLES / "sentiment-pairs.jsonl"
VALIDATION_FILE = EXAMPLES / "sentiment-pairs-validation.jsonl"
META_FILE = EXAMPLES / "sentiment-pairs.meta.json"
BOOK = REPO / ".cache" / "assets" / "botchan.txt"
PROMPT_SEED = 20260601  # which held-out sentences, and how many words each prompt keeps


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
