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
  LoRA-wrapped model trains its adapters only. ``group_learning_rates`` ((name prefix, lr) pairs) gives the
  parameters whose name starts with a prefix their own base rate (the longest matching prefix wins), e.g. a
  fresh DSKD projector beside a pre-trained student; the others stay in the first group at ``learning_rate``,
  every group has the same weight decay, and the schedule scales every group by the same factor. Gradients are clipped to ``max_grad_norm``. The learning rate
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
* **Metrics** (one ``observer.metrics(stage, step, metrics)`` per step): ``loss`` (batch mean), ``grad_norm``
  (pre-clip), ``learning_rate`` (the base one this step used), ``epoch`` (fractional), ``step_seconds``, the mean
  over micro-batches of every ``loss_fn`` stat (weighted by micro-batch size, so per-example stats average to
  the batch mean; non-scalar tensors are averaged first), except ``tokens``, a count, which is summed over the
  step and also gives ``tokens_per_second``. fit's own names win over a stat of the same name.
* **Checkpoints** every ``checkpoint_every`` steps, at the end and when stopping, each reported with
  ``observer.checkpoint``: ``step-{step:08d}/``, published atomically, so a crash never leaves a half
  checkpoint (layout: :mod:`ctpd_core.checkpoint`; only the ``requires_grad`` parameters: everything for full
  fine-tuning, the adapters for LoRA). The newest ``keep_checkpoints`` are kept.
