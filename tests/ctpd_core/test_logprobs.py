"""Chunked log-probs equal the naive fp32 log-softmax (values and gradients); span sums by scatter-add."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from ctpd_core.logprobs import (
    IGNORE_INDEX,
    label_logprobs,
    label_logprobs_from_hidden,
    model_label_logprobs,
    span_logprobs,
)

BATCH, SEQ, VOCAB, HIDDEN = 3, 7, 50, 4  # B·T = 21: chunk sizes 1, 4, 5, 8 do not divide it


def naive_label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: full fp32 log-softmax, then gather; 0 at ignored positions."""
    logps = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]
    return torch.where(labels == IGNORE_INDEX, 0.0, picked)


def make_labels(
    generator: torch.Generator, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB
) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)  # [B, T]
    labels[0, :2] = IGNORE_INDEX  # a prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    return labels


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


class LargestFloat32Tensor(TorchDispatchMode):
    """Records the element count of the largest fp32 tensor any op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float32:
                self.largest = max(self.largest, leaf.numel())
        return out


# ---------------------------------------------------------------------------------------------- label_logprobs


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 8, 21, 1024])
def test_label_logprobs_equals_naive(generator: torch.Generator, chunk_size: int) -> None:
    logits = torch.randn(BATCH, SEQ, VOCAB, generator=generator) * 3
    labels = make_labels(generator)
    got = label_logprobs(logits, labels, chunk_size=chunk_size)
    assert got.dtype == torch.float32
    assert got.shape == (BATCH, SEQ)
    torch.testing.assert_close(got, naive_label_logprobs(logits, labels))
    assert torch.all(got[labels == IGNORE_INDEX] == 0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_label_logprobs_low_precision_logits_are_upcast(
    generator: torch.Generator, dtype: torch.dtype
) -> None:
    logits = (torch.randn(BATCH, SEQ, VOCAB, generator=generator) * 3).to(dtype)
    labels = make_labels(generator)
    got = label_logprobs(logits, labels, chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive_label_logprobs(logits, labels))


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_logprobs_gradients_equal_naive(
    generator: torch.Generator, chunk_size: int, dtype: torch.dtype
) -> None:
    base = (torch.randn(BATCH, SEQ, VOCAB, generator=generator) * 3).to(dtype)
    labels = make_labels(generator)
    upstream = torch.randn(BATCH, SEQ, generator=generator)  # a non-trivial downstream use
    logits_chunked = base.clone().requires_grad_(True)
    logits_naive = base.clone().requires_grad_(True)
    (label_logprobs(logits_chunked, labels, chunk_size=chunk_size) * upstream).sum().backward()
    (naive_label_logprobs(logits_naive, labels) * upstream).sum().backward()
    assert logits_chunked.grad is not None
    assert logits_chunked.grad.dtype == dtype
    torch.testing.assert_close(logits_chunked.grad, logits_naive.grad)


def test_label_logprobs_never_builds_full_fp32_logits(generator: torch.Generator) -> None:
    """With bf16 logits, no fp32 tensor larger than one chunk exists, in forward or backward."""
    logits = (torch.randn(BATCH, SEQ, VOCAB, generator=generator) * 3).to(torch.bfloat16).requires_grad_(True)
    labels = make_labels(generator)
    chunk_size = 4
    with LargestFloat32Tensor() as chunked:
        label_logprobs(logits, labels, chunk_size=chunk_size).sum().backward()
    assert chunked.largest <= chunk_size * VOCAB
    with LargestFloat32Tensor() as naive:  # the detector does see the naive way's full copy
        naive_label_logprobs(logits, labels).sum().backward()
    assert naive.largest >= BATCH * SEQ * VOCAB


def test_label_logprobs_all_ignored_and_empty() -> None:
    logits = torch.randn(2, 3, VOCAB)
    labels = torch.full((2, 3), IGNORE_INDEX)
    torch.testing.assert_close(label_logprobs(logits, labels), torch.zeros(2, 3))
    assert label_logprobs(torch.randn(2, 0, VOCAB), torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.full((BATCH, SEQ), VOCAB), "outside"),
        (torch.full((BATCH, SEQ), -5), "outside"),
        (torch.zeros(BATCH, SEQ + 1, dtype=torch.long), "shape"),
        (torch.zeros(BATCH, SEQ, dtype=torch.int32), "torch.long"),
    ],
)
def test_label_logprobs_rejects_bad_labels(labels: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        label_logprobs(torch.randn(BATCH, SEQ, VOCAB), labels)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_label_logprobs_rejects_bad_chunk_size(chunk_size: object) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        label_logprobs(torch.randn(1, 2, VOCAB), torch.zeros(1, 2, dtype=torch.long), chunk_size=chunk_size)  # type: ignore[arg-type]


def test_label_logprobs_rejects_non_3d_logits() -> None:
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        label_logprobs(torch.randn(2, VOCAB), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------- label_logprobs_from_hidden


def naive_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()  # [B, T, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return naive_label_logprobs(logits, labels)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 1024])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_from_hidden_equals_naive_values_and_gradients(
    generator: torch.Generator, chunk_size: int, has_bias: bool, softcap: float | None
) -> None:
    hidden_base = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    weight_base = torch.randn(VOCAB, HIDDEN, generator=generator)
    bias_base = torch.randn(VOCAB, generator=generator) if has_bias else None
    labels = make_labels(generator)
    upstream = torch.randn(BATCH, SEQ, generator=generator)

    def leaves() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bias = bias_base.clone().requires_grad_(True) if bias_base is not None else None
        return hidden_base.clone().requires_grad_(True), weight_base.clone().requires_grad_(True), bias

    hidden_c, weight_c, bias_c = leaves()
    hidden_n, weight_n, bias_n = leaves()
    got = label_logprobs_from_hidden(
        hidden_c, weight_c, labels, output_bias=bias_c, final_logit_softcapping=softcap, chunk_size=chunk_size
    )
    expected = naive_from_hidden(hidden_n, weight_n, labels, bias_n, softcap)
    torch.testing.assert_close(got, expected)
    assert torch.all(got[labels == IGNORE_INDEX] == 0.0)

    (got * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(hidden_c.grad, hidden_n.grad)
    torch.testing.assert_close(weight_c.grad, weight_n.grad)
    if has_bias:
        torch.testing.assert_close(bias_c.grad, bias_n.grad)
    # Ignored positions receive no gradient.
    assert torch.all(hidden_c.grad[labels == IGNORE_INDEX] == 0.0)


def test_from_hidden_softcapping_changes_the_result(generator: torch.Generator) -> None:
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator) * 5
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    labels = make_labels(generator)
    capped = label_logprobs_from_hidden(hidden, weight, labels, final_logit_softcapping=1.5)
    uncapped = label_logprobs_from_hidden(hidden, weight, labels)
    assert not torch.allclose(capped, uncapped)
    # With cap = 1.5 every logit lies in (-1.5, 1.5): a log-prob is at least -3 - log(V).
    assert capped.min() > -3.0 - torch.log(torch.tensor(float(VOCAB)))


def test_from_hidden_bf16(generator: torch.Generator) -> None:
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator).to(torch.bfloat16)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator).to(torch.bfloat16)
    labels = make_labels(generator)
    got = label_logprobs_from_hidden(hidden, weight, labels, chunk_size=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive_from_hidden(hidden, weight, labels))


def test_from_hidden_no_grad_path_equals_grad_path(generator: torch.Generator) -> None:
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator).requires_grad_(True)
    labels = make_labels(generator)
    with_grad = label_logprobs_from_hidden(hidden, weight, labels, chunk_size=4)
    with torch.inference_mode():
        without_grad = label_logprobs_from_hidden(hidden, weight.detach(), labels, chunk_size=4)
    torch.testing.assert_close(with_grad.detach(), without_grad)


def test_from_hidden_never_builds_full_fp32_logits(generator: torch.Generator) -> None:
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator).requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator).requires_grad_(True)
    labels = make_labels(generator)
    chunk_size = 5
    with LargestFloat32Tensor() as chunked:
        label_logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk_size).sum().backward()
    # Chunk-sized logits and the [V, H] weight gradient are the largest fp32 tensors; never [B*T, V].
    assert chunked.largest <= max(chunk_size * VOCAB, VOCAB * HIDDEN)
    assert chunked.largest < BATCH * SEQ * VOCAB


def saved_fp32_elements(compute) -> int:  # type: ignore[no-untyped-def]
    """Elements of the distinct fp32 storages autograd saves for backward while running ``compute``."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == torch.float32:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // 4
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute().sum().backward()
    return sum(storages.values())


