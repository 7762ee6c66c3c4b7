"""DB-backed implementations of the ctpd_core protocols: what a running job reports goes to SQL.

* :class:`DbObserver` is the recipe's :class:`ctpd_core.pipeline.PipelineObserver`: ``stage_started`` /
  ``stage_finished`` / ``checkpoint_saved`` events, the job's ``stage`` and progress columns (at most one
  write per second per stage, plus the last value of a stage when it finishes), and metric points (one
  multi-row insert per optimizer step).
* With a ``stop_signal``, :class:`DbObserver` also stops the *inference* stages (prepare, reference,
  weights, evaluate) between batches when a cancel arrives, by raising the recipe's ``JobStopped`` from
  ``progress``: fit() only polls the signal between optimizer steps, and those stages have no checkpoint
  to lose (the stage cache discards a partial output). Training stages are left to fit(), which
  checkpoints before it stops.
* :class:`DbStopSignal` is fit()'s :class:`ctpd_core.train.StopSignal`: it reads the job's cancel flag at
  most once per second, and also stops the run when the worker lost its lease (the reaper gave the job
  to another attempt, so this one must not keep training).
* :class:`Heartbeat` renews the job's lease from a thread every ``lease_seconds / 4`` while the job runs
  (model loading included) and stops for good once the lease is lost.

Every write goes through ``app.db.repository``, one short transaction per call, on a session of its own
(the repository opens one per call), so the heartbeat thread never shares a session with the task thread.
A failed progress or metric write is logged and dropped: it must not kill a training run; events and the
lease are retried by their callers' next call.

Torch-free: the ``default`` queue worker (the reaper) imports this module without the training stack.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from app.db import repository
from worker import failpoints

if TYPE_CHECKING:
    from ctpd_core.train import Progress

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 1.0
CANCEL_POLL_SECONDS = 1.0
# Progress stages that are batched inference, not fit() (whose stages are "distill", "contrastive:<direction>").
INTERRUPTIBLE_STAGES = frozenset({"prepare", "reference", "contrastive", "weights", "evaluate"})


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: non-finite floats become None, numpy scalars numbers, paths and others str."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


class DbObserver:
    """Reports one job's stages, progress, metrics and checkpoints to SQL (see the module docstring)."""

    def __init__(
        self,
        db: repository.Database,
        job_id: str,
        *,
        progress_interval: float = PROGRESS_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        stop_signal: DbStopSignal | None = None,
        attempt: int | None = None,
    ) -> None:
        self.db, self.job_id = db, job_id
        self.attempt = attempt
        self.progress_interval = progress_interval
        self.clock = clock
        self.stop_signal = stop_signal
        self._last_write: dict[str, float] = {}  # progress stage -> when its progress was last written
        self._pending: dict[str, Progress] = {}  # progress stage -> the newest value not yet written

    # ---------------------------------------------------------------------------------- the protocol

    def stage_started(self, stage: str, cached: bool) -> None:
        failpoints.hit(f"stage_started:{stage}", self.attempt)
        self._flush_progress()
        self._safely(
            "progress",
            lambda: repository.update_progress(self.db, self.job_id, stage=stage, step=None, total=None, eta_seconds=None),
        )
        message = f"{stage}: reusing the cached output" if cached else f"{stage} started"
        self._event("stage_started", message, stage=stage, data={"cached": cached})

    def stage_finished(self, stage: str, seconds: float, cached: bool, summary: Mapping[str, Any]) -> None:
        self._flush_progress()
        self._event(
            "stage_finished",
            f"{stage} finished in {seconds:.1f} s" + (" (cached)" if cached else ""),
            stage=stage,
            data={"seconds": seconds, "cached": cached, "summary": jsonable(dict(summary))},
        )

    def progress(self, progress: Progress) -> None:
        failpoints.hit(f"step:{progress.stage}:{progress.step}", self.attempt)
        now = self.clock()
        last = self._last_write.get(progress.stage)
        if last is not None and now - last < self.progress_interval:
            self._pending[progress.stage] = progress  # written by the next due write or the stage's end
        else:
            self._write_progress(progress, now)
        if (
            self.stop_signal is not None
            and progress.stage in INTERRUPTIBLE_STAGES
            and progress.step < progress.total
            and self.stop_signal.should_stop()
        ):
            from worker.recipe import JobStopped  # the recipe is loaded by now; this module stays torch-free

            self._flush_progress()
            logger.info("job %s: stopping %s at %d of %d", self.job_id, progress.stage, progress.step, progress.total)
            raise JobStopped()

    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        self._safely("metrics", lambda: repository.add_metrics(self.db, self.job_id, stage, step, metrics))

    def checkpoint(self, stage: str, step: int, path: Path) -> None:
        self._event(
            "checkpoint_saved",
            f"{stage}: checkpoint at step {step}",
            stage=stage.split(":", 1)[0],
            data={"stage": stage, "step": step, "path": str(path)},
        )

    # ------------------------------------------------------------------------------------ internals

    def close(self) -> None:
        """Write what is still pending (call once the run has returned)."""
        self._flush_progress()

    def _write_progress(self, progress: Progress, now: float) -> None:
        self._pending.pop(progress.stage, None)
        self._last_write[progress.stage] = now
        self._safely(
            "progress",
            lambda: repository.update_progress(
                # The column holds the pipeline stage ("contrastive", not "contrastive:positive").
                self.db, self.job_id, stage=progress.stage.split(":", 1)[0], step=progress.step,
                total=progress.total, eta_seconds=progress.eta_seconds,
            ),
        )

    def _flush_progress(self) -> None:
        for progress in list(self._pending.values()):
            self._write_progress(progress, self.clock())

    def _event(self, type: str, message: str, *, stage: str | None, data: Mapping[str, Any]) -> None:
        self._safely(
            type, lambda: repository.add_event(self.db, self.job_id, type, message, stage=stage, data=jsonable(data))
        )

    def _safely(self, what: str, write: Callable[[], None]) -> None:
        try:
            write()
        except SQLAlchemyError:
            logger.warning("job %s: could not record %s; continuing", self.job_id, what, exc_info=True)


