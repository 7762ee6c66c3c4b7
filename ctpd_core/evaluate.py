"""Held-out metrics of a distilled student that do not depend on its tokenizer.

All quantities are sums over a response's tokens, i.e. string-level log-likelihoods, so they compare across
vocabularies (method §3.4): the student's implicit reward against its reference (the teacher for CTPD, the
initial student for the baselines), agreement with the teacher's own ranking of the two responses, bits per
byte of the chosen responses (as nanochat's ``evaluate_bpb``: nats per UTF-8 byte / ln 2), and the KL from
the initial student, computed exactly over the full next-token distributions at every held-out response
position (teacher forcing, so it is deterministic and needs no sampling).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ctpd_core.batching import collate_side, response_logprobs
from ctpd_core.logprobs import model_label_kl
from ctpd_core.pipeline import PairRecord, TokenLogprobs, batches, collate_responses, progress_of
from ctpd_core.train import ProgressCallback, autocast_context


def _sums(rows: Sequence[np.ndarray]) -> np.ndarray:
    return np.asarray([float(np.sum(r)) for r in rows], dtype=np.float64)


@torch.inference_mode()
def evaluate_student(
    student: nn.Module,
    initial_student: nn.Module,
    records: Sequence[PairRecord],
    *,
    reference: TokenLogprobs,
    teacher: TokenLogprobs | None,
    beta: float,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    progress: ProgressCallback | None = None,
) -> dict[str, float]:
    """Metrics on held-out pairs (see the module docstring); ``reference`` and ``teacher`` hold the stored
    per-token log-probs of the same records (on their own sides)."""
    if not records:
        return {"pairs": 0}
    student.eval()
    initial_student.eval()
    final = {"chosen": [], "rejected": []}
    initial = {"chosen": [], "rejected": []}
    kl_total, kl_positions = 0.0, 0
    started = time.monotonic()
    done = 0
    for batch_records in batches(records, batch_size):
        responses = [r.chosen for r in batch_records] + [r.rejected for r in batch_records]
        batch = collate_responses(responses, "student", pad_id).to(device)
        lengths = batch.response_mask.sum(dim=1).tolist()
        with autocast_context(device, precision):
            for model, store in ((student, final), (initial_student, initial)):
                logps = response_logprobs(model, batch).float().cpu().numpy()
                rows = [logps[i, : lengths[i]] for i in range(len(responses))]
                store["chosen"] += rows[: len(batch_records)]
                store["rejected"] += rows[len(batch_records) :]
            kl_positions_batch = model_label_kl(
                student, initial_student, batch.input_ids, batch.attention_mask, batch.labels
            )  # [2b, T]
        kl, count = float(kl_positions_batch.sum()), batch.num_tokens
        kl_total += kl
        kl_positions += count
        done += len(batch_records)
        if progress:
            progress(progress_of("evaluate", done, len(records), started))

    student_w, student_l = _sums(final["chosen"]), _sums(final["rejected"])
    initial_w, initial_l = _sums(initial["chosen"]), _sums(initial["rejected"])
    reference_w, reference_l = _sums(reference.chosen), _sums(reference.rejected)
    reward_w, reward_l = beta * (student_w - reference_w), beta * (student_l - reference_l)
    initial_reward_w, initial_reward_l = beta * (initial_w - reference_w), beta * (initial_l - reference_l)
    metrics: dict[str, float] = {
        "pairs": float(len(records)),
        "preference_accuracy": float(np.mean(reward_w > reward_l)),
        "reward_margin": float(np.mean(reward_w - reward_l)),
        "chosen_reward": float(np.mean(reward_w)),
        "rejected_reward": float(np.mean(reward_l)),
        "initial_preference_accuracy": float(np.mean(initial_reward_w > initial_reward_l)),
        "initial_reward_margin": float(np.mean(initial_reward_w - initial_reward_l)),
        "likelihood_preference_accuracy": float(np.mean(student_w > student_l)),
        "bits_per_byte_chosen": _bits_per_byte(final["chosen"], [r.chosen for r in records]),
        "initial_bits_per_byte_chosen": _bits_per_byte(initial["chosen"], [r.chosen for r in records]),
        "kl_from_initial_per_token": kl_total / max(kl_positions, 1),
        "kl_from_initial_per_response": kl_total / (2 * len(records)),
    }
    if teacher is not None:
        teacher_prefers = _sums(teacher.chosen) > _sums(teacher.rejected)
        metrics["teacher_agreement"] = float(np.mean((student_w > student_l) == teacher_prefers))
        metrics["initial_teacher_agreement"] = float(np.mean((initial_w > initial_l) == teacher_prefers))
    return metrics


def _bits_per_byte(token_logps: Sequence[np.ndarray], responses: Sequence[Any]) -> float:
    """−Σ log p / (ln 2 · bytes) over the response text (the EOS token, which has no bytes, left out)."""
    text_logps = [lp[:-1] if r.has_eos else lp for lp, r in zip(token_logps, responses, strict=True)]
    return _nats_per_byte_in_bits(text_logps, sum(r.num_bytes for r in responses))


def _nats_per_byte_in_bits(token_logps: Sequence[np.ndarray], total_bytes: int) -> float:
    return -sum(float(np.sum(lp)) for lp in token_logps) / (math.log(2) * max(total_bytes, 1))


# ------------------------------------------------------------------------------------ one model, free text
# Helpers that score (prompt ids, response ids) of a single tokenizer: sampled continuations and real text,
# rather than prepared pairs. The benchmark in bench/quality/ is built on them.


def _sequence_batches(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int
):
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start : start + batch_size]
        responses = response_ids[start : start + batch_size]
        sequences = [np.asarray(list(p) + list(r), dtype=np.int64) for p, r in zip(prompts, responses, strict=True)]
        spans = [np.arange(len(r), dtype=np.int64) for r in responses]  # one span per token: no alignment here
        yield collate_side(sequences, [len(p) for p in prompts], spans, pad_id), [len(r) for r in responses]


@torch.inference_mode()
def sequence_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
) -> list[np.ndarray]:
    """Per-token log-probs of each response given its prompt (an empty response gives an empty array)."""
    model.eval()
    out: list[np.ndarray] = []
    for batch, lengths in _sequence_batches(prompt_ids, response_ids, pad_id, batch_size):
        batch = batch.to(device)
        with autocast_context(device, precision):
            logps = response_logprobs(model, batch).float().cpu().numpy()
        out += [logps[i, :n].astype(np.float64) for i, n in enumerate(lengths)]
    return out


@torch.inference_mode()
def sequence_kl(
    model: nn.Module,
    reference_model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
) -> np.ndarray:
    """Σ over response positions of the exact KL(model ‖ reference_model) of the next-token distributions,
    one value per response. On the model's own samples this is the sequence-level KL of the DPO paper's
    reward-KL frontier, without the variance of a log-ratio estimate."""
    model.eval()
    reference_model.eval()
    out: list[float] = []
    for batch, _ in _sequence_batches(prompt_ids, response_ids, pad_id, batch_size):
        batch = batch.to(device)
        with autocast_context(device, precision):
            kl = model_label_kl(model, reference_model, batch.input_ids, batch.attention_mask, batch.labels)
        out += kl.sum(dim=1).double().cpu().tolist()
    return np.asarray(out, dtype=np.float64)


def bits_per_byte(token_logps: Sequence[np.ndarray], texts: Sequence[str]) -> float:
    """−Σ log p / (ln 2 · UTF-8 bytes): comparable across tokenizers (nanochat's ``evaluate_bpb``)."""
    return _nats_per_byte_in_bits(token_logps, sum(len(t.encode("utf-8")) for t in texts))
