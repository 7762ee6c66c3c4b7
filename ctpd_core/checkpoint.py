"""Training checkpoints: the folder layout, saving and loading one, RNG state, metric history, generations.

A checkpoint is ``step-{step:08d}/`` under a training stage's ``checkpoint_dir``, published atomically
(:func:`ctpd_core.publish.publish_folder`), holding ``trainable.safetensors`` (the ``requires_grad``
parameters by name), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (torch CPU, CUDA, python ``random`` and
numpy states), ``state.json`` (step, epoch, position within the epoch, config, fit version, attempt) and
``metrics.json`` (the last ``HISTORY_STEPS`` steps' metrics, replayed on resume). Torch files are read with
``weights_only=True``. ``ctpd_core.train.fit`` decides when to save and what to do with a loaded one.

**Multi-rank runs** (``fit(dist=...)`` with more than one rank) write the same folder with the trainable tensors
and the optimizer state as ``torch.distributed.checkpoint`` (DCP) folders, ``trainable.dcp/`` and
``optimizer.dcp/``: every rank writes its own shards (FSDP2) or its share of the replicated tensors (DDP) into
rank 0's staging folder; after a barrier rank 0 writes the scheduler, RNG, state and metrics files and renames
the folder into place (the guard and the generation fence are asked there, and the outcome is broadcast).
Tensors are keyed by the *unwrapped* model's parameter names (``torch.distributed.checkpoint.state_dict`` strips
DDP's ``module.`` and the checkpoint wrapper's component), so both formats speak the same names and resume across
world sizes: DCP reshards on load (4 ranks -> 2, 2 -> 1 without any process group), and a single-process
checkpoint loads into a multi-rank run through the full-state-dict path of the same helpers. ``rng.pt`` is
rank 0's state and every rank restores it: ranks draw the same random numbers, as a fresh multi-rank run seeded
with the same seed does (data order never depends on the RNG; the method trains without dropout).
:func:`read_trainable_tensors` reads the weights of either format as full CPU tensors.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# The file names are the layout's, which the API reads without torch (ctpd_core.checkpoint_layout).
from ctpd_core.checkpoint_layout import (
    CHECKPOINT_PREFIX,
    DCP_OPTIMIZER_DIR,
    DCP_TRAINABLE_DIR,
    HISTORY_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    TRAINABLE_FILE,
)
from ctpd_core.distributed import DistContext
from ctpd_core.publish import publish_folder

logger = logging.getLogger(__name__)

FIT_VERSION = 1
"""Bumped whenever the checkpoint layout or the step arithmetic changes; a mismatch refuses to resume."""

HISTORY_STEPS = 10_000
"""Steps of metrics a checkpoint keeps: a sink can only have lost what an attempt buffered but never wrote,
and the worker's buffer holds at most 10,000 writes (about one per step), so older steps are never missing.
Bounded so that neither memory nor each checkpoint's size grows with the length of the run."""
_STAGING_PREFIX = ".staging-step-"

# Config fields that change when or how often checkpoints are written, not what the run computes: a resume may
# change them. Every other field must match the checkpoint's.
_RESUMABLE_CHANGES = frozenset({"checkpoint_every", "keep_checkpoints"})

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


def seed_everything(seed: int) -> None:
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
            "key": torch.from_numpy(np.asarray(key).astype(np.int64)),
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


def _write_small_files(
    staging: Path,
    state: Mapping[str, Any],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: Sequence[tuple[int, Mapping[str, float]]],
) -> None:
    """The files every format shares: scheduler, RNG (this process's), state and the metric history."""
    torch.save(scheduler.state_dict(), staging / SCHEDULER_FILE)
    torch.save(_rng_state(), staging / RNG_FILE)
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    recent = history[-HISTORY_STEPS:]
    (staging / HISTORY_FILE).write_text(json.dumps([[step, dict(metrics)] for step, metrics in recent]),
                                        encoding="utf-8")


def _target(checkpoint_dir: Path, state: Mapping[str, Any]) -> Path:
    return checkpoint_dir / f"{CHECKPOINT_PREFIX}{state['step']:08d}"


def save_checkpoint(
    checkpoint_dir: Path,
    state: Mapping[str, Any],
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    guard: Callable[[], bool] | None = None,
    history: Sequence[tuple[int, Mapping[str, float]]] = (),
) -> Path | None:
    """Publish ``step-{step:08d}/`` atomically (a resumed run's redo of a step replaces it).

    None (nothing published) when ``guard()`` says no, or when a checkpoint of a newer generation (attempt)
    already holds that step."""
    target = _target(checkpoint_dir, state)

    def write(staging: Path) -> None:
        save_file(
            {name: parameter.detach().cpu().contiguous() for name, parameter in trainable.items()},
            str(staging / TRAINABLE_FILE),
        )
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        _write_small_files(staging, state, scheduler, history)

    def may_publish() -> bool:
        return (guard is None or guard()) and not _newer_generation(target, state.get("attempt"))

    if not publish_folder(target, write, staging_prefix=_STAGING_PREFIX, may_publish=may_publish):
        logger.warning("checkpoint %s not published: this run no longer owns it", target)
        return None
    logger.debug("checkpoint written: %s", target)
    return target


