"""Where a job's training checkpoints live on disk, and the names the API gives them. Torch-free: the API lists
and serves them from these folders, the worker writes them (``ctpd_core.checkpoint``, ``worker.recipe``).

* **While a stage trains**, a checkpoint is ``<run_dir>/<stage>/step-NNNNNNNN/`` (``ctpd_core.checkpoint``):
  ``trainable.safetensors`` (the ``requires_grad`` parameters), ``state.json``, ``metrics.json`` and the
  resume-only optimizer, scheduler and RNG files. A checkpoint of a multi-rank run holds ``trainable.dcp/`` and
  ``optimizer.dcp/`` (``torch.distributed.checkpoint`` folders) in place of the weights and optimizer files. ``fit`` keeps the newest ``keep_checkpoints`` of them.
* **Once the student is exported**, the recipe keeps the distill checkpoints that are still on disk as
  ``<run_dir>/checkpoints/<id>/`` without their resume-only files (AdamW's moments alone are twice the weights),
  so any of them can still be turned into a model after the job, at about the weights' size each. A checkpoint
  that ``keep_checkpoints`` pruned is gone for good.
* **A materialised checkpoint** (a Hugging Face folder built from the base model and the checkpoint's tensors,
  ``worker.recipe.materialize_checkpoint``) is ``<checkpoint folder>/model/``, published atomically, so it goes
  wherever its checkpoint goes (moved with it, pruned with it).

Ids are ``<stage>-<step:08d>`` (``distill-00000040``): URL-safe, and the same before and after the move. Only the
student's (``distill``) checkpoints are named: the π+/π− checkpoints of the contrastive stage are resume points of
teacher-sized models, deleted as soon as π± is published in the stage cache (which jobs of every tenant share),
so the API neither lists nor serves them.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_PREFIX = "step-"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
HISTORY_FILE = "metrics.json"  # the last steps' metrics up to the checkpoint, for replay on resume
RESUME_ONLY_FILES = (OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE)
# A checkpoint written by several ranks (torch.distributed.checkpoint) holds the trainable tensors and the optimizer
# state as two DCP folders (one file per rank and a ``.metadata``) in place of the two files above.
DCP_TRAINABLE_DIR = "trainable.dcp"
DCP_OPTIMIZER_DIR = "optimizer.dcp"
DCP_METADATA_FILE = ".metadata"
RESUME_ONLY_DIRS = (DCP_OPTIMIZER_DIR,)

KEPT_DIR = "checkpoints"  # under a run folder: the checkpoints kept after the export
MODEL_DIR = "model"  # under a checkpoint folder: its materialised model
MODEL_STAGING_PREFIX = ".model-"  # a model being written next to MODEL_DIR (held by its writer)
LISTED_STAGES = ("distill",)

_ID = re.compile(r"^(?P<stage>[a-z]+)-(?P<step>\d{8})$")


def run_folder(artifact_root: Path, job_id: str) -> Path:
    """A job's run folder (the worker's ``RunContext.run_dir``)."""
    return Path(artifact_root) / "jobs" / job_id


def checkpoint_id(stage: str, step: int) -> str:
    return f"{stage}-{step:08d}"


def parse_checkpoint_id(value: str) -> tuple[str, int] | None:
    """``(stage, step)`` of an id this module gave, or None for anything else (a listed stage only)."""
    match = _ID.match(value)
    if match is None or match.group("stage") not in LISTED_STAGES:
        return None
    return match.group("stage"), int(match.group("step"))


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint's trainable tensors, in either format (one file, or a DCP folder)."""
    return (folder / TRAINABLE_FILE).is_file() or (folder / DCP_TRAINABLE_DIR / DCP_METADATA_FILE).is_file()


def _is_complete(folder: Path) -> bool:
    """A published checkpoint: a real folder (no symlink) with its weights and state (staging folders are named
    otherwise, and a checkpoint is renamed into place whole)."""
    return folder.is_dir() and not folder.is_symlink() and has_weights(folder) and (folder / STATE_FILE).is_file()


