"""Per-token and per-span log-probabilities, without a full fp32 log-softmax over ``[B, T, V]``.

Why this module exists: the naive ``logits.float().log_softmax(-1).gather(...)`` costs ``B·T·V·4`` bytes for
the fp32 copy plus as much again for the log-softmax (and twice that again in backward). With a Gemma-sized
vocabulary (V = 262,144) one 2,000-token sequence already needs ~2 GiB per copy. Preference training only needs
one number per position (the log-prob of the label), so we process positions in chunks: upcast one chunk to
fp32, log-normalise it, gather the labels, and throw the chunk away. Under autograd each chunk runs inside
``torch.utils.checkpoint`` so the fp32 chunk is recomputed in backward instead of being kept alive; memory is
then a few chunk-sized temporaries, independent of B·T (``bench/logprobs_memory.py`` measures it).

Label convention (one convention everywhere in ctpd): labels are **already shifted**. ``labels[b, t]`` is the
token that ``logits[b, t]`` predicts, i.e. ``labels[b, t] = input_ids[b, t + 1]`` for response positions and
``IGNORE_INDEX`` (-100) at prompt positions, padding and the last position. Ignored positions get log-prob 0.0.

Span sums (method §3.4): a span's log-prob is the **sum** of its tokens' log-probs; ``span_logprobs`` does it
with one ``scatter_add`` over a ``[B, T]`` span index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
"""Label value of positions that predict nothing (prompt, padding, last position)."""

NO_SPAN = -1
"""Span index of positions that belong to no span (prompt, padding, excluded EOS)."""

DEFAULT_CHUNK_SIZE = 512
"""Positions per chunk. The fp32 chunk costs ``chunk_size × V × 4`` bytes: 512 MiB for Gemma-3's
V = 262,144, 256 MiB for Llama-3's V = 128,256, 62.5 MiB for V = 32,000. Peak temporary memory is a small
multiple of that, independent of B·T: about 2 chunks in forward (the logits and their log-softmax), 3–4 in
backward (recomputed log-softmax, the gathered gradient, the logits gradient), plus, for
:func:`label_logprobs_from_hidden` with a trainable head, two ``[V, H]`` weight gradients while autograd
accumulates them. 512 rows is still a large, efficient matmul on any accelerator; lower it if
memory is tight, raise it if the per-chunk Python overhead ever shows up in a profile (it does not at these
sizes)."""


def _validate_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int, got {chunk_size!r}; pass e.g. {DEFAULT_CHUNK_SIZE}."
        )


def _validate_labels(labels: torch.Tensor, batch_shape: tuple[int, ...], vocab_size: int) -> None:
    """Check shape, dtype and range of the labels (range errors would crash `gather` on GPU opaquely)."""
    if labels.dtype != torch.long:
        raise ValueError(f"labels must be torch.long, got {labels.dtype}; convert with labels.long().")
    if tuple(labels.shape) != batch_shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match the first two dims {batch_shape} of the "
            "logits/hidden states; labels must be aligned with positions (already shifted)."
        )
    is_out_of_range = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))  # [B, T]
    if bool(is_out_of_range.any()):
        bad_value = int(labels[is_out_of_range][0])
        raise ValueError(
            f"labels contain {bad_value}, outside [0, {vocab_size}) and not IGNORE_INDEX={IGNORE_INDEX}; "
            "use the tokenizer that matches this model's vocabulary and -100 for ignored positions."
        )


def _run_chunk(
    function: Callable[..., torch.Tensor], *args: torch.Tensor | float | None, single: bool = False
) -> torch.Tensor:
    """Run ``function`` on one chunk, checkpointed when autograd would otherwise save its fp32 temporaries.

    A ``single`` chunk is not checkpointed: keeping its temporaries for backward costs no more than the
    forward pass already held (one chunk), and recomputing them would cost a second head matmul for
    nothing (~40 % of a short sequence's step on CPU).
    """
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    )
    if needs_grad and not single:
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def _logprobs_of_logits_chunk(logits_chunk: torch.Tensor, labels_chunk: torch.Tensor) -> torch.Tensor:
    """Log-prob of each label from one chunk of (any-dtype) logits, computed in fp32.

    ``log_softmax`` then ``gather`` rather than ``gather − logsumexp``: same values, but log-softmax and its
    backward are single fused kernels, whereas ``logsumexp`` runs as several full passes over ``[N, V]``
    (max, subtract, exp, sum) forward and again backward: ~1.7× slower per chunk (forward+backward) on CPU.
    """
    logps = torch.log_softmax(logits_chunk.float(), dim=1)  # [N, V]
    return logps.gather(1, labels_chunk.unsqueeze(1)).squeeze(1)  # [N]


def _logprobs_of_hidden_chunk(
    hidden_chunk: torch.Tensor,
    output_weight: torch.Tensor,
    output_bias: torch.Tensor | None,
    labels_chunk: torch.Tensor,
    final_logit_softcapping: float | None,
) -> torch.Tensor:
    """Project one chunk of hidden states to logits, optionally soft-cap, and take the label log-probs.

    The matmul runs in the model's dtype (as the model's own head would); softcapping and the log-softmax
    run in fp32 (more precise than the model's own bf16 ``tanh``; identical in fp32).
    """
    logits_fp32 = F.linear(hidden_chunk, output_weight, output_bias).float()  # [N, V]
    if final_logit_softcapping is not None:
        logits_fp32 = final_logit_softcapping * torch.tanh(logits_fp32 / final_logit_softcapping)  # [N, V]
    return _logprobs_of_logits_chunk(logits_fp32, labels_chunk)  # [N]


def label_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Log-prob of each label under ``logits``, chunk by chunk in fp32.

    Args:
        logits: ``[B, T, V]``, any float dtype (bf16/fp16 logits are upcast one chunk at a time).
        labels: ``[B, T]`` long, already shifted (``labels[b, t]`` is predicted by ``logits[b, t]``),
            ``IGNORE_INDEX`` (-100) where nothing is predicted.
        chunk_size: positions (over the flattened B·T axis) per chunk; memory ``chunk_size × V × 4`` bytes.

    Returns:
        ``[B, T]`` float32 log-probs, 0.0 at ignored positions. Differentiable with respect to ``logits``;
        the gradient of ``logits`` (same dtype and size as ``logits``) is the only full-size tensor backward
        creates.

    Use :func:`label_logprobs_from_hidden` when you have the hidden states: it never builds ``[B, T, V]``
    logits at all.
    """
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float tensor [B, T, V], got dtype {logits.dtype} and shape {tuple(logits.shape)}."
        )
    _validate_chunk_size(chunk_size)
    batch_size, seq_len, vocab_size = logits.shape
    _validate_labels(labels, (batch_size, seq_len), vocab_size)

    flat_logits = logits.reshape(batch_size * seq_len, vocab_size)  # [B*T, V] (a view when contiguous)
    flat_labels = labels.reshape(-1)  # [B*T]
    is_labelled = flat_labels != IGNORE_INDEX  # [B*T]
    safe_labels = torch.where(is_labelled, flat_labels, 0)  # [B*T] ignored positions gather a dummy index
    # torch.split has one backward node for all chunks, so backward assembles the logits gradient once
    # (slicing in a loop would allocate a full-size zero gradient per chunk).
    single = flat_logits.shape[0] <= chunk_size
    chunk_logps = [
        _run_chunk(_logprobs_of_logits_chunk, logits_chunk, labels_chunk, single=single)  # [N]
        for logits_chunk, labels_chunk in zip(
            flat_logits.split(chunk_size), safe_labels.split(chunk_size), strict=True
        )
    ]
    if not chunk_logps:  # B*T == 0
        return logits.new_zeros((batch_size, seq_len), dtype=torch.float32)
    flat_logps = torch.cat(chunk_logps)  # [B*T]
    flat_logps = torch.where(is_labelled, flat_logps, 0.0)  # [B*T]
    return flat_logps.view(batch_size, seq_len)  # [B, T]


