"""Dual-Space Knowledge Distillation with cross-model attention (DSKD; Zhang et al., EMNLP 2024; method §8).

The baseline the paper calls its strongest cross-tokenizer KD: on the chosen responses, each model's
representations are projected into the other's space, and a cross-model attention aligns the two token
sequences, so the student can be distilled from a teacher with another tokenizer and another hidden size.

For one batch (the same rows on both sides; ``R_s`` / ``R_t`` response tokens per row):

* **attention.** Queries: ``query([e_s(input) ⊕ e_s(target)])`` at the student's response positions, from the
  student's *detached* input embeddings of the token each position reads and the token it predicts
  (``2·d_s → 2·d_t``). Keys: the teacher's ``[e_t(input) ⊕ e_t(target)]`` at its response positions, divided
  by their standard deviation (one scalar). Scores ``q·k / √(2·d_t)``, softmax over the teacher's response
  positions only (another row's, padding and prompt positions get weight 0). Computed in fp32.
* **teacher → student.** Values: ``t2s(h_t / std(h_t) + e_t(target) / std(e_t(target)))`` (``d_t → d_s``),
  ``h_t`` the teacher's final hidden states. The attended values go through the student's LM head (weights
  detached): the *t2s logits*, the teacher's distribution in the student's vocabulary. ``CE(t2s)`` on the
  student's targets trains the projector; ``KL_t2s = KL(t2s ‖ student)`` at temperature T, t2s detached, only
  at positions where the t2s argmax is the target (DSKD's correctness mask), trains the student.
* **student → teacher.** The transposed scores, softmax over the student's response positions, attend to
  ``s2t(h_s)`` (``d_s → d_t``); through the teacher's LM head (detached): the *s2t logits*.
  ``KL_s2t = KL(teacher ‖ s2t)`` at temperature T over the teacher's response positions trains the student
  (through ``h_s``) and the projector.
* **loss** ``(1 − κ)·CE_student + κ·(CE(t2s) + KL_t2s + KL_s2t)``, κ = 0.5, T = 2.0 in the paper. Both KLs
  divide both sides' logits by T and are not multiplied by T² (as DSKD).

Normalisation: each term is a token mean over its own side's response positions: CE_student, CE(t2s) and
KL_t2s over the student's tokens (positions the correctness mask drops count as 0, as in DSKD), KL_s2t over the
teacher's. DSKD divides every sum, the s2t one included, by the student's token count, which weights KL_s2t by
the teacher's tokens per student token (how finely the teacher's tokenizer cuts the text); its own mean keeps
that weight at 1 whatever the two tokenizers are. The standard deviations are taken over the response
positions only (DSKD's include the padding it fills with token 0, so they depend on the batch's padding).

Where we differ from the reference code otherwise: both LM heads are applied whole (bias and Gemma's final
logit softcapping included), so the t2s and s2t logits live where the model's own logits do; and logits exist
only at response positions, a chunk of positions at a time (two vocabularies of up to 262k entries).

The trained unit is :class:`DualSpaceStudent` (student and projector), so ``fit()`` trains, checkpoints and
resumes both; the projector, fresh and random, learns at DSKD's own rate (``PROJECTOR_LEARNING_RATE`` through
``FitConfig.group_learning_rates``), and is saved beside the exported student (:func:`save_projector`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctpd_core.batching import SideBatch
from ctpd_core.logprobs import _backbone, _final_logit_softcapping, head_logits

PROJECTOR_FILE = "dskd_projector.safetensors"
"""The projector's weights, beside the exported student."""

PROJECTOR_CONFIG_FILE = "dskd_projector.json"
"""Its dimensions (and a format number), so :func:`load_projector` rebuilds it without the models."""

PROJECTOR_PREFIX = "projector."
"""The name prefix of the projector's parameters in a :class:`DualSpaceStudent` (for ``group_learning_rates``)."""

PROJECTOR_LEARNING_RATE = 1e-3
"""DSKD's ``--projector-lr`` (its GPT-2 and TinyLlama scripts both use 1e-3, beside student rates of 5e-4 and
1e-3): the projector starts random, so it gets its own rate in a separate optimizer group."""

