"""The one place that turns a JobSpec into ctpd_core calls (design.md). Used by the worker and ``ctpd run``.

It owns the mapping from spec fields to stage arguments, the stage cache keys, and the order of the stages.
:func:`run_spec` reads as the README's pipeline table: each stage is a function that takes the records it
needs and returns a frozen one (:class:`Prepared`, :class:`Reference`, :class:`Contrastive`, :class:`Weights`,
:class:`Distilled`, :class:`Evaluation`, :class:`Exported`). What they share is only the :class:`ModelPool`
(frozen models loaded once, trainable ones fresh, the fingerprint memo) and the :class:`StageRunner` (the
stage cache, stage reporting and timing). No Celery, no SQL: what the caller wants to know arrives through an
:class:`~ctpd_core.observe.Observer`, and a :class:`~ctpd_core.observe.StopToken` stops the run between any
two batches (training checkpoints first) and at every stage boundary.

Caching: prepare, reference, contrastive and weights are stored under ``artifact_root`` by a content key of
everything that determines them (data, tokenizers, model identities, settings), so a second job with the same
teacher, data and settings reuses them without loading the teacher at all. distill, evaluate and export
belong to one run and live under ``run_dir``; training checkpoints there, so a restarted job (or a rerun
after a stop) resumes where it stopped. Resume state is deleted once what it protects is published (the
contrastive model in the cache, the student in ``export/``): it holds optimizer state, several times the
model's size. The student's last checkpoints stay, weights only, under ``run_dir/checkpoints``
(``ctpd_core.checkpoint_layout``), for the API to list and make into models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from ctpd_core.artifacts import FolderMirror, StageCache, content_key
from ctpd_core.checkpoint_layout import (
    MODEL_STAGING_PREFIX,
    StoredCheckpoint,
    keep_checkpoints,
)
from ctpd_core.data import PreferencePair, load_pairs, pairs_fingerprint
from ctpd_core.encoding import EncodingConfig
from ctpd_core.evaluate import evaluate_student
from ctpd_core.export import (
    CardFacts,
    base_license,
    declared_dtype,
    export_student,
    public_model_id,
    resolve_export_dtype,
)
from ctpd_core.inference import pad_token_id, token_logprobs
from ctpd_core.models import load_causal_lm, load_tokenizer, model_fingerprint, tokenizer_fingerprint
from ctpd_core.observe import NeverStop, NullObserver, Observer, Stopped, StopToken, check_stop
from ctpd_core.pipeline import (
    Granularity,
    averaged_weights,
    contrastive_weights,
    fixed_weights,
    make_distill_loss,
    prepare,
)
from ctpd_core.publish import EXPORT_STAGING_PREFIX, publish_folder
from ctpd_core.records import (
    PreparedData,
    Side,
    TokenLogprobs,
    build_items,
    load_prepared,
    load_token_values,
    save_prepared,
    save_token_values,
    swap_pairs,
)
from ctpd_core.spec import KD_METHODS, JobSpec, ModelRef, PreferenceMethod
from ctpd_core.train import FitConfig, fit
from ctpd_core.vocab import Stage, fit_stage

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when a stage's output format or semantics change: old cache entries stop matching
SPLITS = ("train", "validation")
DIRECTIONS = ("positive", "negative")  # π+ by DPO, π− by DPO on swapped pairs


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class RunContext:
    artifact_root: Path
    run_dir: Path
    model_cache: Path
    device: torch.device = field(default_factory=default_device)
    observer: Observer = field(default_factory=NullObserver)
    stop_signal: StopToken | None = None  # None: nothing stops the run
    dataset_resolver: Callable[[str], Path] | None = None  # uploaded dataset id -> file
    inference_batch_size: int = 8  # reference and weights passes (evaluation uses the spec's batch size)
    # Fencing (the worker): asked before a checkpoint or the export is published; False = another attempt
    # owns the job now, so this run stops without publishing. ``generation`` (the attempt) goes into every
    # checkpoint, and a checkpoint of a newer generation is never replaced.
    publish_guard: Callable[[], bool] | None = None
    generation: int | None = None
    # A rank of a multi-GPU job (worker.rank_main): a ctpd_core.distributed.DistContext. The stages then shard
    # their frozen passes over the ranks, train with torch.distributed, and leave evaluation and export to rank 0.
    dist: Any = None
    # The shared storage (app/storage: a bucket) when workers are many: the stage cache fetches a missing stage from
    # it before computing one and pushes what it publishes, and the export is pushed there for the API to serve.
    mirror: FolderMirror | None = None


@dataclass
class RunResult:
    status: Literal["succeeded", "stopped"]  # stopped: a stop token fired (training checkpointed first)
    metrics: dict[str, float]
    export_dir: Path | None
    stage_seconds: dict[str, float]
    cached_stages: list[str]


# ------------------------------------------------------------------------------------------ shared by stages


class ModelPool:
    """Models of one run: frozen ones loaded once and shared, trainable ones fresh on every call, and model
    fingerprints (memoised across runs in ``artifact_root/fingerprints.json``)."""

    def __init__(self, context: RunContext) -> None:
        self.model_cache, self.device = context.model_cache, context.device
        self.memo_file = context.artifact_root / "fingerprints.json"
        self._frozen: dict[tuple[str, str | None], tuple[Any, Any]] = {}

    def frozen(self, ref: ModelRef) -> tuple[Any, Any]:
        """(model, tokenizer) in eval mode without grads, loaded on first use."""
        key = (ref.model, ref.revision)
        if key not in self._frozen:
            model, tokenizer = self._load(ref)
            model.requires_grad_(False)
            model.eval()
            self._frozen[key] = (model, tokenizer)
        return self._frozen[key]

    def fresh(self, ref: ModelRef) -> tuple[Any, Any]:
        """A newly loaded trainable (model, tokenizer); seed torch before the call for a reproducible init."""
        return self._load(ref)

    def release(self) -> None:
        """Drop the frozen models (the teacher, π±), so training has their memory."""
        self._frozen.clear()

    def load_on_cpu(self, ref: ModelRef) -> Any:
        """A fresh copy of ``ref``'s model on the CPU, to put a sharded model's gathered weights in."""
        model, _ = load_causal_lm(ref.model, cache_dir=self.model_cache, trust_remote_code=ref.trust_remote_code,
                                  revision=ref.revision)
        return model

    def fingerprint(self, ref: ModelRef) -> str:
        return model_fingerprint(ref.model, cache_dir=self.model_cache, revision=ref.revision, memo_file=self.memo_file)

    def _load(self, ref: ModelRef) -> tuple[Any, Any]:
        model, tokenizer = load_causal_lm(
            ref.model, cache_dir=self.model_cache, trust_remote_code=ref.trust_remote_code, revision=ref.revision
        )
        model.to(self.device)
        return model, tokenizer


class StageRunner:
    """The stage cache and the stage log of one run: reports each stage's start and end (with its summary),
    times it, and checks the stop token at both of its boundaries."""

    def __init__(self, context: RunContext, precision: str) -> None:
        self.context = context
        self.dist = context.dist
        self.cache = StageCache(context.artifact_root, mirror=context.mirror)
        self.observer = context.observer
        self.stop: StopToken = context.stop_signal or NeverStop()
        # What every cached inference or training output depends on besides its inputs.
        self.numerics = {"device": context.device.type, "precision": precision}
        self.stage_seconds: dict[str, float] = {}
        self.cached_stages: list[str] = []

    @contextmanager
    def stage(self, name: Stage, cached: bool) -> Iterator[dict[str, Any]]:
        # A stop is honoured at every stage boundary too, not only inside the loops: a cancel that arrives
        # during a stage's last batch (or a stage with no loop at all, like export) never runs the next one.
        check_stop(self.stop, name)
        self.observer.stage_started(name, cached)
        started = time.monotonic()
        summary: dict[str, Any] = {}
        yield summary
        seconds = time.monotonic() - started
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + seconds
        if cached:
            self.cached_stages.append(name)
        self.observer.stage_finished(name, seconds, cached, summary)
        check_stop(self.stop, name)

    def fit_hooks(self) -> dict[str, Any]:
        """fit()'s reporting, stop token and fencing."""
        return {"observer": self.observer, "stop": self.stop, "checkpoint_guard": self.context.publish_guard,
                "generation": self.context.generation}

    @property
    def is_main(self) -> bool:
        """Rank 0 of a multi-GPU job, or the only process of a one-device job: the one that writes results."""
        return self.dist is None or self.dist.is_main

    def is_complete(self, stage: str, key: str) -> bool:
        """Whether the cache holds ``stage``/``key``; the ranks take rank 0's answer, so that they all compute
        (and meet in the same collectives) or all load."""
        complete = self.cache.is_complete(stage, key)
        return complete if self.dist is None else bool(self.dist.broadcast_object(complete))

    def build(self, stage: str, key: str, parts: Mapping[str, Any], write: Callable[[Path], object], *,
              collective: bool) -> Path:
        """The cached folder of ``stage``/``key``, built by ``write`` when missing.

        One process: :meth:`StageCache.build`. Ranks: a ``collective`` write (sharded inference, distributed
        training) runs on every rank, each into a folder of its own, and rank 0's is published (a write only
        writes files on rank 0, see ``is_main``); any other write runs on rank 0 alone while the others wait."""
        if self.dist is None:
            return self.cache.build(stage, key, parts, write)
        if not self.is_complete(stage, key):
            if collective:
                scratch = self.context.run_dir / "ranks" / f"rank-{self.dist.rank}"
                scratch.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=scratch) as folder:
                    write(Path(folder))
                    if self.is_main:
                        self.cache.build(stage, key, parts, lambda out: _move_contents(Path(folder), out))
            elif self.is_main:
                self.cache.build(stage, key, parts, write)
            self.dist.barrier()  # rank 0 has published: every rank reads the same folder
        return self.cache.path(stage, key)

    def frozen_logprobs(self, model: Any, records: Any, side: Side, pad_id: int, *, batch_size: int, precision: str,
                        stage: str) -> TokenLogprobs:
        """A frozen model's per-token log-probs of ``records``; on ranks, each computes a contiguous shard and the
        shards are gathered back in order (every rank gets the whole)."""
        shard = records if self.dist is None else records[_shard(len(records), self.dist)]
        values = token_logprobs(model, shard, side, pad_id, batch_size=batch_size, device=self.context.device,
                                precision=precision, stage=stage, observer=self.observer, stop=self.stop)
        if self.dist is None:
            return values
        from ctpd_core.distributed import gather_shards

        return TokenLogprobs(chosen=gather_shards(values.chosen, self.dist),
                             rejected=gather_shards(values.rejected, self.dist))

    def fit_layout(self, spec: JobSpec, stage: Literal["distill", "contrastive"], model: nn.Module) -> dict[str, Any]:
        """fit()'s distributed arguments for a training stage of a multi-GPU job (none on one device)."""
        if self.dist is None:
            return {}
        section = spec.training if stage == "distill" else spec.contrastive
        # Every training stage trains on all of the job's ranks (the widest stage's devices, JobSpec.gpus_required).
        chosen = resolve_strategy(spec, stage, model, self.context.device, self.dist.world_size)
        checkpointing = section.activation_checkpointing
        return {"dist": self.dist, "strategy": chosen,
                "activation_checkpointing": chosen == "fsdp" if checkpointing is None else checkpointing}


