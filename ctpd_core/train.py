"""fit(): the one training loop behind every training stage (teacher π⁺/π⁻ DPO, student CTPD / DPO / TIS-DPO).

The loop knows nothing about losses, models or data formats, so each stage is "build the items, write a
``loss_fn``, call fit()", and checkpointing, resume, cancellation and metrics work the same for all of them.

The contract, in the order a step runs:

* **Items** are opaque: ``train_items`` is a sequence of already-encoded examples and fit only picks them by
  index. ``loss_fn(model, micro_batch_items)`` collates them, moves them to the model's device, runs the forward
  and returns ``(micro-batch mean loss, stats)``.
* **Order.** Epoch ``e`` visits the items in ``torch.randperm`` order from
  ``torch.Generator().manual_seed(seed + epoch)``, cut into batches of ``batch_size`` with ``drop_last`` (as the
  authors' DataLoader did, method §6). The order depends only on (seed, epoch), not on the global RNG, so the
  batch of any step can be recomputed on resume. A dataset *smaller than one batch* is used whole as one batch
  per epoch: a tiny smoke-test dataset still trains instead of yielding zero steps.
* **Accumulation.** One optimizer step is one batch, run as ``batch_size // micro_batch_size`` micro-batches;
  each micro-batch loss is scaled by ``len(micro) / len(batch)`` before ``backward`` so the gradient is that of
  the batch mean (also when a tiny dataset makes the last micro-batch shorter).
* **Length.** ``max_steps`` if set, else ``ceil(epochs * steps_per_epoch)`` (fractional epochs stop mid-epoch).
* **Optimizer and schedule.** AdamW (torch default betas and eps, one parameter group, so weight decay applies
  to every trainable tensor, as in the authors' code) over the parameters with ``requires_grad`` only: a
  LoRA-wrapped model trains its adapters only. Gradients are clipped to ``max_grad_norm``. The learning rate
  follows the shape of Hugging Face's ``get_{cosine,linear,constant}_schedule_with_warmup`` (what the authors
  ran): a linear warmup ``step / warmup_steps`` over ``round(warmup_ratio * total_steps)`` steps, then cosine to
  0, linear to 0, or constant. Unlike HF, the decay progress is clamped to 1, so the cosine never rises again
  past ``total_steps`` (method §9.7: the authors' π⁻ run re-increased its LR for a whole epoch).
* **Precision.** ``"auto"`` is bf16 autocast on CUDA and fp32 on CPU; ``"bf16"`` is
  ``torch.autocast(device_type, dtype=torch.bfloat16)`` around ``loss_fn``; ``"fp32"`` is no autocast. Trainable
  (master) weights must be fp32 and stay fp32; only the forward computes in bf16.
* **Dropout.** fit puts the model in ``train()`` mode and does **not** touch dropout modules or the model
  config: the method trains with dropout disabled (§6), so callers build their models with dropout 0. fit logs
  a warning when it sees active dropout, rather than silently rewriting the caller's model.
* **Metrics** (one ``metric_sink.log(step, metrics)`` per step): ``loss`` (batch mean), ``grad_norm``
  (pre-clip), ``learning_rate`` (the one this step used), ``epoch`` (fractional), ``step_seconds``, the mean
  over micro-batches of every ``loss_fn`` stat (weighted by micro-batch size, so per-example stats average to
  the batch mean; non-scalar tensors are averaged first), except ``tokens``, a count, which is summed over the
  step and also gives ``tokens_per_second``. fit's own names win over a stat of the same name.
* **Checkpoints** every ``checkpoint_every`` steps, at the end and when stopping: ``step-{step:08d}/`` written
  under a temporary name and renamed into place, so a crash never leaves a half checkpoint. It holds
  ``trainable.safetensors`` (the ``requires_grad`` parameters by name: everything for full fine-tuning, the
  adapters for LoRA), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (torch CPU, CUDA, python ``random`` and
  numpy states) and ``state.json`` (step, epoch, position within the epoch, config, fit version). The newest
  ``keep_checkpoints`` are kept. Torch files are read with ``weights_only=True``.
* **Resume.** If ``checkpoint_dir`` holds a checkpoint, fit loads the newest one into the (freshly built,
  identically initialised) model, optimizer, scheduler and RNGs and continues from its step: the per-step
  losses equal those of an uninterrupted run. Only trainable parameters are stored, so frozen weights and
  buffers must come from the caller's model building as before. A checkpoint written with a different config
  (``checkpoint_every`` and ``keep_checkpoints`` aside: they don't change the trajectory) or a different
  number of items is refused; fit cannot see *which* items it is given, so one ``checkpoint_dir`` per stage and
  dataset is the caller's job. A finished run resumes at its last step and returns at once, with the trained
  weights loaded into the model: calling fit twice is safe (a job delivered twice redoes nothing).
* **Stop and progress.** ``stop_signal.should_stop()`` is polled after every optimizer step (never
  mid-accumulation), the last one included: a stop that arrives during the last step still returns
  ``stopped=True`` (after the final checkpoint), so a cancelled run never goes on as if it had finished.
  On stop fit checkpoints and returns ``stopped=True``. ``progress`` gets a ``Progress`` when the loop starts
  (``eta_seconds=None``) and after every step (ETA from the mean wall time per step so far, checkpoint writes
  included).
* **Metric history.** Every checkpoint also holds ``metrics.json``: the metrics of its last ``HISTORY_STEPS``
  steps. On resume ``replay_metrics(history)`` is called once with them, before the first new step: the steps
  before the checkpoint are not run again, so a sink that lost some of their metrics (an attempt that died
  with its writes unflushed) can restore them. Sinks that keep what they saw need not pass it.
* **Fenced checkpoints.** With ``generation`` (the worker passes the job's attempt), every checkpoint records
  it, and a save never replaces a checkpoint of a *newer* generation: a process that was paused and resumed
  after another attempt took over cannot overwrite its successor's state. ``checkpoint_guard()`` is asked
  just before each checkpoint is renamed into place; False discards it (the caller lost the right to
  write) and fit stops at once with ``stopped=True``.

fit is single-process: data-parallel training would shard each batch by rank and reduce the metrics.
A fresh run seeds torch, python ``random`` and numpy with ``config.seed`` (method §6: all three are seeded at
the start of training); a resumed run restores their saved states instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FIT_VERSION = 1
"""Bumped whenever the checkpoint layout or the step arithmetic changes; a mismatch refuses to resume."""

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
HISTORY_FILE = "metrics.json"  # the last steps' metrics up to the checkpoint, for replay on resume
HISTORY_STEPS = 10_000
"""Steps of metrics a checkpoint keeps: a sink can only have lost what an attempt buffered but never wrote,
and the worker's buffer holds at most 10,000 writes (about one per step), so older steps are never missing.
Bounded so that neither memory nor each checkpoint's size grows with the length of the run."""
CHECKPOINT_PREFIX = "step-"
_STAGING_PREFIX = ".staging-step-"

