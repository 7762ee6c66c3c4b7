"""The body of ``ctpd.materialize_checkpoint(job_id, checkpoint_id)``: a training checkpoint made into a model folder.

Light work for the ``default`` queue: load the student's base on the CPU (so it never competes with a training
job for GPU memory on the same machine), put the checkpoint's tensors back and write the folder next to the
checkpoint (``worker.recipe.materialize_checkpoint``). The job's spec is re-read with the job's policy applied
(``worker.policy``), as ``run_job`` does: the base a checkpoint needs is the one its job was allowed to load.

The outcome is an event (``checkpoint_model_ready`` / ``checkpoint_model_failed``, data: checkpoint, step, error),
unfenced: the job may be running, finished or cancelled, and this is no attempt of it. The folder itself is the
proof of readiness (the API checks it on disk), so a duplicate delivery that finds it built does nothing. One
checkpoint is built by one task at a time: the build holds an exclusive ``flock`` on ``.model.lock`` inside the
checkpoint folder (the kernel drops it if the worker dies), and a delivery that finds it held returns ``busy`` at
once: the holder records the outcome (the API re-sends a request only after a long timeout, so this is rare).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from app.db import events as job_log
from app.db import jobs as job_rows
from app.db.engine import Database
from app.db.models import Job
from app.policy import PolicyViolation
from ctpd_core.catalog import ModelLoadError
from ctpd_core.checkpoint_layout import (
    MODEL_STAGING_PREFIX,
    StoredCheckpoint,
    find_checkpoint,
    parse_checkpoint_id,
    run_folder,
)
from ctpd_core.held_paths import remove_orphans
from ctpd_core.vocab import EventLevel, EventType

if TYPE_CHECKING:
    from app.settings import Settings

logger = logging.getLogger(__name__)

MAX_ERROR = 2000
STAGING_GRACE_SECONDS = 3600.0  # only where flock cannot tell: a staging folder unchanged this long is dead
BUILD_LOCK_FILE = ".model.lock"  # in the checkpoint folder: held while its model is built (moves with the folder)


@contextmanager
def build_lock(checkpoint_folder: Path) -> Iterator[bool]:
    """Hold the checkpoint's build lock for the block: yields False (holding nothing) when another build holds it.
    A filesystem without locks yields True (the build goes on, as before; publish_folder keeps the first)."""
    fd = os.open(checkpoint_folder / BUILD_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)  # RDWR: NFS locks need it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as error:
            logger.warning("cannot lock %s (%s); two deliveries may build it at once", checkpoint_folder, error)
        yield True
    finally:
        os.close(fd)  # releases the lock; the empty file stays (removing it would race the next locker)


def build_checkpoint_model(db: Database, settings: Settings, job_id: str, checkpoint: str) -> str:
    """Build the model folder of ``checkpoint`` (an id like ``distill-00000040``); returns ready, failed, busy
    (another task is building it now) or skipped (no such job). Failures are recorded, never raised: this runs at
    a task boundary."""
    job = job_rows.get_job(db, job_id)
    if job is None:
        logger.warning("materialize %s: job %s does not exist; nothing to do", checkpoint, job_id)
        return "skipped"
    parsed = parse_checkpoint_id(checkpoint)
    data: dict[str, object] = {"checkpoint": checkpoint}
    stored = None
    if parsed is not None:
        data["stage"], data["step"] = parsed
        stored = find_checkpoint(run_folder(settings.artifact_root, job_id), *parsed)
    if stored is None:
        return _failed(db, job_id, data, f"checkpoint {checkpoint} is no longer on disk (a job keeps only its newest "
                                         "checkpoints while it trains); pick one the listing shows")
    if stored.model_ready():
        return "ready"  # a duplicate delivery, or two requests: built once
    try:
        with build_lock(stored.folder) as held:
            if not held:
                logger.info("materialize %s of job %s: another task is building it; leaving it to that one",
                            checkpoint, job_id)
                return "busy"
            if stored.model_ready():
                return "ready"  # built by a holder that let go just before this delivery took the lock
            return _build(db, settings, job, stored, data)
    except FileNotFoundError:  # the checkpoint folder was pruned before its lock file could be made
        return _failed(db, job_id, data, f"checkpoint {checkpoint} is no longer on disk (a job keeps only its newest "
                                         "checkpoints while it trains); pick one the listing shows")


def _build(db: Database, settings: Settings, job: Job, stored: StoredCheckpoint, data: dict[str, object]) -> str:
    """The build itself, under the checkpoint's lock."""
    job_id, checkpoint = job.id, stored.id
    # A build killed mid-write left its held staging folder here; no sweep looks inside checkpoint folders.
    remove_orphans(((staging, True) for staging in stored.folder.glob(f"{MODEL_STAGING_PREFIX}*")),
                   grace_seconds=STAGING_GRACE_SECONDS)
    started = time.monotonic()
    try:
        from ctpd_core.spec import JobSpec, TrackingSpec
        from worker.policy import enforce_job_policy
        from worker.recipe import materialize_checkpoint

        # The build opens the job's models and files but tracks nothing: its tracking server (which need not
        # resolve from this worker now) is no part of the check.
        spec = JobSpec.model_validate(job.spec).model_copy(update={"tracking": TrackingSpec()})
        spec = enforce_job_policy(db, spec, job, settings)
        folder = materialize_checkpoint(spec, stored, model_cache=settings.model_cache)
    except (PolicyViolation, ModelLoadError, ValueError, OSError) as error:
        # OSError: the checkpoint was pruned while its tensors were read, or the disk is full
        logger.info("materialize %s of job %s failed: %s", checkpoint, job_id, error)
        return _failed(db, job_id, data, str(error) or type(error).__name__)
    except Exception as error:  # the task boundary: recorded as the build's failure, with the type for operators
        logger.exception("materialize %s of job %s failed", checkpoint, job_id)
        return _failed(db, job_id, data, f"internal error: {type(error).__name__}: {error}")
    seconds = time.monotonic() - started
    job_log.add_event(db, job_id, EventType.CHECKPOINT_MODEL_READY,
                      f"checkpoint {checkpoint}: model folder ready ({seconds:.1f} s)", stage=stored.stage,
                      data={**data, "seconds": round(seconds, 3)})
    logger.info("materialize %s of job %s: %s in %.1f s", checkpoint, job_id, folder, seconds)
    return "ready"


def _failed(db: Database, job_id: str, data: dict[str, object], error: str) -> str:
    error = error if len(error) <= MAX_ERROR else error[: MAX_ERROR - 3] + "..."
    job_log.add_event(db, job_id, EventType.CHECKPOINT_MODEL_FAILED, f"checkpoint {data['checkpoint']}: {error}",
                      level=EventLevel.WARNING, stage=str(data.get("stage") or "distill"), data={**data, "error": error})
    return "failed"