def _shard(count: int, dist: Any) -> slice:
    from ctpd_core.distributed import shard_range

    indices = shard_range(count, dist)
    return slice(indices.start, indices.stop)


def _move_contents(source: Path, target: Path) -> None:
    for path in source.iterdir():
        shutil.move(str(path), str(target / path.name))


def resolve_strategy(spec: JobSpec, stage: Literal["distill", "contrastive"], model: nn.Module, device: torch.device,
                     devices: int) -> str:
    """ddp or fsdp: as the stage asks, or for ``auto`` the memory planner's choice from the loaded model (a full
    replica per GPU when the model, its gradients, AdamW state and activations fit one GPU, else sharded): the
    decision the API's plan announced at submission."""
    strategy = (spec.training if stage == "distill" else spec.contrastive).strategy
    if strategy != "auto":
        return strategy
    from ctpd_core import memory_plan

    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    config = getattr(model, "config", None)
    return memory_plan.choose_strategy(total_parameters=total, trainable_parameters=trainable,
                                       gpu_memory_bytes=gpu_bytes, devices=devices,
                                       config=config.to_dict() if config is not None else None, spec=spec, stage=stage)


def full_state(model: Any, dist: Any) -> dict[str, Any] | None:
    """The trained model's full state dict on CPU, on rank 0 (every rank must call: with FSDP it gathers the
    shards); the model's own on one process."""
    if dist is None:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.is_main else None


