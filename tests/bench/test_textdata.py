"""bench/textdata.py: the Botchan text helpers behind the example dataset and the quality benchmark."""

from __future__ import annotations


def test_continuation_prompts_are_strict_prefixes_from_the_asked_range(botchan_sentences):
    import random

    from bench.textdata import continuation_prompts

    start = len(botchan_sentences) // 2
    prompts, skipped = continuation_prompts(botchan_sentences, start, len(botchan_sentences), random.Random(3))
    assert prompts and all(start <= p.sentence_index < len(botchan_sentences) for p in prompts)
    for p in prompts:
        sentence = botchan_sentences[p.sentence_index]
        assert p.prompt + p.rest == sentence and p.rest.strip()
        assert 6 <= len(p.prompt.split()) <= 12
    again, _ = continuation_prompts(botchan_sentences, start, len(botchan_sentences), random.Random(3))
    assert again == prompts
    assert sum(skipped.values()) + len(prompts) == len(botchan_sentences) - start
