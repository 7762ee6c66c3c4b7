"""A job's training checkpoints as the API offers them: listed, and made into model folders on a worker.

What exists is read from two sources, each the truth for its part: the ``checkpoint_saved`` events say which
checkpoints a job saved (and when), the disk says which are still there (``ctpd_core.checkpoint_layout``: only
complete folders; ``keep_checkpoints`` prunes older ones while the job trains). A checkpoint with an event but no
folder was pruned (:class:`CheckpointPruned`: 410); one with neither never existed (404).

A checkpoint holds only the trainable tensors, and the API has no torch, so making it a model (base model +
tensors + tokenizer + card, in the export dtype) is a task for a worker on the ``default`` queue
(``ctpd.materialize_checkpoint``, ``worker.checkpoint_models``). Its state is what its events say (requested,
ready, failed: the last one wins) and whether its ``model/`` folder is on disk (ready whatever the events say).

Each task loads the student's whole base on the CPU, and the ``default`` queue is the reaper's too, so a request
is enqueued once: asking again while it is pending enqueues nothing, unless the pending request is older than
:data:`MODEL_REQUEST_RESEND_SECONDS` (its message may have been lost; it is recorded and sent again). The worker
builds one checkpoint's model at a time (a lock beside the checkpoint), so a re-sent duplicate does no work twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from app.db import events as job_log
from app.db import models as orm
from app.db.engine import Database
from app.db.models import utcnow
from app.queue import TaskQueue
from ctpd_core.checkpoint_layout import (
    LISTED_STAGES,
    STATE_FILE,
    StoredCheckpoint,
    checkpoint_id,
    find_checkpoint,
    folder_bytes,
    parse_checkpoint_id,
    run_folder,
    stored_checkpoints,
)
from ctpd_core.vocab import EventType

logger = logging.getLogger(__name__)

ModelStatus = Literal["absent", "pending", "ready", "failed"]
# A pending build request older than this is enqueued again (its message may have been lost, or its worker died
# mid-build); younger, asking again enqueues nothing. Far longer than a build (a base loaded on the CPU: minutes).
MODEL_REQUEST_RESEND_SECONDS = 15 * 60.0
_MODEL_EVENTS = (EventType.CHECKPOINT_MODEL_REQUESTED, EventType.CHECKPOINT_MODEL_READY,
                 EventType.CHECKPOINT_MODEL_FAILED)


class NoSuchCheckpoint(LookupError):
    """Not a checkpoint id this job ever had (404)."""


class CheckpointPruned(LookupError):
    """The job saved it, but it is no longer on disk (410)."""


class QueueUnavailable(RuntimeError):
    """The request is recorded but the broker refused the task (503: retry)."""


@dataclass(frozen=True)
class CheckpointView:
    stored: StoredCheckpoint
    saved_at: datetime | None
    metrics: dict[str, float]
    model_status: ModelStatus
    model_error: str | None = None
    model_bytes: int | None = None
    requested_at: datetime | None = None  # pending: when the pending request was recorded

    @property
    def id(self) -> str:
        return self.stored.id


@dataclass
class _Log:
    """What a job's checkpoint events say, per checkpoint id."""

    saved_at: dict[str, datetime] = field(default_factory=dict)
    last_model_event: dict[str, orm.JobEvent] = field(default_factory=dict)


def _read_log(db: Database, job_id: str) -> _Log:
    log = _Log()
    for event in job_log.events_of_types(db, job_id, (EventType.CHECKPOINT_SAVED, *_MODEL_EVENTS)):
        data = event.data or {}
        if event.type == EventType.CHECKPOINT_SAVED:
            stage, step = data.get("stage"), data.get("step")
            if stage in LISTED_STAGES and isinstance(step, int):
                log.saved_at[checkpoint_id(str(stage), step)] = event.created_at
        elif isinstance(data.get("checkpoint"), str):
            log.last_model_event[data["checkpoint"]] = event
    return log


def _view(stored: StoredCheckpoint, log: _Log, metrics: dict[str, float]) -> CheckpointView:
    saved_at = log.saved_at.get(stored.id)
    if saved_at is None:  # on disk without its event (an attempt whose writes were lost): the folder's time
        saved_at = datetime.fromtimestamp((stored.folder / STATE_FILE).stat().st_mtime, tz=UTC)
    if stored.model_ready():
        return CheckpointView(stored, saved_at, metrics, "ready", model_bytes=folder_bytes(stored.model_folder))
    last = log.last_model_event.get(stored.id)
    if last is None or last.type == EventType.CHECKPOINT_MODEL_READY:  # ready once, gone since: ask again
        return CheckpointView(stored, saved_at, metrics, "absent")
    if last.type == EventType.CHECKPOINT_MODEL_FAILED:
        return CheckpointView(stored, saved_at, metrics, "failed", model_error=(last.data or {}).get("error"))
    return CheckpointView(stored, saved_at, metrics, "pending", requested_at=last.created_at)