@dataclass(frozen=True)
class StoredCheckpoint:
    stage: str
    step: int
    folder: Path
    kept: bool  # True: kept after the export (no resume-only files); False: a live resume point

    @property
    def id(self) -> str:
        return checkpoint_id(self.stage, self.step)

    @property
    def model_folder(self) -> Path:
        return self.folder / MODEL_DIR

    def model_ready(self) -> bool:
        model = self.model_folder
        return model.is_dir() and not model.is_symlink() and (model / "config.json").is_file()

    def size_bytes(self) -> int:
        """Bytes on disk of the checkpoint itself (its materialised model, if any, not counted)."""
        return folder_bytes(self.folder, skip={MODEL_DIR})


def folder_bytes(folder: Path, skip: set[str] | frozenset[str] = frozenset()) -> int:
    """Bytes of the regular files under ``folder`` (symlinks not followed), leaving out the top-level ``skip``
    names and staging folders."""
    total = 0
    for root, dirs, names in os.walk(folder, followlinks=False):
        if Path(root) == folder:
            dirs[:] = [name for name in dirs if name not in skip and not name.startswith(".")]
        for name in names:
            path = Path(root) / name
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue  # pruned meanwhile
            if not path.is_symlink() and path.is_file():
                total += info.st_size
    return total


def find_checkpoint(run_dir: Path, stage: str, step: int) -> StoredCheckpoint | None:
    """The checkpoint of ``stage`` at ``step`` that is on disk now (kept, or still a live resume point)."""
    kept = Path(run_dir) / KEPT_DIR / checkpoint_id(stage, step)
    if _is_complete(kept):
        return StoredCheckpoint(stage, step, kept, kept=True)
    live = Path(run_dir) / stage / f"{CHECKPOINT_PREFIX}{step:08d}"
    if _is_complete(live):
        return StoredCheckpoint(stage, step, live, kept=False)
    return None


def stored_checkpoints(run_dir: Path, stage: str) -> list[StoredCheckpoint]:
    """Every complete checkpoint of ``stage`` on disk, oldest first (a step both kept and live, mid-move, once)."""
    steps: set[int] = set()
    kept_dir = Path(run_dir) / KEPT_DIR
    if kept_dir.is_dir():
        for path in kept_dir.iterdir():
            parsed = parse_checkpoint_id(path.name)
            if parsed is not None and parsed[0] == stage:
                steps.add(parsed[1])
    live_dir = Path(run_dir) / stage
    if live_dir.is_dir():
        for path in live_dir.iterdir():
            suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
            if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
                steps.add(int(suffix))
    found = [find_checkpoint(run_dir, stage, step) for step in sorted(steps)]
    return [checkpoint for checkpoint in found if checkpoint is not None]


def keep_checkpoints(run_dir: Path, stage: str) -> list[Path]:
    """Move ``stage``'s live checkpoints to ``<run_dir>/checkpoints/<id>/`` without their resume-only files, then
    remove the stage's checkpoint folder; returns the kept folders.

    Each checkpoint is renamed first and stripped after, so a crash at any point leaves the live folder with
    complete checkpoints only (a retried job resumes from one of those, or starts the stage over): never a live
    checkpoint without its optimizer state, which ``fit`` could not resume."""
    live_dir = Path(run_dir) / stage
    kept_dir = Path(run_dir) / KEPT_DIR
    kept: list[Path] = []
    if live_dir.is_dir():
        for path in sorted(live_dir.iterdir()):
            suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
            if not (path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and _is_complete(path)):
                continue
            target = kept_dir / checkpoint_id(stage, int(suffix))
            kept_dir.mkdir(parents=True, exist_ok=True)
            if target.exists():  # an earlier attempt of this job kept the same step: this one is newer
                shutil.rmtree(target)
            os.replace(path, target)
            for name in RESUME_ONLY_FILES:
                (target / name).unlink(missing_ok=True)
            for name in RESUME_ONLY_DIRS:
                shutil.rmtree(target / name, ignore_errors=True)
            kept.append(target)
    shutil.rmtree(live_dir, ignore_errors=True)
    return kept