DSKD_CHUNK_SIZE = 256
"""Response positions per chunk of LM-head work. A student chunk holds about six ``[n, V_s]`` fp32 temporaries
(the student's and the t2s logits, their log-softmaxes at 1 and at T), so half of
:data:`ctpd_core.logprobs.DEFAULT_CHUNK_SIZE` keeps the peak near that of a plain log-prob chunk: ~1.5 GiB at
Gemma-3's V = 262,144, ~0.2 GiB at V = 32,000."""

_FORMAT = 1
_MASKED_SCORE = torch.finfo(torch.float32).min  # exp(min − max) is exactly 0; an all-masked row stays finite


# --------------------------------------------------------------------------------------------- the modules


class DualSpaceProjector(nn.Module):
    """DSKD's three projectors (``nn.Linear`` with bias, PyTorch's default initialisation, fp32).

    * ``query``: ``2·d_s → 2·d_t``, on the student's ``[input embedding ⊕ target embedding]``;
    * ``t2s``: ``d_t → d_s``, teacher hidden states (plus target embeddings) into the student's space;
    * ``s2t``: ``d_s → d_t``, student hidden states into the teacher's space.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int) -> None:
        super().__init__()
        for name, value in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int (the model's hidden size), got {value!r}.")
        self.student_hidden, self.teacher_hidden = student_hidden, teacher_hidden
        self.query = nn.Linear(2 * student_hidden, 2 * teacher_hidden)
        self.t2s = nn.Linear(teacher_hidden, student_hidden)
        self.s2t = nn.Linear(student_hidden, teacher_hidden)

    @classmethod
    def for_models(cls, student: nn.Module, teacher: nn.Module, *, seed: int | None = None) -> DualSpaceProjector:
        """A projector between ``student`` and ``teacher`` (Hugging Face causal LMs, PEFT-wrapped or not),
        from their hidden sizes. With ``seed`` its initial weights depend on nothing else (the global RNG is
        left as it was), so a job rebuilt for a resume starts from the same projector."""
        sizes = (_hidden_size(student, "student"), _hidden_size(teacher, "teacher"))
        if seed is None:
            return cls(*sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(*sizes)

    def config(self) -> dict[str, int]:
        return {"format": _FORMAT, "student_hidden": self.student_hidden, "teacher_hidden": self.teacher_hidden}


class DualSpaceStudent(nn.Module):
    """The trained unit of a dskd job: the student (possibly PEFT-wrapped) and its projector, so that fit()
    trains, checkpoints and resumes both (their parameters are ``student.*`` and ``projector.*``). ``.student``
    is what gets exported; the projector is saved beside it (:func:`save_projector`). Calling it calls the
    student."""

    def __init__(self, student: nn.Module, projector: DualSpaceProjector) -> None:
        super().__init__()
        if not isinstance(projector, DualSpaceProjector):
            raise ValueError(f"projector must be a DualSpaceProjector, got {type(projector).__name__}.")
        hidden = _hidden_size(student, "student")
        if projector.student_hidden != hidden:
            raise ValueError(
                f"the projector was built for a student of hidden size {projector.student_hidden}, this student's "
                f"is {hidden}; build it with DualSpaceProjector.for_models(student, teacher)."
            )
        self.student = student
        self.projector = projector

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)


def _hidden_size(model: nn.Module, role: str) -> int:
    """The width of the final hidden states, which must also be the embeddings' (DSKD adds the two)."""
    embeddings = getattr(model, "get_input_embeddings", None)
    weight = getattr(embeddings(), "weight", None) if callable(embeddings) else None
    if weight is None or weight.dim() != 2:
        raise ValueError(
            f"the {role} ({type(model).__name__}) has no input embedding matrix (get_input_embeddings()); "
            "DSKD needs a Hugging Face causal LM."
        )
    config: Any = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text_config, "hidden_size", None)
    if hidden is not None and int(hidden) != int(weight.shape[1]):
        raise ValueError(
            f"the {role}'s embeddings are {weight.shape[1]} wide but its hidden size is {hidden}; DSKD adds "
            "target embeddings to hidden states, so it needs the two equal."
        )
    return int(weight.shape[1])


# ------------------------------------------------------------------------------------------ save and load