def trained_model(model: Any, runner: StageRunner, fresh_on_cpu: Callable[[], Any]) -> Any:
    """The model fit trained, whole, where results are written: itself on one process and under DDP (every rank
    holds a full replica), and under FSDP a fresh CPU copy with the gathered weights, on rank 0. None on the
    other ranks (which must still call: the gather is collective)."""
    if runner.dist is None:
        return model
    from torch.distributed.tensor import DTensor

    if not any(isinstance(parameter, DTensor) for parameter in model.parameters()):  # a replica (DDP): whole already
        return model if runner.is_main else None
    state = full_state(model, runner.dist)
    if state is None:
        return None
    whole = fresh_on_cpu()
    whole.load_state_dict(state)
    return whole.to(runner.context.device)


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Prepared:
    key: str  # the prepare stage's cache key, part of every later stage's
    data: PreparedData
    train_fingerprint: str  # of the training pairs, for the model card
    student_tokenizer: Any
    teacher_tokenizer: Any  # the student's for the baselines: both "sides" are the student's
    pad_ids: Mapping[Side, int]


@dataclass(frozen=True)
class Reference:
    """A frozen model's per-token log-probs of both splits, on ``side``'s tokens."""

    key: str
    model: ModelRef
    side: Side
    logprobs: Mapping[str, TokenLogprobs]  # "train", "validation"


@dataclass(frozen=True)
class Contrastive:
    """π+ and π−: given, or trained by DPO (then folders in the stage cache). ``*_id`` is what names each in the
    weights key: a given model's fingerprint, or a trained one's contrastive key."""

    positive: ModelRef
    negative: ModelRef
    positive_id: str
    negative_id: str
    side: Side


@dataclass(frozen=True)
class Weights:
    values: TokenLogprobs | None  # per span (ctpd) or token (tisdpo) of the training split; None for dpo


@dataclass(frozen=True)
class Distilled:
    student: nn.Module | None  # trained, in eval mode; None on the ranks other than rank 0 (they are done)
    steps: int
    projector: Any = None  # dskd: the trained DualSpaceProjector, exported beside the student


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]


@dataclass(frozen=True)
class Exported:
    path: Path


# ---------------------------------------------------------------------------------------------- helpers


def split_dataset(spec: JobSpec, resolver: Callable[[str], Path] | None) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Train and validation pairs: a given validation file (or split of a save_to_disk folder), or a seeded
    hold-out of ``validation_fraction``. A conversational row keeps its prompt as messages; the prepare stage
    renders them with each model's chat template (``ctpd_core.encoding.render_prompt``)."""
    dataset = spec.dataset
    if dataset.id is not None:
        if resolver is None:
            raise ValueError("dataset.id needs the service (uploaded datasets); locally, use dataset.path")
        path = resolver(dataset.id)
    elif dataset.path is not None:
        path = Path(dataset.path)
    else:  # the spec's validators require one of the two
        raise ValueError("the dataset needs dataset.path or dataset.id")
    pairs = load_pairs(path, split=dataset.split)
    if dataset.validation_id is not None:
        if resolver is None:
            raise ValueError("dataset.validation_id needs the service (uploaded datasets); locally, use "
                             "dataset.validation_path")
        train, validation = pairs, load_pairs(resolver(dataset.validation_id))
    elif dataset.validation_path is not None:
        train, validation = pairs, load_pairs(dataset.validation_path, split=dataset.validation_split,
                                              split_field="dataset.validation_split")
    elif dataset.validation_split is not None:  # another split of the same save_to_disk folder
        train, validation = pairs, load_pairs(path, split=dataset.validation_split,
                                              split_field="dataset.validation_split")
    else:
        order = list(range(len(pairs)))
        random.Random(spec.training.seed).shuffle(order)
        held_out = round(len(pairs) * dataset.validation_fraction)
        if dataset.validation_fraction > 0 and len(pairs) >= 2:
            held_out = max(held_out, 1)
        validation = [pairs[i] for i in sorted(order[:held_out])]
        train = [pairs[i] for i in sorted(order[held_out:])]
    if dataset.max_pairs is not None:
        train = train[: dataset.max_pairs]
    if spec.evaluation.max_pairs is not None:
        validation = validation[: spec.evaluation.max_pairs]
    if not train:
        raise ValueError("the dataset leaves no training pairs after the validation split; add rows or lower it")
    return train, validation