* **Resume.** If ``checkpoint_dir`` holds a checkpoint, fit loads the newest one into the (freshly built,
  identically initialised) model, optimizer, scheduler and RNGs and continues from its step: the per-step
  losses equal those of an uninterrupted run. Only trainable parameters are stored, so frozen weights and
  buffers must come from the caller's model building as before. A checkpoint written with a different config
  (``checkpoint_every`` and ``keep_checkpoints`` aside: they don't change the trajectory) or a different
  number of items is refused; fit cannot see *which* items it is given, so one ``checkpoint_dir`` per stage and
  dataset is the caller's job. A finished run resumes at its last step and returns at once, with the trained
  weights loaded into the model: calling fit twice is safe (a job delivered twice redoes nothing).
* **Stop and progress.** ``stop.should_stop()`` is polled after every optimizer step (never
  mid-accumulation), the last one included: a stop that arrives during the last step still raises
  :class:`~ctpd_core.observe.Stopped` (after the final checkpoint), so a cancelled run never goes on as if it
  had finished. On stop fit checkpoints and raises ``Stopped(stage, step, checkpoint)``. ``observer.progress``
  gets a ``Progress`` when the loop starts (``eta_seconds=None``) and after every step (ETA from the mean wall
  time per step so far, checkpoint writes included).
* **Metric history.** Every checkpoint also holds ``metrics.json``: the metrics of its last ``HISTORY_STEPS``
  steps. On resume ``observer.replay_metrics(stage, history)`` is called once with them, before the first new
  step: the steps before the checkpoint are not run again, so an observer that lost some of their metrics (an
  attempt that died with its writes unflushed) can restore them.
* **Fenced checkpoints.** With ``generation`` (the worker passes the job's attempt), every checkpoint records
  it, and a save never replaces a checkpoint of a *newer* generation: a process that was paused and resumed
  after another attempt took over cannot overwrite its successor's state. ``checkpoint_guard()`` is asked
  just before each checkpoint is renamed into place; False discards it (the caller lost the right to
  write) and fit stops at once with ``Stopped``.

* **Data parallel** (``dist``, a :class:`~ctpd_core.distributed.DistContext` of more than one rank; every
  rank calls fit with the same arguments). The model and its loss are wrapped together
  (:class:`~ctpd_core.distributed.TrainingStep`, so ``loss_fn`` gets the plain model and may use its parts)
  by :func:`~ctpd_core.distributed.prepare_model` (``strategy`` ``"ddp"`` or ``"fsdp"``,
  ``activation_checkpointing``) on ``dist.device`` (``device`` is ignored). Each step's *global* batch is the
  single-process one (same order from (seed, epoch)); rank ``r`` takes its contiguous share
  (:func:`~ctpd_core.distributed.shard_bounds`), so ``batch_size`` must be a multiple of
  ``world_size * micro_batch_size`` and the shares are equal. Each micro-batch loss is scaled by
  ``len(micro) / len(share)``: DDP and FSDP *average* gradients over ranks, so the reduced gradient is that
  of the global batch mean and the trajectory equals the single-process one within float tolerance.
  Gradients are reduced once per step (``no_sync()`` / ``set_requires_gradient_sync(False)`` for all
  micro-batches but the last). A dataset smaller than one batch is split into ``num_items // world_size``
  items per rank (the other ``num_items % world_size`` sit out, as ``drop_last`` leaves an epoch's tail out;
  a set smaller than the world is refused). ``loss`` and the ``loss_fn`` stats are averaged over ranks,
  ``tokens`` summed, ``grad_norm`` is the norm of the full gradient; only rank 0 reports to the observer;
  every rank polls ``stop`` and all stop at the same step if any of them says so. Checkpoints are
  ``torch.distributed.checkpoint`` folders (:mod:`ctpd_core.checkpoint`) that resume on any world size, one
  process included; a single-process checkpoint resumes on several ranks. With ``fsdp`` the model's
  parameters are left sharded (DTensors) on return: gather them with ``get_model_state_dict(model,
  options=StateDictOptions(full_state_dict=True, cpu_offload=True))`` (collective: every rank calls it), or
  read ``FitResult.checkpoint`` with :func:`~ctpd_core.checkpoint.read_trainable_tensors`. ``dist=None`` or a
  world of one is the single-process loop and format, unchanged.

A fresh run seeds torch, python ``random`` and numpy with ``config.seed`` (method §6: all three are seeded at
the start of training; every rank the same); a resumed run restores their saved states instead (rank 0's, on
every rank).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ctpd_core.checkpoint import (
    FIT_VERSION,
    HISTORY_STEPS,
    latest_checkpoint,
    load_checkpoint,
    load_history,
    prune_checkpoints,
    remove_staging_folders,
    save_checkpoint,
    save_distributed_checkpoint,
    seed_everything,
)
from ctpd_core.distributed import (
    DistContext,
    DistStrategy,
    TrainingStep,
    apply_block_checkpointing,
    is_distributed,
    prepare_model,
    set_gradient_sync,
    shard_bounds,
    unwrapped_name,
)
from ctpd_core.inference import autocast_factory
from ctpd_core.observe import NeverStop, NullObserver, Observer, Progress, Stopped, StopToken
from ctpd_core.spec import LrSchedule, Precision, TrainingSpec

logger = logging.getLogger(__name__)

_SCHEDULES = ("cosine", "linear", "constant")
_PRECISIONS = ("auto", "fp32", "bf16")


LossFn = Callable[[torch.nn.Module, Sequence[Any]], tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]]
"""``loss_fn(model, micro_batch_items) -> (scalar mean loss, stats)``; stats may include a ``tokens`` count."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _largest_divisor(number: int, at_most: int) -> int:
    return max(divisor for divisor in range(1, min(number, at_most) + 1) if number % divisor == 0)


def _training_default(name: str) -> Any:
    return TrainingSpec.model_fields[name].default


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings of one training stage. The defaults are the JobSpec's ``training`` defaults, read
    from the spec (the one place they live): the recipe always passes every field; tests and library callers
    may leave out what they don't vary."""

    learning_rate: float
    lr_schedule: LrSchedule = _training_default("lr_schedule")
    warmup_ratio: float = _training_default("warmup_ratio")
    epochs: float = _training_default("epochs")
    max_steps: int | None = _training_default("max_steps")  # overrides epochs when set
    batch_size: int = _training_default("batch_size")  # items per optimizer step
    micro_batch_size: int = _training_default("micro_batch_size")  # per forward/backward; divides batch_size
    max_grad_norm: float = _training_default("max_grad_norm")  # math.inf disables clipping (norm still reported)
    weight_decay: float = _training_default("weight_decay")
    precision: Precision = _training_default("precision")
    seed: int = _training_default("seed")
    checkpoint_every: int = _training_default("checkpoint_every")  # optimizer steps
    keep_checkpoints: int = 2  # not a spec field: how many resume points a stage keeps on disk
    # Not a spec field: (parameter-name prefix, base lr) pairs, for parameters that learn at their own rate (a
    # fresh projector beside a pre-trained student). Names are the unwrapped model's (as checkpoints store them).
    group_learning_rates: tuple[tuple[str, float], ...] = ()

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
        _validate_group_learning_rates(self.group_learning_rates)


@dataclass(frozen=True)
class FitResult:
    """How a finished fit() call ended (a stopped one raises ``Stopped``); the trained weights are in the model
    (and in ``checkpoint``)."""

    steps: int  # optimizer steps done in total (including those before a resume)
    total_steps: int
    resumed_from: int | None  # the step of the checkpoint this call resumed from
    last_metrics: dict[str, float]  # of the last step (read from the checkpoint if this call ran none)
    checkpoint: Path | None  # the newest checkpoint folder


@dataclass(frozen=True)
class StepPlan:
    """The step arithmetic of a run, for fit and for callers that report totals before training starts."""

    batch_size: int  # items per step (all ranks): config.batch_size, or the dataset if it is smaller (see fit)
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(config: FitConfig, num_items: int, world_size: int = 1) -> StepPlan:
    """How many optimizer steps ``fit`` will take over ``num_items`` items with ``config`` on ``world_size``
    ranks (the global batch is split over them; see fit)."""
    if not _is_int(num_items) or num_items < 1:
        raise ValueError(f"the training set is empty (num_items={num_items!r}); give fit at least one item.")
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}.")
    batch_size = min(config.batch_size, num_items)
    if world_size > 1:
        per_step = world_size * config.micro_batch_size
        if config.batch_size % per_step:
            raise ValueError(
                f"batch_size {config.batch_size} is not a multiple of world_size * micro_batch_size "
                f"({world_size} * {config.micro_batch_size} = {per_step}): every rank takes an equal share of "
                f"each batch; use batch_size {per_step * max(1, round(config.batch_size / per_step))}."
            )
        if num_items < world_size:
            raise ValueError(
                f"{num_items} training items cannot be shared by {world_size} ranks (each needs at least one per "
                "step); train on fewer devices or give more items."
            )
        # A dataset smaller than one batch: equal shares, so the last num_items % world_size items sit out.
        batch_size -= batch_size % world_size
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


