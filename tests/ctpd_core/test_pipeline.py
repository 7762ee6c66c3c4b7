"""The stages on tiny models: prepare, reference, contrastive (the swap is real), weights (teacher tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctpd_core.data import load_pairs
from ctpd_core.encoding import EncodingConfig
from ctpd_core.inference import token_logprobs
from ctpd_core.losses import dpo_loss
from ctpd_core.models import load_causal_lm
from ctpd_core.pipeline import contrastive_weights, fixed_weights, make_distill_loss, prepare
from ctpd_core.records import build_items, load_prepared, save_prepared, swap_pairs
from ctpd_core.train import FitConfig, fit

CPU = torch.device("cpu")
INFER = {"device": CPU, "precision": "fp32", "stage": "reference"}  # token_logprobs on the CPU, in fp32


@pytest.fixture(scope="module")
def prepared(tiny_dataset_path, student_tokenizer, teacher_tokenizer):
    pairs = load_pairs(tiny_dataset_path)
    return prepare(pairs[:30], pairs[30:], student_tokenizer, teacher_tokenizer, EncodingConfig(max_response_tokens=64))


@pytest.fixture(scope="module")
def teacher(tiny_teacher_folder, tmp_path_factory):
    model, _ = load_causal_lm(str(tiny_teacher_folder), cache_dir=tmp_path_factory.mktemp("cache"))
    return model.eval()


def test_prepare_records_and_stats(prepared):
    assert len(prepared.train) == 30 and len(prepared.validation) == 10
    assert prepared.stats["alignment"]["spans"] > 0
    record = prepared.train[0].chosen
    # Both sides cover the same spans; the EOS span is last on both.
    assert record.student_span.max() == record.teacher_span.max() == record.num_spans - 1
    assert record.has_eos


def test_prepared_round_trip(prepared, tmp_path):
    save_prepared(tmp_path, prepared)
    loaded = load_prepared(tmp_path)
    assert loaded.stats == prepared.stats
    for a, b in zip(prepared.train + prepared.validation, loaded.train + loaded.validation, strict=True):
        for which in ("chosen", "rejected"):
            x, y = getattr(a, which), getattr(b, which)
            assert np.array_equal(x.student_ids, y.student_ids) and np.array_equal(x.teacher_span, y.teacher_span)
            assert (x.num_spans, x.num_bytes, x.has_eos) == (y.num_spans, y.num_bytes, y.has_eos)


def test_reference_logprobs_do_not_depend_on_batching(prepared, teacher, teacher_tokenizer):
    pad = teacher_tokenizer.pad_token_id
    batched = token_logprobs(teacher, prepared.train[:6], "teacher", pad, batch_size=6, **INFER)
    single = token_logprobs(teacher, prepared.train[:6], "teacher", pad, batch_size=1, **INFER)
    for a, b in zip(batched.chosen + batched.rejected, single.chosen + single.rejected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # And they are the teacher's log-probs of the teacher's tokens, computed the plain way.
    record = prepared.train[0].chosen
    ids = torch.as_tensor(record.teacher_ids)[None]
    with torch.no_grad():
        logps = torch.log_softmax(teacher(ids).logits.float(), -1)[0]
    p = record.teacher_prompt_length
    expected = logps[p - 1 : -1].gather(1, ids[0, p:, None]).squeeze(1).numpy()
    np.testing.assert_allclose(batched.chosen[0], expected, rtol=1e-5, atol=1e-5)


def test_swap_pairs_swaps_for_real(prepared, teacher, teacher_tokenizer):
    reference = token_logprobs(teacher, prepared.train[:4], "teacher", teacher_tokenizer.pad_token_id, batch_size=4, **INFER)
    items = build_items(prepared.train[:4], reference)
    swapped = swap_pairs(items)
    for item, flipped in zip(items, swapped, strict=True):
        assert np.array_equal(flipped.record.chosen.teacher_ids, item.record.rejected.teacher_ids)
        assert np.array_equal(flipped.record.rejected.student_ids, item.record.chosen.student_ids)
        assert np.array_equal(flipped.reference_chosen, item.reference_rejected)
        twice = flipped.swapped()
        assert np.array_equal(twice.reference_chosen, item.reference_chosen)
        assert np.array_equal(twice.record.chosen.teacher_ids, item.record.chosen.teacher_ids)


def _train_contrastive(tiny_teacher_folder, tmp_path, items, teacher_tokenizer, direction):
    model, _ = load_causal_lm(str(tiny_teacher_folder), cache_dir=tmp_path)
    config = FitConfig(learning_rate=3e-3, lr_schedule="constant", warmup_ratio=0.0, max_steps=12, batch_size=8,
                       micro_batch_size=4, seed=0, checkpoint_every=100)
    loss_fn = make_distill_loss("dpo", 0.5, policy_side="teacher", reference_side="teacher",
                                pad_id=teacher_tokenizer.pad_token_id, device=CPU)
    fit(model, items if direction == "positive" else swap_pairs(items), loss_fn, config, tmp_path / direction,
        stage=f"contrastive:{direction}")
    return model.eval()


def test_contrastive_models_move_in_opposite_directions(prepared, teacher, teacher_tokenizer, tiny_teacher_folder, tmp_path):
    """π+ is trained on the pairs and π− on the swapped pairs: their implicit rewards must disagree,
    which would not happen if the swap were the no-op of the authors' code (method §9.2)."""
    pad = teacher_tokenizer.pad_token_id
    records = prepared.train[:16]
    reference = token_logprobs(teacher, records, "teacher", pad, batch_size=8, **INFER)
    items = build_items(records, reference)
    margins = {}
    for direction in ("positive", "negative"):
        model = _train_contrastive(tiny_teacher_folder, tmp_path, items, teacher_tokenizer, direction)
        logps = token_logprobs(model, records, "teacher", pad, batch_size=8, **INFER)
        margins[direction] = np.mean(
            [(c.sum() - rc.sum()) - (r.sum() - rr.sum())
             for c, r, rc, rr in zip(logps.chosen, logps.rejected, reference.chosen, reference.rejected, strict=True)]
        )
    assert margins["positive"] > 0.5 and margins["negative"] < -0.5