def fit_config(spec: JobSpec, *, learning_rate: float, epochs: float, max_steps: int | None) -> FitConfig:
    training = spec.training
    return FitConfig(
        learning_rate=learning_rate,
        lr_schedule=training.lr_schedule,
        warmup_ratio=training.warmup_ratio,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=training.batch_size,
        micro_batch_size=training.micro_batch_size,
        max_grad_norm=training.max_grad_norm,
        weight_decay=training.weight_decay,
        precision=training.precision,
        seed=training.seed,
        checkpoint_every=training.checkpoint_every,
    )


def _trajectory(config: FitConfig) -> dict[str, Any]:
    """The FitConfig fields that change what training produces (not how often it checkpoints)."""
    values = dict(config.__dict__)
    values.pop("checkpoint_every", None)
    values.pop("keep_checkpoints", None)
    if not values.get("group_learning_rates"):  # none (every stage but dskd's distill): the keys of before they existed
        values.pop("group_learning_rates", None)
    return values


def _is_ctpd(spec: JobSpec) -> bool:
    return spec.method == "ctpd"


def with_lora(spec: JobSpec, student: Any) -> Any:
    """The student wrapped in the spec's LoRA adapters (peft), or as it is without LoRA: how distill builds the
    model it trains, and how a checkpoint's tensors (named as that model names them) are put back."""
    if not spec.lora.enabled:
        return student
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        student,
        LoraConfig(
            # peft annotates lora_alpha as int but computes alpha / r in float: a fractional alpha is kept.
            r=spec.lora.r, lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]
            lora_dropout=spec.lora.dropout,
            target_modules=spec.lora.target_modules, task_type="CAUSAL_LM",
        ),
    )


def encoding_config(spec: JobSpec) -> EncodingConfig:
    """How prepare cuts and encodes responses: the spec's ``sequence`` section."""
    return EncodingConfig(**spec.sequence.model_dump())


def job_tokenizer(spec: JobSpec, role: Literal["student", "teacher"], model_cache: Path) -> Any:
    """One side's tokenizer as the prepare stage (and a preflight) loads it: the teacher side is the student's for
    the student-only baselines. Raises ModelLoadError (not loadable) or TokenizerOffsetsError (a slow tokenizer)."""
    ref = spec.teacher if role == "teacher" and spec.uses_teacher and spec.teacher is not None else spec.student
    return load_tokenizer(ref.model, cache_dir=model_cache, trust_remote_code=ref.trust_remote_code,
                          revision=ref.revision, role=f"{role} tokenizer")


# ----------------------------------------------------------------------------------------------- stages


def prepare_stage(spec: JobSpec, runner: StageRunner) -> Prepared:
    """Tokenize and align every pair with both tokenizers (cached by data, tokenizers and ``sequence``)."""
    context = runner.context
    train_pairs, validation_pairs = split_dataset(spec, context.dataset_resolver)
    student_tokenizer = job_tokenizer(spec, "student", context.model_cache)
    teacher_tokenizer = (job_tokenizer(spec, "teacher", context.model_cache)
                         if spec.uses_teacher and spec.teacher is not None
                         else student_tokenizer)  # the student-only baselines: both "sides" are the student's
    train_fingerprint = pairs_fingerprint(train_pairs)
    parts = {
        "stage": Stage.PREPARE,
        "version": RECIPE_VERSION,
        "train": train_fingerprint,
        "validation": pairs_fingerprint(validation_pairs),
        "student_tokenizer": tokenizer_fingerprint(student_tokenizer),
        "teacher_tokenizer": tokenizer_fingerprint(teacher_tokenizer),
        "sequence": spec.sequence.model_dump(),
    }
    key = content_key(parts)

    def write(out: Path) -> None:
        data = prepare(train_pairs, validation_pairs, student_tokenizer, teacher_tokenizer, encoding_config(spec),
                       observer=runner.observer, stop=runner.stop)
        save_prepared(out, data)

    with runner.stage(Stage.PREPARE, runner.is_complete(Stage.PREPARE, key)) as summary:
        data = load_prepared(runner.build(Stage.PREPARE, key, parts, write, collective=False))
        summary.update(data.stats)
    return Prepared(
        key=key, data=data, train_fingerprint=train_fingerprint, student_tokenizer=student_tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        pad_ids={"student": pad_token_id(student_tokenizer), "teacher": pad_token_id(teacher_tokenizer)},
    )


def reference_stage(
    spec: JobSpec, runner: StageRunner, models: ModelPool, prepared: Prepared, ref: ModelRef, side: Side,
    *, stage: Stage = Stage.REFERENCE,
) -> Reference:
    """A frozen model's per-token log-probs on ``side`` for both splits (cached). The job's reference is the
    teacher on its own tokens for ctpd, the initial student for the baselines (method §5.2); the contrastive
    stage asks for another one when π± start from a different model (reported under its own ``stage``)."""
    parts = {
        "stage": Stage.REFERENCE,
        "version": RECIPE_VERSION,
        "prepare": prepared.key,
        "model": models.fingerprint(ref),
        "side": side,
        **runner.numerics,
    }
    key = content_key(parts)

    def write(out: Path) -> None:
        model, _ = models.frozen(ref)
        splits = {"train": prepared.data.train, "validation": prepared.data.validation}
        values = {
            split: runner.frozen_logprobs(
                model, splits[split], side, prepared.pad_ids[side], batch_size=runner.context.inference_batch_size,
                precision=spec.training.precision, stage=stage,
            )
            for split in SPLITS
        }
        if runner.is_main:
            save_token_values(out / "logprobs.safetensors", values)

    with runner.stage(stage, runner.is_complete(Stage.REFERENCE, key)) as summary:
        folder = runner.build(Stage.REFERENCE, key, parts, write, collective=True)
        logprobs = load_token_values(folder / "logprobs.safetensors")
        summary["model"] = ref.model
        summary["side"] = side
    return Reference(key=key, model=ref, side=side, logprobs=logprobs)