def list_checkpoints(db: Database, artifact_root: Path, job: orm.Job) -> list[CheckpointView]:
    """The job's checkpoints still on disk, oldest first, with their step's metrics and model state."""
    run_dir = run_folder(artifact_root, job.id)
    log = _read_log(db, job.id)
    views: list[CheckpointView] = []
    for stage in LISTED_STAGES:
        stored = stored_checkpoints(run_dir, stage)
        metrics = job_log.metrics_at_steps(db, job.id, stage, [checkpoint.step for checkpoint in stored])
        for checkpoint in stored:
            try:
                views.append(_view(checkpoint, log, metrics[checkpoint.step]))
            except FileNotFoundError:  # pruned by the training loop while it was being listed
                continue
    return views


def get_checkpoint(db: Database, artifact_root: Path, job: orm.Job, checkpoint: str) -> CheckpointView:
    """One checkpoint; raises :class:`NoSuchCheckpoint` or :class:`CheckpointPruned`."""
    parsed = parse_checkpoint_id(checkpoint)
    if parsed is None:
        raise NoSuchCheckpoint(f"{checkpoint!r} is not a checkpoint id (they look like distill-00000040); list "
                               f"/v1/jobs/{job.id}/checkpoints")
    stage, step = parsed
    log = _read_log(db, job.id)
    stored = find_checkpoint(run_folder(artifact_root, job.id), stage, step)
    if stored is None:
        if checkpoint in log.saved_at:
            raise CheckpointPruned(
                f"checkpoint {checkpoint} of job {job.id} is no longer on disk: a job keeps only its newest "
                f"checkpoints while it trains; list /v1/jobs/{job.id}/checkpoints for those that remain")
        raise NoSuchCheckpoint(f"job {job.id} has no checkpoint {checkpoint}; list /v1/jobs/{job.id}/checkpoints")
    metrics = job_log.metrics_at_steps(db, job.id, stage, [step])[step]
    return _view(stored, log, metrics)


def request_model(db: Database, queue: TaskQueue, artifact_root: Path, job: orm.Job, checkpoint: str
                  ) -> tuple[CheckpointView, bool]:
    """Ask a worker to make the checkpoint a model folder, unless it is one: ``(view, pending)``, pending False
    when the folder is ready (nothing asked). A request is recorded and enqueued when none is pending, or when the
    pending one is older than :data:`MODEL_REQUEST_RESEND_SECONDS` (a lost message must not leave it pending for
    good); asking again meanwhile enqueues nothing (each build loads a whole base model)."""
    view = get_checkpoint(db, artifact_root, job, checkpoint)
    if view.model_status == "ready":
        return view, False
    now = utcnow()
    if view.model_status == "pending" and view.requested_at is not None and (
            now - view.requested_at < timedelta(seconds=MODEL_REQUEST_RESEND_SECONDS)):
        return view, True  # asked again while a young request is pending: it is on its way
    data = {"checkpoint": view.id, "stage": view.stored.stage, "step": view.stored.step}
    if view.model_status == "pending":
        message = (f"checkpoint {view.id}: asked again; the pending request got no answer in "
                   f"{MODEL_REQUEST_RESEND_SECONDS / 60:.0f} min, so it is sent again")
    else:
        message = f"checkpoint {view.id}: a model folder was asked for"
    # Recorded before it is sent: the event's time is what the next request measures the resend timeout from.
    job_log.add_event(db, job.id, EventType.CHECKPOINT_MODEL_REQUESTED, message, stage=view.stored.stage, data=data)
    try:
        queue.enqueue_checkpoint_model(job.id, view.id)
    except Exception as error:  # the broker: the request stays recorded, the caller retries
        logger.warning("job %s: could not enqueue the model of %s: %s", job.id, view.id, error)
        job_log.add_event(db, job.id, EventType.CHECKPOINT_MODEL_FAILED,
                          f"checkpoint {view.id}: the request could not be queued", level="warning",
                          stage=view.stored.stage, data={**data, "error": "the task queue was unreachable; ask again"})
        raise QueueUnavailable(f"the task queue is unreachable; POST again to build the model of {view.id}") from error
    return CheckpointView(view.stored, view.saved_at, view.metrics, "pending", requested_at=now), True
