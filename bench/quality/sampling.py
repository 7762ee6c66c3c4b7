"""Sampling continuations from a causal LM, reproducibly, and the clean-up the sentiment task applies to them.

Used by the example-dataset builder (examples/build_sentiment_pairs.py, Gemma samples turned into pairs) and
by the quality benchmark (bench/quality/, every trained model's samples scored by a reward). Prompts come as
token ids built the way training encodes them (``PairEncoder.prompt_ids``: the tokenizer's own start tokens,
raw text), so a model is sampled in exactly the format it was trained on.

A continuation ends at the first *control* token: EOS and pad, and also Gemma's ``<start_of_image>``,
``<end_of_turn>``, ``<unusedN>``..., which the GGUF-converted tokenizer does not flag as special (so
``skip_special_tokens`` would keep them as text) and which the base model emits as a paragraph break.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ctpd_core.inference import autocast_context, batched, pad_token_id
from ctpd_core.observe import StopToken

_CONTROL = re.compile(r"<start_of_\w+>|<end_of_\w+>|<unused\d+>|<image_soft_token>|\[multimodal\]")


def control_token_ids(tokenizer: Any) -> set[int]:
    """Ids at which a continuation ends: special tokens (eos, pad, ...) and Gemma's turn/image/unused tokens."""
    ids = set(tokenizer.all_special_ids)
    ids.update(
        i for i, token in tokenizer.added_tokens_decoder.items() if token.special or _CONTROL.fullmatch(token.content)
    )
    return ids


def cut_at_control(ids: list[int], control: set[int], ignore: set[int]) -> tuple[list[int], bool]:
    """``ids`` up to the first control token; True when a token other than those in ``ignore`` (eos/pad) cut it."""
    for position, token in enumerate(ids):
        if token in control:
            return ids[:position], token not in ignore
    return ids, False


def clean_continuation(text: str) -> tuple[str, bool]:
    """Cut at the first newline and strip trailing whitespace; the leading space is kept. True if cut."""
    cut = "\n" in text
    return text.split("\n", 1)[0].rstrip(), cut


def continuation_text(
    tokenizer: Any, prompt_ids: Sequence[int], generated: Sequence[int], prompt: str
) -> tuple[str, bool]:
    """The text ``generated`` adds after ``prompt``, as the full sequence decodes (SentencePiece decoders drop
    a leading space when a piece is decoded on its own, so decoding the continuation alone would lose it).
    True when the full decode did not start with ``prompt`` and the continuation was decoded alone instead.
    Special tokens (left padding included) decode to nothing."""
    full = tokenizer.decode(list(prompt_ids) + list(generated), skip_special_tokens=True)
    if full.startswith(prompt):
        return full[len(prompt) :], False
    return tokenizer.decode(list(generated), skip_special_tokens=True), True


@dataclass(frozen=True)
class Sample:
    """One sampled continuation: the token ids the model drew (cut before the first control token, with the
    EOS appended when the model ended the text itself: it stands for whichever control token was drawn), and
    the text after the newline clean-up."""

    token_ids: list[int]
    text: str
    ended: bool  # the model emitted EOS (or another control token) within max_new_tokens
    logprobs: list[float] | None = None  # log-prob of each drawn token under the sampling distribution, if asked


@dataclass(frozen=True)
class SamplingConfig:
    num_samples: int = 4
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0  # 1.0 with top_k 0: plain ancestral sampling, so a KL on the samples is the policy's own
    seed: int = 0
    batch_size: int = 16  # prompts per generate() call (each with num_samples rows)
    return_logprobs: bool = False  # keeps [steps, rows, V] scores while generating: for checks, not big runs

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("num_samples, max_new_tokens and batch_size must be >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1] (got {self.temperature}, {self.top_p})")


@torch.inference_mode()
def sample_continuations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    config: SamplingConfig,
    *,
    device: torch.device,
    precision: str = "auto",
    stop: StopToken | None = None,
) -> list[list[Sample]]:
    """``config.num_samples`` continuations of every prompt, in prompt order.

    Batch ``b`` (prompts ``b*batch_size ..``) is sampled under ``torch.manual_seed(seed + b)``: the same
    prompts and seed give the same samples for the same model, and two models sampled with the same seed share
    their random numbers (common random numbers make their reward difference less noisy).
    """
    from transformers import GenerationConfig

    if len(prompts) != len(prompt_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt id lists")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer defines no EOS token, so a sampled continuation could never end")
    pad_id = pad_token_id(tokenizer)
    control = control_token_ids(tokenizer)
    generation = GenerationConfig(
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=0,  # explicit: the models' own generation_config may set top_k (Gemma's sets 64)
        max_new_tokens=config.max_new_tokens,
        num_return_sequences=config.num_samples,
        eos_token_id=sorted(control),  # stop at any control token, not only EOS
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_scores=config.return_logprobs,
    )
    model.eval()
    out: list[list[Sample]] = []
    for batch_index, batch in enumerate(batched(prompt_ids, config.batch_size, stage="sampling", stop=stop)):
        start = batch_index * config.batch_size
        batch_ids = [list(ids) for ids in batch]
        width = max(len(ids) for ids in batch_ids)
        # Left padding: every prompt ends at the same column, where generation starts.
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch_ids], device=device)
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids], device=device
        )
        torch.manual_seed(config.seed + batch_index)
        with autocast_context(device, precision):
            output = cast(Any, model).generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation)
        rows = output.sequences[:, width:].tolist()
        step_logprobs = None
        if config.return_logprobs:  # scores[t]: the processed logits step t sampled from, [rows, V]
            drawn = output.sequences[:, width:]
            step_logprobs = torch.stack(
                [torch.log_softmax(score.float(), dim=-1).gather(1, drawn[:, t : t + 1]).squeeze(1)
                 for t, score in enumerate(output.scores)], dim=1,
            ).tolist()
        for j, ids in enumerate(batch_ids):
            samples = []
            for r in range(j * config.num_samples, (j + 1) * config.num_samples):  # copies are adjacent
                row = rows[r]
                generated, _ = cut_at_control(row, control, set())
                ended = len(generated) < len(row)
                raw, _ = continuation_text(tokenizer, ids, generated, prompts[start + j])
                text, _ = clean_continuation(raw)
                # An ended continuation keeps its EOS: the end is part of what the model chose (and what the
                # eos_span training scored), and the KL at that position counts.
                kept = len(generated) + int(ended)
                samples.append(Sample(
                    token_ids=generated + ([eos_id] if ended else []), text=text, ended=ended,
                    logprobs=step_logprobs[r][:kept] if step_logprobs is not None else None,
                ))
            out.append(samples)
    return out