# Config fields that change when or how often checkpoints are written, not what the run computes: a resume may
# change them. Every other field must match the checkpoint's.
_RESUMABLE_CHANGES = frozenset({"checkpoint_every", "keep_checkpoints"})

LrSchedule = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "fp32", "bf16"]
_SCHEDULES = ("cosine", "linear", "constant")
_PRECISIONS = ("auto", "fp32", "bf16")


class MetricSink(Protocol):
    """Where per-step metrics go (the worker's implementation writes them to SQL)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...


class StopSignal(Protocol):
    """Cooperative cancellation: polled between optimizer steps (the worker's reads the job's cancel flag)."""

    def should_stop(self) -> bool: ...


@dataclass(frozen=True)
class Progress:
    """Where a stage stands, for the job's progress columns."""

    stage: str
    step: int  # optimizer steps done
    total: int  # optimizer steps of the whole run
    eta_seconds: float | None  # None until a step has been timed


ProgressCallback = Callable[[Progress], None]

LossFn = Callable[[torch.nn.Module, Sequence[Any]], tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]]
"""``loss_fn(model, micro_batch_items) -> (scalar mean loss, stats)``; stats may include a ``tokens`` count."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _largest_divisor(number: int, at_most: int) -> int:
    return max(divisor for divisor in range(1, min(number, at_most) + 1) if number % divisor == 0)


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings of one training stage; defaults live in the JobSpec, these are only fallbacks."""

    learning_rate: float
    lr_schedule: LrSchedule = "cosine"
    warmup_ratio: float = 0.1
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16  # items per optimizer step
    micro_batch_size: int = 2  # items per forward/backward; batch_size must be a multiple
    max_grad_norm: float = 1.0  # math.inf disables clipping (the norm is still reported)
    weight_decay: float = 0.01
    precision: Precision = "auto"
    seed: int = 0
    checkpoint_every: int = 100  # optimizer steps
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if (
            not _is_number(self.learning_rate)
            or not math.isfinite(self.learning_rate)
            or self.learning_rate <= 0
        ):
            raise ValueError(
                f"learning_rate must be a finite number > 0, got {self.learning_rate!r}; the method uses 1e-6 for CTPD."
            )
        if self.lr_schedule not in _SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(_SCHEDULES)}, got {self.lr_schedule!r}.")
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio <= 1:
            raise ValueError(
                f"warmup_ratio must be a number in [0, 1], got {self.warmup_ratio!r}; the method uses 0.1."
            )
        if not _is_number(self.epochs) or not math.isfinite(self.epochs) or self.epochs <= 0:
            raise ValueError(f"epochs must be a finite number > 0 (fractions allowed), got {self.epochs!r}.")
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise ValueError(
                f"max_steps must be None (train for `epochs`) or an integer >= 1, got {self.max_steps!r}."
            )
        for name in ("batch_size", "micro_batch_size", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}; "
                f"pick a micro_batch_size that divides it (e.g. {_largest_divisor(self.batch_size, self.micro_batch_size)})."
            )
        if not _is_number(self.max_grad_norm) or not self.max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm must be > 0 (math.inf to disable clipping), got {self.max_grad_norm!r}; the method uses 1.0."
            )
        if not _is_number(self.weight_decay) or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(
                f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}; the method uses 0.01."
            )
        if self.precision not in _PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(_PRECISIONS)}, got {self.precision!r} "
                "(fp16 is not supported: it needs loss scaling; use bf16)."
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}.")


