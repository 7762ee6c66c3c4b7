"""DSKD: its pieces by hand, the whole loss against a plain full-sequence computation, gradient flow, the
projector's shapes and files, and a few fit() steps of a tiny student and teacher with different tokenizers and
hidden sizes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from ctpd_core.batching import SideBatch, response_logprobs
from ctpd_core.data import load_pairs
from ctpd_core.dskd import (
    PROJECTOR_CONFIG_FILE,
    PROJECTOR_FILE,
    PROJECTOR_PREFIX,
    DualSpaceProjector,
    DualSpaceStudent,
    cross_model_attention,
    dskd_loss,
    dskd_terms,
    kl_at_temperature,
    load_projector,
    normalise_teacher,
    save_projector,
    student_space_terms,
    teacher_space_terms,
)
from ctpd_core.encoding import EncodingConfig
from ctpd_core.inference import collate_responses, pad_token_id
from ctpd_core.memory_plan import dskd_projector_params
from ctpd_core.observe import NullObserver
from ctpd_core.pipeline import prepare
from ctpd_core.records import ResponseRecord
from ctpd_core.train import FitConfig, fit

STUDENT_HIDDEN, TEACHER_HIDDEN = 24, 40  # different on purpose: every projector is a real change of width
LN = math.log


def t(*rows: Any) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------------------- tiny models


def build_student(tokenizer: Any, seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=STUDENT_HIDDEN, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0,
        tie_word_embeddings=False,  # untied, so the head's gradient is told apart from the embeddings'
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def teacher(teacher_tokenizer: Any) -> Gemma3ForCausalLM:
    torch.manual_seed(2)
    config = Gemma3TextConfig(
        vocab_size=len(teacher_tokenizer), hidden_size=TEACHER_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=16,
        eos_token_id=teacher_tokenizer.eos_token_id, bos_token_id=teacher_tokenizer.bos_token_id,
        pad_token_id=teacher_tokenizer.pad_token_id, final_logit_softcapping=5.0,  # the heads are applied whole
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def chosen(tiny_dataset_path: Path, student_tokenizer: Any, teacher_tokenizer: Any) -> list[ResponseRecord]:
    pairs = load_pairs(tiny_dataset_path)
    data = prepare(pairs[:12], [], student_tokenizer, teacher_tokenizer, EncodingConfig(max_response_tokens=24))
    return [record.chosen for record in data.train]


def batches(responses: Sequence[ResponseRecord], student_tokenizer: Any, teacher_tokenizer: Any
            ) -> tuple[SideBatch, SideBatch]:
    return (collate_responses(responses, "student", pad_token_id(student_tokenizer)),
            collate_responses(responses, "teacher", pad_token_id(teacher_tokenizer)))


def dual(student: torch.nn.Module, teacher: torch.nn.Module) -> DualSpaceStudent:
    return DualSpaceStudent(student, DualSpaceProjector.for_models(student, teacher, seed=0))


def most_common_target(batch: SideBatch) -> int:
    return int(batch.labels[batch.labels.ne(-100)].mode().values)


def aim_t2s_at(model: DualSpaceStudent, token: int) -> None:
    """Bias t2s towards the student's head row of ``token``: its argmax becomes ``token`` nearly everywhere,
    so the correctness mask holds where that is the target and not elsewhere (a random projector is never
    right, which would leave KL_t2s an untested 0)."""
    with torch.no_grad():
        model.projector.t2s.weight.mul_(0.1)
        student: Any = model.student
        model.projector.t2s.bias.copy_(20 * student.get_output_embeddings().weight[token])


# --------------------------------------------------------------------------------- the pieces, by hand


def test_kl_at_temperature_by_hand() -> None:
    # T = 2: target [0, 2 ln 3] / 2 → p = (1/4, 3/4); logits [0, 0] → q = (1/2, 1/2)
    target, logits = t([0.0, 2 * LN(3)], [1.0, 2.0]), t([0.0, 0.0], [1.0, 2.0])
    expected_t2 = 0.25 * LN(0.25 / 0.5) + 0.75 * LN(0.75 / 0.5)
    torch.testing.assert_close(kl_at_temperature(target, logits, 2.0), t(expected_t2, 0.0))
    # T = 1: p = (1/10, 9/10): the temperature divides both sides
    expected_t1 = 0.1 * LN(0.1 / 0.5) + 0.9 * LN(0.9 / 0.5)
    torch.testing.assert_close(kl_at_temperature(target[:1], logits[:1], 1.0), t(expected_t1))


def test_student_space_terms_by_hand_with_the_correctness_mask() -> None:
    # row 0: target 0, t2s argmax 0 (correct). row 1: target 1, t2s argmax still 0 (wrong: no KL there).
    student_logits = torch.zeros(2, 3, requires_grad=True)  # uniform over 3
    t2s_logits = t([2 * LN(2), 0.0, 0.0], [2 * LN(2), 0.0, 0.0]).requires_grad_(True)  # at T=1: (4, 1, 1)/6
    terms = student_space_terms(student_logits, t2s_logits, torch.tensor([0, 1]), temperature=2.0)
    torch.testing.assert_close(terms["nll"], t(LN(3), LN(3)))
    torch.testing.assert_close(terms["t2s_ce"], t(-LN(4 / 6), -LN(1 / 6)))
    torch.testing.assert_close(terms["t2s_correct"], t(1.0, 0.0))
    # T = 2: t2s → softmax(ln 2, 0, 0) = (1/2, 1/4, 1/4) against the uniform student
    expected_kl = 0.5 * LN(0.5 * 3) + 2 * 0.25 * LN(0.25 * 3)
    torch.testing.assert_close(terms["t2s_kl"], t(expected_kl, 0.0))
    # t2s is the KL's target (detached): its gradient reaches the student's logits only
    terms["t2s_kl"].sum().backward()
    assert t2s_logits.grad is None and student_logits.grad is not None and student_logits.grad[1].abs().sum() == 0
    # and CE(t2s) reaches the t2s logits only
    student_logits.grad = None
    terms["t2s_ce"].sum().backward()
    assert student_logits.grad is None and t2s_logits.grad is not None


def test_teacher_space_terms_by_hand() -> None:
    teacher_logits = t([0.0, 2 * LN(3)]).requires_grad_(True)  # T = 2: (1/4, 3/4)
    s2t_logits = t([0.0, 0.0], [4.0, 0.0]).requires_grad_(True)
    terms = teacher_space_terms(teacher_logits.expand(2, 2), s2t_logits, torch.tensor([1, 1]), temperature=2.0)
    q_row1 = (math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1))  # softmax([4, 0] / 2)
    expected = [0.25 * LN(0.25 / 0.5) + 0.75 * LN(0.75 / 0.5),
                0.25 * LN(0.25 / q_row1[0]) + 0.75 * LN(0.75 / q_row1[1])]
    torch.testing.assert_close(terms["s2t_kl"], t(*expected))
    torch.testing.assert_close(terms["s2t_correct"], t(0.0, 0.0))  # argmax 0 (a tie picks 0, then 4 > 0)
    terms["s2t_kl"].sum().backward()
    assert teacher_logits.grad is None and s2t_logits.grad is not None


def test_teacher_normalisation_uses_the_real_response_positions_only() -> None:
    mask = torch.tensor([[True, True, False]])  # the third column is padding: its 1000s must not count
    index = t([[1.0, 1.0], [3.0, 3.0], [1000.0, 1000.0]])  # real values 1, 1, 3, 3: std (unbiased) 2/√3
    target = t([[2.0], [4.0], [1000.0]])  # real 2, 4: std √2
    hidden = t([[0.0], [6.0], [1000.0]])  # real 0, 6: std 3√2
    keys, values = normalise_teacher(index, target, hidden, mask)
    torch.testing.assert_close(keys[0, :2], t([1.0, 1.0], [3.0, 3.0]) / (2 / math.sqrt(3)))
    torch.testing.assert_close(values[0, :2], t([0.0], [6.0]) / (3 * math.sqrt(2)) + t([2.0], [4.0]) / math.sqrt(2))


def test_cross_model_attention_by_hand_is_restricted_to_response_positions() -> None:
    # D = 2 (so d_t = 1): scores q·k / √2. Student position 1 and teacher position 2 are padding.
    student_mask, teacher_mask = torch.tensor([[True, False]]), torch.tensor([[True, True, False]])
    queries = t([[math.sqrt(2) * LN(3), 0.0], [9.0, 9.0]])  # row 0 scores: ln 3, 0, (masked)
    keys = t([[1.0, 0.0], [0.0, 1.0], [50.0, 50.0]])
    t2s, s2t = cross_model_attention(queries, keys, student_mask, teacher_mask)
    torch.testing.assert_close(t2s[0, 0], t(0.75, 0.25, 0.0))  # the padded teacher position: exactly 0
    assert t2s[0, :, 2].eq(0).all()  # from every student position, the padded one included
    # student → teacher: every teacher position attends to the one real student position only
    torch.testing.assert_close(s2t[0], t([1.0, 0.0], [1.0, 0.0], [1.0, 0.0]))
    # what a padded teacher position holds changes nothing
    other_keys = keys.clone()
    other_keys[0, 2] = torch.tensor([-7.0, 3.0])
    torch.testing.assert_close(cross_model_attention(queries, other_keys, student_mask, teacher_mask)[0][0, 0],
                               t2s[0, 0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------- the projector


def test_projector_shapes_between_different_widths(student_tokenizer: Any, teacher: Any) -> None:
    projector = DualSpaceProjector.for_models(build_student(student_tokenizer), teacher)
    assert (projector.student_hidden, projector.teacher_hidden) == (STUDENT_HIDDEN, TEACHER_HIDDEN)
    # nn.Linear weights are [out, in]: query 2·d_s → 2·d_t, t2s d_t → d_s, s2t d_s → d_t
    assert tuple(projector.query.weight.shape) == (2 * TEACHER_HIDDEN, 2 * STUDENT_HIDDEN)
    assert tuple(projector.t2s.weight.shape) == (STUDENT_HIDDEN, TEACHER_HIDDEN)
    assert tuple(projector.s2t.weight.shape) == (TEACHER_HIDDEN, STUDENT_HIDDEN)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in projector.parameters())
    # inside the trained unit its parameters are the ones group_learning_rates names by PROJECTOR_PREFIX
    unit = DualSpaceStudent(build_student(student_tokenizer), projector)
    names = [name for name, _ in unit.named_parameters()]
    assert [n for n in names if n.startswith(PROJECTOR_PREFIX)] == [f"projector.{n}" for n, _ in projector.named_parameters()]
    assert all(n.startswith(("student.", PROJECTOR_PREFIX)) for n in names)
    # the memory planner counts the projector without torch: the same number as the module has
    assert dskd_projector_params(STUDENT_HIDDEN, TEACHER_HIDDEN) == sum(p.numel() for p in projector.parameters())


def test_a_seeded_projector_is_reproducible_and_leaves_the_global_rng_alone(student_tokenizer: Any, teacher: Any
                                                                             ) -> None:
    student = build_student(student_tokenizer)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = DualSpaceProjector.for_models(student, teacher, seed=7)
    torch.testing.assert_close(torch.rand(3), expected_next, rtol=0, atol=0)
    second = DualSpaceProjector.for_models(student, teacher, seed=7)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_projector_and_student_refuse_bad_inputs(student_tokenizer: Any, teacher: Any) -> None:
    with pytest.raises(ValueError, match="student_hidden must be a positive int"):
        DualSpaceProjector(0, 8)
    with pytest.raises(ValueError, match="teacher_hidden must be a positive int"):
        DualSpaceProjector(8, True)
    with pytest.raises(ValueError, match="built for a student of hidden size 8, this student's is 24"):
        DualSpaceStudent(build_student(student_tokenizer), DualSpaceProjector(8, TEACHER_HIDDEN))
    with pytest.raises(ValueError, match="has no input embedding matrix"):
        DualSpaceProjector.for_models(torch.nn.Linear(2, 2), teacher)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    projector = DualSpaceProjector(STUDENT_HIDDEN, TEACHER_HIDDEN)
    save_projector(projector, tmp_path)
    assert (tmp_path / PROJECTOR_FILE).is_file() and (tmp_path / PROJECTOR_CONFIG_FILE).is_file()
    loaded = load_projector(tmp_path)
    assert (loaded.student_hidden, loaded.teacher_hidden) == (STUDENT_HIDDEN, TEACHER_HIDDEN)
    for (name, a), (other, b) in zip(projector.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == other
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_refuses_a_missing_or_mismatched_projector(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"has no {PROJECTOR_FILE} or {PROJECTOR_CONFIG_FILE}"):
        load_projector(tmp_path)
    save_projector(DualSpaceProjector(4, 6), tmp_path / "small")
    save_projector(DualSpaceProjector(4, 8), tmp_path / "other")
    (tmp_path / "other" / PROJECTOR_CONFIG_FILE).replace(tmp_path / "small" / PROJECTOR_CONFIG_FILE)
    with pytest.raises(ValueError, match="come from different projectors"):
        load_projector(tmp_path / "small")


# ---------------------------------------------------------------------------------------- the loss


def plain_dskd(model: DualSpaceStudent, teacher: Any, student_batch: SideBatch, teacher_batch: SideBatch,
               kappa: float, temperature: float) -> dict[str, torch.Tensor]:
    """DSKD the plain way, as its reference code lays it out: whole-sequence tensors, the models' own
    ``logits``, the attention over every position pair masked by the two label masks, masked sums."""
    student: Any = model.student
    projector = model.projector
    s_labels, t_labels = student_batch.labels, teacher_batch.labels  # [B, T_s], [B, T_t]
    s_mask, t_mask = s_labels.ne(-100), t_labels.ne(-100)
    s_target, t_target = s_labels.clamp_min(0), t_labels.clamp_min(0)
    s_out = student.model(input_ids=student_batch.input_ids, attention_mask=student_batch.attention_mask)
    s_logits = student.lm_head(s_out.last_hidden_state)  # [B, T_s, V_s]
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=teacher_batch.input_ids,
                                 attention_mask=teacher_batch.attention_mask).last_hidden_state
        t_logits = teacher(input_ids=teacher_batch.input_ids, attention_mask=teacher_batch.attention_mask).logits
    s_embed, t_embed = student.get_input_embeddings(), teacher.get_input_embeddings()
    s_index = torch.cat([s_embed(torch.where(s_mask, student_batch.input_ids, 0)), s_embed(s_target)], -1).detach()
    t_index = torch.cat([t_embed(torch.where(t_mask, teacher_batch.input_ids, 0)), t_embed(t_target)], -1)
    t_target_embeds = t_embed(t_target)

    def by_real_std(x: torch.Tensor) -> torch.Tensor:
        return x / x[t_mask].std()

    keys = by_real_std(t_index)
    values = projector.t2s(by_real_std(t_hidden) + by_real_std(t_target_embeds))
    align = projector.query(s_index) @ keys.transpose(1, 2) / math.sqrt(2 * TEACHER_HIDDEN)  # [B, T_s, T_t]
    pair_mask = s_mask[:, :, None] & t_mask[:, None, :]
    align = align.masked_fill(~pair_mask, -1e30)
    t2s_logits = torch.softmax(align, -1) @ values @ student.lm_head.weight.detach().T  # [B, T_s, V_s]
    s2t_hidden = torch.softmax(align.transpose(1, 2), -1) @ projector.s2t(s_out.last_hidden_state)
    s2t_logits = s2t_hidden @ teacher.lm_head.weight.detach().T
    cap = teacher.config.final_logit_softcapping
    s2t_logits = cap * torch.tanh(s2t_logits / cap)  # the teacher's head whole, as its logits are

    def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
        p = torch.log_softmax(p_logits / temperature, -1)
        return (p.exp() * (p - torch.log_softmax(q_logits / temperature, -1))).sum(-1)

    n_s, n_t = s_mask.sum(), t_mask.sum()
    nll = -(torch.log_softmax(s_logits, -1).gather(-1, s_target[..., None])[..., 0] * s_mask).sum() / n_s
    t2s_ce = -(torch.log_softmax(t2s_logits, -1).gather(-1, s_target[..., None])[..., 0] * s_mask).sum() / n_s
    correct = t2s_logits.argmax(-1).eq(s_target) & s_mask
    t2s_kl = (kl(t2s_logits.detach(), s_logits) * correct).sum() / n_s
    s2t_kl = (kl(t_logits, s2t_logits) * t_mask).sum() / n_t
    loss = (1 - kappa) * nll + kappa * (t2s_ce + t2s_kl + s2t_kl)
    return {"loss": loss, "nll": nll, "t2s_ce": t2s_ce, "t2s_kl": t2s_kl, "s2t_kl": s2t_kl,
            "t2s_accuracy": correct.sum() / n_s}


def test_the_loss_equals_a_plain_full_sequence_computation(chosen, student_tokenizer, teacher_tokenizer, teacher
                                                           ) -> None:
    model = dual(build_student(student_tokenizer), teacher)
    student_batch, teacher_batch = batches(chosen[:5], student_tokenizer, teacher_tokenizer)
    assert student_batch.input_ids.shape[1] != teacher_batch.input_ids.shape[1]  # really two tokenizations
    aim_t2s_at(model, most_common_target(student_batch))
    loss, stats = dskd_loss(model, teacher, student_batch, teacher_batch, kappa=0.5, temperature=2.0)
    assert 0 < stats["t2s_accuracy"] < 1  # the correctness mask keeps some positions and drops others
    expected = plain_dskd(model, teacher, student_batch, teacher_batch, kappa=0.5, temperature=2.0)
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-5, atol=1e-5)
    for name in ("nll", "t2s_ce", "t2s_kl", "s2t_kl", "t2s_accuracy"):
        torch.testing.assert_close(stats[name], expected[name].detach(), rtol=1e-5, atol=1e-5, msg=name)
    assert stats["s2t_kl"] > 0 and stats["t2s_ce"] > 0
    torch.testing.assert_close(stats["kd_loss"], stats["t2s_ce"] + stats["t2s_kl"] + stats["s2t_kl"])
    assert stats["tokens"] == float(student_batch.attention_mask.sum())
    assert all(not value.requires_grad for value in stats.values() if isinstance(value, torch.Tensor))


def test_kappa_zero_is_the_students_cross_entropy_alone(chosen, student_tokenizer, teacher_tokenizer, teacher
                                                        ) -> None:
    model = dual(build_student(student_tokenizer), teacher)
    student_batch, teacher_batch = batches(chosen[:4], student_tokenizer, teacher_tokenizer)
    loss, _ = dskd_loss(model, teacher, student_batch, teacher_batch, kappa=0.0, temperature=2.0)
    token_logps = response_logprobs(model.student, student_batch)  # [B, R_s]
    torch.testing.assert_close(loss, -token_logps.sum() / student_batch.response_mask.sum(), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.projector.parameters())


def test_chunking_changes_neither_the_loss_nor_the_gradients(chosen, student_tokenizer, teacher_tokenizer, teacher
                                                             ) -> None:
    student_batch, teacher_batch = batches(chosen[:4], student_tokenizer, teacher_tokenizer)
    results = []
    for chunk_size in (3, 100_000):  # several checkpointed chunks, then one plain one
        model = dual(build_student(student_tokenizer), teacher)
        loss, _ = dskd_loss(model, teacher, student_batch, teacher_batch, kappa=0.5, temperature=2.0,
                            chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), {name: torch.clone(p.grad) for name, p in model.named_parameters()
                                        if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    assert set(results[0][1]) == set(results[1][1]) == {name for name, _ in model.named_parameters()}
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-5, atol=1e-6, msg=name)


def grads_of(term: str, model: DualSpaceStudent, teacher: Any, student_batch: SideBatch, teacher_batch: SideBatch
             ) -> dict[str, bool]:
    """Which parameters (of the student, projector and teacher) get a non-zero gradient from one term."""
    for parameter in [*model.parameters(), *teacher.parameters()]:
        parameter.grad = None
    dskd_terms(model, teacher, student_batch, teacher_batch, temperature=2.0)[term].backward()
    named = {**dict(model.named_parameters()), **{f"teacher.{n}": p for n, p in teacher.named_parameters()}}
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in named.items()}


def test_gradients_reach_the_student_and_the_projector_never_the_teacher_or_the_heads_read_through(
    chosen, student_tokenizer, teacher_tokenizer, teacher
) -> None:
    model = dual(build_student(student_tokenizer), teacher)
    assert all(p.requires_grad for p in teacher.parameters())  # frozen by no_grad and detach, not by flags
    batch = batches(chosen[:4], student_tokenizer, teacher_tokenizer)

    def moved(grads: dict[str, bool], prefix: str) -> set[str]:
        return {name for name, has in grads.items() if has and name.startswith(prefix)}

    # CE(t2s) trains the query and t2s projectors only: the student's embeddings and head are read detached
    t2s_ce = grads_of("t2s_ce", model, teacher, *batch)
    assert moved(t2s_ce, "projector.") == {f"projector.{n}.{p}" for n in ("query", "t2s") for p in ("weight", "bias")}
    assert not moved(t2s_ce, "student.") and not moved(t2s_ce, "teacher.")
    # KL(t2s ‖ student): t2s is the target, so the student alone (its head included) moves
    aimed = dual(build_student(student_tokenizer), teacher)
    aim_t2s_at(aimed, most_common_target(batch[0]))
    t2s_kl = grads_of("t2s_kl", aimed, teacher, *batch)
    assert not moved(t2s_kl, "projector.") and not moved(t2s_kl, "teacher.")
    assert {"student.lm_head.weight", "student.model.norm.weight"} <= moved(t2s_kl, "student.")
    # KL(teacher ‖ s2t): the student's hidden states, the s2t and query projectors; not the student's head
    # (s2t reads the teacher's, detached) nor its input embeddings (the query's are detached)
    s2t_kl = grads_of("s2t_kl", model, teacher, *batch)
    assert moved(s2t_kl, "projector.") == {f"projector.{n}.{p}" for n in ("query", "s2t") for p in ("weight", "bias")}
    assert "student.model.layers.1.mlp.down_proj.weight" in moved(s2t_kl, "student.")
    assert "student.lm_head.weight" not in moved(s2t_kl, "student.") and not moved(s2t_kl, "teacher.")
    # the whole loss: every student and projector parameter, nothing of the teacher
    model.zero_grad(set_to_none=True)
    loss, _ = dskd_loss(model, teacher, *batch, kappa=0.5, temperature=2.0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_inputs_are_refused(chosen, student_tokenizer, teacher_tokenizer, teacher) -> None:
    student = build_student(student_tokenizer)
    model = dual(student, teacher)
    student_batch, teacher_batch = batches(chosen[:3], student_tokenizer, teacher_tokenizer)
    arguments: dict[str, Any] = {"kappa": 0.5, "temperature": 2.0}
    with pytest.raises(ValueError, match="trains a DualSpaceStudent .* got LlamaForCausalLM"):
        dskd_loss(student, teacher, student_batch, teacher_batch, **arguments)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kappa must be a number in \\[0, 1\\].*got 1.5"):
        dskd_loss(model, teacher, student_batch, teacher_batch, kappa=1.5, temperature=2.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        dskd_loss(model, teacher, student_batch, teacher_batch, kappa=0.5, temperature=0)
    with pytest.raises(ValueError, match="3 rows and the teacher batch 2"):
        dskd_loss(model, teacher, student_batch, batches(chosen[:2], student_tokenizer, teacher_tokenizer)[1],
                  **arguments)
    teacher.train()
    try:
        with pytest.raises(ValueError, match="teacher is in training mode.*teacher.eval"):
            dskd_loss(model, teacher, student_batch, teacher_batch, **arguments)
    finally:
        teacher.eval()


# ------------------------------------------------------------------------------------------- training


def test_a_few_fit_steps_lower_the_loss_and_checkpoint_the_projector(
    chosen, student_tokenizer, teacher_tokenizer, teacher, tmp_path: Path
) -> None:
    model = dual(build_student(student_tokenizer), teacher)
    before = {name: p.detach().clone() for name, p in model.projector.named_parameters()}

    def loss_fn(trained: torch.nn.Module, items: Sequence[ResponseRecord]) -> tuple[torch.Tensor, dict[str, Any]]:
        student_batch, teacher_batch = batches(items, student_tokenizer, teacher_tokenizer)
        return dskd_loss(trained, teacher, student_batch, teacher_batch, kappa=0.5, temperature=2.0)  # type: ignore[arg-type]

    class Losses(NullObserver):
        def __init__(self) -> None:
            self.seen: dict[int, dict[str, float]] = {}

        def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
            self.seen[step] = dict(metrics)

    observer = Losses()
    config = FitConfig(learning_rate=1e-2, lr_schedule="constant", warmup_ratio=0.0, max_steps=8, batch_size=8,
                       micro_batch_size=4, precision="fp32", seed=0, checkpoint_every=100,
                       group_learning_rates=((PROJECTOR_PREFIX, 3e-2),))  # the fresh projector learns faster
    result = fit(model, chosen[:8], loss_fn, config, tmp_path, stage="distill", observer=observer)
    losses = [observer.seen[step]["loss"] for step in sorted(observer.seen)]
    assert losses[-1] < 0.8 * losses[0], losses  # one fixed batch of 8: the loss must fall clearly
    assert observer.seen[8]["t2s_ce"] < observer.seen[1]["t2s_ce"]  # the projector learned to map the teacher
    assert {"nll", "t2s_ce", "t2s_kl", "s2t_kl", "t2s_accuracy", "tokens"} <= set(observer.seen[1])
    assert all(not torch.equal(p, before[name]) for name, p in model.projector.named_parameters())
    from ctpd_core.checkpoint import read_trainable_tensors

    assert result.checkpoint is not None
    stored = read_trainable_tensors(result.checkpoint)
    assert {"projector.query.weight", "projector.t2s.bias", "projector.s2t.weight"} <= set(stored)
    assert "student.lm_head.weight" in stored and not any(name.startswith("teacher") for name in stored)


def test_a_lora_student_trains_its_adapters_and_the_projector_only(chosen, student_tokenizer, teacher_tokenizer,
                                                                   teacher) -> None:
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(build_student(student_tokenizer),
                             LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    model = dual(student, teacher)
    loss, _ = dskd_loss(model, teacher, *batches(chosen[:3], student_tokenizer, teacher_tokenizer),
                        kappa=0.5, temperature=2.0)
    loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trained) and any(n.startswith(PROJECTOR_PREFIX) for n in trained)
    assert not any(name.startswith("student.") and "lora_" not in name for name in trained)


def test_under_bf16_autocast_the_dual_space_block_stays_fp32(chosen, student_tokenizer, teacher_tokenizer, teacher
                                                             ) -> None:
    model = dual(build_student(student_tokenizer), teacher)
    batch = batches(chosen[:3], student_tokenizer, teacher_tokenizer)
    full, _ = dskd_loss(model, teacher, *batch, kappa=0.5, temperature=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, stats = dskd_loss(model, teacher, *batch, kappa=0.5, temperature=2.0)
        weights, _ = cross_model_attention(torch.ones(1, 2, 4), torch.ones(1, 3, 4), torch.ones(1, 2, dtype=torch.bool),
                                           torch.ones(1, 3, dtype=torch.bool))
    assert mixed.dtype == torch.float32 and weights.dtype == torch.float32
    torch.testing.assert_close(mixed, full, rtol=5e-2, atol=5e-2)  # bf16 matmuls in the models, nothing worse
    mixed.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.projector.parameters())
