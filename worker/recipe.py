"""The one place that turns a JobSpec into ctpd_core calls (design.md). Used by the worker and ``ctpd run``.

It owns the mapping from spec fields to stage arguments, the stage cache keys, and the order of the stages.
No Celery, no SQL: what the caller wants to know arrives through a :class:`PipelineObserver`, and a
:class:`StopSignal` stops it between training steps (after a checkpoint).

Caching: prepare, reference, contrastive and weights are stored under ``artifact_root`` by a content key of
everything that determines them (data, tokenizers, model identities, settings), so a second job with the same
teacher, data and settings reuses them without loading the teacher at all. distill, evaluate and export
belong to one run and live under ``run_dir``; training checkpoints there, so a restarted job (or a rerun
after a stop) resumes where it stopped. Checkpoints are deleted once what they protect is published (the
contrastive model in the cache, the student in ``export/``): they hold optimizer state, several times the
model's size.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctpd_core.artifacts import StageCache, content_key
from ctpd_core.data import PreferencePair, load_pairs, pairs_fingerprint
from ctpd_core.encoding import EncodingConfig
from ctpd_core.evaluate import evaluate_student
from ctpd_core.export import export_student
from ctpd_core.models import load_causal_lm, load_tokenizer, model_fingerprint, tokenizer_fingerprint
from ctpd_core.pipeline import (
    NullObserver,
    PipelineObserver,
    TokenLogprobs,
    averaged_weights,
    build_items,
    contrastive_weights,
    fixed_weights,
    load_prepared,
    load_token_values,
    make_distill_loss,
    pad_token_id,
    prepare,
    save_prepared,
    save_token_values,
    swap_pairs,
    token_logprobs,
)
from ctpd_core.spec import JobSpec, ModelRef
from ctpd_core.train import FitConfig, StopSignal, fit

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when a stage's output format or semantics change: old cache entries stop matching


class JobStopped(Exception):
    """The stop signal fired; the current stage checkpointed and returned."""


@dataclass
class RunContext:
    artifact_root: Path
    run_dir: Path
    model_cache: Path
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    observer: PipelineObserver = field(default_factory=NullObserver)
    stop_signal: StopSignal | None = None
    dataset_resolver: Callable[[str], Path] | None = None  # uploaded dataset id -> file
    inference_batch_size: int = 8
    # Fencing (the worker): asked before a checkpoint or the export is published; False = another attempt
    # owns the job now, so this run stops without publishing. ``generation`` (the attempt) goes into every
    # checkpoint, and a checkpoint of a newer generation is never replaced.
    publish_guard: Callable[[], bool] | None = None
    generation: int | None = None


@dataclass
class RunResult:
    status: str  # "succeeded" or "stopped"
    metrics: dict[str, float]
    export_dir: Path | None
    stage_seconds: dict[str, float]
    cached_stages: list[str]


class _ObserverSink:
    """fit()'s MetricSink, forwarding to the observer under a stage name."""

    def __init__(self, observer: PipelineObserver, stage: str) -> None:
        self.observer, self.stage = observer, stage

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.observer.metrics(self.stage, step, metrics)