def fit(
    model: torch.nn.Module,
    train_items: Sequence[Any],
    loss_fn: LossFn,
    config: FitConfig,
    checkpoint_dir: Path,
    *,
    stage: str,
    observer: Observer | None = None,
    stop: StopToken | None = None,
    device: torch.device | str = "cpu",
    checkpoint_guard: Callable[[], bool] | None = None,
    generation: int | None = None,
    dist: DistContext | None = None,
    strategy: DistStrategy = "ddp",
    activation_checkpointing: bool = False,
) -> FitResult:
    """Train the ``requires_grad`` parameters of ``model`` on ``train_items`` by minimising ``loss_fn``.

    Resumes from the newest checkpoint in ``checkpoint_dir`` if there is one (see the module docstring for the
    full contract). fit moves the model to ``device``; ``loss_fn`` moves its items there. On return the model
    holds the trained weights, back in the train/eval mode it came in. ``stage`` names the loop in every
    report (``distill``, ``contrastive:positive``); a stop raises :class:`~ctpd_core.observe.Stopped`.
    With ``dist`` of several ranks every rank calls fit alike (data parallel; see the module docstring).
    """
    observer, stop = observer or NullObserver(), stop or NeverStop()
    if not isinstance(config, FitConfig):
        raise ValueError(f"config must be a FitConfig, got {type(config).__name__}.")
    if len(train_items) == 0:
        raise ValueError("train_items is empty; give fit at least one encoded example.")
    # The ranks of a data-parallel run; None (dist None or a world of one) is the single-process loop, unchanged.
    ranks = dist if dist is not None and is_distributed(dist) else None
    distributed = ranks is not None
    plan = plan_steps(config, len(train_items), 1 if ranks is None else ranks.world_size)
    device = torch.device(device) if ranks is None else ranks.device
    autocast = autocast_factory(config.precision, device)
    checkpoint_dir = Path(checkpoint_dir)
    if ranks is not None and not ranks.is_main:
        observer = NullObserver()  # rank 0 alone reports; every rank still polls the stop token

    model.to(device)
    _trainable_parameters(model)  # checked before wrapping, so the errors name the caller's parameters
    _warn_on_active_dropout(model)
    # What a micro-batch calls: the loss on the model, as one module that DDP / FSDP2 wrap (so loss_fn may use
    # the model's parts, not only its forward; see TrainingStep). Single-process, loss_fn(model, ...) directly.
    step_module: Callable[[Sequence[Any]], tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]]
    if ranks is not None:
        step_module = prepare_model(TrainingStep(model, loss_fn), ctx=ranks, strategy=strategy,
                                    precision=config.precision, activation_checkpointing=activation_checkpointing)
    else:
        if activation_checkpointing:
            apply_block_checkpointing(model)
        step_module = partial(loss_fn, model)
    # By the unwrapped model's names (what both checkpoint formats store), in the optimizer's parameter order.
    trainable = {unwrapped_name(name, model): parameter for name, parameter in _trainable_parameters(model).items()}
    # Built before any resume so the state dicts load into the same structure that wrote them.
    param_groups = parameter_groups(trainable, config.learning_rate, config.group_learning_rates)
    if not config.group_learning_rates:  # today's one group, built exactly as before
        optimizer = torch.optim.AdamW(
            trainable.values(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
    else:
        # The groups' order is the optimizer's parameter order, which the checkpoint formats number by.
        trainable = {name: trainable[name] for group in param_groups for name in group["names"]}
        optimizer = torch.optim.AdamW(
            [{"params": [trainable[name] for name in group["names"]], "lr": group["lr"]} for group in param_groups],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
    scheduler = build_scheduler(
        optimizer, schedule=config.lr_schedule, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps
    )

    checkpoint: Path | None = None
    if ranks is None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_staging_folders(checkpoint_dir)
        checkpoint = latest_checkpoint(checkpoint_dir)
    else:  # rank 0 sweeps and picks the resume point, so no rank sees a different folder
        if ranks.is_main:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            remove_staging_folders(checkpoint_dir)
            checkpoint = latest_checkpoint(checkpoint_dir)
        picked = ranks.broadcast_object(None if checkpoint is None else str(checkpoint))
        checkpoint = None if picked is None else Path(picked)
    if checkpoint is None:
        seed_everything(config.seed)
        start_step, resumed_from, last_metrics = 0, None, {}
        history: list[tuple[int, dict[str, float]]] = []
    else:
        state = load_checkpoint(checkpoint, _config_dict(config), len(train_items), trainable, optimizer, scheduler,
                                model=model, distributed=distributed)
        start_step = resumed_from = state["step"]
        last_metrics = dict(state.get("last_metrics", {}))
        history = load_history(checkpoint)
        logger.info("%s: resuming from %s (step %d of %d)", stage, checkpoint, start_step, plan.total_steps)
        if history:
            # The steps before the checkpoint are not run again, so their metrics come from the checkpoint: an
            # observer that lost some of them (an attempt that died with its writes unflushed) gets them back.
            observer.replay_metrics(stage, list(history))
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
        if ranks is not None:
            path = save_distributed_checkpoint(checkpoint_dir, state, model, list(trainable), optimizer,
                                               scheduler, ranks, guard=checkpoint_guard, history=history)
        else:
            path = save_checkpoint(checkpoint_dir, state, trainable, optimizer, scheduler, guard=checkpoint_guard,
                                   history=history)
        if path is None:
            refused = True
            return None
        if ranks is None or ranks.is_main:
            prune_checkpoints(checkpoint_dir, config.keep_checkpoints)
        observer.checkpoint(stage, step, path)
        return path

    logger.info(
        "%s: %d items, %d steps (%d per epoch, batch %d, micro-batch %d), %d warmup, %d trainable tensors",
        *(stage, len(train_items), plan.total_steps, plan.steps_per_epoch, plan.batch_size),
        *(config.micro_batch_size, plan.warmup_steps, len(trainable)),
    )
    observer.progress(Progress(stage, start_step, plan.total_steps, None))

    was_training = model.training
    model.train()
    step = start_step
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
            if ranks is not None:  # this rank's share of the global batch
                share_range = shard_bounds(len(batch), ranks.rank, ranks.world_size)
                batch = batch[share_range.start : share_range.stop]

            # ---- one optimizer step: accumulate the batch-mean gradient over micro-batches
            optimizer.zero_grad(set_to_none=True)
            loss_sum: torch.Tensor | float = 0.0
            stat_sums: dict[str, torch.Tensor | float] = {}
            tokens: torch.Tensor | float | None = None
            starts = range(0, len(batch), config.micro_batch_size)
            for start in starts:
                micro_items = [train_items[index] for index in batch[start : start + config.micro_batch_size]]
                # micro-batch mean → batch mean (this rank's share; DDP/FSDP average the shares' gradients)
                share = len(micro_items) / len(batch)
                with _gradient_sync(step_module, enabled=not distributed or start == starts[-1]):
                    with autocast():
                        loss, stats = step_module(micro_items)
                    _check_loss(loss, step)
                    (loss * share).backward()
                loss_sum = loss_sum + loss.detach().float() * share
                for name, value in stats.items():
                    if name == "tokens":
                        tokens = _as_scalar(value) + (0.0 if tokens is None else tokens)
                    else:
                        stat_sums[name] = stat_sums.get(name, 0.0) + _as_scalar(value) * share
            if ranks is not None:
                loss_sum, stat_sums, tokens = _reduce_step_metrics(ranks, loss_sum, stat_sums, tokens)
                grad_norm = _clip_full_gradient(list(trainable.values()), config.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            # The base rate this step uses (LambdaLR's own product; the first group need not be the base one)
            learning_rate = config.learning_rate * lr_multiplier(
                scheduler.last_epoch, schedule=config.lr_schedule, warmup_steps=plan.warmup_steps,
                total_steps=plan.total_steps,
            )
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
            observer.metrics(stage, step, dict(last_metrics))

            if step % config.checkpoint_every == 0 or step == plan.total_steps:
                saved = save(step)
                if saved is not None:
                    checkpoint, saved_step = saved, step
            seconds_per_step = (time.perf_counter() - loop_start) / (step - start_step)
            observer.progress(Progress(stage, step, plan.total_steps, seconds_per_step * (plan.total_steps - step)))
            # The last step too: a stop that arrives during it must not let the run end as if it had finished.
            # Every rank asks its token and they agree (a refusal is rank 0's, already broadcast by the save).
            wants_stop = refused or stop.should_stop()
            if ranks is not None:
                wants_stop = ranks.any_true(wants_stop)
            if wants_stop:
                if saved_step != step and not refused:
                    saved = save(step)
                    checkpoint = saved if saved is not None else checkpoint
                logger.info(
                    "%s: stopped at step %d of %d; checkpoint %s", stage, step, plan.total_steps, checkpoint
                )
                raise Stopped(stage, step, checkpoint)
    finally:
        model.train(was_training)

    return FitResult(
        steps=step,
        total_steps=plan.total_steps,
        resumed_from=resumed_from,
        last_metrics=last_metrics,
        checkpoint=checkpoint,
    )


# ------------------------------------------------------------------------------------------------ helpers


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
    config_items = config.to_dict().items() if config is not None and hasattr(config, "to_dict") else ()
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


@contextmanager
def _gradient_sync(model: object, *, enabled: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: whether its backward reduces gradients over ranks. DDP
    has ``no_sync()``; FSDP2 a flag set before the forward. A plain module always "syncs" (nothing to do)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with nullcontext() if enabled else model.no_sync():
            yield
        return
    if isinstance(model, torch.nn.Module):
        set_gradient_sync(model, enabled)
    yield


def _reduce_step_metrics(
    dist: DistContext,
    loss_sum: torch.Tensor | float,
    stat_sums: dict[str, torch.Tensor | float],
    tokens: torch.Tensor | float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float], torch.Tensor | None]:
    """One all-reduce for the step's figures: loss and stats averaged over ranks (equal shares, so the mean of
    the ranks' means is the global batch mean), tokens summed. Every rank's loss_fn reports the same stats."""
    names = sorted(stat_sums)
    values = [loss_sum, *(stat_sums[name] for name in names), 0.0 if tokens is None else tokens]
    stacked = torch.stack([torch.as_tensor(value, dtype=torch.float32, device=dist.device).reshape(())
                           for value in values])
    reduced = dist.all_reduce_mean(stacked)
    reduced_stats: dict[str, torch.Tensor | float] = {name: reduced[1 + index] for index, name in enumerate(names)}
    return reduced[0], reduced_stats, None if tokens is None else reduced[-1] * dist.world_size


def _clip_full_gradient(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for sharded gradients: the norm of the *full* gradient (FSDP2's is a DTensor, made a
    plain tensor by ``full_tensor()``, which reduces over the shards), then every shard scaled by it."""
    from torch.distributed.tensor import DTensor

    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm


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


def _config_dict(config: FitConfig) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    if not values["group_learning_rates"]:
        # Without groups the recorded config is what it was before the field existed, so checkpoints written
        # then still resume (a missing key would read as a changed configuration).
        del values["group_learning_rates"]
    return json.loads(json.dumps(values))  # as it reads back from state.json


def _validate_group_learning_rates(pairs: object) -> None:
    if not isinstance(pairs, tuple | list):
        raise ValueError(
            f"group_learning_rates must be a tuple of (parameter-name prefix, learning rate) pairs, got {pairs!r}; "
            "e.g. (('projector.', 1e-3),)."
        )
    seen: set[str] = set()
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(
                f"group_learning_rates entry {pair!r} is not a (prefix, learning rate) pair; e.g. ('projector.', 1e-3)."
            )
        prefix, rate = pair
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(
                f"group_learning_rates prefix {prefix!r} must be a non-empty string naming parameters (e.g. 'projector.')."
            )
        if prefix in seen:
            raise ValueError(f"group_learning_rates names the prefix {prefix!r} twice; give each prefix one rate.")
        seen.add(prefix)
        if not _is_number(rate) or not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"the learning rate of group {prefix!r} must be a finite number > 0, got {rate!r}.")


def parameter_groups(
    names: Mapping[str, object] | Sequence[str], base_rate: float, group_rates: Sequence[tuple[str, float]]
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups as ``{"names": [...], "lr": rate}``, base group first.

    A name goes to the group of the longest prefix it starts with (so ``projector.`` and ``projector.query.``
    can differ), else to the base group at ``base_rate``; names keep their order within a group. The base group
    is left out when every name matched a prefix (``torch.distributed.checkpoint``'s optimizer state helpers
    drop an empty group's settings). A prefix that matches no name is refused: it is almost always a misspelt
    name, and its parameters would silently train at the base rate.
    """
    ordered = sorted(group_rates, key=lambda pair: len(pair[0]), reverse=True)
    groups: dict[str, list[str]] = {prefix: [] for prefix, _ in group_rates}
    base: list[str] = []
    for name in names:
        prefix = next((prefix for prefix, _ in ordered if name.startswith(prefix)), None)
        (base if prefix is None else groups[prefix]).append(name)
    unmatched = [prefix for prefix, members in groups.items() if not members]
    if unmatched:
        examples = ", ".join(list(names)[:3])
        raise ValueError(
            f"group_learning_rates prefix {unmatched[0]!r} matches no trainable parameter (names look like "
            f"{examples}); use a prefix of those names."
        )
    base_group = [{"names": base, "lr": base_rate}] if base or not group_rates else []
    return base_group + [{"names": groups[prefix], "lr": float(rate)} for prefix, rate in group_rates]