def job_reference(spec: JobSpec) -> tuple[ModelRef, Side]:
    """The job's reference model and the side whose tokens it reads (method §5.2)."""
    if _is_ctpd(spec) and spec.teacher is not None:
        return spec.teacher, "teacher"
    return spec.student, "student"


def contrastive_stage(
    spec: JobSpec, runner: StageRunner, models: ModelPool, prepared: Prepared, reference: Reference
) -> Contrastive | None:
    """π+ and π− for contrastive weights (None when the weights need none): given, or trained by DPO from the
    teacher (ctpd, the paper) or the student (tisdpo, ablation) on straight and swapped pairs, each on its own
    tokens, against that model's frozen reference."""
    source = spec.weights.source
    if spec.method == "dpo" or source in ("uniform", "random"):
        return None
    base_ref = spec.teacher if source == "teacher_contrastive" else spec.student
    side: Side = "teacher" if source == "teacher_contrastive" else "student"
    if base_ref is None:  # the spec's validators refuse this; said here so the error is clear if one slips by
        raise ValueError("weights.source teacher_contrastive needs a teacher; set teacher or another source")
    if side == reference.side and base_ref == reference.model:
        base_reference = reference
    else:
        base_reference = reference_stage(spec, runner, models, prepared, base_ref, side, stage=Stage.CONTRASTIVE)

    contrastive = spec.contrastive
    if contrastive.positive is not None and contrastive.negative is not None:
        with runner.stage(Stage.CONTRASTIVE, True) as summary:
            summary["given"] = True
        return Contrastive(positive=contrastive.positive, negative=contrastive.negative,
                           positive_id=models.fingerprint(contrastive.positive),
                           negative_id=models.fingerprint(contrastive.negative), side=side)

    config = fit_config(
        spec, learning_rate=contrastive.learning_rate, epochs=contrastive.epochs, max_steps=contrastive.max_steps
    )
    common = {
        "stage": Stage.CONTRASTIVE,
        "version": RECIPE_VERSION,
        "prepare": prepared.key,
        "base": models.fingerprint(base_ref),
        "side": side,
        "reference": base_reference.key,
        "beta": contrastive.beta,
        "fit": _trajectory(config),
        **runner.numerics,
    }
    keys = {direction: content_key({**common, "direction": direction}) for direction in DIRECTIONS}
    cached = all(runner.is_complete(Stage.CONTRASTIVE, key) for key in keys.values())
    items = build_items(prepared.data.train, base_reference.logprobs["train"])
    trained: dict[str, ModelRef] = {}
    if not cached:  # the frozen models' log-probs are computed: π+ / π− training gets their memory
        models.release()
    with runner.stage(Stage.CONTRASTIVE, cached) as summary:
        for direction, key in keys.items():
            direction_items = items if direction == "positive" else swap_pairs(items)
            checkpoints = runner.context.run_dir / "contrastive" / f"{direction}-{key[:16]}"

            def write(out: Path, direction: str = direction, train_items=direction_items, checkpoints=checkpoints) -> None:
                torch.manual_seed(spec.training.seed)  # before loading: the init of a trainable model is seeded
                model, tokenizer = models.fresh(base_ref)
                loss = make_distill_loss("dpo", contrastive.beta, policy_side=side, reference_side=side,
                                         pad_id=prepared.pad_ids[side], device=runner.context.device)
                layout = runner.fit_layout(spec, "contrastive", model)
                result = fit(model, train_items, loss, config, checkpoints,
                             stage=fit_stage(Stage.CONTRASTIVE, direction), device=runner.context.device,
                             **runner.fit_hooks(), **layout)
                trained = trained_model(model, runner, lambda: models.load_on_cpu(base_ref))
                if trained is not None:  # rank 0 (or the only process) writes the model
                    trained.save_pretrained(str(out / "model"), safe_serialization=True)
                    tokenizer.save_pretrained(str(out / "model"))
                    (out / "fit.json").write_text(json.dumps({"steps": result.steps, "last_metrics": result.last_metrics}))

            folder = runner.build(Stage.CONTRASTIVE, key, {**common, "direction": direction}, write, collective=True)
            # The trained model is published in the cache: its resume checkpoints (weights plus optimizer
            # state, three times the model's size) are dead weight now.
            shutil.rmtree(checkpoints, ignore_errors=True)
            trained[direction] = ModelRef(model=str(folder / "model"))
            summary[direction] = str(folder / "model")
    return Contrastive(positive=trained["positive"], negative=trained["negative"], positive_id=keys["positive"],
                       negative_id=keys["negative"], side=side)