@dataclass(frozen=True)
class FitResult:
    """How a fit() call ended; the trained weights are in the model (and in ``checkpoint``)."""

    steps: int  # optimizer steps done in total (including those before a resume)
    total_steps: int
    stopped: bool  # True when the stop signal ended the run early
    resumed_from: int | None  # the step of the checkpoint this call resumed from
    last_metrics: dict[str, float]  # of the last step (read from the checkpoint if this call ran none)
    checkpoint: Path | None  # the newest checkpoint folder


@dataclass(frozen=True)
class StepPlan:
    """The step arithmetic of a run, for fit and for callers that report totals before training starts."""

    batch_size: int  # items per step: config.batch_size, or the whole dataset if it is smaller
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(config: FitConfig, num_items: int) -> StepPlan:
    """How many optimizer steps ``fit`` will take over ``num_items`` items with ``config``."""
    if not _is_int(num_items) or num_items < 1:
        raise ValueError(f"the training set is empty (num_items={num_items!r}); give fit at least one item.")
    batch_size = min(config.batch_size, num_items)
    steps_per_epoch = num_items // batch_size  # drop_last
    if config.max_steps is not None:
        total_steps = config.max_steps
    else:
        total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup_steps = round(config.warmup_ratio * total_steps)
    return StepPlan(batch_size, steps_per_epoch, total_steps, warmup_steps)


