"""One model's measurements on the held-out material (see ``heldout``).

- ``samples``: ``samples_per_prompt`` continuations of every held-out prompt (plain sampling, temperature 1,
  fixed seeds shared by every model), each with its ground-truth reward: the VADER compound score (-1..1) of
  the continuation's text alone.
- ``kl``: Σ over each sample's positions of the exact KL(model ‖ initial model) of the next-token
  distributions, averaged over samples (nats per continuation); 0 for an initial model.
- ``bits_per_byte``: of the real rest of each held-out sentence, given its prompt.
- ``kls``: the per-sample KLs behind ``kl``, ``[prompt][sample]`` as ``rewards`` (the frontier's bootstrap
  resamples prompts on both axes).
- ``preference_accuracy``: on held-out pairs (None for an evaluation set without pairs), how often the model raised log p(chosen) − log p(rejected)
  above the initial model's (its implicit reward against the *initial model of its own family*, so it compares
  across methods whatever their training reference was); a tie counts half, so an untrained model scores 0.5.
  ``likelihood_accuracy``: how often log p(chosen) > log p(rejected) outright.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.quality.freetext import bits_per_byte, sequence_kl, sequence_logprobs
from bench.quality.heldout import EvalSet
from bench.quality.sampling import SamplingConfig, sample_continuations
from bench.quality.stats import distinct_ngrams, preference_accuracy
from ctpd_core.inference import pad_token_id


def vader_scorer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda text: float(analyzer.polarity_scores(text)["compound"])


def pair_logprob_sums(model: Any, eval_set: EvalSet, **common: Any) -> tuple[np.ndarray, np.ndarray]:
    """log p(chosen) and log p(rejected) of every held-out pair (sums over the response tokens and EOS)."""
    chosen = sequence_logprobs(model, eval_set.pair_prompt_ids, eval_set.chosen_ids, **common)
    rejected = sequence_logprobs(model, eval_set.pair_prompt_ids, eval_set.rejected_ids, **common)
    return np.array([c.sum() for c in chosen]), np.array([r.sum() for r in rejected])


def measure_model(
    model: Any,
    tokenizer: Any,
    initial_model: Any | None,
    eval_set: EvalSet,
    sampling: SamplingConfig,
    *,
    reward,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    initial_pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Every measurement of ``model``; ``initial_model`` None means ``model`` is itself the initial model.
    ``initial_pairs``: the initial model's :func:`pair_logprob_sums`, when the caller keeps them."""
    pad = pad_token_id(tokenizer)
    common: dict[str, Any] = {"pad_id": pad, "batch_size": batch_size, "device": device, "precision": precision}
    samples = sample_continuations(model, tokenizer, eval_set.prompts, eval_set.prompt_ids, sampling, device=device,
                                   precision=precision)
    rewards = [[reward(s.text) for s in row] for row in samples]
    flat_prompts = [ids for ids, row in zip(eval_set.prompt_ids, samples, strict=True) for _ in row]
    flat_samples = [s.token_ids for row in samples for s in row]
    if initial_model is None:
        kl = np.zeros(len(flat_samples))
    else:
        # fp32 whatever the precision: under bf16 autocast, rounding the logits over a 262k vocabulary would bias
        # a small KL upwards.
        kl = sequence_kl(model, initial_model, flat_prompts, flat_samples, **{**common, "precision": "fp32"})

    rest_logps = sequence_logprobs(model, eval_set.prompt_ids, eval_set.rest_ids, **common)
    accuracy: float | None = None
    likelihood: float | None = None
    if eval_set.pair_prompt_ids:
        chosen, rejected = pair_logprob_sums(model, eval_set, **common)
        if initial_model is None:
            initial_chosen, initial_rejected = chosen, rejected
        else:
            initial_chosen, initial_rejected = initial_pairs or pair_logprob_sums(initial_model, eval_set, **common)
        accuracy = preference_accuracy(chosen - initial_chosen, rejected - initial_rejected)
        likelihood = float(np.mean(chosen > rejected))
    texts = [s.text for row in samples for s in row]
    per_prompt = np.cumsum([0] + [len(row) for row in samples])
    return {
        "reward": float(np.mean(rewards)),
        "kl": float(np.mean(kl)),
        "kls": [kl[a:b].tolist() for a, b in zip(per_prompt[:-1], per_prompt[1:], strict=True)],
        "kl_per_token": float(np.sum(kl) / max(sum(len(t) for t in flat_samples), 1)),
        "bits_per_byte": bits_per_byte(rest_logps, eval_set.rests),
        "preference_accuracy": accuracy,
        "likelihood_accuracy": likelihood,
        "mean_tokens": float(np.mean([len(t) for t in flat_samples])),
        "ended_share": float(np.mean([s.ended for row in samples for s in row])),
        "distinct_2": distinct_ngrams(texts, 2),
        "rewards": rewards,  # [prompt][sample]: the win rates are computed from these
        "samples": [[s.text for s in row] for row in samples],
    }