def weights_stage(
    spec: JobSpec, runner: StageRunner, models: ModelPool, prepared: Prepared, reference: Reference,
    contrastive: Contrastive | None,
) -> Weights:
    """Span (ctpd) or token (tisdpo) importance weights of the training pairs; none for dpo and the chosen-response
    baselines (sft, uld, dskd)."""
    if spec.method == "dpo" or spec.method in KD_METHODS:
        return Weights(values=None)
    weights_spec = spec.weights
    granularity: Granularity = "span" if _is_ctpd(spec) else "token"
    if contrastive is None:  # the uniform and random ablations (method §4.3)
        side: Side = reference.side if _is_ctpd(spec) else "student"
        mode: Literal["uniform", "random"] = "uniform" if weights_spec.source == "uniform" else "random"
        with runner.stage(Stage.WEIGHTS, False) as summary:
            values = fixed_weights(
                prepared.data.train, side, granularity, mode, seed=spec.training.seed,
                low=weights_spec.random_low, high=weights_spec.random_high,
            )
            summary["source"] = weights_spec.source
        return Weights(values=values)

    side = contrastive.side
    parts = {
        "stage": Stage.WEIGHTS,
        "version": RECIPE_VERSION,
        "prepare": prepared.key,
        "positive": contrastive.positive_id,
        "negative": contrastive.negative_id,
        "side": side,
        "granularity": granularity,
        # Averaging is applied to the stored weights below: it does not change what this stage computes.
        "weights": weights_spec.model_dump(exclude={"average"}),
        **runner.numerics,
    }
    key = content_key(parts)

    def write(out: Path) -> None:
        logps = {}
        for direction, ref in (("positive", contrastive.positive), ("negative", contrastive.negative)):
            models.release()  # one frozen model on the GPU at a time: the teacher, then π+, then π−
            model, _ = models.frozen(ref)
            logps[direction] = runner.frozen_logprobs(
                model, prepared.data.train, side, prepared.pad_ids[side],
                batch_size=runner.context.inference_batch_size, precision=spec.training.precision,
                stage=f"{Stage.WEIGHTS}:{direction}",
            )
        models.release()
        if not runner.is_main:
            return
        values = contrastive_weights(
            prepared.data.train, logps["positive"], logps["negative"], side, granularity,
            lower=weights_spec.lower, upper=weights_spec.upper, scale=weights_spec.scale,
        )
        save_token_values(out / "weights.safetensors", {"train": values})

    with runner.stage(Stage.WEIGHTS, runner.is_complete(Stage.WEIGHTS, key)) as summary:
        folder = runner.build(Stage.WEIGHTS, key, parts, write, collective=True)
        values = load_token_values(folder / "weights.safetensors")["train"]
        if weights_spec.average:
            values = averaged_weights(values)
            summary["average"] = True
        flat = torch.cat([torch.as_tensor(w) for w in values.chosen + values.rejected])
        summary.update(
            {"source": weights_spec.source, "mean_weight": float(flat.mean()), "min_weight": float(flat.min()),
             "max_weight": float(flat.max())}
        )
    return Weights(values=values)


def distill_stage(
    spec: JobSpec, runner: StageRunner, models: ModelPool, prepared: Prepared, reference: Reference,
    weights: Weights,
) -> Distilled:
    """The student trained with the job's loss; checkpoints under ``run_dir/distill`` (resumed on a rerun)."""
    with runner.stage(Stage.DISTILL, False) as summary:
        torch.manual_seed(spec.training.seed)  # before loading: the init of a trainable model is seeded
        student = with_lora(spec, models.fresh(spec.student)[0])
        items = build_items(prepared.data.train, reference.logprobs["train"], weights.values)
        config = fit_config(spec, learning_rate=spec.training.learning_rate, epochs=spec.training.epochs,
                            max_steps=spec.training.max_steps)
        if spec.method in KD_METHODS:
            trained_unit, loss, config = _kd_training(spec, models, prepared, student, config, runner.context.device)
        else:
            trained_unit = student
            loss = make_distill_loss(cast(PreferenceMethod, spec.method), spec.beta, policy_side="student",
                                     reference_side=reference.side, pad_id=prepared.pad_ids["student"],
                                     device=runner.context.device)
        layout = runner.fit_layout(spec, "distill", trained_unit)
        result = fit(trained_unit, items, loss, config, runner.context.run_dir / Stage.DISTILL, stage=Stage.DISTILL,
                     device=runner.context.device, **runner.fit_hooks(), **layout)
        summary.update({"steps": result.steps, "resumed_from": result.resumed_from, **result.last_metrics})
    models.release()  # the live teacher of uld / dskd: evaluation loads the initial student instead
    projector = getattr(trained_unit, "projector", None)
    trained = trained_model(student, runner, lambda: with_lora(spec, models.load_on_cpu(spec.student)))
    if trained is not None:
        trained.eval()
    return Distilled(student=trained, steps=result.steps, projector=projector)


def _kd_training(spec: JobSpec, models: ModelPool, prepared: Prepared, student: nn.Module, config: FitConfig,
                 device: torch.device) -> tuple[nn.Module, Any, FitConfig]:
    """What sft, uld and dskd train, their loss and fit config: the student on the chosen responses, with the
    frozen teacher run live for uld and dskd (its full next-token distributions and hidden states are too large to
    cache), and for dskd the student wrapped with its fresh projector, which learns at its own rate."""
    from ctpd_core.kd import KdConfig, KdMethod, make_kd_loss

    kd = spec.kd
    teacher = models.frozen(spec.teacher)[0] if spec.uses_teacher and spec.teacher is not None else None
    unit: nn.Module = student
    if spec.method == "dskd" and teacher is not None:  # the spec refuses dskd without a teacher
        from ctpd_core.dskd import PROJECTOR_PREFIX, DualSpaceProjector, DualSpaceStudent

        projector = DualSpaceProjector.for_models(student, teacher, seed=spec.training.seed).to(device)
        unit = DualSpaceStudent(student, projector)
        config = dataclasses.replace(config, group_learning_rates=((PROJECTOR_PREFIX, kd.projector_learning_rate),))
    settings = KdConfig(kappa=kd.kappa, temperature=kd.temperature, uld_alignment=kd.uld_alignment)
    loss = make_kd_loss(cast(KdMethod, spec.method), settings, teacher=teacher, pad_ids=prepared.pad_ids,
                        device=device)
    return unit, loss, config


def evaluate_stage(
    spec: JobSpec, runner: StageRunner, models: ModelPool, prepared: Prepared, reference: Reference,
    distilled: Distilled,
) -> Evaluation:
    """Held-out metrics of the trained student against the initial one (reported at the last training step)."""
    if distilled.student is None:
        raise RuntimeError("evaluate runs on rank 0 only: the other ranks end after distill")
    with runner.stage(Stage.EVALUATE, False) as summary:
        initial_student, _ = models.frozen(spec.student)
        validation = reference.logprobs["validation"]
        metrics = evaluate_student(
            distilled.student,
            initial_student,
            prepared.data.validation,
            reference=validation,
            teacher=validation if _is_ctpd(spec) else None,
            beta=spec.beta,
            pad_id=prepared.pad_ids["student"],
            batch_size=spec.evaluation.batch_size,
            device=runner.context.device,
            precision=spec.training.precision,
            observer=runner.observer,
            stop=runner.stop,
        )
        runner.observer.metrics(Stage.EVALUATE, distilled.steps, metrics)
        summary.update(metrics)
    return Evaluation(metrics=metrics)