def test_span_weights_come_from_teacher_tokens(prepared, teacher, teacher_tokenizer):
    """Weights are computed from π± log-probs of the TEACHER's tokens, summed per aligned span (method
    §9.1: the authors fed student tokens to teacher models)."""
    pad = teacher_tokenizer.pad_token_id
    records = prepared.train[:5]
    positive = token_logprobs(teacher, records, "teacher", pad, batch_size=5, **INFER)
    negative_model = type(teacher)(teacher.config).eval()  # a different model stands in for π−
    negative = token_logprobs(negative_model, records, "teacher", pad, batch_size=5, **INFER)
    weights = contrastive_weights(records, positive, negative, "teacher", "span", lower=-0.5, upper=1.5, scale=1.0)
    for index, record in enumerate(records):
        response = record.chosen
        assert weights.chosen[index].shape == (response.num_spans,)
        delta = np.zeros(response.num_spans)
        np.add.at(delta, response.teacher_span, positive.chosen[index] - negative.chosen[index])
        np.testing.assert_allclose(weights.chosen[index], np.exp(np.clip(delta, -0.5, 1.5)), rtol=1e-5)
        delta_r = np.zeros(record.rejected.num_spans)
        np.add.at(delta_r, record.rejected.teacher_span, positive.rejected[index] - negative.rejected[index])
        np.testing.assert_allclose(weights.rejected[index], np.exp(-np.clip(delta_r, -0.5, 1.5)), rtol=1e-5)


def test_fixed_weights(prepared):
    uniform = fixed_weights(prepared.train[:3], "student", "span", "uniform", seed=0)
    assert all(np.all(w == 1) and w.shape == (r.chosen.num_spans,) for w, r in zip(uniform.chosen, prepared.train, strict=False))
    random_a = fixed_weights(prepared.train[:3], "student", "token", "random", seed=3)
    random_b = fixed_weights(prepared.train[:3], "student", "token", "random", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(random_a.chosen, random_b.chosen, strict=True))
    assert all(w.min() >= 0.7 and w.max() <= 1.3 for w in random_a.chosen)
    assert random_a.chosen[0].shape == (len(prepared.train[0].chosen.student_span),)