def label_logprobs_from_hidden(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    output_bias: torch.Tensor | None = None,
    final_logit_softcapping: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Log-prob of each label from the final hidden states and the LM head, never building ``[B, T, V]``.

    Only labelled positions are projected (prompt and padding rows are dropped before the V-sized matmul,
    which saves compute as well as memory); logits exist one chunk at a time.

    Args:
        hidden: ``[B, T, H]`` final hidden states (after the final norm), any float dtype.
        output_weight: ``[V, H]`` LM-head weight (``nn.Linear`` layout), same dtype as ``hidden``.
        labels: ``[B, T]`` long, already shifted, ``IGNORE_INDEX`` (-100) where nothing is predicted.
        output_bias: optional ``[V]`` LM-head bias.
        final_logit_softcapping: if set, logits become ``cap · tanh(logits / cap)`` (Gemma-2/3 style).
        chunk_size: labelled positions per chunk; memory ``chunk_size × V × 4`` bytes per fp32 copy.

    Returns:
        ``[B, T]`` float32 log-probs, 0.0 at ignored positions; differentiable w.r.t. hidden, weight, bias.
    """
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a float tensor [B, T, H], got dtype {hidden.dtype} and shape {tuple(hidden.shape)}."
        )
    batch_size, seq_len, hidden_size = hidden.shape
    if output_weight.dim() != 2 or output_weight.shape[1] != hidden_size:
        raise ValueError(
            f"output_weight must be [V, H] with H={hidden_size} (nn.Linear layout), got "
            f"{tuple(output_weight.shape)}; pass lm_head.weight, not its transpose."
        )
    if output_weight.dtype != hidden.dtype:
        raise ValueError(
            f"output_weight dtype {output_weight.dtype} differs from hidden dtype {hidden.dtype}; "
            "cast one of them (the model's head and backbone normally share a dtype)."
        )
    vocab_size = output_weight.shape[0]
    if output_bias is not None and tuple(output_bias.shape) != (vocab_size,):
        raise ValueError(f"output_bias must be [V]=[{vocab_size}], got {tuple(output_bias.shape)}.")
    if final_logit_softcapping is not None and not final_logit_softcapping > 0:
        raise ValueError(
            f"final_logit_softcapping must be a positive float or None, got {final_logit_softcapping!r}."
        )
    _validate_chunk_size(chunk_size)
    _validate_labels(labels, (batch_size, seq_len), vocab_size)
    softcap = None if final_logit_softcapping is None else float(final_logit_softcapping)

    flat_labels = labels.reshape(-1)  # [B*T]
    labelled_positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # [N]
    selected_hidden = hidden.reshape(-1, hidden_size).index_select(0, labelled_positions)  # [N, H]
    selected_labels = flat_labels.index_select(0, labelled_positions)  # [N]
    single = selected_hidden.shape[0] <= chunk_size
    chunk_logps = [
        _run_chunk(
            _logprobs_of_hidden_chunk, hidden_chunk, output_weight, output_bias, labels_chunk, softcap, single=single
        )
        for hidden_chunk, labels_chunk in zip(
            selected_hidden.split(chunk_size), selected_labels.split(chunk_size), strict=True
        )
    ]
    flat_logps = hidden.new_zeros(batch_size * seq_len, dtype=torch.float32)  # [B*T]
    if chunk_logps:
        flat_logps = flat_logps.index_copy(0, labelled_positions, torch.cat(chunk_logps))  # [B*T]
    return flat_logps.view(batch_size, seq_len)  # [B, T]


def _backbone(model: nn.Module) -> nn.Module:
    """The module that maps input ids to the final hidden states (HF's ``get_decoder`` or base model)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        backbone = get_decoder()
        if backbone is not None and backbone is not model:
            return backbone
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None:
        raise ValueError(
            f"cannot find the backbone of {type(model).__name__}: neither get_decoder() nor "
            f"base_model_prefix={prefix!r} gives a submodule; compute model(...).logits and use label_logprobs."
        )
    return backbone


def _final_logit_softcapping(model: nn.Module) -> float | None:
    """Read the head's logit post-processing from the (text) config; refuse ones we do not reproduce."""
    config = cast(Any, model).config  # a transformers config (torch's stubs type module attributes as Tensor | Module)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("logit_scale", "logits_scaling"):
        value = getattr(text_config, name, None)
        if value is not None and float(value) != 1.0:
            raise ValueError(
                f"{type(model).__name__} scales its logits ({name}={value}), which model_label_logprobs does "
                "not reproduce; compute model(...).logits and use label_logprobs instead."
            )
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return None if softcap is None else float(softcap)


def model_label_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token log-probs of a Hugging Face causal LM, without materialising its ``[B, T, V]`` logits.

    Runs the backbone (``model.get_decoder()``, else ``getattr(model, model.base_model_prefix)``), takes
    ``last_hidden_state`` and applies the head (``model.get_output_embeddings()``) chunk by chunk, with the
    config's ``final_logit_softcapping`` when set. Equal to ``label_logprobs(model(...).logits, labels)``
    up to matmul rounding.

    Args:
        model: a ``*ForCausalLM`` (or a wrapper such as a PEFT model that forwards these methods).
        input_ids: ``[B, T]`` prompt + response tokens, padded.
        attention_mask: ``[B, T]`` 1 on real tokens, 0 on padding.
        labels: ``[B, T]`` long, **already shifted**: ``labels[b, t] = input_ids[b, t + 1]`` at positions
            whose next token is a response token, ``IGNORE_INDEX`` (-100) elsewhere (prompt, padding, last).
        chunk_size: labelled positions per chunk (see :data:`DEFAULT_CHUNK_SIZE`).

    Returns:
        ``[B, T]`` float32 log-probs, 0.0 at ignored positions.
    """
    if tuple(input_ids.shape) != tuple(attention_mask.shape):
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must have "
            "the same [B, T] shape."
        )
    head = cast(Any, model).get_output_embeddings()  # PreTrainedModel's, reached through nn.Module
    head_weight = getattr(head, "weight", None)
    if head_weight is None or head_weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__}.get_output_embeddings() returned {type(head).__name__}, not a linear head "
            "with a [V, H] weight; compute model(...).logits and use label_logprobs instead."
        )
    softcap = _final_logit_softcapping(model)
    outputs = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = outputs.last_hidden_state  # [B, T, H]
    return label_logprobs_from_hidden(
        hidden,
        head_weight,
        labels,
        output_bias=getattr(head, "bias", None),
        final_logit_softcapping=softcap,
        chunk_size=chunk_size,
    )  # [B, T]


def span_logprobs(token_logps: torch.Tensor, token_span: torch.Tensor, num_spans: int) -> torch.Tensor:
    """Sum per-token log-probs into per-span log-probs (method §3.4: sum, not mean) by one scatter-add.

    Args:
        token_logps: ``[B, T]`` float per-position log-probs (e.g. from :func:`label_logprobs`).
        token_span: ``[B, T]`` integer span index of the label at each position, ``NO_SPAN`` (-1) for
            positions in no span (prompt, padding, excluded EOS). Uses the same positions as ``token_logps``.
        num_spans: K, the number of span columns (the max span count in the batch).

    Returns:
        ``[B, K]`` span log-probs in ``token_logps``' dtype; spans with no tokens (padding) are 0.0. Extra
        ``-1`` padding on T changes nothing; a larger K only appends zero columns. Differentiable w.r.t.
        ``token_logps``; values at ``-1`` positions (even non-finite ones) contribute nothing.
    """
    if token_logps.dim() != 2 or not token_logps.is_floating_point():
        raise ValueError(
            f"token_logps must be a float tensor [B, T], got dtype {token_logps.dtype} and shape "
            f"{tuple(token_logps.shape)}."
        )
    if tuple(token_span.shape) != tuple(token_logps.shape):
        raise ValueError(
            f"token_span shape {tuple(token_span.shape)} must equal token_logps shape {tuple(token_logps.shape)}."
        )
    if token_span.is_floating_point() or token_span.dtype == torch.bool:
        raise ValueError(f"token_span must be an integer tensor, got {token_span.dtype}; use .long().")
    if isinstance(num_spans, bool) or not isinstance(num_spans, int) or num_spans < 0:
        raise ValueError(f"num_spans must be a non-negative int, got {num_spans!r}.")
    token_span = token_span.long()
    if token_span.numel() > 0:
        min_index, max_index = (int(v) for v in torch.aminmax(token_span))
        if min_index < NO_SPAN:
            raise ValueError(f"token_span contains {min_index}; use -1 for positions in no span.")
        if max_index >= num_spans:
            raise ValueError(
                f"token_span contains span index {max_index} but num_spans={num_spans}; pass num_spans as the "
                "max span count in the batch (max index + 1)."
            )
    is_in_span = token_span != NO_SPAN  # [B, T]
    scatter_index = torch.where(is_in_span, token_span, 0)  # [B, T]
    contributions = torch.where(is_in_span, token_logps, 0.0)  # [B, T]
    spans = token_logps.new_zeros((token_logps.shape[0], num_spans))  # [B, K]
    if num_spans == 0:
        return spans
    return spans.scatter_add(1, scatter_index, contributions)  # [B, K]


def head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> torch.Tensor:  # [N, V]
    """The LM head on selected hidden states ``[N, H]``, as the model's own head computes it (bias, final-logit
    softcapping), in fp32: for losses that need whole distributions at a few positions (the KD baselines)."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _final_hidden_and_head(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    head = cast(Any, model).get_output_embeddings()  # PreTrainedModel's, reached through nn.Module
    outputs = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return outputs.last_hidden_state, head.weight, getattr(head, "bias", None), _final_logit_softcapping(model)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    logits = F.linear(hidden, weight, bias).float()  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits, dim=1)  # [N, V]


