"""The memory planner: will a job fit its GPUs, and with which strategy? Torch-free (the API runs it at submission).

Given the models' shapes (:class:`ModelShape`: parameter count and the few dimensions activations depend on),
the spec's sequence budget, micro-batch, precision, LoRA, devices and strategy, and the memory of one GPU, it
estimates the per-GPU peak of every stage that runs on a GPU, assuming no stage output is cached yet (the worst
case: a cached stage loads nothing):

* **contrastive** (when the job trains π+ / π−): a full fine-tune of a copy of the base (the teacher for ctpd;
  LoRA applies to the student only), with the base itself still resident as a frozen model (worker/recipe.py's
  model pool keeps it from the reference pass until the weights pass ends).
* **distill**: the student's training: weights, gradients and AdamW state (sharded over the ranks under fsdp),
  bf16 copies of the weights, activations, the log-prob chunks.
* the frozen passes, each rank holding a whole model (they are sharded by data, never by model): **reference**
  (the teacher for ctpd, the initial student for the baselines), **weights** (π+ and π− with the base still
  resident), **evaluate** (on rank 0 alone: the whole trained student and the initial one).

Every figure is an estimate of what autograd and the allocator hold at the peak, not a measurement; the constants
below say where each comes from, and :data:`HEADROOM` leaves room for the CUDA context, NCCL buffers and
fragmentation. A model whose size is unknown (a hub id not in :data:`KNOWN_HUB_MODELS`: the service cannot reach
the Hub) is "not checked": the planner never refuses what it cannot size.

``auto`` strategy (:func:`resolve_strategy`; the worker calls :func:`choose_strategy` with the loaded model): on
one GPU it is ``ddp``, meaning a plain single process (one rank has nothing to shard); on several, ``ddp`` when a
full replica with its optimizer state and activations fits one GPU, else ``fsdp``. Activation checkpointing, unless the
spec sets it, is on with fsdp and off otherwise (ctpd_core/spec.py).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ctpd_core.spec import MAX_DEVICES, JobSpec

GiB = 1024**3

# ------------------------------------------------------------------------------------------ the constants

# Trainable parameters (ctpd_core/train.py): the master weights are fp32 and stay fp32 (bf16 only in autocast's
# forward), gradients are fp32, and torch.optim.AdamW keeps two fp32 states (exp_avg, exp_avg_sq). That is the
# ZeRO paper's "16 bytes per parameter" of mixed-precision Adam (Rajbhandari et al. 2020, §3: 2 + 2 + 4 + 4 + 4
# with fp16 weights and gradients beside fp32 master weights, momentum and variance); we keep no separate
# half-precision weights, so ours is 4 + 4 + 8, and what the fp16 copies cost there is BF16_COPY_BYTES below.
MASTER_WEIGHT_BYTES = 4
GRADIENT_BYTES = 4
ADAM_STATE_BYTES = 8
STATE_BYTES_PER_TRAINABLE_PARAM = MASTER_WEIGHT_BYTES + GRADIENT_BYTES + ADAM_STATE_BYTES  # 16
# Under bf16 autocast every matmul casts its fp32 weight to bf16 and autograd keeps that copy for the backward
# pass: 2 bytes per parameter for the whole step (one block at a time with activation checkpointing, whose
# recompute casts again). FSDP2's MixedPrecisionPolicy all-gathers bf16 weights one block at a time instead.
BF16_COPY_BYTES = 2
# DDP's gradient buckets: torch.nn.parallel.DistributedDataParallel copies gradients into its own buckets for the
# all-reduce (gradient_as_bucket_view=False, its default): another fp32 gradient's worth on every rank.
DDP_BUCKET_BYTES = 4
# Frozen models (teacher, π±, the initial student, a LoRA student's base): loaded by ctpd_core.models.load_causal_lm
# in its default dtype, fp32, and cast per op under autocast; no gradients, no optimizer state.
FROZEN_WEIGHT_BYTES = 4
# Log-probs (ctpd_core/logprobs.py): the head runs DEFAULT_CHUNK_SIZE positions at a time, each chunk upcast to
# fp32 ([chunk, V] × 4 bytes); its docstring counts ~2 chunks alive in forward and 3-4 in backward.
LOGIT_CHUNK_ROWS = 512  # = ctpd_core.logprobs.DEFAULT_CHUNK_SIZE (tests/ctpd_core/test_memory_plan.py checks)
TRAIN_LOGIT_CHUNKS = 4
FROZEN_LOGIT_CHUNKS = 2
# The reference and weights passes run 2 × 8 responses per forward (worker/recipe.py RunContext.inference_batch_size
# pairs, ctpd_core.inference.token_logprobs); evaluation runs 2 × evaluation.batch_size.
INFERENCE_BATCH_PAIRS = 8
# The share of a GPU's memory the plan leaves unused: the CUDA context (~0.5-1 GiB), NCCL buffers, the caching
# allocator's fragmentation. 10 % of 80 GiB is 8 GiB.
HEADROOM = 0.10
# Activation checkpointing costs about one more forward per step (~30 % more compute); the plan only says so.


def activation_bytes_per_token_layer(shape: ModelShape, precision: str) -> int:
    """Bytes autograd keeps per token and per transformer block for the backward pass, without checkpointing.

    Counted from the tensors a Llama-style block saves under bf16 autocast with SDPA attention (no ``[T, T]``
    scores): the two RMSNorms' fp32 inputs and outputs and their bf16 casts (2 × 10h bytes), q through RoPE and
    attention to the output projection (8·q_dim), k and v likewise (10·kv_dim), the gated MLP's gate, up, activation,
    product and down-projection input (12·intermediate). The same kind of count as Korthikanti et al. 2022
    ("Reducing Activation Recomputation in Large Transformer Models", 34·h bytes per token for a GPT block with
    flash attention); trust it to ~30 %. fp32 training keeps every tensor in 4 bytes: twice as much.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    per = 20 * h + 8 * shape.q_dim + 10 * shape.kv_dim + 12 * i
    return per * (2 if precision == "fp32" else 1)