def test_checkpointing_keeps_no_chunk_logits_alive_for_backward(generator: torch.Generator) -> None:
    """Without checkpointing every chunk's fp32 logits would be saved (B·T·V in total); with it, none."""
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator).requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator).requires_grad_(True)
    logits = (torch.randn(BATCH, SEQ, VOCAB, generator=generator)).to(torch.bfloat16).requires_grad_(True)
    labels = make_labels(generator)
    from_hidden = saved_fp32_elements(
        lambda: label_logprobs_from_hidden(hidden, weight, labels, chunk_size=5)
    )
    # Only the weight, the hidden states and per-position scalars: nothing V-sized per position.
    assert from_hidden <= VOCAB * HIDDEN + BATCH * SEQ * (HIDDEN + 2)
    assert saved_fp32_elements(lambda: label_logprobs(logits, labels, chunk_size=5)) <= BATCH * SEQ
    assert saved_fp32_elements(lambda: naive_label_logprobs(logits, labels)) >= BATCH * SEQ * VOCAB


def test_a_single_chunk_is_not_recomputed_and_stays_within_one_chunk(generator: torch.Generator) -> None:
    """When every labelled position fits one chunk, nothing is checkpointed (no recompute); what autograd
    saves is still bounded by one chunk of logits."""
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator).requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator).requires_grad_(True)
    labels = make_labels(generator)
    labelled = int((labels != IGNORE_INDEX).sum())
    saved = saved_fp32_elements(lambda: label_logprobs_from_hidden(hidden, weight, labels, chunk_size=BATCH * SEQ))
    assert labelled * VOCAB <= saved <= 2 * labelled * VOCAB + VOCAB * HIDDEN + BATCH * SEQ * (HIDDEN + 2)