def _trainable_state_dict(model: torch.nn.Module, names: Collection[str]) -> dict[str, Any]:
    """The model's trainable tensors under the unwrapped model's names (DTensor shards under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    everything = get_model_state_dict(model)
    missing = sorted(set(names) - set(everything))
    if missing:  # a wrapper whose name component torch's state-dict helpers do not strip
        raise ValueError(
            f"the prepared model's state dict lacks the trainable parameters {missing[:5]} under their unwrapped "
            "names; prepare the model with ctpd_core.distributed.prepare_model."
        )
    return {name: everything[name] for name in names}


def save_distributed_checkpoint(
    checkpoint_dir: Path,
    state: Mapping[str, Any],
    model: torch.nn.Module,
    trainable_names: Collection[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: DistContext,
    guard: Callable[[], bool] | None = None,
    history: Sequence[tuple[int, Mapping[str, float]]] = (),
) -> Path | None:
    """:func:`save_checkpoint` of a multi-rank run; every rank calls it (it is collective) and gets the same answer.

    Rank 0 makes the staging folder and tells the others; all ranks write their DCP shards into it; after a
    barrier (every rank's files are on disk) rank 0 writes the small files, asks ``guard()`` and the generation
    fence, and renames the folder into place. ``checkpoint_dir`` must be one folder every rank sees (one host,
    or shared storage)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    target = _target(checkpoint_dir, state)

    def write_shards(staging: Path) -> None:
        dcp.save(_trainable_state_dict(model, trainable_names), checkpoint_id=staging / DCP_TRAINABLE_DIR)
        dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=staging / DCP_OPTIMIZER_DIR)
        ctx.barrier()

    if not ctx.is_main:
        write_shards(Path(ctx.broadcast_object(None)))
        published = ctx.broadcast_object(None)
        return target if published else None

    def write(staging: Path) -> None:
        ctx.broadcast_object(str(staging))
        write_shards(staging)
        _write_small_files(staging, {**state, "world_size": ctx.world_size}, scheduler, history)

    def may_publish() -> bool:
        return (guard is None or guard()) and not _newer_generation(target, state.get("attempt"))

    published = publish_folder(target, write, staging_prefix=_STAGING_PREFIX, may_publish=may_publish)
    ctx.broadcast_object(published)
    if not published:
        logger.warning("checkpoint %s not published: this run no longer owns it", target)
        return None
    logger.debug("checkpoint written by %d ranks: %s", ctx.world_size, target)
    return target


def load_history(checkpoint: Path) -> list[tuple[int, dict[str, float]]]:
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


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    for _, path in checkpoint_steps(checkpoint_dir)[:-keep]:
        shutil.rmtree(path)
        logger.debug("checkpoint pruned: %s", path)


def remove_staging_folders(checkpoint_dir: Path) -> None:
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


def _check_state(checkpoint: Path, config: Mapping[str, Any], num_items: int) -> dict[str, Any]:
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("fit_version") != FIT_VERSION:
        raise ValueError(
            f"checkpoint {checkpoint} was written by fit version {state.get('fit_version')!r}, this is "
            f"{FIT_VERSION}; it cannot be resumed exactly: {_fresh_start(checkpoint)}."
        )
    differences = _describe_differences(state["config"], config)
    if state["num_items"] != num_items:
        differences.append(f"number of train_items: checkpoint {state['num_items']}, now {num_items}")
    if differences:
        raise ValueError(
            f"checkpoint {checkpoint} belongs to a run with a different configuration "
            f"({'; '.join(differences)}), so resuming would not continue that run: restore those values, "
            f"or {_fresh_start(checkpoint)}."
        )
    return state


def _fresh_start(checkpoint: Path) -> str:
    return f"give this run a fresh checkpoint_dir (or delete {checkpoint.parent}) to start over"


def _check_shapes(checkpoint: Path, shapes: Mapping[str, tuple[int, ...]],
                  trainable: Mapping[str, torch.nn.Parameter]) -> None:
    """The checkpoint trains the same tensors (names and full shapes) as this model."""
    if set(shapes) != set(trainable):
        unexpected, missing = sorted(set(shapes) - set(trainable)), sorted(set(trainable) - set(shapes))
        raise ValueError(
            f"checkpoint {checkpoint} trains other parameters than this model (in the checkpoint only: "
            f"{unexpected[:5]}; in the model only: {missing[:5]}); build the model the same way (same base, "
            f"same LoRA config) or {_fresh_start(checkpoint)}."
        )
    for name, parameter in trainable.items():
        if tuple(shapes[name]) != tuple(parameter.shape):  # a DTensor's shape is the full one
            raise ValueError(
                f"checkpoint {checkpoint} has {name} of shape {tuple(shapes[name])}, the model "
                f"{tuple(parameter.shape)}; build the model the same way or {_fresh_start(checkpoint)}."
            )


