"""KD baselines (method §8): SFT and ULD by hand, the two ULD alignments, and the fit() loss on tiny models."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ctpd_core.batching import SideBatch, collate_side, response_logprobs
from ctpd_core.data import load_pairs
from ctpd_core.encoding import EncodingConfig
from ctpd_core.inference import collate_responses
from ctpd_core.kd import KdConfig, aligned_positions, make_kd_loss, sft_loss, uld_distance, uld_loss
from ctpd_core.models import load_causal_lm
from ctpd_core.observe import NullObserver
from ctpd_core.pipeline import prepare
from ctpd_core.records import TrainItem
from ctpd_core.train import FitConfig, fit

CPU = torch.device("cpu")


def probability_logits(*rows: tuple[float, ...]) -> torch.Tensor:
    """Logits whose softmax is exactly the given probabilities (log p; log 0 = −inf)."""
    return torch.tensor([[math.log(p) if p > 0 else -math.inf for p in row] for row in rows])


# ---------------------------------------------------------------------------------------------------- SFT


def test_sft_loss_hand_computed_ignores_padding_even_non_finite() -> None:
    token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, math.nan, -math.inf]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, stats = sft_loss(token_logps, mask)
    torch.testing.assert_close(loss, torch.tensor((1.0 + 2.0 + 0.5) / 3))  # a mean over the 3 tokens, not rows
    torch.testing.assert_close(stats["nll"], loss.detach())
    assert not stats["nll"].requires_grad


def test_sft_loss_gradient_is_minus_one_over_the_token_count() -> None:
    token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    sft_loss(token_logps, mask)[0].backward()
    torch.testing.assert_close(token_logps.grad, -mask.float() / 3)


@pytest.mark.parametrize(
    ("token_logps", "mask", "message"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), "selects no response token"),
        (torch.zeros(2, 3), torch.ones(2, 3), "must be a bool tensor"),
        (torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), "must be a bool tensor"),
        (torch.zeros(6), torch.ones(6, dtype=torch.bool), r"float tensor \[B, R\]"),
    ],
)
def test_sft_loss_rejects_bad_inputs(token_logps: torch.Tensor, mask: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sft_loss(token_logps, mask)


# ---------------------------------------------------------------------------------------------------- ULD

# Two positions; the student has a vocabulary of 3, the teacher one of 4.
STUDENT_PROBS = ((0.2, 0.5, 0.3), (0.6, 0.3, 0.1))
TEACHER_PROBS = ((0.1, 0.4, 0.1, 0.4), (0.25, 0.25, 0.25, 0.25))
# Sorted in descending order, the student's zero-padded to 4:
#   position 0: student [0.5, 0.3, 0.2, 0.0], teacher [0.4, 0.4, 0.1, 0.1]
#               → |0.1| + |−0.1| + |0.1| + |−0.1| = 0.4
#   position 1: student [0.6, 0.3, 0.1, 0.0], teacher [0.25, 0.25, 0.25, 0.25]
#               → 0.35 + 0.05 + 0.15 + 0.25 = 0.8
EXPECTED_DISTANCES = torch.tensor([0.4, 0.8])


def test_uld_distance_hand_computed() -> None:
    distances = uld_distance(probability_logits(*STUDENT_PROBS), probability_logits(*TEACHER_PROBS))
    assert distances.dtype == torch.float32 and distances.shape == (2,)
    torch.testing.assert_close(distances, EXPECTED_DISTANCES)


def test_uld_distance_zero_pads_whichever_vocabulary_is_shorter() -> None:
    # The same pair with the roles exchanged: now the teacher's vocabulary is the shorter one.
    swapped = uld_distance(probability_logits(*TEACHER_PROBS), probability_logits(*STUDENT_PROBS))
    torch.testing.assert_close(swapped, EXPECTED_DISTANCES)
    # One-hot teacher over 2 tokens against [0.5, 0.25, 0.25]: sorted and padded, [1, 0, 0] vs
    # [0.5, 0.25, 0.25] → 0.5 + 0.25 + 0.25 = 1.0 (the padded tail counts in full).
    torch.testing.assert_close(
        uld_distance(probability_logits((0.5, 0.25, 0.25)), probability_logits((1.0, 0.0))), torch.tensor([1.0])
    )
    # A distribution padded with a zero-probability token is the same distribution: distance 0.
    torch.testing.assert_close(
        uld_distance(probability_logits((0.5, 0.3, 0.2, 0.0)), probability_logits((0.3, 0.2, 0.5))),
        torch.tensor([0.0]),
    )


def test_uld_distance_of_identical_distributions_is_zero() -> None:
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(uld_distance(logits, logits.clone()), torch.zeros(5))


def test_uld_distance_ignores_which_token_has_which_probability() -> None:
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 6, generator=generator), torch.randn(4, 9, generator=generator)
    expected = uld_distance(student, teacher)
    permuted = uld_distance(student[:, torch.randperm(6, generator=generator)],
                            teacher[:, torch.randperm(9, generator=generator)])
    torch.testing.assert_close(permuted, expected)
    assert bool((expected > 0).all()) and bool((expected <= 2).all())  # an L1 distance of two distributions


def test_uld_distance_gradient_hand_computed_and_teacher_detached() -> None:
    student = probability_logits(STUDENT_PROBS[0]).requires_grad_(True)
    teacher = probability_logits(TEACHER_PROBS[0]).requires_grad_(True)
    uld_distance(student, teacher).sum().backward()
    # Sorted, the student's tokens are 1 (0.5 > 0.4: sign +), 2 (0.3 < 0.4: −), 0 (0.2 > 0.1: +), so
    # d/dp = g = [+1, +1, −1]; through the softmax d/dz_k = p_k (g_k − Σ_j p_j g_j), Σ p g = 0.4:
    # [0.2 · 0.6, 0.5 · 0.6, 0.3 · (−1.4)].
    torch.testing.assert_close(student.grad, torch.tensor([[0.12, 0.30, -0.42]]))
    assert teacher.grad is None  # the teacher is a constant of the loss


def test_uld_loss_hand_computed() -> None:
    ce_logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, stats = uld_loss(ce_logps, mask, probability_logits(*STUDENT_PROBS), probability_logits(*TEACHER_PROBS), 0.5)
    # (1 − κ) · NLL + κ · mean ULD = 0.5 · 3.5 / 3 + 0.5 · (0.4 + 0.8) / 2
    torch.testing.assert_close(loss, torch.tensor(0.5 * 3.5 / 3 + 0.5 * 0.6))
    torch.testing.assert_close(stats["nll"], torch.tensor(3.5 / 3))
    torch.testing.assert_close(stats["uld"], torch.tensor(0.6))
    assert all(not value.requires_grad for value in stats.values())


def test_uld_loss_at_kappa_zero_is_exactly_sft_and_gives_the_logits_no_gradient() -> None:
    ce_logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    student = probability_logits(*STUDENT_PROBS).requires_grad_(True)
    loss, _ = uld_loss(ce_logps, mask, student, probability_logits(*TEACHER_PROBS), 0.0)
    expected, _ = sft_loss(ce_logps, mask)
    assert torch.equal(loss, expected)
    loss.backward()
    assert student.grad is not None and torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("kappa", [-0.1, 1.5, math.nan, True])
def test_uld_loss_rejects_kappa_outside_the_unit_interval(kappa: float) -> None:
    with pytest.raises(ValueError, match=r"kappa must be a number in \[0, 1\]"):
        uld_loss(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 3), torch.zeros(1, 4), kappa)


def test_uld_distance_rejects_mismatched_positions() -> None:
    with pytest.raises(ValueError, match="2 positions but teacher_logits 3"):
        uld_distance(torch.zeros(2, 3), torch.zeros(3, 4))


# ------------------------------------------------------------------------------------ aligned_positions


def side(prompt_lengths: list[int], spans: list[list[int]]) -> SideBatch:
    """A SideBatch whose token ids do not matter: only its layout (prompt lengths, spans) does."""
    ids = [np.arange(p + len(s)) + 10 for p, s in zip(prompt_lengths, spans, strict=True)]
    return collate_side(ids, prompt_lengths, [np.asarray(s) for s in spans], pad_token_id=0)


# "the cat sat" tokenised two ways: student "th|e| cat| sat", teacher "the| c|at| sat" (3 aligned spans);
# a second response "no" whose teacher splits its first span in three. Response token j is predicted from
# position prompt_length − 1 + j.
STUDENT = side([2, 1], [[0, 0, 1, 2], [0, 1]])  # label positions: row 0 → 1, 2, 3, 4; row 1 → 0, 1
TEACHER = side([3, 2], [[0, 1, 1, 2], [0, 0, 0, 1]])  # row 0 → 2, 3, 4, 5; row 1 → 1, 2, 3, 4


def test_span_alignment_pairs_the_positions_that_predict_each_spans_first_token() -> None:
    student_at, teacher_at = aligned_positions(STUDENT, TEACHER, "span")
    # row 0: spans 0, 1, 2 start at student tokens 0, 2, 3 and teacher tokens 0, 1, 3;
    # row 1: spans 0, 1 start at student tokens 0, 1 and teacher tokens 0, 3.
    assert student_at.tolist() == [[0, 1], [0, 3], [0, 4], [1, 0], [1, 1]]
    assert teacher_at.tolist() == [[0, 2], [0, 3], [0, 5], [1, 1], [1, 4]]


def test_position_alignment_pairs_token_j_with_token_j_up_to_the_shorter_response() -> None:
    student_at, teacher_at = aligned_positions(STUDENT, TEACHER, "position")
    assert student_at.tolist() == [[0, 1], [0, 2], [0, 3], [0, 4], [1, 0], [1, 1]]
    assert teacher_at.tolist() == [[0, 2], [0, 3], [0, 4], [0, 5], [1, 1], [1, 2]]


def test_span_alignment_skips_a_span_missing_on_one_side() -> None:
    student = side([1], [[0, 1, 2]])  # positions 0, 1, 2
    teacher = side([1], [[0, 0, 2]])  # positions 0, 1, 2; span 1 has no teacher token
    student_at, teacher_at = aligned_positions(student, teacher, "span")
    assert student_at.tolist() == [[0, 0], [0, 2]] and teacher_at.tolist() == [[0, 0], [0, 2]]


def test_aligned_positions_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="uld_alignment must be one of"):
        aligned_positions(STUDENT, TEACHER, "first_token")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 rows but the teacher batch 1"):
        aligned_positions(STUDENT, side([1], [[0]]), "span")


# ------------------------------------------------------------------------------ make_kd_loss, tiny models


@pytest.fixture(scope="module")
def records(tiny_dataset_path, student_tokenizer, teacher_tokenizer):
    pairs = load_pairs(tiny_dataset_path)
    return prepare(pairs[:8], [], student_tokenizer, teacher_tokenizer, EncodingConfig(max_response_tokens=64)).train


@pytest.fixture(scope="module")
def teacher(tiny_teacher_folder, tmp_path_factory):
    model, _ = load_causal_lm(str(tiny_teacher_folder), cache_dir=tmp_path_factory.mktemp("cache"))
    return model.eval()


@pytest.fixture
def student(tiny_student_folder, tmp_path):
    model, _ = load_causal_lm(str(tiny_student_folder), cache_dir=tmp_path)
    return model


@pytest.fixture(scope="module")
def pad_ids(student_tokenizer, teacher_tokenizer):
    return {"student": student_tokenizer.eos_token_id, "teacher": teacher_tokenizer.pad_token_id}


def as_items(records) -> list[TrainItem]:
    """KD trains on the chosen responses alone: no reference log-probs or weights are read."""
    empty = np.zeros(0, dtype=np.float32)
    return [TrainItem(record=record, reference_chosen=empty, reference_rejected=empty) for record in records]


def test_sft_loss_fn_is_the_chosen_responses_token_mean_nll(records, student, pad_ids) -> None:
    items = as_items(records[:4])
    loss, stats = make_kd_loss("sft", KdConfig(), teacher=None, pad_ids=pad_ids, device=CPU)(student, items)
    batch = collate_responses([r.chosen for r in records[:4]], "student", pad_ids["student"])
    logps = response_logprobs(student, batch)  # the model_label_logprobs path
    expected = -logps[batch.response_mask].sum() / batch.response_mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert stats["tokens"] == float(batch.attention_mask.sum())  # as make_distill_loss counts them
    assert all(record.chosen.has_eos for record in records[:4])  # so the EOS token was in the mean
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


@pytest.mark.parametrize("alignment", ["span", "position"])
def test_uld_loss_fn_equals_uld_loss_on_the_models_full_logits(
    records, student, teacher, pad_ids, alignment
) -> None:
    """Against the plain path: both models' whole [B, T, V] logits (Gemma-3 softcapping on, applied by the
    model itself), gathered at the aligned positions, through uld_loss."""
    # The tiny teacher's logits are near 0 (nearly uniform over 600 tokens, and then every sorted teacher
    # probability exceeds the student's and ULD no longer depends on the teacher): sharpen it first, through
    # its final norm (Gemma scales by 1 + weight), so that the cap changes its distributions.
    sharp_teacher = copy.deepcopy(teacher)
    with torch.no_grad():
        sharp_teacher.model.norm.weight.fill_(40.0)
    capped_teacher = copy.deepcopy(sharp_teacher)
    capped_teacher.config.final_logit_softcapping = 3.0
    chosen = [r.chosen for r in records[:4]]
    config = KdConfig(kappa=0.5, uld_alignment=alignment)
    loss_fn = make_kd_loss("uld", config, teacher=capped_teacher, pad_ids=pad_ids, device=CPU)
    loss, stats = loss_fn(student, as_items(records[:4]))

    student_batch = collate_responses(chosen, "student", pad_ids["student"])
    teacher_batch = collate_responses(chosen, "teacher", pad_ids["teacher"])
    student_at, teacher_at = aligned_positions(student_batch, teacher_batch, alignment)
    with torch.no_grad():
        student_logits = student(input_ids=student_batch.input_ids, attention_mask=student_batch.attention_mask).logits
        teacher_logits = capped_teacher(
            input_ids=teacher_batch.input_ids, attention_mask=teacher_batch.attention_mask
        ).logits
        uncapped_logits = sharp_teacher(input_ids=teacher_batch.input_ids, attention_mask=teacher_batch.attention_mask).logits
        expected, expected_stats = uld_loss(
            response_logprobs(student, student_batch), student_batch.response_mask,
            student_logits[student_at[:, 0], student_at[:, 1]], teacher_logits[teacher_at[:, 0], teacher_at[:, 1]], 0.5,
        )
        _, uncapped_stats = uld_loss(
            response_logprobs(student, student_batch), student_batch.response_mask,
            student_logits[student_at[:, 0], student_at[:, 1]], uncapped_logits[teacher_at[:, 0], teacher_at[:, 1]], 0.5,
        )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["uld"], expected_stats["uld"], rtol=1e-5, atol=1e-6)
    assert abs(float(uncapped_stats["uld"]) - float(expected_stats["uld"])) > 1e-3  # the cap was honoured
    # span mode: one position per aligned span (every span has tokens on both sides); position mode: min(R_s, R_t)
    counts = [r.num_spans if alignment == "span" else min(len(r.student_span), len(r.teacher_span)) for r in chosen]
    assert student_at.shape[0] == sum(counts) and stats["aligned_positions"] == sum(counts) / 4
    assert 0.0 < float(stats["uld"]) <= 2.0 and math.isfinite(float(loss.detach()))


def test_uld_loss_fn_trains_the_student_only(records, student, teacher, pad_ids) -> None:
    loss_fn = make_kd_loss("uld", KdConfig(), teacher=teacher, pad_ids=pad_ids, device=CPU)
    loss, _ = loss_fn(student, as_items(records[:3]))
    assert loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_uld_at_kappa_zero_is_exactly_the_sft_loss_fn(records, student, teacher, pad_ids) -> None:
    items = as_items(records[:4])
    sft, sft_stats = make_kd_loss("sft", KdConfig(), teacher=None, pad_ids=pad_ids, device=CPU)(student, items)
    uld, uld_stats = make_kd_loss("uld", KdConfig(kappa=0.0), teacher=teacher, pad_ids=pad_ids, device=CPU)(
        student, items
    )
    assert torch.equal(uld, sft)  # one CE code path, and κ = 0 adds exactly nothing
    assert torch.equal(uld_stats["nll"], sft_stats["nll"]) and uld_stats["tokens"] == sft_stats["tokens"]


def test_uld_trains_under_fit_and_reports_its_stats(records, student, teacher, pad_ids, tmp_path) -> None:
    class Recorder(NullObserver):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []

        def metrics(self, stage, step, metrics):
            self.steps.append(dict(metrics))

    recorder = Recorder()
    config = FitConfig(learning_rate=3e-3, lr_schedule="constant", warmup_ratio=0.0, max_steps=2, batch_size=4,
                       micro_batch_size=2, seed=0, checkpoint_every=100)
    loss_fn = make_kd_loss("uld", KdConfig(), teacher=teacher, pad_ids=pad_ids, device=CPU)
    fit(student, as_items(records), loss_fn, config, tmp_path / "uld", stage="distill", observer=recorder)
    assert len(recorder.steps) == 2
    for metrics in recorder.steps:
        assert {"loss", "nll", "uld", "aligned_positions", "tokens"} <= set(metrics)
        assert all(math.isfinite(value) for value in metrics.values())
        torch.testing.assert_close(metrics["loss"], 0.5 * metrics["nll"] + 0.5 * metrics["uld"])


def test_make_kd_loss_refuses_bad_inputs(teacher, pad_ids) -> None:
    with pytest.raises(ValueError, match="method 'uld' distills a teacher"):
        make_kd_loss("uld", KdConfig(), teacher=None, pad_ids=pad_ids, device=CPU)
    with pytest.raises(ValueError, match="method 'dskd' distills a teacher"):
        make_kd_loss("dskd", KdConfig(), teacher=None, pad_ids=pad_ids, device=CPU)
    with pytest.raises(ValueError, match="'sft' trains on the chosen responses alone"):
        make_kd_loss("sft", KdConfig(), teacher=teacher, pad_ids=pad_ids, device=CPU)
    with pytest.raises(ValueError, match="method must be one of"):
        make_kd_loss("ctpd", KdConfig(), teacher=teacher, pad_ids=pad_ids, device=CPU)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pad_ids\['teacher'\] must be a token id"):
        make_kd_loss("uld", KdConfig(), teacher=teacher, pad_ids={"student": 0}, device=CPU)
    with pytest.raises(ValueError, match="config must be a KdConfig"):
        make_kd_loss("sft", {"kappa": 0.5}, teacher=None, pad_ids=pad_ids, device=CPU)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kappa": 1.5}, r"kappa must be a number in \[0, 1\]"),
        ({"kappa": -0.5}, r"kappa must be a number in \[0, 1\]"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": math.inf}, "temperature must be a finite number > 0"),
        ({"uld_alignment": "tokens"}, "uld_alignment must be one of"),
    ],
)
def test_kd_config_refuses_bad_values(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KdConfig(**fields)  # type: ignore[arg-type]



def test_dskd_delegates_both_sides_chosen_batches_and_its_settings(
    records, student, teacher, pad_ids, monkeypatch
) -> None:
    """The glue only (DSKD itself is tested with ctpd_core.dskd): a stand-in module records its call."""
    import sys
    import types

    calls = []

    def fake_dskd_loss(model, frozen, student_batch, teacher_batch, *, kappa, temperature):
        calls.append((model, frozen, student_batch, teacher_batch, kappa, temperature))
        return torch.zeros((), requires_grad=True), {"kd": torch.tensor(1.0)}

    monkeypatch.setitem(sys.modules, "ctpd_core.dskd", types.SimpleNamespace(dskd_loss=fake_dskd_loss))
    loss_fn = make_kd_loss("dskd", KdConfig(kappa=0.25, temperature=3.0), teacher=teacher, pad_ids=pad_ids, device=CPU)
    _, stats = loss_fn(student, as_items(records[:2]))
    ((model, frozen, student_batch, teacher_batch, kappa, temperature),) = calls
    assert model is student and frozen is teacher and (kappa, temperature) == (0.25, 3.0)
    chosen = [r.chosen for r in records[:2]]
    assert torch.equal(student_batch.input_ids, collate_responses(chosen, "student", pad_ids["student"]).input_ids)
    assert torch.equal(teacher_batch.input_ids, collate_responses(chosen, "teacher", pad_ids["teacher"]).input_ids)
    assert stats["kd"] == 1.0 and stats["tokens"] == float(student_batch.attention_mask.sum())