def test_from_hidden_rejects_bad_inputs(generator: torch.Generator) -> None:
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    labels = make_labels(generator)
    with pytest.raises(ValueError, match="transpose"):
        label_logprobs_from_hidden(hidden, weight.T, labels)
    with pytest.raises(ValueError, match="dtype"):
        label_logprobs_from_hidden(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="output_bias"):
        label_logprobs_from_hidden(hidden, weight, labels, output_bias=torch.zeros(VOCAB + 1))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        label_logprobs_from_hidden(hidden, weight, labels, final_logit_softcapping=0.0)
    with pytest.raises(ValueError, match="outside"):
        label_logprobs_from_hidden(hidden, weight, torch.full((BATCH, SEQ), VOCAB))


# ------------------------------------------------------------------------------------------ model_label_logprobs


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gemma3() -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=4,
        final_logit_softcapping=2.0,
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # large logits, so the soft-cap visibly matters
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded prompt+response rows and their shifted labels (response positions only)."""
    generator = torch.Generator().manual_seed(1)
    lengths, prompt_lengths, seq = [9, 6], [3, 2], 9
    input_ids = torch.randint(0, vocab_size, (2, seq), generator=generator)  # [B, T]
    positions = torch.arange(seq)  # [T]
    attention_mask = (positions < torch.tensor(lengths).unsqueeze(1)).long()  # [B, T]
    input_ids = torch.where(attention_mask.bool(), input_ids, 0)
    next_is_response = (positions + 1 >= torch.tensor(prompt_lengths).unsqueeze(1)) & (
        positions + 1 < torch.tensor(lengths).unsqueeze(1)
    )  # [B, T]
    next_ids = torch.cat([input_ids[:, 1:], torch.zeros(2, 1, dtype=torch.long)], dim=1)  # [B, T]
    labels = torch.where(next_is_response, next_ids, IGNORE_INDEX)  # [B, T]
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_model_label_logprobs_equals_naive_from_model_logits(build, chunk_size: int) -> None:  # type: ignore[no-untyped-def]
    model = build()
    input_ids, attention_mask, labels = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
        got = model_label_logprobs(model, input_ids, attention_mask, labels, chunk_size=chunk_size)
    torch.testing.assert_close(got, naive_label_logprobs(logits, labels))
    assert torch.all(got[labels == IGNORE_INDEX] == 0.0)


def test_model_label_logprobs_applies_gemma_softcapping() -> None:
    model = tiny_gemma3()
    input_ids, attention_mask, labels = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        got = model_label_logprobs(model, input_ids, attention_mask, labels)
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        uncapped = naive_label_logprobs(model.lm_head(hidden), labels)
    assert (got - uncapped).abs().max() > 0.1


def test_model_label_logprobs_gradients_equal_naive() -> None:
    model = tiny_llama().train(False)
    input_ids, attention_mask, labels = padded_batch(model.config.vocab_size)
    model_label_logprobs(model, input_ids, attention_mask, labels, chunk_size=3).sum().backward()
    chunked_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    naive_label_logprobs(logits, labels).sum().backward()
    naive_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert chunked_grads.keys() == naive_grads.keys()
    for name, grad in naive_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, msg=name)


def test_model_label_logprobs_rejects_mismatched_mask() -> None:
    model = tiny_llama()
    input_ids, attention_mask, labels = padded_batch(model.config.vocab_size)
    with pytest.raises(ValueError, match="attention_mask"):
        model_label_logprobs(model, input_ids, attention_mask[:, :-1], labels)


# ------------------------------------------------------------------------------------------------ span_logprobs


def test_span_logprobs_hand_computed() -> None:
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0], [-0.5, -0.25, -2.0, -1.0, -8.0]])  # [B, T]
    token_span = torch.tensor([[-1, 0, 0, 1, -1], [0, 1, 1, 2, -1]])  # [B, T]
    got = span_logprobs(token_logps, token_span, num_spans=3)
    expected = torch.tensor([[-2.0 + -3.0, -4.0, 0.0], [-0.5, -0.25 + -2.0, -1.0]])  # [B, K]
    torch.testing.assert_close(got, expected)


def test_span_logprobs_invariant_to_padding_on_both_axes(generator: torch.Generator) -> None:
    token_logps = -torch.rand(2, 6, generator=generator)  # [B, T]
    token_span = torch.tensor([[-1, 0, 1, 1, 2, -1], [0, 0, 1, -1, -1, -1]])
    base = span_logprobs(token_logps, token_span, num_spans=3)
    # Extra positions on T, all outside any span, holding garbage (even non-finite) log-probs.
    padded_logps = torch.cat([token_logps, torch.tensor([[float("nan"), -7.0], [float("-inf"), 3.0]])], dim=1)
    padded_span = torch.cat([token_span, torch.full((2, 2), -1)], dim=1)
    torch.testing.assert_close(span_logprobs(padded_logps, padded_span, num_spans=3), base)
    # Extra span columns on K are zeros; the real ones do not move.
    wider = span_logprobs(token_logps, token_span, num_spans=5)
    torch.testing.assert_close(wider[:, :3], base)
    assert torch.all(wider[:, 3:] == 0.0)


def test_span_logprobs_gradient_is_span_membership(generator: torch.Generator) -> None:
    token_logps = (-torch.rand(2, 4, generator=generator)).requires_grad_(True)
    token_span = torch.tensor([[0, 1, -1, 1], [-1, -1, 0, 0]])
    weights = torch.tensor([[2.0, 3.0], [5.0, 7.0]])
    (span_logprobs(token_logps, token_span, num_spans=2) * weights).sum().backward()
    expected = torch.tensor([[2.0, 3.0, 0.0, 3.0], [0.0, 0.0, 5.0, 5.0]])
    torch.testing.assert_close(token_logps.grad, expected)


def test_span_logprobs_equals_python_loop(generator: torch.Generator) -> None:
    token_logps = torch.randn(4, 11, generator=generator)
    token_span = torch.randint(-1, 5, (4, 11), generator=generator)
    got = span_logprobs(token_logps, token_span, num_spans=5)
    expected = torch.zeros(4, 5)
    for b in range(4):
        for t in range(11):
            if token_span[b, t] >= 0:
                expected[b, token_span[b, t]] += token_logps[b, t]
    torch.testing.assert_close(got, expected)


def test_span_logprobs_rejects_bad_indices() -> None:
    token_logps = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="num_spans=2"):
        span_logprobs(token_logps, torch.tensor([[0, 1, 2]]), num_spans=2)
    with pytest.raises(ValueError, match="-1"):
        span_logprobs(token_logps, torch.tensor([[0, -2, 1]]), num_spans=2)
    with pytest.raises(ValueError, match="shape"):
        span_logprobs(token_logps, torch.tensor([[0, 1]]), num_spans=2)
    with pytest.raises(ValueError, match="integer"):
        span_logprobs(token_logps, torch.tensor([[0.0, 1.0, 1.0]]), num_spans=2)
    with pytest.raises(ValueError, match="num_spans"):
        span_logprobs(token_logps, torch.tensor([[0, 1, 1]]), num_spans=-1)


def test_span_logprobs_zero_spans() -> None:
    got = span_logprobs(torch.zeros(2, 3), torch.full((2, 3), -1), num_spans=0)
    assert got.shape == (2, 0)