def test_ctpd_with_uniform_weights_is_dpo_with_the_teacher_as_reference(
    prepared, teacher, teacher_tokenizer, tiny_student_folder, student_tokenizer, tmp_path
):
    """Method §5.2 at the pipeline level: uniform span weights make the CTPD loss of a batch equal the DPO
    loss on sequence log-probs with the teacher's string likelihood as the reference."""
    records = prepared.train[:4]
    reference = token_logprobs(teacher, records, "teacher", teacher_tokenizer.pad_token_id, batch_size=4, **INFER)
    weights = fixed_weights(records, "teacher", "span", "uniform", seed=0)
    items = build_items(records, reference, weights)
    student, _ = load_causal_lm(str(tiny_student_folder), cache_dir=tmp_path)
    loss_fn = make_distill_loss("ctpd", 0.1, policy_side="student", reference_side="teacher",
                                pad_id=student_tokenizer.eos_token_id, device=CPU)
    loss, stats = loss_fn(student, items)
    policy = token_logprobs(student, records, "student", student_tokenizer.eos_token_id, batch_size=4, **INFER)
    expected, _ = dpo_loss(
        torch.tensor([p.sum() for p in policy.chosen]), torch.tensor([p.sum() for p in policy.rejected]),
        torch.tensor([r.sum() for r in reference.chosen]), torch.tensor([r.sum() for r in reference.rejected]), 0.1,
    )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert stats["tokens"] > 0


def test_averaged_weights_keep_each_responses_total_and_spread_it_evenly():
    from ctpd_core.pipeline import averaged_weights
    from ctpd_core.records import TokenLogprobs

    weights = TokenLogprobs(
        chosen=[np.array([0.5, 1.5, 4.0], dtype=np.float32), np.array([], dtype=np.float32)],
        rejected=[np.array([0.25, 0.75], dtype=np.float32), np.array([2.0], dtype=np.float32)],
    )
    out = averaged_weights(weights)
    np.testing.assert_allclose(out.chosen[0], [2.0, 2.0, 2.0])
    assert out.chosen[1].size == 0
    np.testing.assert_allclose(out.rejected[0], [0.5, 0.5])
    np.testing.assert_allclose(out.rejected[1], [2.0])
    for before, after in zip(weights.chosen + weights.rejected, out.chosen + out.rejected, strict=True):
        assert after.sum() == pytest.approx(before.sum())


def test_prepare_reports_and_asks_the_stop_even_when_the_last_pair_is_dropped(student_tokenizer, teacher_tokenizer):
    from ctpd_core.data import PreferencePair
    from ctpd_core.observe import NullObserver, Stopped

    pairs = [PreferencePair(prompt=f"Question {i}:", chosen=" a fine answer.", rejected=" no.") for i in range(3)]
    pairs.append(PreferencePair(prompt="Question 3:", chosen="", rejected=" no."))  # no spans without an EOS span
    seen = []

    class Recording(NullObserver):
        def progress(self, progress):
            seen.append((progress.step, progress.total))

    class StopAtTheEnd:
        def should_stop(self):
            return bool(seen) and seen[-1][0] == 4

    encoding = EncodingConfig(max_response_tokens=64, eos_span=False)
    data = prepare(pairs, [], student_tokenizer, teacher_tokenizer, encoding, observer=Recording())
    assert data.stats["dropped"] == {"unalignable": 0, "empty_response": 1} and len(data.train) == 3
    assert seen[-1] == (4, 4)  # the dropped last pair still closed the stage's progress
    seen.clear()
    with pytest.raises(Stopped):
        prepare(pairs, [], student_tokenizer, teacher_tokenizer, encoding, observer=Recording(), stop=StopAtTheEnd())
