"""bench/quality/sampling.py and the free-text helpers of bench/quality/freetext.py, on the tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.quality.freetext import bits_per_byte, sequence_kl, sequence_logprobs
from bench.quality.sampling import SamplingConfig, clean_continuation, cut_at_control, sample_continuations
from ctpd_core.encoding import EncodingConfig, PairEncoder
from ctpd_core.models import load_causal_lm
from tests.conftest import catalog_cache

CPU = torch.device("cpu")
PROMPTS = ["It was a fine day and", "The teacher said that", "I"]


@pytest.fixture(scope="module")
def student(tiny_student_folder):
    model, tokenizer = load_causal_lm(str(tiny_student_folder), cache_dir=catalog_cache())
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def prompt_ids(student):
    _, tokenizer = student
    encoder = PairEncoder(tokenizer, tokenizer, EncodingConfig())
    return [encoder.prompt_ids(p, "student") for p in PROMPTS]


def test_cut_at_control_and_clean_continuation():
    assert cut_at_control([5, 6, 1, 7], {1, 2}, ignore={1}) == ([5, 6], False)
    assert cut_at_control([5, 2, 1], {1, 2}, ignore={1}) == ([5], True)
    assert cut_at_control([5, 6], {1}, ignore=set()) == ([5, 6], False)
    assert clean_continuation(" a happy day.  \nNext") == (" a happy day.", True)
    assert clean_continuation(" kept as is") == (" kept as is", False)


def test_samples_are_reproducible_per_seed_and_shaped_per_prompt(student, prompt_ids):
    model, tokenizer = student
    config = SamplingConfig(num_samples=3, max_new_tokens=8, seed=7, batch_size=2)
    first = sample_continuations(model, tokenizer, PROMPTS, prompt_ids, config, device=CPU)
    again = sample_continuations(model, tokenizer, PROMPTS, prompt_ids, config, device=CPU)
    other = sample_continuations(
        model, tokenizer, PROMPTS, prompt_ids, SamplingConfig(num_samples=3, max_new_tokens=8, seed=8, batch_size=2),
        device=CPU,
    )
    assert [len(row) for row in first] == [3, 3, 3]
    assert [[s.token_ids for s in row] for row in first] == [[s.token_ids for s in row] for row in again]
    assert [[s.token_ids for s in row] for row in first] != [[s.token_ids for s in row] for row in other]
    for row in first:
        for sample in row:
            assert len(sample.token_ids) <= 8 + 1
            # An ended sample carries its EOS; a running one has exactly max_new_tokens tokens.
            if sample.ended:
                assert sample.token_ids[-1] == tokenizer.eos_token_id
            else:
                assert len(sample.token_ids) == 8
            assert "\n" not in sample.text


def test_sampling_is_plain_ancestral_sampling(student, prompt_ids):
    """top_k 0 and top_p 1: a token outside the model's top 50 can be drawn (the HF default top_k=50 would
    never draw one), which is what makes the KL on the samples the policy's own."""
    model, tokenizer = student
    config = SamplingConfig(num_samples=16, max_new_tokens=1, seed=0, batch_size=4)
    rows = sample_continuations(model, tokenizer, PROMPTS, prompt_ids, config, device=CPU)
    ranks = []
    for ids, row in zip(prompt_ids, rows, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        order = torch.argsort(logits, descending=True).tolist()
        ranks += [order.index(s.token_ids[0]) for s in row if s.token_ids]
    assert max(ranks) >= 50  # an untrained tiny model is near uniform over ~1k tokens


def test_sequence_logprobs_match_a_direct_forward(student, prompt_ids):
    model, _ = student
    responses = [[10, 11, 12], [13], [14, 15]]
    got = sequence_logprobs(model, prompt_ids, responses, pad_id=0, batch_size=2, device=CPU)
    for ids, response, values in zip(prompt_ids, responses, got, strict=True):
        full = torch.tensor([ids + response])
        with torch.no_grad():
            logps = torch.log_softmax(model(full).logits[0].float(), dim=-1)
        expected = [float(logps[len(ids) - 1 + j, token]) for j, token in enumerate(response)]
        np.testing.assert_allclose(values, expected, atol=1e-5)
    assert bits_per_byte(got, ["abc", "d", "ef"]) == pytest.approx(
        -sum(v.sum() for v in got) / (np.log(2) * 6)
    )


def test_sequence_kl_is_zero_against_itself_and_matches_the_full_distributions(student, prompt_ids, tiny_student_folder):
    model, _ = student
    other, _ = load_causal_lm(str(tiny_student_folder), cache_dir=catalog_cache())
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    responses = [[10, 11, 12], [13], [14, 15]]
    assert np.allclose(sequence_kl(model, model, prompt_ids, responses, pad_id=0, batch_size=2, device=CPU), 0, atol=1e-6)
    got = sequence_kl(model, other, prompt_ids, responses, pad_id=0, batch_size=2, device=CPU)
    for ids, response, value in zip(prompt_ids, responses, got, strict=True):
        full = torch.tensor([ids + response])
        with torch.no_grad():
            p = torch.log_softmax(model(full).logits[0].float(), dim=-1)
            q = torch.log_softmax(other(full).logits[0].float(), dim=-1)
        positions = range(len(ids) - 1, len(ids) - 1 + len(response))
        expected = sum(float((p[t].exp() * (p[t] - q[t])).sum()) for t in positions)
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert value > 0


def test_left_padded_batches_sample_from_the_same_distribution_as_a_plain_forward(student, prompt_ids):
    """Prompts of different lengths share a left-padded batch; each drawn token's log-prob at generation time
    must equal its log-prob in an unpadded forward pass (wrong positions or masks would break this)."""
    model, tokenizer = student
    assert len({len(ids) for ids in prompt_ids}) > 1
    config = SamplingConfig(num_samples=2, max_new_tokens=6, seed=3, batch_size=3, return_logprobs=True)
    rows = sample_continuations(model, tokenizer, PROMPTS, prompt_ids, config, device=CPU)
    flat_prompts = [ids for ids, row in zip(prompt_ids, rows, strict=True) for _ in row]
    flat = [s for row in rows for s in row]
    # An ended sample's last id stands for whichever control token was drawn; compare the tokens before it.
    kept = [s.token_ids[:-1] if s.ended else s.token_ids for s in flat]
    direct = sequence_logprobs(model, flat_prompts, kept, pad_id=0, batch_size=4, device=CPU)
    for sample, tokens, values in zip(flat, kept, direct, strict=True):
        np.testing.assert_allclose(sample.logprobs[: len(tokens)], values, atol=1e-4)


def test_free_text_scoring_stops_between_batches(student):
    from ctpd_core.observe import Stopped

    class StopNow:
        def should_stop(self):
            return True

    model, _ = student
    prompts, responses = [[1, 2, 3]] * 4, [[4, 5]] * 4
    common = {"pad_id": 0, "batch_size": 2, "device": torch.device("cpu"), "precision": "fp32", "stop": StopNow()}
    with pytest.raises(Stopped):
        sequence_logprobs(model, prompts, responses, **common)
    with pytest.raises(Stopped):
        sequence_kl(model, model, prompts, responses, **common)