class DbStopSignal:
    """True once the job's cancel was requested (read at most once per ``poll_seconds``) or the lease is lost."""

    def __init__(
        self,
        db: repository.Database,
        job_id: str,
        *,
        lease_lost: threading.Event | None = None,
        poll_seconds: float = CANCEL_POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db, self.job_id = db, job_id
        self.lease_lost = lease_lost
        self.poll_seconds = poll_seconds
        self.clock = clock
        self._last_poll: float | None = None
        self.cancel_requested = False

    def should_stop(self) -> bool:
        if self.lease_lost is not None and self.lease_lost.is_set():
            return True
        if self.cancel_requested:
            return True
        now = self.clock()
        if self._last_poll is not None and now - self._last_poll < self.poll_seconds:
            return False
        self._last_poll = now
        try:
            self.cancel_requested = repository.is_cancel_requested(self.db, self.job_id)
        except SQLAlchemyError:
            logger.warning("job %s: could not read the cancel flag; asking again later", self.job_id, exc_info=True)
        if self.cancel_requested:
            logger.info("job %s: cancel requested; checkpointing and stopping", self.job_id)
        return self.cancel_requested


class Heartbeat:
    """Renews a job's lease every ``lease_seconds / 4`` from a daemon thread until stopped or lost.

    ``lost`` is set (and the thread ends) when the repository says this worker no longer holds the job: the
    reaper requeued it after a missed lease, or it finished elsewhere. A database error is logged and the
    next beat tries again (the lease has three more beats of slack).
    """

    def __init__(self, db: repository.Database, job_id: str, worker_id: str, lease_seconds: float) -> None:
        self.db, self.job_id, self.worker_id = db, job_id, worker_id
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 4
        self.lost = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, self.interval))

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                held = repository.heartbeat(self.db, self.job_id, self.worker_id, self.lease_seconds)
            except SQLAlchemyError:
                logger.warning("job %s: heartbeat failed; retrying in %.1f s", self.job_id, self.interval, exc_info=True)
                continue
            if not held:
                logger.warning("job %s: lease lost by %s; stopping this attempt", self.job_id, self.worker_id)
                self.lost.set()
                return