def split_dataset(spec: JobSpec, resolver: Callable[[str], Path] | None) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Train and validation pairs: a given validation file, or a seeded hold-out of ``validation_fraction``."""
    dataset = spec.dataset
    if dataset.id is not None:
        if resolver is None:
            raise ValueError("dataset.id needs the service (uploaded datasets); locally, use dataset.path")
        path = resolver(dataset.id)
    else:
        path = Path(dataset.path)
    pairs = load_pairs(path)
    if dataset.validation_id is not None:
        if resolver is None:
            raise ValueError("dataset.validation_id needs the service (uploaded datasets); locally, use "
                             "dataset.validation_path")
        train, validation = pairs, load_pairs(resolver(dataset.validation_id))
    elif dataset.validation_path is not None:
        train, validation = pairs, load_pairs(dataset.validation_path)
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
    return values


class Recipe:
    """One run of a JobSpec. ``run()`` executes the stages in order; see the module docstring."""

    def __init__(self, spec: JobSpec, context: RunContext) -> None:
        self.spec = spec
        self.context = context
        self.cache = StageCache(context.artifact_root)
        self.observer = context.observer
        self.device = context.device
        self.stage_seconds: dict[str, float] = {}
        self.cached_stages: list[str] = []
        self._models: dict[tuple[str, str | None], tuple[Any, Any]] = {}
        self._fingerprint_memo = context.artifact_root / "fingerprints.json"
        self.is_ctpd = spec.method == "ctpd"
        # The reference model and the side whose tokens it reads (method §5.2).
        self.reference_ref: ModelRef = spec.teacher if self.is_ctpd else spec.student  # type: ignore[assignment]
        self.reference_side = "teacher" if self.is_ctpd else "student"
        self.precision = spec.training.precision
        self.numerics = {"device": self.device.type, "precision": self.precision}

    # ------------------------------------------------------------------------------------------ helpers

    @contextmanager
    def _stage(self, name: str, cached: bool) -> Iterator[dict[str, Any]]:
        # A stop is honoured at every stage boundary too, not only inside the loops: a cancel that arrives
        # during a stage's last batch (or a stage with no loop at all, like export) never runs the next one.
        self._check_stop_signal()
        self.observer.stage_started(name, cached)
        started = time.monotonic()
        summary: dict[str, Any] = {}
        yield summary
        seconds = time.monotonic() - started
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + seconds
        if cached:
            self.cached_stages.append(name)
        self.observer.stage_finished(name, seconds, cached, summary)
        self._check_stop_signal()

    def _fingerprint(self, ref: ModelRef) -> str:
        return model_fingerprint(
            ref.model, cache_dir=self.context.model_cache, revision=ref.revision, memo_file=self._fingerprint_memo
        )

    def _load(self, ref: ModelRef, fresh: bool = False) -> tuple[Any, Any]:
        """(model, tokenizer); frozen models are loaded once per run, trainable ones fresh each time."""
        key = (ref.model, ref.revision)
        if not fresh and key in self._models:
            return self._models[key]
        model, tokenizer = load_causal_lm(
            ref.model,
            cache_dir=self.context.model_cache,
            trust_remote_code=ref.trust_remote_code,
            revision=ref.revision,
        )
        model.to(self.device)
        if not fresh:
            model.requires_grad_(False)
            model.eval()
            self._models[key] = (model, tokenizer)
        return model, tokenizer

    def _check_stop(self, stopped: bool) -> None:
        if stopped:
            raise JobStopped()

    def _check_stop_signal(self) -> None:
        signal = self.context.stop_signal
        if signal is not None and signal.should_stop():
            raise JobStopped()

    def _fit_hooks(self, stage: str) -> dict[str, Any]:
        """fit()'s fencing and metric replay for ``stage`` (an observer without ``replay_metrics`` keeps what it
        saw, so it needs none)."""
        replay = getattr(self.observer, "replay_metrics", None)
        return {"checkpoint_guard": self.context.publish_guard, "generation": self.context.generation,
                "replay_metrics": (lambda history: replay(stage, history)) if callable(replay) else None}

    # ------------------------------------------------------------------------------------------- stages

    def run(self) -> RunResult:
        spec, context = self.spec, self.context
        context.run_dir.mkdir(parents=True, exist_ok=True)
        train_pairs, validation_pairs = split_dataset(spec, context.dataset_resolver)
        self.data_fingerprint = pairs_fingerprint(train_pairs)
        student_tokenizer = load_tokenizer(
            spec.student.model, cache_dir=context.model_cache, trust_remote_code=spec.student.trust_remote_code,
            role="student tokenizer",
        )
        teacher_tokenizer = (
            load_tokenizer(
                spec.teacher.model, cache_dir=context.model_cache, trust_remote_code=spec.teacher.trust_remote_code,
                role="teacher tokenizer",
            )
            if self.is_ctpd
            else student_tokenizer  # the baselines train the student alone: both "sides" are the student's
        )
        self.pad_ids = {"student": pad_token_id(student_tokenizer), "teacher": pad_token_id(teacher_tokenizer)}

        # 1. prepare
        prepare_parts = {
            "stage": "prepare",
            "version": RECIPE_VERSION,
            "train": self.data_fingerprint,
            "validation": pairs_fingerprint(validation_pairs),
            "student_tokenizer": tokenizer_fingerprint(student_tokenizer),
            "teacher_tokenizer": tokenizer_fingerprint(teacher_tokenizer),
            "sequence": spec.sequence.model_dump(),
        }
        prepare_key = content_key(prepare_parts)
        with self._stage("prepare", self.cache.is_complete("prepare", prepare_key)) as summary:
            folder = self.cache.build(
                "prepare",
                prepare_key,
                prepare_parts,
                lambda out: save_prepared(
                    out,
                    prepare(
                        train_pairs, validation_pairs, student_tokenizer, teacher_tokenizer,
                        EncodingConfig(**spec.sequence.model_dump()), progress=self.observer.progress,
                    ),
                ),
            )
            self.data = load_prepared(folder)
            summary.update(self.data.stats)
        self.prepare_key = prepare_key

        # 2. reference
        reference_key, reference = self._reference_stage(self.reference_ref, self.reference_side, stage="reference")

        # 3 + 4. contrastive models and weights
        weights = self._weights_stages(reference_key, reference)

        # 5. distill. The teacher and the contrastive models are no longer needed: free their memory.
        self._models.clear()
        student, distill_step = self._distill(reference, weights)

        # 6. evaluate
        with self._stage("evaluate", False) as summary:
            initial_student, _ = self._load(spec.student)
            metrics = evaluate_student(
                student,
                initial_student,
                self.data.validation,
                reference=reference["validation"],
                teacher=reference["validation"] if self.is_ctpd else None,
                beta=spec.beta,
                pad_id=self.pad_ids["student"],
                batch_size=min(spec.evaluation.batch_size, self.context.inference_batch_size),
                device=self.device,
                precision=self.precision,
                progress=self.observer.progress,
            )
            self.observer.metrics("evaluate", distill_step, metrics)
            summary.update(metrics)

        # 7. export: written under a staging name, then renamed into place only if this run still owns the job
        # (asked right before the rename, as for checkpoints), so a paused or partitioned attempt that wakes up
        # late never rewrites the export its successor already published.
        with self._stage("export", False) as summary:
            staging = context.run_dir / f".export-{context.generation or 0}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            export_student(
                student,
                student_tokenizer,
                staging,
                spec=spec.model_dump(mode="json"),
                metrics=metrics,
                data_fingerprint=self.data_fingerprint,
                stage_seconds=self.stage_seconds,
            )
            # The last point before anything is published: a stop that arrived while the folder was written, or
            # another attempt that owns the job now (its export is the one that counts), publishes nothing.
            signal = context.stop_signal
            if (signal is not None and signal.should_stop()) or (
                context.publish_guard is not None and not context.publish_guard()
            ):
                shutil.rmtree(staging, ignore_errors=True)
                raise JobStopped()
            export_dir = context.run_dir / "export"
            if export_dir.exists():  # an earlier attempt of this job got this far and was lost before its finish
                shutil.rmtree(export_dir)
            staging.rename(export_dir)
            summary["path"] = str(export_dir)
        # The exported folder is the run's result; the distill checkpoints (weights plus optimizer state) only
        # served resuming, and cost several times the model's size on disk.
        shutil.rmtree(context.run_dir / "distill", ignore_errors=True)
        (context.run_dir / "result.json").write_text(
            json.dumps({"metrics": metrics, "stage_seconds": self.stage_seconds, "export_dir": str(export_dir)}, indent=2)
        )
        return RunResult("succeeded", metrics, export_dir, self.stage_seconds, self.cached_stages)

    def _reference_stage(self, ref: ModelRef, side: str, stage: str) -> tuple[str, dict[str, TokenLogprobs]]:
        """A frozen model's per-token log-probs on ``side`` for both splits (cached)."""
        parts = {
            "stage": "reference",
            "version": RECIPE_VERSION,
            "prepare": self.prepare_key,
            "model": self._fingerprint(ref),
            "side": side,
            **self.numerics,
        }
        key = content_key(parts)

        def write(out: Path) -> None:
            model, _ = self._load(ref)
            values = {
                split: token_logprobs(
                    model, records, side, self.pad_ids[side], batch_size=self.context.inference_batch_size,
                    device=self.device, precision=self.precision, stage=stage, progress=self.observer.progress,
                )
                for split, records in (("train", self.data.train), ("validation", self.data.validation))
            }
            save_token_values(out / "logprobs.safetensors", values)

        with self._stage(stage, self.cache.is_complete("reference", key)) as summary:
            folder = self.cache.build("reference", key, parts, write)
            values = load_token_values(folder / "logprobs.safetensors")
            summary["model"] = ref.model
            summary["side"] = side
        return key, values

    def _weights_stages(self, reference_key: str, reference: dict[str, TokenLogprobs]) -> TokenLogprobs | None:
        spec = self.spec
        source = spec.weights.source
        if spec.method == "dpo":
            return None
        granularity = "span" if self.is_ctpd else "token"
        if source in ("uniform", "random"):
            side = self.reference_side if self.is_ctpd else "student"
            with self._stage("weights", False) as summary:
                weights = fixed_weights(
                    self.data.train, side, granularity, source, seed=spec.training.seed,
                    low=spec.weights.random_low, high=spec.weights.random_high,
                )
                summary["source"] = source
            return weights

        # Contrastive weights: π+ / π− from the teacher (ctpd, the paper) or the student (tisdpo, ablation),
        # each on its own tokens.
        base_ref = spec.teacher if source == "teacher_contrastive" else spec.student
        side = "teacher" if source == "teacher_contrastive" else "student"
        if side == self.reference_side and base_ref == self.reference_ref:
            base_reference_key, base_reference = reference_key, reference
        else:
            base_reference_key, base_reference = self._reference_stage(base_ref, side, stage="contrastive")
        positive_fp, negative_fp = self._contrastive_stage(base_ref, side, base_reference_key, base_reference)

        parts = {
            "stage": "weights",
            "version": RECIPE_VERSION,
            "prepare": self.prepare_key,
            "positive": positive_fp,
            "negative": negative_fp,
            "side": side,
            "granularity": granularity,
            # Averaging is applied to the stored weights below: it does not change what this stage computes.
            "weights": spec.weights.model_dump(exclude={"average"}),
            **self.numerics,
        }
        key = content_key(parts)

        def write(out: Path) -> None:
            logps = {}
            for direction in ("positive", "negative"):
                model = self._contrastive_models[direction]
                if isinstance(model, ModelRef):
                    model, _ = self._load(model)
                logps[direction] = token_logprobs(
                    model, self.data.train, side, self.pad_ids[side], batch_size=self.context.inference_batch_size,
                    device=self.device, precision=self.precision, stage="weights", progress=self.observer.progress,
                )
            weights = contrastive_weights(
                self.data.train, logps["positive"], logps["negative"], side, granularity,
                lower=spec.weights.lower, upper=spec.weights.upper, scale=spec.weights.scale,
            )
            save_token_values(out / "weights.safetensors", {"train": weights})

        with self._stage("weights", self.cache.is_complete("weights", key)) as summary:
            folder = self.cache.build("weights", key, parts, write)
            weights = load_token_values(folder / "weights.safetensors")["train"]
            if spec.weights.average:
                weights = averaged_weights(weights)
                summary["average"] = True
            flat = torch.cat([torch.as_tensor(w) for w in weights.chosen + weights.rejected])
            summary.update(
                {"source": source, "mean_weight": float(flat.mean()), "min_weight": float(flat.min()),
                 "max_weight": float(flat.max())}
            )
        return weights

    def _contrastive_stage(
        self, base_ref: ModelRef, side: str, reference_key: str, reference: dict[str, TokenLogprobs]
    ) -> tuple[str, str]:
        """π+ and π− (given, or trained by DPO from ``base_ref`` on straight and swapped pairs)."""
        spec = self.spec
        contrastive = spec.contrastive
        self._contrastive_models: dict[str, Any] = {}
        if contrastive.positive is not None and contrastive.negative is not None:
            with self._stage("contrastive", True) as summary:
                self._contrastive_models = {"positive": contrastive.positive, "negative": contrastive.negative}
                summary["given"] = True
            return self._fingerprint(contrastive.positive), self._fingerprint(contrastive.negative)

        config = fit_config(
            spec, learning_rate=contrastive.learning_rate, epochs=contrastive.epochs, max_steps=contrastive.max_steps
        )
        common = {
            "stage": "contrastive",
            "version": RECIPE_VERSION,
            "prepare": self.prepare_key,
            "base": self._fingerprint(base_ref),
            "side": side,
            "reference": reference_key,
            "beta": contrastive.beta,
            "fit": _trajectory(config),
            **self.numerics,
        }
        keys = {direction: content_key({**common, "direction": direction}) for direction in ("positive", "negative")}
        cached = all(self.cache.is_complete("contrastive", key) for key in keys.values())
        items = build_items(self.data.train, reference["train"])
        with self._stage("contrastive", cached) as summary:
            for direction, key in keys.items():
                direction_items = items if direction == "positive" else swap_pairs(items)

                checkpoints = self.context.run_dir / "contrastive" / f"{direction}-{key[:16]}"

                def write(out: Path, direction: str = direction, train_items=direction_items, checkpoints=checkpoints) -> None:
                    torch.manual_seed(spec.training.seed)
                    model, tokenizer = self._load(base_ref, fresh=True)
                    result = fit(
                        model,
                        train_items,
                        make_distill_loss(
                            "dpo", contrastive.beta, policy_side=side, reference_side=side,
                            pad_id=self.pad_ids[side], device=self.device,
                        ),
                        config,
                        checkpoints,
                        stage=f"contrastive:{direction}",
                        metric_sink=_ObserverSink(self.observer, f"contrastive:{direction}"),
                        stop_signal=self.context.stop_signal,
                        progress=self.observer.progress,
                        device=self.device,
                        on_checkpoint=lambda step, path, d=direction: self.observer.checkpoint(f"contrastive:{d}", step, path),
                        **self._fit_hooks(f"contrastive:{direction}"),
                    )
                    self._check_stop(result.stopped)
                    model.save_pretrained(str(out / "model"), safe_serialization=True)
                    tokenizer.save_pretrained(str(out / "model"))
                    (out / "fit.json").write_text(json.dumps({"steps": result.steps, "last_metrics": result.last_metrics}))

                folder = self.cache.build("contrastive", key, {**common, "direction": direction}, write)
                # The trained model is published in the cache: its resume checkpoints (weights plus optimizer
                # state, three times the model's size) are dead weight now.
                shutil.rmtree(checkpoints, ignore_errors=True)
                self._contrastive_models[direction] = ModelRef(model=str(folder / "model"))
                summary[direction] = str(folder / "model")
        return keys["positive"], keys["negative"]

    def _distill(self, reference: dict[str, TokenLogprobs], weights: TokenLogprobs | None) -> tuple[Any, int]:
        spec = self.spec
        with self._stage("distill", False) as summary:
            torch.manual_seed(spec.training.seed)
            student, _ = self._load(spec.student, fresh=True)
            if spec.lora.enabled:
                from peft import LoraConfig, get_peft_model

                student = get_peft_model(
                    student,
                    LoraConfig(
                        r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                        target_modules=spec.lora.target_modules, task_type="CAUSAL_LM",
                    ),
                )
            items = build_items(self.data.train, reference["train"], weights)
            result = fit(
                student,
                items,
                make_distill_loss(
                    spec.method, spec.beta, policy_side="student", reference_side=self.reference_side,
                    pad_id=self.pad_ids["student"], device=self.device,
                ),
                fit_config(
                    spec, learning_rate=spec.training.learning_rate, epochs=spec.training.epochs,
                    max_steps=spec.training.max_steps,
                ),
                self.context.run_dir / "distill",
                stage="distill",
                metric_sink=_ObserverSink(self.observer, "distill"),
                stop_signal=self.context.stop_signal,
                progress=self.observer.progress,
                device=self.device,
                on_checkpoint=lambda step, path: self.observer.checkpoint("distill", step, path),
                **self._fit_hooks("distill"),
            )
            self._check_stop(result.stopped)
            summary.update({"steps": result.steps, "resumed_from": result.resumed_from, **result.last_metrics})
        student.eval()
        return student, result.steps


def run_spec(spec: JobSpec, context: RunContext) -> RunResult:
    """Run every stage of ``spec``; a fired stop signal returns status ``stopped`` (checkpointed)."""
    recipe = Recipe(spec, context)
    try:
        return recipe.run()
    except JobStopped:
        return RunResult("stopped", {}, None, recipe.stage_seconds, recipe.cached_stages)