def save_projector(projector: DualSpaceProjector, folder: Path) -> None:
    """``dskd_projector.safetensors`` (its state dict, fp32, on the CPU) and ``dskd_projector.json`` (its
    dimensions) in ``folder``, beside the exported student."""
    if not isinstance(projector, DualSpaceProjector):
        raise ValueError(f"save_projector takes a DualSpaceProjector, got {type(projector).__name__}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().to("cpu", torch.float32).contiguous() for name, value in projector.state_dict().items()}
    save_file(tensors, str(folder / PROJECTOR_FILE), metadata={"format": str(_FORMAT)})
    (folder / PROJECTOR_CONFIG_FILE).write_text(json.dumps(projector.config(), indent=2) + "\n", encoding="utf-8")


def load_projector(folder: Path) -> DualSpaceProjector:
    """The projector :func:`save_projector` wrote into ``folder`` (fp32, on the CPU)."""
    folder = Path(folder)
    weights, config_path = folder / PROJECTOR_FILE, folder / PROJECTOR_CONFIG_FILE
    missing = [path.name for path in (weights, config_path) if not path.is_file()]
    if missing:
        raise ValueError(
            f"{folder} has no {' or '.join(missing)}: it holds no DSKD projector; point at the folder a dskd job "
            "exported (save_projector writes both files)."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format") != _FORMAT:
        raise ValueError(f"{config_path} has format {config.get('format')!r}, this code reads {_FORMAT}.")
    projector = DualSpaceProjector(config["student_hidden"], config["teacher_hidden"])
    tensors = load_file(str(weights), device="cpu")
    expected = {name: tuple(value.shape) for name, value in projector.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in tensors.items()}
    if found != expected:
        raise ValueError(
            f"{weights} does not match {config_path} (tensors {found}, expected {expected}); the two files come "
            "from different projectors: export them again together."
        )
    projector.load_state_dict(tensors)
    return projector


# ------------------------------------------------------------------------------ the pieces, on plain tensors


def kl_at_temperature(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(target/T) ‖ softmax(logits/T))`` per row, in fp32 (no T² factor, as DSKD).

    ``target_logits``, ``logits``: ``[N, V]`` → ``[N]``. Differentiable in both; detach the one that is a target.
    """
    target_logps = torch.log_softmax(target_logits.float() / temperature, dim=-1)  # [N, V]
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, V]
    return (target_logps.exp() * (target_logps - logps)).sum(dim=-1)  # [N]


def student_space_terms(
    student_logits: torch.Tensor, t2s_logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> dict[str, torch.Tensor]:
    """The per-position terms in the student's vocabulary, at its response positions (``[N, V_s]`` logits,
    ``[N]`` targets): ``nll`` (the student's CE), ``t2s_ce`` (CE of the t2s logits: trains the projector),
    ``t2s_correct`` (the t2s argmax is the target: DSKD's correctness mask, float) and ``t2s_kl``
    (``KL(t2s ‖ student)`` at ``temperature``, t2s detached, 0 where t2s is not correct). Each ``[N]``."""
    targets = targets.unsqueeze(1)  # [N, 1]
    nll = -torch.log_softmax(student_logits.float(), dim=-1).gather(1, targets).squeeze(1)  # [N]
    t2s_ce = -torch.log_softmax(t2s_logits.float(), dim=-1).gather(1, targets).squeeze(1)  # [N]
    correct = (t2s_logits.detach().argmax(dim=-1) == targets.squeeze(1)).float()  # [N]
    t2s_kl = kl_at_temperature(t2s_logits.detach(), student_logits, temperature) * correct  # [N]
    return {"nll": nll, "t2s_ce": t2s_ce, "t2s_kl": t2s_kl, "t2s_correct": correct}


def teacher_space_terms(
    teacher_logits: torch.Tensor, s2t_logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> dict[str, torch.Tensor]:
    """The per-position terms in the teacher's vocabulary, at its response positions: ``s2t_kl``
    (``KL(teacher ‖ s2t)`` at ``temperature``, teacher detached) and ``s2t_correct`` (float). Each ``[N]``."""
    s2t_kl = kl_at_temperature(teacher_logits.detach(), s2t_logits, temperature)  # [N]
    correct = (s2t_logits.detach().argmax(dim=-1) == targets).float()  # [N]
    return {"s2t_kl": s2t_kl, "s2t_correct": correct}


def normalise_teacher(
    teacher_index_embeds: torch.Tensor,
    teacher_target_embeds: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DSKD's keys and t2s inputs: each tensor divided by its one standard deviation over the real response
    positions, in fp32.

    ``teacher_index_embeds`` ``[B, R_t, 2·d_t]`` (input ⊕ target embeddings), ``teacher_target_embeds`` and
    ``teacher_hidden`` ``[B, R_t, d_t]``, ``teacher_mask`` ``[B, R_t]`` bool. Returns the keys
    ``[B, R_t, 2·d_t]`` and ``hidden/std + target/std`` ``[B, R_t, d_t]`` (what ``t2s`` projects)."""

    def normalised(values: torch.Tensor) -> torch.Tensor:
        values = values.float()
        real = values[teacher_mask]  # [N, D]
        scale = real.std() if real.numel() > 1 else values.new_ones(())
        return values / scale.clamp_min(torch.finfo(torch.float32).tiny)

    keys = normalised(teacher_index_embeds)  # [B, R_t, 2·d_t]
    values = normalised(teacher_hidden) + normalised(teacher_target_embeds)  # [B, R_t, d_t]
    return keys, values


def cross_model_attention(
    queries: torch.Tensor, keys: torch.Tensor, student_mask: torch.Tensor, teacher_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two attention maps of one batch, in fp32.

    ``queries`` ``[B, R_s, D]`` (the projected student embeddings), ``keys`` ``[B, R_t, D]`` (the normalised
    teacher embeddings; D = 2·d_t), masks ``[B, R_s]`` / ``[B, R_t]`` bool (response tokens). Scores are
    ``q·k / √D`` (DSKD's ``√(2·d_t)``). Returns ``t2s_weights`` ``[B, R_s, R_t]`` (each student position's
    softmax over the teacher's response positions of its row; masked ones get exactly 0) and ``s2t_weights``
    ``[B, R_t, R_s]`` (the transposed scores, softmax over the student's response positions)."""
    with torch.autocast(queries.device.type, enabled=False):
        scores = queries.float() @ keys.float().transpose(1, 2) / math.sqrt(keys.shape[-1])  # [B, R_s, R_t]
        t2s = torch.softmax(scores.masked_fill(~teacher_mask[:, None, :], _MASKED_SCORE), dim=-1)
        s2t = torch.softmax(scores.transpose(1, 2).masked_fill(~student_mask[:, None, :], _MASKED_SCORE), dim=-1)
    return t2s, s2t


# ------------------------------------------------------------------------------------------------- the loss


def _validate(model: object, teacher: nn.Module, student_batch: SideBatch, teacher_batch: SideBatch,
              temperature: float, chunk_size: int) -> None:
    if not isinstance(model, DualSpaceStudent):
        raise ValueError(
            f"dskd_loss trains a DualSpaceStudent (the student and its projector), got {type(model).__name__}; "
            "wrap it: DualSpaceStudent(student, DualSpaceProjector.for_models(student, teacher))."
        )
    if teacher.training:
        raise ValueError("the teacher is in training mode (dropout would be active); pass teacher.eval().")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; DSKD uses 2.0.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}; e.g. {DSKD_CHUNK_SIZE}.")
    student_rows, teacher_rows = student_batch.input_ids.shape[0], teacher_batch.input_ids.shape[0]
    if student_rows != teacher_rows:
        raise ValueError(
            f"the student batch has {student_rows} rows and the teacher batch {teacher_rows}; collate the same "
            "responses on both sides (collate_responses(responses, 'student' / 'teacher', ...))."
        )


def _head(model: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    head = cast(Any, model).get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(
            f"the {role}'s get_output_embeddings() returned {type(head).__name__}, not a linear head with a "
            "[V, H] weight; DSKD projects into the LM heads."
        )
    return weight, getattr(head, "bias", None), _final_logit_softcapping(model)


def _response_rows(batch: SideBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, input tokens and target tokens at the response positions: ``[B, R, H]``, ``[B, R]``,
    ``[B, R]`` (padding reads position 0 and token 0; the masks drop it)."""
    positions = batch.label_positions  # [B, R]
    rows = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, R, H]
    inputs = batch.input_ids.gather(1, positions)  # [B, R]
    targets = torch.where(batch.response_mask, batch.labels.gather(1, positions), 0)  # [B, R]
    return rows, inputs, targets


def _chunked(function: Callable[..., torch.Tensor], split: Sequence[torch.Tensor], constants: Sequence[Any],
             chunk_size: int) -> torch.Tensor:
    """``function(*chunk_of(split), *constants)`` over chunks of rows, concatenated: ``[N, C]``. With several
    chunks under autograd each is checkpointed, so its ``[n, V]`` fp32 temporaries are recomputed in backward
    instead of kept (the reason this module never holds more than a chunk of logits)."""
    rows = split[0].shape[0]
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(value, torch.Tensor) and value.requires_grad for value in (*split, *constants)
    )
    pieces = []
    for chunk in zip(*(tensor.split(chunk_size) for tensor in split), strict=True):
        if needs_grad and rows > chunk_size:
            pieces.append(checkpoint(function, *chunk, *constants, use_reentrant=False))
        else:
            pieces.append(function(*chunk, *constants))
    return torch.cat(pieces)


def _student_chunk(hidden: torch.Tensor, t2s_hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, softcap: float | None, temperature: float) -> torch.Tensor:
    student_logits = head_logits(hidden, weight, bias, softcap)  # [n, V_s]
    # the student's head, detached: CE(t2s) trains the projector, not the head it reads through
    t2s_logits = head_logits(t2s_hidden, weight.detach(), None if bias is None else bias.detach(), softcap)
    terms = student_space_terms(student_logits, t2s_logits, targets, temperature)
    return torch.stack([terms["nll"], terms["t2s_ce"], terms["t2s_kl"], terms["t2s_correct"]], dim=1)  # [n, 4]


def _teacher_chunk(teacher_hidden: torch.Tensor, s2t_hidden: torch.Tensor, targets: torch.Tensor,
                   weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                   temperature: float) -> torch.Tensor:
    with torch.no_grad():
        teacher_logits = head_logits(teacher_hidden, weight, bias, softcap)  # [n, V_t]
    s2t_logits = head_logits(s2t_hidden, weight.detach(), None if bias is None else bias.detach(), softcap)
    terms = teacher_space_terms(teacher_logits, s2t_logits, targets, temperature)
    return torch.stack([terms["s2t_kl"], terms["s2t_correct"]], dim=1)  # [n, 2]


def dskd_terms(
    model: DualSpaceStudent,
    teacher: nn.Module,
    student_batch: SideBatch,
    teacher_batch: SideBatch,
    *,
    temperature: float,
    chunk_size: int = DSKD_CHUNK_SIZE,
) -> dict[str, torch.Tensor]:
    """The loss's terms as differentiable scalars (``nll``, ``t2s_ce``, ``t2s_kl``, ``s2t_kl``; token means,
    see the module docstring) and two detached ones (``t2s_accuracy``, ``s2t_accuracy``)."""
    _validate(model, teacher, student_batch, teacher_batch, temperature, chunk_size)
    student, projector = model.student, model.projector
    student_mask, teacher_mask = student_batch.response_mask, teacher_batch.response_mask  # [B, R_s], [B, R_t]

    student_out = _backbone(student)(input_ids=student_batch.input_ids, attention_mask=student_batch.attention_mask,
                                     use_cache=False)
    student_hidden, student_inputs, student_targets = _response_rows(student_batch, student_out.last_hidden_state)
    with torch.no_grad():  # the teacher is frozen: no graph, nothing of it trains
        teacher_out = _backbone(teacher)(input_ids=teacher_batch.input_ids,
                                         attention_mask=teacher_batch.attention_mask, use_cache=False)
        teacher_hidden, teacher_inputs, teacher_targets = _response_rows(teacher_batch, teacher_out.last_hidden_state)
        teacher_embed = cast(Any, teacher).get_input_embeddings()
        teacher_target_embeds = teacher_embed(teacher_targets)  # [B, R_t, d_t]
        teacher_index = torch.cat([teacher_embed(teacher_inputs), teacher_target_embeds], dim=-1)  # [B, R_t, 2·d_t]
        keys, teacher_values = normalise_teacher(teacher_index, teacher_target_embeds, teacher_hidden, teacher_mask)
    student_embed = cast(Any, student).get_input_embeddings()
    # detached: the query is the projector's to learn, the embeddings are not moved by it (as DSKD)
    student_index = torch.cat([student_embed(student_inputs), student_embed(student_targets)], dim=-1).detach()

    with torch.autocast(student_hidden.device.type, enabled=False):  # the dual-space block runs in fp32
        queries = projector.query(student_index.float())  # [B, R_s, 2·d_t]
        t2s_weights, s2t_weights = cross_model_attention(queries, keys, student_mask, teacher_mask)
        t2s_hidden = t2s_weights @ projector.t2s(teacher_values)  # [B, R_s, d_s]
        s2t_hidden = s2t_weights @ projector.s2t(student_hidden.float())  # [B, R_t, d_t]

    # Only the response positions reach the heads, a chunk at a time.
    student_rows = student_mask.reshape(-1).nonzero().squeeze(1)  # [N_s]
    teacher_rows = teacher_mask.reshape(-1).nonzero().squeeze(1)  # [N_t]

    def flat(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1, *values.shape[2:]).index_select(0, rows)

    student_weight, student_bias, student_softcap = _head(student, "student")
    teacher_weight, teacher_bias, teacher_softcap = _head(teacher, "teacher")
    student_columns = _chunked(
        _student_chunk,
        [flat(student_hidden, student_rows), flat(t2s_hidden, student_rows), flat(student_targets, student_rows)],
        [student_weight, student_bias, student_softcap, float(temperature)],
        chunk_size,
    )  # [N_s, 4]
    teacher_columns = _chunked(
        _teacher_chunk,
        [flat(teacher_hidden, teacher_rows), flat(s2t_hidden, teacher_rows), flat(teacher_targets, teacher_rows)],
        [teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(), teacher_softcap,
         float(temperature)],
        chunk_size,
    )  # [N_t, 2]
    student_tokens = max(int(student_rows.numel()), 1)
    teacher_tokens = max(int(teacher_rows.numel()), 1)
    student_means = student_columns.sum(dim=0) / student_tokens  # [4]
    teacher_means = teacher_columns.sum(dim=0) / teacher_tokens  # [2]
    return {
        "nll": student_means[0],
        "t2s_ce": student_means[1],
        "t2s_kl": student_means[2],
        "s2t_kl": teacher_means[0],
        "t2s_accuracy": student_means[3].detach(),
        "s2t_accuracy": teacher_means[1].detach(),
    }


def dskd_loss(
    model: DualSpaceStudent,
    teacher: nn.Module,
    student_batch: SideBatch,
    teacher_batch: SideBatch,
    *,
    kappa: float,
    temperature: float,
    chunk_size: int = DSKD_CHUNK_SIZE,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(1 − κ)·CE_student + κ·(CE(t2s) + KL_t2s + KL_s2t)`` on one micro-batch of responses (module docstring).

    Args:
        model: the student and its projector (:class:`DualSpaceStudent`), on the batches' device.
        teacher: the frozen teacher, in eval mode; it runs under ``torch.no_grad`` and nothing of it trains.
        student_batch, teacher_batch: the same responses on each side (``collate_responses`` of the chosen
            rows), on the model's device.
        kappa: the weight of the KD terms, in [0, 1] (0.5 in the paper; 0 is the student's CE alone).
        temperature: of both KL terms (2.0 in the paper).
        chunk_size: response positions per chunk of LM-head work (:data:`DSKD_CHUNK_SIZE`).

    Returns:
        The scalar loss and detached stats: ``nll``, ``t2s_ce``, ``t2s_kl``, ``s2t_kl``, ``kd_loss`` (their
        sum without ``nll``), ``t2s_accuracy``, ``s2t_accuracy`` (argmax = target, over each side's response
        tokens) and ``tokens`` (the student batch's tokens, prompts included, as ``make_distill_loss`` counts).
    """
    if isinstance(kappa, bool) or not isinstance(kappa, int | float) or not 0 <= kappa <= 1:
        raise ValueError(f"kappa must be a number in [0, 1] (the weight of the KD terms), got {kappa!r}; DSKD uses 0.5.")
    terms = dskd_terms(model, teacher, student_batch, teacher_batch, temperature=temperature, chunk_size=chunk_size)
    kd_loss = terms["t2s_ce"] + terms["t2s_kl"] + terms["s2t_kl"]
    loss = (1.0 - kappa) * terms["nll"] + kappa * kd_loss
    stats: dict[str, Any] = {name: value.detach() for name, value in terms.items()}
    stats["kd_loss"] = kd_loss.detach()
    stats["tokens"] = float(student_batch.attention_mask.sum())
    return loss, stats