@torch.no_grad()
def model_label_kl(
    model: nn.Module,
    reference_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """KL(model ‖ reference_model) of the full next-token distributions at every labelled position.

    Same conventions as :func:`model_label_logprobs` (labels already shifted, -100 ignored); both models
    must share the tokenizer (e.g. a student and its initial copy). Chunked over positions, so neither
    model's ``[B, T, V]`` logits exist. Returns ``[B, T]`` float32, 0.0 at ignored positions.
    """
    hidden, weight, bias, softcap = _final_hidden_and_head(model, input_ids, attention_mask)
    hidden_ref, weight_ref, bias_ref, softcap_ref = _final_hidden_and_head(reference_model, input_ids, attention_mask)
    if weight.shape[0] != weight_ref.shape[0]:
        raise ValueError("model_label_kl compares two models over one vocabulary; their heads differ in size")
    flat_labels = labels.reshape(-1)
    positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # [N]
    size = hidden.shape[-1]
    selected = hidden.reshape(-1, size).index_select(0, positions)  # [N, H]
    selected_ref = hidden_ref.reshape(-1, hidden_ref.shape[-1]).index_select(0, positions)
    kl = hidden.new_zeros(flat_labels.shape[0], dtype=torch.float32)
    pieces = []
    for chunk, chunk_ref in zip(selected.split(chunk_size), selected_ref.split(chunk_size), strict=True):
        logp = _chunk_logps(chunk, weight, bias, softcap)  # [n, V]
        logq = _chunk_logps(chunk_ref, weight_ref, bias_ref, softcap_ref)
        pieces.append((logp.exp() * (logp - logq)).sum(dim=1))  # [n]
    if pieces:
        kl = kl.index_copy(0, positions, torch.cat(pieces))
    return kl.view(labels.shape)  # [B, T]