def lr_multiplier(step: int, *, schedule: LrSchedule, warmup_steps: int, total_steps: int) -> float:
    """The factor on the base learning rate for optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / (warmup_steps + 1)``, so that every step trains (Hugging Face's
    ``step / warmup_steps`` spends step 0 at learning rate 0, a real loss on a short run), then decay over
    the remaining steps. The decay progress is clamped
    to [0, 1], so any step at or past ``total_steps`` gets the final value (0 for cosine and linear) instead of
    a cosine that climbs back up (method §9.7).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, schedule: LrSchedule, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_multiplier``; call ``.step()`` once after every ``optimizer.step()``."""

    def multiplier(step: int) -> float:
        return lr_multiplier(step, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def checkpoint_steps(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under ``checkpoint_dir`` as (step, folder), oldest first."""
    found = []
    if Path(checkpoint_dir).is_dir():
        for path in Path(checkpoint_dir).iterdir():
            suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
            if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
                found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None; staging folders of an interrupted save don't count."""
    found = checkpoint_steps(checkpoint_dir)
    return found[-1][1] if found else None


def fit(
    model: torch.nn.Module,
    train_items: Sequence[Any],
    loss_fn: LossFn,
    config: FitConfig,
    checkpoint_dir: Path,
    *,
    stage: str = "distill",
    metric_sink: MetricSink | None = None,
    stop_signal: StopSignal | None = None,
    progress: ProgressCallback | None = None,
    device: torch.device | str = "cpu",
    on_checkpoint: Callable[[int, Path], None] | None = None,
    checkpoint_guard: Callable[[], bool] | None = None,
    generation: int | None = None,
    replay_metrics: Callable[[list[tuple[int, dict[str, float]]]], None] | None = None,
) -> FitResult:
    """Train the ``requires_grad`` parameters of ``model`` on ``train_items`` by minimising ``loss_fn``.

    Resumes from the newest checkpoint in ``checkpoint_dir`` if there is one (see the module docstring for the
    full contract). fit moves the model to ``device``; ``loss_fn`` moves its items there. On return the model
    holds the trained weights, back in the train/eval mode it came in.
    """
    if not isinstance(config, FitConfig):
        raise ValueError(f"config must be a FitConfig, got {type(config).__name__}.")
    if len(train_items) == 0:
        raise ValueError("train_items is empty; give fit at least one encoded example.")
    plan = plan_steps(config, len(train_items))
    device = torch.device(device)
    autocast = _autocast_factory(config.precision, device)
    checkpoint_dir = Path(checkpoint_dir)

    model.to(device)
    trainable = _trainable_parameters(model)
    _warn_on_active_dropout(model)
    # Built before any resume so the state dicts load into the same structure that wrote them.
    optimizer = torch.optim.AdamW(
        trainable.values(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = build_scheduler(
        optimizer, schedule=config.lr_schedule, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps
    )

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    _remove_staging_folders(checkpoint_dir)
    checkpoint = latest_checkpoint(checkpoint_dir)
    if checkpoint is None:
        _seed_everything(config.seed)
        start_step, resumed_from, last_metrics = 0, None, {}
        history: list[tuple[int, dict[str, float]]] = []
    else:
        state = _load_checkpoint(checkpoint, config, len(train_items), trainable, optimizer, scheduler)
        start_step = resumed_from = state["step"]
        last_metrics = dict(state.get("last_metrics", {}))
        history = _load_history(checkpoint)
        logger.info("%s: resuming from %s (step %d of %d)", stage, checkpoint, start_step, plan.total_steps)
        if replay_metrics is not None and history:
            # The steps before the checkpoint are not run again, so their metrics come from the checkpoint: a
            # sink that lost some of them (an attempt that died with its writes unflushed) gets them back.
            replay_metrics(list(history))
    saved_step = resumed_from
    refused = False

    def save(step: int) -> Path | None:
        nonlocal refused
        epoch, position = divmod(step, plan.steps_per_epoch)
        state = {
            "fit_version": FIT_VERSION,
            "stage": stage,
            "step": step,
            "epoch": epoch,
            "position": position,  # index of the next batch within `epoch`
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps,
            "num_items": len(train_items),
            "config": _config_dict(config),
            "last_metrics": last_metrics,
            "attempt": generation,
        }
        path = _save_checkpoint(checkpoint_dir, state, trainable, optimizer, scheduler, guard=checkpoint_guard,
                                history=history)
        if path is None:
            refused = True
            return None
        _prune_checkpoints(checkpoint_dir, config.keep_checkpoints)
        if on_checkpoint is not None:
            on_checkpoint(step, path)
        return path

    logger.info(
        "%s: %d items, %d steps (%d per epoch, batch %d, micro-batch %d), %d warmup, %d trainable tensors",
        *(stage, len(train_items), plan.total_steps, plan.steps_per_epoch, plan.batch_size),
        *(config.micro_batch_size, plan.warmup_steps, len(trainable)),
    )
    if progress is not None:
        progress(Progress(stage, start_step, plan.total_steps, None))

    was_training = model.training
    model.train()
    step, stopped = start_step, False
    epoch_seen, order = -1, []
    loop_start = time.perf_counter()
    try:
        while step < plan.total_steps:
            step_start = time.perf_counter()
            epoch, position = divmod(step, plan.steps_per_epoch)
            if epoch != epoch_seen:  # the order is a function of (seed, epoch) only, so resume recomputes it
                generator = torch.Generator().manual_seed(config.seed + epoch)
                order = torch.randperm(len(train_items), generator=generator).tolist()
                epoch_seen = epoch
            batch = order[position * plan.batch_size : (position + 1) * plan.batch_size]

            # ---- one optimizer step: accumulate the batch-mean gradient over micro-batches
            optimizer.zero_grad(set_to_none=True)
            loss_sum: torch.Tensor | float = 0.0
            stat_sums: dict[str, torch.Tensor | float] = {}
            tokens: torch.Tensor | float | None = None
            for start in range(0, len(batch), config.micro_batch_size):
                micro_items = [train_items[index] for index in batch[start : start + config.micro_batch_size]]
                share = len(micro_items) / len(batch)  # micro-batch mean → batch mean
                with autocast():
                    loss, stats = loss_fn(model, micro_items)
                _check_loss(loss, step)
                (loss * share).backward()
                loss_sum = loss_sum + loss.detach().float() * share
                for name, value in stats.items():
                    if name == "tokens":
                        tokens = _as_scalar(value) + (0.0 if tokens is None else tokens)
                    else:
                        stat_sums[name] = stat_sums.get(name, 0.0) + _as_scalar(value) * share
            grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            step += 1

            # ---- metrics (float() syncs with the device once per value, so step_seconds is real time)
            last_metrics = {name: float(value) for name, value in stat_sums.items()}
            last_metrics.update(
                loss=float(loss_sum),
                grad_norm=float(grad_norm),
                learning_rate=float(learning_rate),
                epoch=step / plan.steps_per_epoch,
            )
            if tokens is not None:
                last_metrics["tokens"] = float(tokens)
            step_seconds = time.perf_counter() - step_start
            last_metrics["step_seconds"] = step_seconds
            if tokens is not None:
                last_metrics["tokens_per_second"] = float(tokens) / step_seconds if step_seconds > 0 else 0.0
            history.append((step, dict(last_metrics)))
            if len(history) > 2 * HISTORY_STEPS:  # trimmed in blocks: amortised O(1) per step
                del history[:-HISTORY_STEPS]
            if metric_sink is not None:
                metric_sink.log(step, dict(last_metrics))

            if step % config.checkpoint_every == 0 or step == plan.total_steps:
                saved = save(step)
                if saved is not None:
                    checkpoint, saved_step = saved, step
            if progress is not None:
                seconds_per_step = (time.perf_counter() - loop_start) / (step - start_step)
                progress(
                    Progress(stage, step, plan.total_steps, seconds_per_step * (plan.total_steps - step))
                )
            if refused or (stop_signal is not None and stop_signal.should_stop()):
                if saved_step != step and not refused:
                    saved = save(step)
                    checkpoint = saved if saved is not None else checkpoint
                stopped = True
                logger.info(
                    "%s: stopped at step %d of %d; checkpoint %s", stage, step, plan.total_steps, checkpoint
                )
                break
    finally:
        model.train(was_training)

    return FitResult(
        steps=step,
        total_steps=plan.total_steps,
        stopped=stopped,
        resumed_from=resumed_from,
        last_metrics=last_metrics,
        checkpoint=checkpoint,
    )


# ------------------------------------------------------------------------------------------------ helpers


def _autocast_factory(
    precision: Precision, device: torch.device
) -> Callable[[], AbstractContextManager[Any]]:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision={precision!r} needs bf16, which this GPU lacks; use precision='fp32'.")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def autocast_context(device: torch.device, precision: Precision) -> AbstractContextManager[Any]:
    """The forward-pass context of ``precision`` on ``device`` (bf16 autocast, or none), for inference too."""
    return _autocast_factory(precision, device)()


def _trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters fit optimises and checkpoints, by name; they must be fp32 master weights."""
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    if not trainable:
        raise ValueError(
            "the model has no parameter with requires_grad=True, so there is nothing to train; "
            "unfreeze the parameters or wrap the model with LoRA."
        )
    for name, parameter in trainable.items():
        if parameter.dtype != torch.float32:
            raise ValueError(
                f"trainable parameter {name!r} is {parameter.dtype}; fit keeps master weights in float32. "
                "Load the model (or its adapters) in float32 and use precision='bf16' for bf16 compute."
            )
    return trainable


def _warn_on_active_dropout(model: torch.nn.Module) -> None:
    """Warn, don't rewrite: the method trains with dropout off (§6), but the model is the caller's."""
    active = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Dropout) and module.p > 0
    ]
    config = getattr(model, "config", None)
    config_items = config.to_dict().items() if hasattr(config, "to_dict") else ()
    active += [
        f"config.{key}={value}"
        for key, value in config_items
        if ("dropout" in key or "pdrop" in key) and _is_number(value) and value > 0
    ]
    if active:
        logger.warning(
            "dropout is active in %d places (%s); the method trains with dropout disabled (§6): "
            "build the model with dropout 0 unless you mean it",
            len(active),
            ", ".join(active[:5]),
        )


def _check_loss(loss: object, step: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor (the micro-batch mean) first, got {shape} at step {step}."
        )
    if not loss.requires_grad:
        raise ValueError(
            f"the loss of step {step} does not require grad: loss_fn must compute it from the model's "
            "trainable parameters, outside torch.no_grad()."
        )


def _as_scalar(value: torch.Tensor | float) -> torch.Tensor | float:
    """A stat as one number; tensors stay on the device (no sync) and non-scalars are averaged."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean()
    return float(value)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed)


def _rng_state() -> dict[str, Any]:
    # numpy's key array becomes a tensor so the file loads with weights_only=True.
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    key = numpy_state["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))


def _config_dict(config: FitConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # as it reads back from state.json


def _save_checkpoint(
    checkpoint_dir: Path,
    state: Mapping[str, Any],
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    guard: Callable[[], bool] | None = None,
    history: Sequence[tuple[int, Mapping[str, float]]] = (),
) -> Path | None:
    """Write ``step-{step:08d}/`` under a staging name, then rename it into place (atomic on one filesystem).

    None (nothing published) when ``guard()`` says no, or when a checkpoint of a newer generation (attempt)
    already holds that step."""
    target = checkpoint_dir / f"{CHECKPOINT_PREFIX}{state['step']:08d}"
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=checkpoint_dir))
    try:
        save_file(
            {name: parameter.detach().cpu().contiguous() for name, parameter in trainable.items()},
            str(staging / TRAINABLE_FILE),
        )
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), staging / SCHEDULER_FILE)
        torch.save(_rng_state(), staging / RNG_FILE)
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        recent = history[-HISTORY_STEPS:]
        (staging / HISTORY_FILE).write_text(json.dumps([[step, dict(metrics)] for step, metrics in recent]),
                                            encoding="utf-8")
        # Asked last, right before the rename, so the window in which a takeover can slip in is smallest.
        if (guard is not None and not guard()) or _newer_generation(target, state.get("attempt")):
            shutil.rmtree(staging, ignore_errors=True)
            logger.warning("checkpoint %s not published: this run no longer owns it", target)
            return None
        if target.exists():  # a step redone by a resumed run (same or newer generation): replace it
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.debug("checkpoint written: %s", target)
    return target


def _load_history(checkpoint: Path) -> list[tuple[int, dict[str, float]]]:
    """The per-step metrics saved with ``checkpoint`` (empty for a checkpoint written before they were)."""
    path = checkpoint / HISTORY_FILE
    if not path.is_file():
        return []
    return [(int(step), dict(metrics)) for step, metrics in json.loads(path.read_text(encoding="utf-8"))]


def _newer_generation(target: Path, generation: int | None) -> bool:
    """Whether ``target`` holds a checkpoint written by a newer generation (attempt) than ``generation``."""
    if generation is None or not (target / STATE_FILE).is_file():
        return False
    try:
        theirs = json.loads((target / STATE_FILE).read_text(encoding="utf-8")).get("attempt")
    except (OSError, ValueError):
        return False
    return isinstance(theirs, int) and theirs > generation


def _prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    for _, path in checkpoint_steps(checkpoint_dir)[:-keep]:
        shutil.rmtree(path)
        logger.debug("checkpoint pruned: %s", path)


def _remove_staging_folders(checkpoint_dir: Path) -> None:
    """Staging folders are what a crash during a save leaves behind; they are never a valid checkpoint."""
    for path in checkpoint_dir.glob(f"{_STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def _describe_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    names = sorted((set(saved) | set(current)) - _RESUMABLE_CHANGES)
    missing = "(absent)"
    return [
        f"{name}: checkpoint {saved.get(name, missing)!r}, now {current.get(name, missing)!r}"
        for name in names
        if saved.get(name, missing) != current.get(name, missing)
    ]


def _load_checkpoint(
    checkpoint: Path,
    config: FitConfig,
    num_items: int,
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNGs from ``checkpoint``; refuse one of a different run."""
    fresh_start = f"give this run a fresh checkpoint_dir (or delete {checkpoint.parent}) to start over"
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("fit_version") != FIT_VERSION:
        raise ValueError(
            f"checkpoint {checkpoint} was written by fit version {state.get('fit_version')!r}, this is "
            f"{FIT_VERSION}; it cannot be resumed exactly: {fresh_start}."
        )
    differences = _describe_differences(state["config"], _config_dict(config))
    if state["num_items"] != num_items:
        differences.append(f"number of train_items: checkpoint {state['num_items']}, now {num_items}")
    if differences:
        raise ValueError(
            f"checkpoint {checkpoint} belongs to a run with a different configuration "
            f"({'; '.join(differences)}), so resuming would not continue that run: restore those values, "
            f"or {fresh_start}."
        )

    tensors = load_file(str(checkpoint / TRAINABLE_FILE), device="cpu")
    if set(tensors) != set(trainable):
        unexpected, missing = sorted(set(tensors) - set(trainable)), sorted(set(trainable) - set(tensors))
        raise ValueError(
            f"checkpoint {checkpoint} trains other parameters than this model (in the checkpoint only: "
            f"{unexpected[:5]}; in the model only: {missing[:5]}); build the model the same way (same base, "
            f"same LoRA config) or {fresh_start}."
        )
    with torch.no_grad():
        for name, parameter in trainable.items():
            if tensors[name].shape != parameter.shape:
                raise ValueError(
                    f"checkpoint {checkpoint} has {name} of shape {tuple(tensors[name].shape)}, the model "
                    f"{tuple(parameter.shape)}; build the model the same way or {fresh_start}."
                )
            parameter.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    _set_rng_state(torch.load(checkpoint / RNG_FILE, map_location="cpu", weights_only=True))
    return state