def export_dtype(spec: JobSpec) -> str:
    """The dtype the student is written in: ``export.dtype``, where ``auto`` is the base's declared one."""
    declared = declared_dtype(spec.student.model, revision=spec.student.revision) if spec.export.dtype == "auto" else None
    return resolve_export_dtype(spec.export.dtype, declared)


# The card shows the settings that made the model; references and data are named by the card's own fields, in
# public terms only (a server path never reaches a card that may be published).
_CARD_SETTINGS = {"method", "beta", "weights", "training", "sequence", "lora", "evaluation"}


def card_facts(
    spec: JobSpec, *, held_out: Mapping[str, float], data_fingerprint: str | None = None,
    stage_seconds: Mapping[str, float] | None = None, checkpoint_step: int | None = None,
    training_metrics: Mapping[str, float] | None = None,
) -> CardFacts:
    """The model card of ``spec``'s student (or of one of its checkpoints), in public names."""
    title = spec.name or "Distilled student"
    teacher = spec.teacher.model if spec.teacher is not None and spec.uses_teacher else None
    return CardFacts(
        title=title if checkpoint_step is None else f"{title} (checkpoint, step {checkpoint_step})",
        method=spec.method,
        base_model=public_model_id(spec.student.model),
        teacher=public_model_id(teacher) if teacher is not None else None,
        license=spec.export.license or base_license(spec.student.model, revision=spec.student.revision),
        datasets=tuple(spec.export.datasets),
        held_out=dict(held_out),
        checkpoint_step=checkpoint_step,
        training_metrics=dict(training_metrics or {}),
        data_fingerprint=data_fingerprint,
        stage_seconds=dict(stage_seconds or {}),
        settings=spec.model_dump(mode="json", include=_CARD_SETTINGS),
    )


def export_stage(
    spec: JobSpec, runner: StageRunner, prepared: Prepared, distilled: Distilled, evaluation: Evaluation
) -> Exported:
    """The student as a Hugging Face folder, ``run_dir/export``, in the export dtype. Published only if this run
    still owns the job (asked right before the rename, as for checkpoints), so a paused or partitioned attempt
    that wakes up late never rewrites the export its successor already published; a stop that arrived while the
    folder was written publishes nothing either."""
    context = runner.context
    export_dir = context.run_dir / Stage.EXPORT
    with runner.stage(Stage.EXPORT, False) as summary:
        dtype = export_dtype(spec)

        def write(staging: Path) -> None:
            card = card_facts(spec, held_out=evaluation.metrics, data_fingerprint=prepared.train_fingerprint,
                              stage_seconds=runner.stage_seconds)
            export_student(distilled.student, prepared.student_tokenizer, staging, spec=spec.model_dump(mode="json"),
                           metrics=evaluation.metrics, card=card, dtype=dtype)
            if distilled.projector is not None:  # dskd: the projector that was trained with the student
                from ctpd_core.dskd import save_projector

                save_projector(distilled.projector, staging)

        def may_publish() -> bool:
            return not runner.stop.should_stop() and (context.publish_guard is None or context.publish_guard())

        # An export already there is an earlier attempt's of this job that was lost before its finish: replaced.
        # Held while written: a worker killed mid-export leaves a folder the orphan sweep can tell is dead.
        if not publish_folder(export_dir, write, staging_prefix=f"{EXPORT_STAGING_PREFIX}{context.generation or 0}-",
                              may_publish=may_publish, held=True):
            raise Stopped(Stage.EXPORT)
        if context.mirror is not None:  # replaces an earlier attempt's copy, as the publish did
            context.mirror.push(export_dir, export_dir.relative_to(context.artifact_root).as_posix(), replace=True)
        summary["path"] = str(export_dir)
        summary["dtype"] = dtype
    # The exported folder is the run's result; the distill checkpoints only served resuming. Those fit left on disk
    # are kept without their optimizer state (twice the weights for AdamW), so any of them can still be made into a
    # model (materialize_checkpoint) at about the weights' size each.
    keep_checkpoints(context.run_dir, Stage.DISTILL)
    return Exported(path=export_dir)