# ------------------------------------------------------------------------------------------ model shapes

@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: its parameter count and the dimensions activations scale with."""

    params: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    q_dim: int  # num_attention_heads × head_dim
    kv_dim: int  # num_key_value_heads × head_dim
    tie_word_embeddings: bool
    source: str  # where the figures come from, for the plan's text

    @property
    def embedding_params(self) -> int:
        """The input embedding and the output head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def block_params(self) -> int:
        """One transformer block's parameters (FSDP's unit: fully_shard wraps each block)."""
        return max(0, self.params - self.embedding_params) // max(1, self.num_layers)

    def lora_params(self, rank: int, target_modules: Sequence[str] | str = "all-linear") -> int:
        """LoRA adapter parameters: ``rank × (in + out)`` per adapted linear layer (peft's A and B).

        ``all-linear`` is every block linear (peft leaves the output head out); a list counts the Llama-style
        names it knows (q/k/v/o_proj, gate/up/down_proj) and, if it names none of them, falls back to all-linear."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        sizes = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h,
                 "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
        named = [sizes[name] for name in target_modules if name in sizes] if not isinstance(target_modules, str) else []
        per_block = sum(named) if named else sum(sizes.values())
        return rank * per_block * self.num_layers


class ShapeUnknown(ValueError):
    """A config the planner cannot size (a field it needs is missing, or an architecture it does not count)."""


def _get(config: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return None


# Architectures whose blocks carry four norms (pre/post attention and MLP) and q/k norms of head_dim each.
_FOUR_NORM_TYPES = {"gemma2", "gemma3", "gemma3_text"}
_QK_NORM_TYPES = {"gemma3", "gemma3_text", "qwen3", "qwen3_moe"}
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2"}
_DENSE_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "gpt2",
                "mixtral"}


def shape_from_config(config: Mapping[str, Any], *, params: int | None = None, source: str = "config.json") -> ModelShape:
    """A :class:`ModelShape` from a Hugging Face ``config.json`` mapping (``model.config.to_dict()`` works too).

    The parameter count is computed from hidden_size, num_hidden_layers, intermediate_size, vocab_size,
    num_attention_heads, num_key_value_heads, head_dim and tie_word_embeddings for the decoder families in
    ``_DENSE_TYPES`` (tests/ctpd_core/test_memory_plan.py checks each against ``sum(p.numel())`` of a model built
    from the same config); another ``model_type`` with those fields is counted as a Llama-style decoder and its
    source says so. ``params`` (the loaded model's exact count, or the safetensors headers') overrides the count.
    Raises :class:`ShapeUnknown` when a dimension is missing."""
    if isinstance(config.get("text_config"), Mapping):  # multimodal wrappers (gemma3, llava): the text decoder
        config = config["text_config"]
    model_type = str(config.get("model_type") or "")
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(config, "num_attention_heads", "n_head")
    vocab = _get(config, "vocab_size")
    is_gpt2 = model_type == "gpt2"
    intermediate = _get(config, "n_inner") if is_gpt2 else _get(config, "intermediate_size", "ffn_dim")
    if is_gpt2 and intermediate is None and hidden is not None:
        intermediate = 4 * hidden  # GPT-2's n_inner default
    missing = [name for name, value in (("hidden_size", hidden), ("num_hidden_layers", layers),
                                        ("num_attention_heads", heads), ("vocab_size", vocab),
                                        ("intermediate_size", intermediate)) if not isinstance(value, int) or value <= 0]
    if missing:
        raise ShapeUnknown(f"config ({model_type or 'no model_type'}) has no {', '.join(missing)}")
    kv_heads = _get(config, "num_key_value_heads") or heads
    head_dim = _get(config, "head_dim") or hidden // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    tie = config.get("tie_word_embeddings")
    tied = bool(tie) if tie is not None else model_type in _TIED_BY_DEFAULT
    shape = ModelShape(
        params=params or 0, hidden_size=hidden, num_layers=layers, intermediate_size=intermediate, vocab_size=vocab,
        q_dim=q_dim, kv_dim=kv_dim, tie_word_embeddings=tied,
        source=source if model_type in _DENSE_TYPES or params else f"{source}, counted as a Llama-style decoder",
    )
    return shape if params else replace(shape, params=_count_params(config, model_type, shape, head_dim))


def _count_params(config: Mapping[str, Any], model_type: str, shape: ModelShape, head_dim: int) -> int:
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    if model_type == "gpt2":  # Conv1D layers with biases, LayerNorms with biases, learned positions
        block = (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
        positions = (_get(config, "n_positions", "max_position_embeddings") or 1024) * h
        return shape.num_layers * block + shape.embedding_params + positions + 2 * h
    attention = h * q + 2 * h * kv + q * h
    if model_type == "qwen2":
        attention += q + 2 * kv  # q, k and v projections carry biases
    elif config.get("attention_bias"):
        attention += q + 2 * kv + h
    experts = _get(config, "num_local_experts")
    mlp = 3 * h * i + (2 * i + h if config.get("mlp_bias") else 0)
    if experts:  # Mixtral: every expert's MLP plus the router
        mlp = experts * 3 * h * i + h * experts
    norms = (4 if model_type in _FOUR_NORM_TYPES else 2) * h + (2 * head_dim if model_type in _QK_NORM_TYPES else 0)
    return shape.num_layers * (attention + mlp + norms) + shape.embedding_params + h


def params_from_safetensors(folder: Path) -> int | None:
    """The exact parameter count of a folder's ``*.safetensors`` files, read from their JSON headers (the first
    8 bytes are the header's length; each tensor lists its shape): no torch, no weights read. None when the
    folder holds none or a header is unreadable."""
    files = sorted(Path(folder).glob("*.safetensors"))
    total = 0
    for file in files:
        try:
            with file.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > 100_000_000:  # a header that size is not a safetensors header
                    return None
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error):
            return None
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total or None


def shape_from_folder(folder: Path) -> ModelShape:
    """The shape of a Hugging Face model folder: dimensions from its config.json, the count from its safetensors
    headers when it has them (exact for any architecture), else from the config. Raises :class:`ShapeUnknown`."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ShapeUnknown(f"{folder} has no readable config.json ({type(error).__name__})") from None
    if not isinstance(config, dict):
        raise ShapeUnknown(f"{folder}/config.json is not a mapping")
    params = params_from_safetensors(folder)
    return shape_from_config(config, params=params,
                             source=f"{folder}/config.json" + (" and safetensors headers" if params else ""))


