"""What bench.quality evaluates on is really held out, and the shared prompt helper still builds the dataset."""

from __future__ import annotations

import json
import random

import pytest

from bench.quality.heldout import (
    BOOK,
    META_FILE,
    TRAIN_FILE,
    VALIDATION_FILE,
    heldout_prompts,
    training_subset,
)
from bench.textdata import continuation_prompts, read_sentences


def _dataset_rows() -> list[dict]:
    return [json.loads(line) for path in (TRAIN_FILE, VALIDATION_FILE) for line in path.read_text().splitlines()]


def test_the_shared_prompt_helper_reproduces_every_prompt_of_the_committed_dataset():
    """examples/build_sentiment_pairs.py draws its prompts with bench.textdata.continuation_prompts; the
    committed files were built before that helper existed, so it must give the very same prompts."""
    meta = json.loads(META_FILE.read_text())
    sentences = read_sentences(BOOK)
    prompts, skipped = continuation_prompts(
        sentences, 0, meta["sentence_boundary"]["prompt_pool_end_exclusive"], random.Random(meta["seed"])
    )
    assert len(prompts) == meta["prompt_selection"]["eligible_prompts"]
    assert skipped == meta["prompt_selection"]["skipped_sentences"]
    drawn = {(p.sentence_index, p.prompt) for p in prompts}
    for row in _dataset_rows():
        assert (int(row["source"].split("=")[1]), row["prompt"]) in drawn


def test_heldout_prompts_come_from_sentences_the_dataset_never_used():
    meta = json.loads(META_FILE.read_text())
    start = meta["sentence_boundary"]["heldout_start_index"]
    prompts = heldout_prompts(64)
    assert len(prompts) == 64 and len({p.sentence_index for p in prompts}) == 64
    assert all(p.sentence_index >= start for p in prompts)
    used = {int(row["source"].split("=")[1]) for row in _dataset_rows()}
    assert used.isdisjoint(p.sentence_index for p in prompts)
    assert heldout_prompts(64) == prompts  # fixed, whatever the training seed
    with pytest.raises(ValueError, match="held-out prompts are eligible"):
        heldout_prompts(100_000)


def test_training_subsets_are_seeded_samples_of_the_training_file(tmp_path):
    first = training_subset(32, 0, tmp_path / "a.jsonl").read_text().splitlines()
    again = training_subset(32, 0, tmp_path / "b.jsonl").read_text().splitlines()
    other = training_subset(32, 1, tmp_path / "c.jsonl").read_text().splitlines()
    source = set(TRAIN_FILE.read_text().splitlines())
    assert first == again and first != other
    assert len(set(first)) == 32 and set(first) <= source
    with pytest.raises(ValueError, match="cannot train on"):
        training_subset(10_000, 0, tmp_path / "d.jsonl")


def test_jargon_sentences_keep_prose_and_drop_headwords_fragments_and_pronunciations():
    from bench.quality.heldout import jargon_sentences

    text = (
        "Front matter that is not read. It has sentences too.\n"
        "Glossary\n\n"
        "   :gobble: vt.\n\n"
        "   1. To consume, usu.: used with ‘up’. “The output spy gobbles characters out of a {tty} output buffer.”\n\n"
        "   :Godzillagram: /god·zil'@·gram/, n.\n\n"
        "   A network packet that in theory is a broadcast to every machine, e.g. a datagram sent to all. Hackers say"
        " it with a straight face and a /slash/ in it. Another ends\n   without a stop\n\n"
        "Bibliography\n\nA book that comes after the end of the lexicon.\n"
    )
    assert jargon_sentences(text) == [
        "To consume, usu.: used with 'up'.",
        '"The output spy gobbles characters out of a tty output buffer."',
    ]
    with pytest.raises(ValueError, match="not the Jargon File"):
        jargon_sentences("no headings here")


def test_jargon_prompts_are_a_fixed_sample_of_the_packaged_text_never_trained_on():
    from bench.quality.heldout import HELDOUT_SOURCES, JARGON, jargon_prompts, prompts_digest

    if not JARGON.exists():
        pytest.fail(f"{JARGON} is missing: run scripts/setup (it extracts the Jargon File from jargon-text)")
    prompts = jargon_prompts(64)
    assert len({p.sentence_index for p in prompts}) == 64
    assert all(6 <= len(p.prompt.split()) <= 12 and p.rest.strip() for p in prompts)
    assert not any(c in p.prompt + p.rest for p in prompts for c in "{}“”")
    assert prompts_digest(jargon_prompts(64)) == prompts_digest(prompts)  # the same prompts on every machine
    assert prompts_digest(prompts[:10]) != prompts_digest(prompts[1:11])
    training_prompts = {row["prompt"] for row in _dataset_rows()}
    assert training_prompts.isdisjoint(p.prompt for p in prompts)
    assert HELDOUT_SOURCES["jargon"].pairs is False and HELDOUT_SOURCES["botchan"].pairs is True
    with pytest.raises(ValueError, match="Jargon File prompts are eligible"):
        jargon_prompts(100_000)
