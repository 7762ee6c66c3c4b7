"""Training checkpoints: the folder layout, saving and loading one, RNG state, metric history, generations.

A checkpoint is ``step-{step:08d}/`` under a training stage's ``checkpoint_dir``, published atomically
(:func:`ctpd_core.publish.publish_folder`), holding ``trainable.safetensors`` (the ``requires_grad``
parameters by name), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (torch CPU, CUDA, python ``random`` and
numpy states), ``state.json`` (step, epoch, position within the epoch, config, fit version, attempt) and
``metrics.json`` (the last ``HISTORY_STEPS`` steps' metrics, replayed on resume). Torch files are read with
``weights_only=True``. ``ctpd_core.train.fit`` decides when to save and what to do with a loaded one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# The file names are the layout's, which the API reads without torch (ctpd_core.checkpoint_layout).
from ctpd_core.checkpoint_layout import (
    CHECKPOINT_PREFIX,
    HISTORY_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    TRAINABLE_FILE,
)
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
    target = checkpoint_dir / f"{CHECKPOINT_PREFIX}{state['step']:08d}"

    def write(staging: Path) -> None:
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

    def may_publish() -> bool:
        return (guard is None or guard()) and not _newer_generation(target, state.get("attempt"))

    if not publish_folder(target, write, staging_prefix=_STAGING_PREFIX, may_publish=may_publish):
        logger.warning("checkpoint %s not published: this run no longer owns it", target)
        return None
    logger.debug("checkpoint written: %s", target)
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


def load_checkpoint(
    checkpoint: Path,
    config: Mapping[str, Any],
    num_items: int,
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNGs from ``checkpoint``; refuse one of a different run
    (``config``: the run's FitConfig as a JSON-shaped dict, compared with the one the checkpoint recorded)."""
    fresh_start = f"give this run a fresh checkpoint_dir (or delete {checkpoint.parent}) to start over"
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("fit_version") != FIT_VERSION:
        raise ValueError(
            f"checkpoint {checkpoint} was written by fit version {state.get('fit_version')!r}, this is "
            f"{FIT_VERSION}; it cannot be resumed exactly: {fresh_start}."
        )
    differences = _describe_differences(state["config"], config)
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