def _llama_family(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int, *,
                  tied: bool, model_type: str = "llama", head_dim: int | None = None) -> dict[str, Any]:
    return {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "vocab_size": vocab, "tie_word_embeddings": tied, "head_dim": head_dim or hidden // heads}


# The packaged catalog's models (ctpd_core/catalog.py), as their converted folders' config.json says; a test keeps
# every catalog entry in this table and checks the counts against models built from these configs.
CATALOG_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": _llama_family(576, 30, 1536, 9, 3, 49_152, tied=True),  # 134,515,008 parameters
    "gemma-3-270m": _llama_family(640, 18, 2048, 4, 1, 262_144, tied=True, model_type="gemma3_text", head_dim=256),
}

# Well-known hub ids, from their published config.json. The service cannot reach the Hugging Face Hub, so a hub id
# is sized only if it is here; anything else is "not checked". -Instruct variants share their base's shape.
_HUB_BASES: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B": _llama_family(4096, 32, 14_336, 32, 8, 128_256, tied=False),
    "meta-llama/Llama-3.1-70B": _llama_family(8192, 80, 28_672, 64, 8, 128_256, tied=False),
    "meta-llama/Llama-3.2-1B": _llama_family(2048, 16, 8192, 32, 8, 128_256, tied=True, head_dim=64),
    "meta-llama/Llama-3.2-3B": _llama_family(3072, 28, 8192, 24, 8, 128_256, tied=True, head_dim=128),
    "Qwen/Qwen2.5-0.5B": _llama_family(896, 24, 4864, 14, 2, 151_936, tied=True, model_type="qwen2"),
    "Qwen/Qwen2.5-1.5B": _llama_family(1536, 28, 8960, 12, 2, 151_936, tied=True, model_type="qwen2"),
    "Qwen/Qwen2.5-3B": _llama_family(2048, 36, 11_008, 16, 2, 151_936, tied=True, model_type="qwen2"),
    "Qwen/Qwen2.5-7B": _llama_family(3584, 28, 18_944, 28, 4, 152_064, tied=False, model_type="qwen2"),
    "Qwen/Qwen2.5-14B": _llama_family(5120, 48, 13_824, 40, 8, 152_064, tied=False, model_type="qwen2"),
    "Qwen/Qwen2.5-32B": _llama_family(5120, 64, 27_648, 40, 8, 152_064, tied=False, model_type="qwen2"),
    "Qwen/Qwen2.5-72B": _llama_family(8192, 80, 29_568, 64, 8, 152_064, tied=False, model_type="qwen2"),
    "HuggingFaceTB/SmolLM2-135M": CATALOG_CONFIGS["smollm2-135m-instruct"],
    "google/gemma-3-270m": CATALOG_CONFIGS["gemma-3-270m"],
}
KNOWN_HUB_MODELS: dict[str, dict[str, Any]] = {
    **_HUB_BASES,
    **{f"{name}-Instruct": config for name, config in _HUB_BASES.items() if name.startswith(("meta-llama/", "Qwen/"))},
    "HuggingFaceTB/SmolLM2-135M-Instruct": CATALOG_CONFIGS["smollm2-135m-instruct"],
    "google/gemma-3-270m-it": CATALOG_CONFIGS["gemma-3-270m"],
}


def known_shape(reference: str) -> ModelShape | None:
    """The shape of a catalog name or a well-known hub id (case-insensitive), or None."""
    if reference in CATALOG_CONFIGS:
        return shape_from_config(CATALOG_CONFIGS[reference], source=f"catalog model {reference}")
    by_lower = {name.lower(): name for name in KNOWN_HUB_MODELS}
    name = by_lower.get(reference.lower())
    if name is None:
        return None
    return shape_from_config(KNOWN_HUB_MODELS[name], source="the planner's table of hub ids")