def materialize_checkpoint(spec: JobSpec, checkpoint: StoredCheckpoint, *, model_cache: Path,
                           device: torch.device | None = None) -> Path:
    """A distill checkpoint of ``spec``'s job as a Hugging Face folder, ``<checkpoint>/model``: the student's base,
    built as distill built it (LoRA included), with the checkpoint's tensors put back, written as the export is
    (export dtype, tokenizer, a card naming the step). Already there: returned as it is. Raises ValueError for a
    checkpoint that does not fit the model (another base, another LoRA config)."""
    target = checkpoint.model_folder
    if checkpoint.model_ready():
        return target
    from ctpd_core.checkpoint import load_history, read_trainable_tensors

    device = device or torch.device("cpu")
    ref = spec.student
    base, tokenizer = load_causal_lm(ref.model, cache_dir=model_cache, trust_remote_code=ref.trust_remote_code,
                                     revision=ref.revision, role="student")
    student = with_lora(spec, base)
    tensors = read_trainable_tensors(checkpoint.folder)  # one file, or a multi-rank run's DCP shards
    projector = None
    if spec.method == "dskd":  # trained as a DualSpaceStudent: student.* are the student's, projector.* beside it
        tensors, projector = _split_dual_space(tensors, checkpoint.id)
    parameters = dict(student.named_parameters())
    unknown = sorted(set(tensors) - set(parameters))
    if unknown:
        raise ValueError(f"checkpoint {checkpoint.id} holds tensors this job's student does not have ({unknown[:5]}); "
                         "was the student's base changed since the job ran?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.shape != parameters[name].shape:
                raise ValueError(f"checkpoint {checkpoint.id}: {name} has shape {tuple(tensor.shape)}, the student "
                                 f"{tuple(parameters[name].shape)}; was the student's base changed since the job ran?")
            parameters[name].copy_(tensor)
    student.to(device).eval()
    at_step = dict(next((metrics for step, metrics in load_history(checkpoint.folder) if step == checkpoint.step), {}))
    dtype = export_dtype(spec)

    def write(staging: Path) -> None:
        card = card_facts(spec, held_out={}, checkpoint_step=checkpoint.step, training_metrics=at_step)
        export_student(student, tokenizer, staging, spec=spec.model_dump(mode="json"), metrics=at_step, card=card,
                       dtype=dtype)
        if projector is not None:
            from ctpd_core.dskd import save_projector

            save_projector(projector, staging)

    # Two requests for one checkpoint may build it at once: the first published wins, the other is discarded.
    publish_folder(target, write, staging_prefix=MODEL_STAGING_PREFIX, held=True,
                   keep_existing=lambda existing: (existing / "config.json").is_file())
    return target


def _split_dual_space(tensors: dict[str, torch.Tensor], checkpoint_id: str) -> tuple[dict[str, torch.Tensor], Any]:
    """A dskd checkpoint's tensors as the student's own (``student.`` dropped) and its projector, rebuilt."""
    from ctpd_core.dskd import PROJECTOR_PREFIX, DualSpaceProjector

    student_prefix = "student."
    own = {name[len(student_prefix):]: value for name, value in tensors.items() if name.startswith(student_prefix)}
    projected = {name[len(PROJECTOR_PREFIX):]: value for name, value in tensors.items()
                 if name.startswith(PROJECTOR_PREFIX)}
    if "query.weight" not in projected or len(own) + len(projected) != len(tensors):
        raise ValueError(f"checkpoint {checkpoint_id} is not a dskd checkpoint (student.* and projector.* tensors); "
                         "was the job's method changed since it ran?")
    query = projected["query.weight"]  # [2·d_t, 2·d_s]
    projector = DualSpaceProjector(int(query.shape[1]) // 2, int(query.shape[0]) // 2)
    projector.load_state_dict(projected)
    return own, projector


# ------------------------------------------------------------------------------------------------- run


def run_spec(spec: JobSpec, context: RunContext) -> RunResult:
    """Run every stage of ``spec`` in order; a stop returns status ``stopped`` (training checkpointed)."""
    runner = StageRunner(context, precision=spec.training.precision)
    models = ModelPool(context)
    context.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        prepared = prepare_stage(spec, runner)
        reference = reference_stage(spec, runner, models, prepared, *job_reference(spec))
        contrastive = contrastive_stage(spec, runner, models, prepared, reference)
        weights = weights_stage(spec, runner, models, prepared, reference, contrastive)
        models.release()  # the teacher and π± are no longer needed: free their memory for training
        distilled = distill_stage(spec, runner, models, prepared, reference, weights)
        if distilled.student is None:  # a rank other than 0: training is done, rank 0 evaluates and exports
            return RunResult("succeeded", {}, None, runner.stage_seconds, runner.cached_stages)
        evaluation = evaluate_stage(spec, runner, models, prepared, reference, distilled)
        exported = export_stage(spec, runner, prepared, distilled, evaluation)
    except Stopped as stopped:
        logger.info("run stopped in %s", stopped.stage)
        return RunResult("stopped", {}, None, runner.stage_seconds, runner.cached_stages)
    return RunResult("succeeded", evaluation.metrics, exported.path, runner.stage_seconds, runner.cached_stages)


# ------------------------------------------------------------------------------------------- preflight
# What a dry run (worker/preflight.py) asks of the recipe: the same tokenizers, encoding and step arithmetic the
# stages above use, without running them, so a preflight cannot drift from what a job then does.


def prepare_sample(spec: JobSpec, pairs: list[PreferencePair], student_tokenizer: Any, teacher_tokenizer: Any) -> PreparedData:
    """The prepare stage's encoding and alignment of ``pairs`` (all as training pairs), not cached: its ``stats``
    are what the job's prepare stage would report for them. Raises ValueError when none survives (as prepare does)."""
    return prepare(pairs, [], student_tokenizer, teacher_tokenizer, encoding_config(spec))


def stage_step_plans(spec: JobSpec, train_pairs: int) -> dict[str, Any]:
    """The optimizer steps of each training stage the job runs over ``train_pairs`` pairs, as fit() will take them
    (``ctpd_core.train.plan_steps`` on the stage's fit config, on the job's ranks): ``{"contrastive": StepPlan,
    "distill": StepPlan}``, contrastive only when the job trains π+ / π− (each of the two takes that many).
    Raises ValueError where fit would (no pairs, fewer pairs than ranks, a batch the ranks cannot share)."""
    from ctpd_core.train import plan_steps

    plans: dict[str, Any] = {}
    world_size = spec.gpus_required  # every training stage trains on all of the job's ranks (fit_layout)
    if spec.method != "dpo" and spec.method not in KD_METHODS and spec.trains_contrastive:
        contrastive = spec.contrastive
        config = fit_config(spec, learning_rate=contrastive.learning_rate, epochs=contrastive.epochs,
                            max_steps=contrastive.max_steps)
        plans[Stage.CONTRASTIVE] = plan_steps(config, train_pairs, world_size)
    config = fit_config(spec, learning_rate=spec.training.learning_rate, epochs=spec.training.epochs,
                        max_steps=spec.training.max_steps)
    plans[Stage.DISTILL] = plan_steps(config, train_pairs, world_size)
    return plans