def _dcp_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    return {name: tuple(item.size) for name, item in metadata.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)}


def is_distributed_checkpoint(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was written by a multi-rank run (DCP folders rather than single files)."""
    return (Path(checkpoint) / DCP_TRAINABLE_DIR).is_dir()


def load_checkpoint(
    checkpoint: Path,
    config: Mapping[str, Any],
    num_items: int,
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    model: torch.nn.Module | None = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNGs from ``checkpoint``; refuse one of a different run
    (``config``: the run's FitConfig as a JSON-shaped dict, compared with the one the checkpoint recorded).

    ``trainable`` is keyed by the unwrapped model's names, in the optimizer's parameter order. ``model`` (the
    module being trained, wrapped or not) is needed for a multi-rank checkpoint and in a multi-rank run
    (``distributed``: every rank calls this, it is collective); a single-process checkpoint loaded by a single
    process goes through the plain state dicts, as it always did."""
    state = _check_state(checkpoint, config, num_items)
    if is_distributed_checkpoint(checkpoint) or distributed:
        if model is None:
            raise ValueError(f"checkpoint {checkpoint} is loaded through torch.distributed.checkpoint, which "
                             "needs the model being trained: pass model=.")
        _load_through_state_dict_helpers(checkpoint, model, trainable, optimizer)
    else:
        tensors = load_file(str(checkpoint / TRAINABLE_FILE), device="cpu")
        _check_shapes(checkpoint, {name: tuple(tensor.shape) for name, tensor in tensors.items()}, trainable)
        with torch.no_grad():
            for name, parameter in trainable.items():
                parameter.copy_(tensors[name])
        optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    # Rank 0's RNG state (a multi-rank checkpoint's) on every rank: the ranks of a run draw the same numbers.
    _set_rng_state(torch.load(checkpoint / RNG_FILE, map_location="cpu", weights_only=True))
    return state


def _load_through_state_dict_helpers(
    checkpoint: Path,
    model: torch.nn.Module,
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
) -> None:
    """Weights and optimizer state through ``torch.distributed.checkpoint.state_dict``, which maps the unwrapped
    names onto DDP / FSDP2 / plain modules: a DCP checkpoint is resharded to this world size by ``dcp.load`` (no
    process group needed for one process); a single-file one is the full state, which every rank distributes to
    its shards (``full_state_dict=True``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if is_distributed_checkpoint(checkpoint):
        _check_shapes(checkpoint, _dcp_shapes(checkpoint / DCP_TRAINABLE_DIR), trainable)
        weights = _trainable_state_dict(model, list(trainable))
        with _single_process_dcp():  # only silences the warning of a load without a process group
            dcp.load(weights, checkpoint_id=checkpoint / DCP_TRAINABLE_DIR)
            set_model_state_dict(model, weights, options=StateDictOptions(strict=False))
            optimizer_state = get_optimizer_state_dict(model, optimizer)
            dcp.load(optimizer_state, checkpoint_id=checkpoint / DCP_OPTIMIZER_DIR)
        set_optimizer_state_dict(model, optimizer, optimizer_state)
        return
    full = StateDictOptions(full_state_dict=True, strict=False)
    tensors: dict[str, Any] = load_file(str(checkpoint / TRAINABLE_FILE), device="cpu")
    _check_shapes(checkpoint, {name: tuple(tensor.shape) for name, tensor in tensors.items()}, trainable)
    set_model_state_dict(model, tensors, options=full)
    # The single-process optimizer file numbers the parameters in the optimizer's order, which is trainable's.
    by_index = torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    names = list(trainable)
    by_name: dict[str, Any] = {
        "state": {names[index]: value for index, value in by_index["state"].items()},
        "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                         for group in by_index["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=full)


def read_trainable_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``checkpoint`` as full CPU tensors by the unwrapped model's parameter names, from
    either format (a multi-rank checkpoint is assembled from its shards in this process, without any process
    group), e.g. to build a model folder from a checkpoint."""
    checkpoint = Path(checkpoint)
    if not is_distributed_checkpoint(checkpoint):
        return load_file(str(checkpoint / TRAINABLE_FILE), device="cpu")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = checkpoint / DCP_TRAINABLE_DIR
    metadata = FileSystemReader(str(folder)).read_metadata()
    tensors = {
        name: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for name, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }
    with _single_process_dcp():
        dcp.load(tensors, checkpoint_id=folder, no_dist=True)
    return tensors


@contextmanager
def _single_process_dcp() -> Iterator[None]:
    """DCP warns that it "assumes the intent is to load in a single process" when no process group is up: here
    that is the intent (a multi-rank checkpoint read by one process), so the warning is noise in the job's log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        yield