# ------------------------------------------------------------------------------------------ the estimate

@dataclass(frozen=True)
class Component:
    name: str
    bytes: int


@dataclass(frozen=True)
class TrainingLoad:
    """One training stage's inputs of a step, per rank."""

    sequences: int  # responses per forward on one rank: 2 × micro_batch_size (chosen and rejected)
    tokens: int  # tokens per sequence: the prompt and response budgets
    precision: str  # "bf16" or "fp32" (auto is bf16 on a GPU)
    lora_rank: int | None = None  # None: full fine-tune
    lora_targets: Sequence[str] | str = "all-linear"
    # Parameters trained beside the model and never sharded (dskd's projector): fp32 weights, gradients, AdamW.
    beside_params: int = 0


def dskd_projector_params(student_hidden: int, teacher_hidden: int) -> int:
    """Parameters of DSKD's projector (``ctpd_core.dskd.DualSpaceProjector``: query 2·d_s → 2·d_t, t2s d_t → d_s,
    s2t d_s → d_t, each a Linear with bias); counted here without torch, pinned against the module by a test."""
    d_s, d_t = student_hidden, teacher_hidden
    return (2 * d_s * 2 * d_t + 2 * d_t) + (d_t * d_s + d_s) + (d_s * d_t + d_t)


def training_components(model: ModelShape, load: TrainingLoad, *, world_size: int, strategy: str,
                        activation_checkpointing: bool, resident_frozen: Sequence[tuple[str, ModelShape]] = ()
                        ) -> list[Component]:
    """Per-GPU bytes of a training stage at its peak (the backward pass of a micro-batch), by component."""
    shard = world_size if strategy == "fsdp" else 1
    trainable = model.lora_params(load.lora_rank, load.lora_targets) if load.lora_rank else model.params
    frozen_base = model.params if load.lora_rank else 0
    bf16 = load.precision != "fp32"
    tokens = load.sequences * load.tokens
    parts = [
        Component("weights (fp32 master)" if not load.lora_rank else "LoRA adapters (fp32 master)",
                  trainable * MASTER_WEIGHT_BYTES // shard),
        Component("gradients (fp32)", trainable * GRADIENT_BYTES // shard),
        Component("AdamW states (2 x fp32)", trainable * ADAM_STATE_BYTES // shard),
    ]
    if frozen_base:
        parts.append(Component("frozen base weights (fp32)", frozen_base * FROZEN_WEIGHT_BYTES // shard))
    if strategy == "fsdp" and world_size > 1:
        # Unsharded at once: the root (embeddings, head) for the whole step, two blocks (the one computing and the
        # one prefetched), each in the compute dtype, plus a block's unsharded gradients before reduce-scatter.
        compute_bytes = 2 if bf16 else 4
        gathered = (model.embedding_params + 2 * model.block_params) * compute_bytes
        parts.append(Component("FSDP all-gathered blocks and root", gathered + model.block_params * GRADIENT_BYTES))
    elif bf16:
        copied = (model.embedding_params + model.block_params) if activation_checkpointing else model.params
        parts.append(Component("bf16 weight copies (autocast)", copied * BF16_COPY_BYTES))
    if strategy == "ddp" and world_size > 1:
        parts.append(Component("DDP gradient buckets", trainable * DDP_BUCKET_BYTES))
    per_layer = activation_bytes_per_token_layer(model, load.precision)
    if activation_checkpointing:  # each block's input (the fp32 residual stream) kept, one block recomputed
        activations = tokens * (model.num_layers * 4 * model.hidden_size + per_layer)
    else:
        activations = tokens * model.num_layers * per_layer
    parts.append(Component("activations" + (" (checkpointed)" if activation_checkpointing else ""), activations))
    head_gradients = 2 * model.vocab_size * model.hidden_size * 4 if not load.lora_rank else 0  # logprobs.py
    parts.append(Component("log-prob chunks", TRAIN_LOGIT_CHUNKS * LOGIT_CHUNK_ROWS * model.vocab_size * 4
                           + tokens * model.hidden_size * 4 * 2 + head_gradients))
    for role, shape in resident_frozen:
        parts.append(Component(f"{role} resident (frozen, fp32)", shape.params * FROZEN_WEIGHT_BYTES))
    if load.beside_params:
        # Its activations (a micro-batch's cross-model attention over response positions) are megabytes: left out.
        parts.append(Component("projector (fp32 weights, gradients, AdamW)",
                               load.beside_params * (MASTER_WEIGHT_BYTES + GRADIENT_BYTES + ADAM_STATE_BYTES)))
    return parts


def frozen_components(models: Sequence[tuple[str, ModelShape, float]], *, sequences: int, tokens: int,
                      precision: str) -> list[Component]:
    """Per-GPU bytes of a frozen pass: every resident model's weights (``(role, shape, bytes per parameter)``),
    plus the transients of the widest one's forward in inference mode (one block's worth: nothing is kept)."""
    parts = [Component(f"{role} weights", int(shape.params * per_param)) for role, shape, per_param in models]
    widest = max((shape for _, shape, _ in models), key=lambda s: s.hidden_size * s.vocab_size)
    all_tokens = sequences * tokens
    parts.append(Component("forward transients", all_tokens * (activation_bytes_per_token_layer(widest, precision)
                                                               + 8 * widest.hidden_size)))
    parts.append(Component("log-prob chunks", FROZEN_LOGIT_CHUNKS * LOGIT_CHUNK_ROWS * widest.vocab_size * 4))
    return parts


def _usable(gpu_memory_bytes: int, headroom: float) -> int:
    return int(gpu_memory_bytes * (1 - headroom))


def default_activation_checkpointing(strategy: str, requested: bool | None) -> bool:
    """The spec's rule: on with fsdp, off otherwise, unless the spec says."""
    return requested if requested is not None else strategy == "fsdp"


def _training_peak(model: ModelShape, load: TrainingLoad, world_size: int, strategy: str, checkpointing: bool | None,
                   resident: Sequence[tuple[str, ModelShape]]) -> tuple[list[Component], bool]:
    ac = default_activation_checkpointing(strategy, checkpointing)
    return training_components(model, load, world_size=world_size, strategy=strategy, activation_checkpointing=ac,
                               resident_frozen=resident), ac


def resolve_strategy(model: ModelShape, load: TrainingLoad, *, world_size: int, requested: str,
                     activation_checkpointing: bool | None, gpu_memory_bytes: int | None, headroom: float = HEADROOM,
                     resident_frozen: Sequence[tuple[str, ModelShape]] = ()) -> Literal["ddp", "fsdp"]:
    """``requested`` unless it is ``auto``; auto: ``ddp`` on one rank (a single process: nothing to shard) or when
    a full replica fits one GPU (or the GPU's memory is unknown), else ``fsdp``."""
    if requested in ("ddp", "fsdp"):
        return requested  # type: ignore[return-value]
    if world_size == 1 or gpu_memory_bytes is None:
        return "ddp"
    parts, _ = _training_peak(model, load, world_size, "ddp", activation_checkpointing, resident_frozen)
    return "ddp" if sum(p.bytes for p in parts) <= _usable(gpu_memory_bytes, headroom) else "fsdp"


TrainingStage = Literal["distill", "contrastive"]


def training_load(spec: JobSpec, stage: TrainingStage, *, on_gpu: bool = True) -> TrainingLoad:
    """What one rank's forward holds in ``stage`` of ``spec``: 2 × micro_batch_size responses of the sequence
    budget (the teacher's tokens are taken as many as the student's: the budgets cut the text, not the tokens of
    the other side), LoRA for the student only (π+ / π− are full fine-tunes)."""
    precision = spec.training.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    lora = spec.lora.enabled and stage == "distill"
    return TrainingLoad(
        sequences=2 * spec.training.micro_batch_size,
        tokens=spec.sequence.max_prompt_tokens + spec.sequence.max_response_tokens,
        precision=precision, lora_rank=spec.lora.r if lora else None, lora_targets=spec.lora.target_modules,
    )


def stage_strategy(spec: JobSpec, stage: TrainingStage, model: ModelShape, *, gpu_memory_bytes: int | None,
                   headroom: float = HEADROOM) -> Literal["ddp", "fsdp"]:
    """The strategy ``stage`` of ``spec`` runs with: the spec's, or for ``auto`` the plan's choice for ``model`` on
    GPUs of ``gpu_memory_bytes`` each (None, on CPU: ddp). Every training stage runs on all ``spec.gpus_required``
    ranks. The API's plan (:func:`plan_job`) decides with this same function."""
    section = spec.training if stage == "distill" else spec.contrastive
    resident = [("base", model)] if stage == "contrastive" else []
    return resolve_strategy(model, training_load(spec, stage), world_size=spec.gpus_required,
                            requested=section.strategy, activation_checkpointing=section.activation_checkpointing,
                            gpu_memory_bytes=gpu_memory_bytes, headroom=headroom, resident_frozen=resident)


def choose_strategy(*, total_parameters: int, trainable_parameters: int, gpu_memory_bytes: int | None, devices: int,
                    config: Mapping[str, Any] | None = None, spec: JobSpec | None = None,
                    stage: TrainingStage = "distill", headroom: float = HEADROOM) -> Literal["ddp", "fsdp"]:
    """``auto`` resolved by the worker from the loaded model: ``ddp`` on one rank or on CPU (``gpu_memory_bytes``
    None), ``fsdp`` when a full replica does not fit one GPU.

    With the model's ``config`` (``model.config.to_dict()``) and the job's ``spec``, the replica's estimate is the
    API's plan (activations and log-prob chunks included: :func:`stage_strategy`), so the worker picks what the
    plan said. With the counts alone it is the states only: trainable parameters at 16 bytes, frozen ones (a LoRA
    student's base) at 4, and the bf16 copies at 2 per parameter, which can pick ddp where activations would not
    fit."""
    if devices <= 1 or gpu_memory_bytes is None:
        return "ddp"
    if config is not None and spec is not None:
        try:
            shape = shape_from_config(config, params=total_parameters, source="the loaded model")
        except ShapeUnknown:
            shape = None
        if shape is not None:
            section = spec.training if stage == "distill" else spec.contrastive
            # No frozen model stays resident while a stage trains (the recipe releases them first), as in plan_job.
            return resolve_strategy(shape, training_load(spec, stage), world_size=devices, requested="auto",
                                    activation_checkpointing=section.activation_checkpointing,
                                    gpu_memory_bytes=gpu_memory_bytes, headroom=headroom, resident_frozen=[])
    frozen = total_parameters - trainable_parameters
    replica = (trainable_parameters * (STATE_BYTES_PER_TRAINABLE_PARAM + DDP_BUCKET_BYTES)
               + frozen * FROZEN_WEIGHT_BYTES + total_parameters * BF16_COPY_BYTES)
    return "ddp" if replica <= _usable(gpu_memory_bytes, headroom) else "fsdp"


# ------------------------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class StagePlan:
    """One stage's estimate on one GPU: fits True/False, or None when it was not checked (and why)."""

    stage: str
    model: str  # who runs, e.g. "student meta-llama/Llama-3.1-8B (8.03 B parameters, ...)"
    components: tuple[Component, ...] = ()
    budget_bytes: int | None = None
    strategy: str | None = None  # training stages only
    world_size: int = 1
    activation_checkpointing: bool | None = None
    not_checked: str | None = None  # why there is no estimate
    fixes: tuple[str, ...] = ()
    field: str | None = None  # the spec field a fix starts from, for the API's 422

    @property
    def peak_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def fits(self) -> bool | None:
        if self.not_checked is not None or self.budget_bytes is None:
            return None
        return self.peak_bytes <= self.budget_bytes

    def summary(self) -> str:
        """One line: what runs where, and the verdict."""
        how = ""
        if self.strategy is not None:
            how = (f", {self.world_size} GPU{'s' if self.world_size > 1 else ''}, "
                   + (self.strategy if self.world_size > 1 else "single process")
                   + f", activation checkpointing {'on' if self.activation_checkpointing else 'off'}")
        if self.not_checked is not None:
            return f"{self.stage}: {self.model}{how}: not checked ({self.not_checked})"
        verdict = ("fits" if self.fits else "does NOT fit") if self.fits is not None else "no GPU budget"
        budget = f" of {gib(self.budget_bytes)} usable" if self.budget_bytes is not None else ""
        return f"{self.stage}: {self.model}{how}: {gib(self.peak_bytes)} per GPU{budget}: {verdict}"


def gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GiB:.1f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    stages: tuple[StagePlan, ...]
    gpu_memory_bytes: int | None
    headroom: float
    gpu_source: str  # where the GPU's memory came from (a setting, a live worker), or why there is none
    notes: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        """False when any checked stage does not fit; unchecked stages never refuse."""
        return all(stage.fits is not False for stage in self.stages)

    def problems(self) -> list[tuple[str | None, str]]:
        """``(param, message)`` for each stage that does not fit: the numbers and the fixes."""
        out: list[tuple[str | None, str]] = []
        for stage in self.stages:
            if stage.fits is not False:
                continue
            parts = ", ".join(f"{c.name} {gib(c.bytes)}" for c in stage.components)
            fixes = "; ".join(stage.fixes) if stage.fixes else "no single change fits"
            states = sum(c.bytes for c in stage.components if c.name.startswith(_STATE_COMPONENTS))
            alone = (f"; weights, gradients and AdamW states alone are {states / 1e9:.1f} GB, "
                     f"{STATE_BYTES_PER_TRAINABLE_PARAM} bytes per trainable parameter"
                     if stage.budget_bytes is not None and states > stage.budget_bytes else "")
            out.append((stage.field, f"the {stage.stage} stage needs {gib(stage.peak_bytes)} per GPU ({parts}{alone}) but "
                        f"one GPU has {gib(stage.budget_bytes)} usable ({gib(self.gpu_memory_bytes)} from "
                        f"{self.gpu_source}, {self.headroom:.0%} kept free); fixes: {fixes}"))
        return out

    def to_text(self) -> str:
        """The plan for a person: one block per stage, a line per component."""
        head = (f"GPU memory: {gib(self.gpu_memory_bytes)} per GPU ({self.gpu_source}), {self.headroom:.0%} kept free"
                if self.gpu_memory_bytes is not None else f"GPU memory: none to check against ({self.gpu_source})")
        lines = [head]
        for stage in self.stages:
            lines.append("")
            lines.append(stage.summary())
            for component in stage.components:
                lines.append(f"    {component.name:<40}{gib(component.bytes):>12}")
            lines += [f"    fix: {fix}" for fix in stage.fixes]
        lines += ["", *(f"note: {note}" for note in self.notes)] if self.notes else []
        lines.append("")
        lines.append("verdict: " + ("fits" if self.fits else "does NOT fit: the job would be refused"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits, "gpu_memory_bytes": self.gpu_memory_bytes, "headroom": self.headroom,
            "gpu_source": self.gpu_source, "notes": list(self.notes),
            "stages": [{"stage": s.stage, "model": s.model, "fits": s.fits, "peak_bytes": s.peak_bytes,
                        "budget_bytes": s.budget_bytes, "strategy": s.strategy, "world_size": s.world_size,
                        "activation_checkpointing": s.activation_checkpointing, "not_checked": s.not_checked,
                        "components": {c.name: c.bytes for c in s.components}, "fixes": list(s.fixes)}
                       for s in self.stages],
        }


_STATE_COMPONENTS = ("weights (fp32 master)", "LoRA adapters", "gradients", "AdamW")

Shapes = Mapping[str, "ModelShape | None"]  # by role: student, teacher, contrastive.positive, contrastive.negative


def _describe(role: str, reference: str, shape: ModelShape | None) -> str:
    if shape is None:
        return f"{role} {reference}"
    return f"{role} {reference} ({shape.params / 1e9:.2f} B parameters, from {shape.source})"


def _round_batch(batch_size: int, per_step: int) -> int:
    return per_step * max(1, round(batch_size / per_step))


def _training_fixes(spec: JobSpec, stage: TrainingStage, model: ModelShape, load: TrainingLoad, world: int,
                    strategy: str, checkpointing: bool | None, resident: Sequence[tuple[str, ModelShape]],
                    budget: int) -> list[str]:
    section = "training" if stage == "distill" else "contrastive"
    fixes: list[str] = []

    def peak(load_: TrainingLoad, world_: int, strategy_: str, ac: bool | None) -> int:
        parts, _ = _training_peak(model, load_, world_, strategy_, ac, resident)
        return sum(p.bytes for p in parts)

    for more in range(max(2, world), MAX_DEVICES + 1):
        if (more, "fsdp") == (world, strategy):
            continue
        need = peak(load, more, "fsdp", checkpointing)
        if need <= budget:
            per_step = more * spec.training.micro_batch_size
            batch = ("" if spec.training.batch_size % per_step == 0 else
                     f" and training.batch_size {_round_batch(spec.training.batch_size, per_step)} (a multiple of "
                     f"{more} x training.micro_batch_size)")
            fixes.append(f"{section}.devices {more} with {section}.strategy fsdp or auto{batch} "
                         f"({gib(need)} per GPU)")
            break
    else:
        parts, _ = _training_peak(model, load, MAX_DEVICES, "fsdp", checkpointing, resident)
        largest = max(parts, key=lambda part: part.bytes)
        fixes.append(f"not more GPUs: even {MAX_DEVICES} with fsdp need {gib(sum(p.bytes for p in parts))} per GPU, "
                     f"mostly what fsdp does not shard ({largest.name}: {gib(largest.bytes)})")
    if stage == "distill" and not spec.lora.enabled:
        lora_load = replace(load, lora_rank=spec.lora.r, lora_targets=spec.lora.target_modules)
        need = peak(lora_load, world, strategy, checkpointing)
        if need <= budget:
            fixes.append(f"lora.enabled true (rank {spec.lora.r}: {gib(need)} per GPU)")
    if stage == "contrastive":
        fixes.append("contrastive.positive and contrastive.negative as ready models (π+ / π− are full fine-tunes of "
                     "the base: LoRA applies to the student only), or weights.source uniform")
    if not default_activation_checkpointing(strategy, checkpointing):
        need = peak(load, world, strategy, True)
        if need <= budget:
            fixes.append(f"{section}.activation_checkpointing true ({gib(need)} per GPU, ~30 % slower)")
    micro = spec.training.micro_batch_size
    while micro > 1:
        micro //= 2
        need = peak(replace(load, sequences=2 * micro), world, strategy, checkpointing)
        if need <= budget:
            fixes.append(f"training.micro_batch_size {micro} ({gib(need)} per GPU; gradients accumulate to the same "
                         "batch_size)")
            break
    tokens = load.tokens
    while tokens > 64:
        tokens //= 2
        need = peak(replace(load, tokens=tokens), world, strategy, checkpointing)
        if need <= budget:
            fixes.append(f"sequence.max_prompt_tokens + sequence.max_response_tokens <= {tokens} "
                         f"({gib(need)} per GPU)")
            break
    return fixes


def _frozen_fixes(peak: int, budget: int, weights: int, gpu: int | None, headroom: float) -> list[str]:
    needed_gpu = math.ceil(peak / (1 - headroom) / GiB)
    fixes = [f"GPUs with at least {needed_gpu} GiB (frozen passes split the data over the ranks, never the model, "
             "so more GPUs do not help)"]
    if weights <= budget:
        fixes.append("shorter sequences (sequence.max_prompt_tokens + sequence.max_response_tokens)")
    else:
        fixes.append("a smaller model (its weights alone exceed one GPU)")
    return fixes


def plan_job(spec: JobSpec, shapes: Shapes, *, gpu_memory_bytes: int | None, gpu_source: str,
             headroom: float = HEADROOM) -> MemoryPlan:
    """The memory plan of ``spec`` on GPUs of ``gpu_memory_bytes`` each (None: no GPU budget, e.g. a CPU worker:
    every stage is estimated but none is refused). ``shapes`` maps each role the spec names to its shape, or None
    when unknown (that role's stages are "not checked")."""
    budget = _usable(gpu_memory_bytes, headroom) if gpu_memory_bytes is not None else None
    on_gpu = gpu_memory_bytes is not None
    world = spec.gpus_required
    stages: list[StagePlan] = []
    student = shapes.get("student")
    student_label = _describe("student", spec.student.model, student)
    # The frozen reference: the teacher on its tokens for ctpd, the initial student for the baselines.
    if spec.method == "ctpd" and spec.teacher is not None:  # the spec's validator requires the teacher for ctpd
        reference_role, reference_ref, reference = "teacher", spec.teacher.model, shapes.get("teacher")
    else:
        reference_role, reference_ref, reference = "student", spec.student.model, student
    inference_precision = "fp32" if spec.training.precision == "fp32" or not on_gpu else "bf16"
    tokens = spec.sequence.max_prompt_tokens + spec.sequence.max_response_tokens

    def frozen_stage(name: str, label: str, models: list[tuple[str, ModelShape | None, float]], sequences: int,
                     field_name: str) -> StagePlan:
        unknown = [role for role, shape, _ in models if shape is None]
        if unknown:
            return StagePlan(name, label, not_checked=_unknown_reason(unknown, spec))
        known = [(role, shape, per_param) for role, shape, per_param in models if shape is not None]
        parts = tuple(frozen_components(known, sequences=sequences, tokens=tokens, precision=inference_precision))
        plan = StagePlan(name, label, parts, budget, field=field_name)
        if plan.fits is False and budget is not None:
            weights = int(sum(shape.params * per_param for _, shape, per_param in known))
            plan = replace(plan, fixes=tuple(_frozen_fixes(plan.peak_bytes, budget, weights, gpu_memory_bytes,
                                                           headroom)))
        return plan

    reference_label = _describe(reference_role, reference_ref, reference)
    stages.append(frozen_stage("reference", reference_label, [(reference_role, reference, FROZEN_WEIGHT_BYTES)],
                               2 * INFERENCE_BATCH_PAIRS, f"{reference_role}.model"))

    if spec.needs_contrastive:
        base_role = "teacher" if spec.weights.source == "teacher_contrastive" else "student"
        base = shapes.get(base_role)
        base_ref = spec.teacher.model if base_role == "teacher" and spec.teacher else spec.student.model
        if spec.trains_contrastive:
            label = f"π+ / π− trained from the {_describe(base_role, base_ref, base)}"
            # The recipe releases the frozen models before π+ / π− train (their log-probs are computed by then).
            stages.append(_training_stage(spec, "contrastive", label, base, [], world, gpu_memory_bytes, headroom))
            positive = negative = base
        else:
            positive, negative = shapes.get("contrastive.positive"), shapes.get("contrastive.negative")
        # The weights pass: the recipe loads π+, releases it, then loads π− (one frozen model at a time).
        # An unknown one leaves the stage "not checked" (None), as an unknown size does everywhere.
        larger = None if positive is None or negative is None else max(positive, negative, key=lambda shape: shape.params)
        resident: list[tuple[str, ModelShape | None, float]] = [("π+ or π−, one at a time", larger, FROZEN_WEIGHT_BYTES)]
        stages.append(frozen_stage("weights", "π+ then π− (frozen), " + reference_label, resident,
                                   2 * INFERENCE_BATCH_PAIRS, "weights.source"))

    # uld and dskd run the frozen teacher live beside the student they train (its next-token distributions and
    # hidden states are too large to cache); dskd also trains its projector beside the student (single device).
    live_teacher = spec.method in ("uld", "dskd")
    teacher_shape = shapes.get("teacher")
    if live_teacher and teacher_shape is None:
        stages.append(StagePlan("distill", student_label, world_size=world,
                                not_checked=_unknown_reason(["teacher"], spec)))
    else:
        beside = [("teacher", teacher_shape)] if live_teacher and teacher_shape is not None else []
        projector = 0
        if spec.method == "dskd" and student is not None and teacher_shape is not None:
            projector = dskd_projector_params(student.hidden_size, teacher_shape.hidden_size)
        stages.append(_training_stage(spec, "distill", student_label, student, beside, world, gpu_memory_bytes,
                                      headroom, beside_params=projector))
    # Evaluation runs on rank 0 alone, with the whole trained student (gathered, under fsdp) and the initial one.
    if student is not None:
        evaluate = frozen_stage(
            "evaluate", "the trained and the initial " + student_label,
            [("trained student", student, FROZEN_WEIGHT_BYTES),
             ("initial student", student, FROZEN_WEIGHT_BYTES)],
            2 * spec.evaluation.batch_size, "evaluation.batch_size",
        )
    else:
        evaluate = StagePlan("evaluate", student_label, not_checked=_unknown_reason(["student"], spec))
    stages.append(evaluate)
    notes = ("estimates assume no stage output is cached yet and the teacher's sequences as long as the student's",)
    return MemoryPlan(tuple(stages), gpu_memory_bytes, headroom, gpu_source, notes)


def _unknown_reason(roles: Sequence[str], spec: JobSpec) -> str:
    return (f"the size of the {' and '.join(roles)} is unknown to the planner: not a catalog model, a readable model "
            "folder or a hub id in its table (the service cannot reach the Hugging Face Hub); not refused")


def _training_stage(spec: JobSpec, stage: TrainingStage, label: str, model: ModelShape | None,
                    resident: Sequence[tuple[str, ModelShape]], world: int, gpu_memory_bytes: int | None,
                    headroom: float, beside_params: int = 0) -> StagePlan:
    section = spec.training if stage == "distill" else spec.contrastive
    field_name = f"{'training' if stage == 'distill' else 'contrastive'}.devices"
    if model is None:
        return StagePlan(stage, label, world_size=world, not_checked=_unknown_reason(["model"], spec))
    load = replace(training_load(spec, stage, on_gpu=gpu_memory_bytes is not None), beside_params=beside_params)
    budget = _usable(gpu_memory_bytes, headroom) if gpu_memory_bytes is not None else None
    strategy = resolve_strategy(model, load, world_size=world, requested=section.strategy,
                                activation_checkpointing=section.activation_checkpointing,
                                gpu_memory_bytes=gpu_memory_bytes, headroom=headroom, resident_frozen=resident)
    parts, ac = _training_peak(model, load, world, strategy, section.activation_checkpointing, resident)
    plan = StagePlan(stage, label, tuple(parts), budget, strategy=strategy, world_size=world,
                     activation_checkpointing=ac, field=field_name)
    if plan.fits is False and budget is not None:
        plan = replace(plan, fixes=tuple(_training_fixes(spec, stage, model, load, world, strategy,
                                                         section.activation_checkpointing, resident, budget)))
    return plan
