"""Held-out metrics of a distilled student that do not depend on its tokenizer.

All quantities are sums over a response's tokens, i.e. string-level log-likelihoods, so they compare across
vocabularies (method §3.4): the student's implicit reward against its reference (the teacher for CTPD, the
initial student for the baselines), agreement with the teacher's own ranking of the two responses, bits per
byte of the chosen responses (as nanochat's ``evaluate_bpb``: nats per UTF-8 byte / ln 2), and the KL from
the initial student, computed exactly over the full next-token distributions at every held-out response
position (teacher forcing, so it is deterministic and needs no sampling).

Free-text scoring (sampled continuations, real text: one model, one tokenizer) is the quality benchmark's,
in ``bench/quality/freetext.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ctpd_core.batching import response_logprobs
from ctpd_core.inference import autocast_context, batched, collate_responses, pair_responses
from ctpd_core.logprobs import model_label_kl
from ctpd_core.observe import Observer, StopToken
from ctpd_core.records import PairRecord, TokenLogprobs
from ctpd_core.vocab import Stage


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
    precision: str,
    observer: Observer | None = None,
    stop: StopToken | None = None,
) -> dict[str, float]:
    """Metrics on held-out pairs (see the module docstring); ``reference`` and ``teacher`` hold the stored
    per-token log-probs of the same records (on their own sides)."""
    if not records:
        return {"pairs": 0}
    student.eval()
    initial_student.eval()
    final: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}  # per-token log-probs, by response
    initial: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}
    kl_total, kl_positions = 0.0, 0
    for batch_records in batched(records, batch_size, stage=Stage.EVALUATE, observer=observer, stop=stop):
        responses = pair_responses(batch_records)
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
