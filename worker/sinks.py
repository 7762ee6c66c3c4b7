"""DB-backed implementations of the ctpd_core protocols: what a running job reports goes to SQL.

* :class:`AttemptLease` is what one attempt of a job holds: the job id, the worker id and the attempt (the
  fencing token). Its ``lost`` event is set once the attempt no longer holds the job (the heartbeat was
  refused, or a write was), and everything that reads it stops.
* :class:`AttemptWriter` is the attempt's one path to SQL: an in-order, bounded buffer of its events, metric
  points and progress, flushed in one fenced transaction (``app.db.events.record_attempt_writes``). While the
  database is unreachable the writes wait in the buffer (retried with backoff, never dropped) and go out in
  order when it returns; a stale attempt's writes are refused as a whole and the lease is marked lost; a
  buffer that fills up (an outage far longer than any lease) stops the run cleanly instead of growing.
* :class:`DbObserver` is the run's :class:`ctpd_core.observe.Observer`: ``stage_started`` /
  ``stage_finished`` / ``checkpoint_saved`` events, the job's ``stage`` and progress columns (at most one
  write per second per stage, plus the last value of a stage when it finishes), and metric points (one
  write per optimizer step, and a resumed stage's replayed ones), all through the writer. It only reports.
* :class:`DbStopSignal` is the run's :class:`ctpd_core.observe.StopToken`, asked between batches by every
  long loop of the core (which answers with ``ctpd_core.observe.Stopped``): it fires on a cancel (the flag
  is read at most once per second), a shutdown request (SIGTERM: the job is handed back), a lost lease, or a
  writer that cannot keep its writes; ``reason`` says which.
* :class:`Heartbeat` renews the lease from a thread every ``lease_seconds / 4`` while the job runs (model
  loading included) and stops for good once the lease is lost.

Every write goes through ``app.db.events`` and ``app.db.jobs``, one short transaction per call, on a session of its own,
so the heartbeat thread never shares a session with the task thread.

Torch-free: the ``default`` queue worker (the reaper) imports this module without the training stack.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from app.db import events as job_log
from app.db import jobs as job_rows
from app.db.engine import Database, is_unavailable
from app.db.events import AttemptWrite, EventWrite, MetricsWrite, ProgressWrite, StaleAttempt
from ctpd_core import logs
from ctpd_core.vocab import EventType
from worker import failpoints

if TYPE_CHECKING:
    from ctpd_core.observe import Progress

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 1.0
CANCEL_POLL_SECONDS = 1.0
MAX_PENDING_WRITES = 10_000  # about 10,000 optimizer steps of metrics: hours of training on any real model
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.5, 10.0
REPLAY_STEPS_PER_WRITE = 500


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


class AttemptLease:
    """One attempt's hold on a job. ``attempt=None``: a local run that holds no lease (writes unfenced).

    Besides the database's view (``holds``), the attempt keeps its own clock of the lease: ``valid_until`` is
    the last successful renewal (taken as the moment the request was *sent*) plus ``lease_seconds``, less a
    safety margin for clock skew. Past it, the attempt counts as lost even if it cannot reach the database
    (a network partition, an outage longer than the lease): by then the reaper may have given the job to
    another attempt, so this one stops and publishes nothing more."""

    def __init__(self, db: Database, job_id: str, worker_id: str | None = None,
                 attempt: int | None = None, *, lease_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic, granted_at: float | None = None) -> None:
        self.db, self.job_id, self.worker_id, self.attempt = db, job_id, worker_id, attempt
        self.lost = threading.Event()
        self.lease_seconds, self.clock = lease_seconds, clock
        self.margin = min(5.0, lease_seconds / 10) if lease_seconds else 0.0
        self.valid_until = (granted_at if granted_at is not None else clock()) + (lease_seconds or math.inf)

    def renewed(self, sent_at: float) -> None:
        if self.lease_seconds is not None:
            self.valid_until = max(self.valid_until, sent_at + self.lease_seconds)

    def is_lost(self) -> bool:
        if not self.lost.is_set() and self.clock() >= self.valid_until - self.margin:
            self.mark_lost("its lease ran out before it could be renewed")
        return self.lost.is_set()

    def holds(self) -> bool:
        """Asked before publishing files (a checkpoint, the export): False once another attempt owns the job.

        A database error answers from the attempt's own lease clock: while the lease it was granted is still
        running, no other attempt can have been given the job (the reaper takes only expired leases)."""
        if self.is_lost():
            return False
        if self.attempt is None or self.worker_id is None:
            return True
        try:
            held = job_rows.holds(self.db, self.job_id, self.worker_id, self.attempt)
        except SQLAlchemyError:
            logger.warning("job %s: could not check the lease before publishing; it runs for %.0f s more, so "
                           "publishing", self.job_id, self.valid_until - self.clock())
            return True
        if not held:
            self.mark_lost("another attempt holds the job")
        return held

    def mark_lost(self, why: str) -> None:
        if not self.lost.is_set():
            logger.warning("job %s: attempt %s lost the job (%s); stopping without writing more",
                           self.job_id, self.attempt, why)
        self.lost.set()


class AttemptWriter:
    """The attempt's writes, buffered in order (see the module docstring). Thread-compatible, not thread-safe:
    the task thread is its only user."""

    def __init__(self, lease: AttemptLease, *, max_pending: int = MAX_PENDING_WRITES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease, self.max_pending, self.clock = lease, max_pending, clock
        self.pending: list[AttemptWrite] = []
        self.overflowed = False
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST_SECONDS
        self._failing_since: float | None = None

    def submit(self, write: AttemptWrite) -> None:
        if self.lease.is_lost():
            return  # a stale attempt's writes would be refused anyway: do not even buffer them
        if isinstance(write, ProgressWrite) and self.pending and isinstance(self.pending[-1], ProgressWrite):
            self.pending[-1] = write  # progress is a level, not a history: only the newest counts
        elif len(self.pending) >= self.max_pending:
            if not self.overflowed:
                logger.error("job %s: %d writes are waiting for the database; stopping the attempt (it is retried "
                             "from its last checkpoint)", self.lease.job_id, len(self.pending))
            self.overflowed = True
            return
        else:
            self.pending.append(write)
        self.flush()

    def flush(self, *, force: bool = False) -> bool:
        """Try to write everything pending; True when nothing is left. Between failures it waits (backoff)."""
        if not self.pending:
            return True
        if self.lease.is_lost():
            self.pending.clear()
            return False
        now = self.clock()
        if not force and now < self._retry_at:
            return False
        try:
            job_log.record_attempt_writes(self.lease.db, self.lease.job_id, self.lease.attempt, self.pending)
        except StaleAttempt as stale:
            self.pending.clear()
            self.lease.mark_lost(str(stale))
            return False
        except SQLAlchemyError as error:
            if not is_unavailable(error):
                raise  # bad data or a bug: retrying would fail the same way; the task records a system error
            if self._failing_since is None:
                self._failing_since = now
                logger.warning("job %s: the database is unreachable (%s); buffering writes in order",
                               self.lease.job_id, type(error).__name__)
            self._retry_at = now + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_SECONDS)
            return False
        if self._failing_since is not None:
            logger.info("job %s: the database is back; wrote %d buffered writes after %.1f s", self.lease.job_id,
                        len(self.pending), now - self._failing_since)
        self.pending.clear()
        self._failing_since, self._retry_delay = None, RETRY_FIRST_SECONDS
        return True

    def close(self, deadline_seconds: float, sleep: Callable[[float], None] = time.sleep) -> bool:
        """Flush, retrying until ``deadline_seconds`` have passed; True when everything was written."""
        deadline = self.clock() + deadline_seconds
        while not self.flush(force=True):
            if self.lease.is_lost() or self.clock() >= deadline:
                if self.pending:
                    logger.error("job %s: %d writes could not be recorded before the deadline", self.lease.job_id,
                                 len(self.pending))
                return False
            sleep(min(self._retry_delay, max(0.0, deadline - self.clock())))
        return True


class DbObserver:
    """Reports one job's stages, progress, metrics and checkpoints to SQL (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        job_id: str,
        *,
        progress_interval: float = PROGRESS_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        attempt: int | None = None,
        writer: AttemptWriter | None = None,
    ) -> None:
        self.db, self.job_id = db, job_id
        self.writer = writer or AttemptWriter(AttemptLease(db, job_id, attempt=attempt), clock=clock)
        self.attempt = self.writer.lease.attempt
        self.progress_interval = progress_interval
        self.clock = clock
        self._last_write: dict[str, float] = {}  # progress stage -> when its progress was last written
        self._pending: dict[str, Progress] = {}  # progress stage -> the newest value not yet written

    # ---------------------------------------------------------------------------------- the protocol

    def stage_started(self, stage: str, cached: bool) -> None:
        failpoints.hit(f"stage_started:{stage}", self.attempt)
        logs.update_job_context(stage=stage)  # the process's log lines name the stage from here on
        self._flush_progress()
        self.writer.submit(ProgressWrite(stage, None, None, None))
        message = f"{stage}: reusing the cached output" if cached else f"{stage} started"
        self._event(EventType.STAGE_STARTED, message, stage=stage, data={"cached": cached})

    def stage_finished(self, stage: str, seconds: float, cached: bool, summary: Mapping[str, Any]) -> None:
        self._flush_progress()
        self._event(
            EventType.STAGE_FINISHED,
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

    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        self.writer.submit(MetricsWrite(tuple((stage, step, name, value) for name, value in metrics.items())))

    def replay_metrics(self, stage: str, history: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """A resumed training stage's metrics of the steps before its checkpoint (fit calls it on resume):
        written where the job lacks them, REPLAY_STEPS_PER_WRITE steps per transaction. This is what makes an attempt that died with writes
        still buffered (an outage longer than its lease) lose no metric point: its successor restores them."""
        for start in range(0, len(history), REPLAY_STEPS_PER_WRITE):  # short transactions, not one long one
            points = tuple((stage, step, name, value) for step, metrics in history[start:start + REPLAY_STEPS_PER_WRITE]
                           for name, value in metrics.items())
            if points:
                self.writer.submit(MetricsWrite(points, only_missing=True))

    def checkpoint(self, stage: str, step: int, path: Path) -> None:
        self._event(
            EventType.CHECKPOINT_SAVED,
            f"{stage}: checkpoint at step {step}",
            stage=stage.split(":", 1)[0],
            data={"stage": stage, "step": step, "path": str(path)},
        )

    # ------------------------------------------------------------------------------------ internals

    def close(self, deadline_seconds: float = 0.0) -> bool:
        """Write what is still pending (call once the run has returned), retrying for ``deadline_seconds``
        while the database is unreachable; True when everything was written."""
        self._flush_progress()
        return self.writer.close(deadline_seconds)

    def _write_progress(self, progress: Progress, now: float) -> None:
        self._pending.pop(progress.stage, None)
        self._last_write[progress.stage] = now
        # The stage column holds the pipeline stage ("contrastive"), the detail column what it counts ("positive").
        stage, _, detail = progress.stage.partition(":")
        self.writer.submit(ProgressWrite(stage, progress.step, progress.total, progress.eta_seconds, detail or None))

    def _flush_progress(self) -> None:
        for progress in list(self._pending.values()):
            self._write_progress(progress, self.clock())

    def _event(self, type: EventType, message: str, *, stage: str | None, data: Mapping[str, Any]) -> None:
        self.writer.submit(EventWrite(type, message, stage=stage, data=jsonable(data)))


class DbStopSignal:
    """Fires on a cancel request (read at most once per ``poll_seconds``), a shutdown request (SIGTERM), a
    lost lease, or a writer that overflowed; ``reason`` says which (``cancel``, ``shutdown``, ``lease_lost``,
    ``storage``), so the task records the right outcome."""

    def __init__(
        self,
        db: Database,
        job_id: str,
        *,
        lease_lost: threading.Event | None = None,
        lease: AttemptLease | None = None,
        writer: AttemptWriter | None = None,
        poll_seconds: float = CANCEL_POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db, self.job_id = db, job_id
        self.lease, self.lease_lost = lease, lease_lost
        self.writer = writer
        self.poll_seconds = poll_seconds
        self.clock = clock
        self._last_poll: float | None = None
        self._unreadable = False
        self.cancel_requested = False
        self.shutdown_requested = threading.Event()  # set from a signal handler: an Event, not a plain flag

    def request_shutdown(self) -> None:
        self.shutdown_requested.set()

    @property
    def reason(self) -> str | None:
        if self.lease is not None and self.lease.is_lost():  # its lost event, or its own lease clock ran out
            return "lease_lost"
        if self.lease_lost is not None and self.lease_lost.is_set():
            return "lease_lost"
        if self.writer is not None and self.writer.overflowed:
            return "storage"
        if self.shutdown_requested.is_set():
            return "shutdown"
        if self.cancel_requested:
            return "cancel"
        return None

    def should_stop(self) -> bool:
        if self.reason is not None:
            return True
        now = self.clock()
        if self._last_poll is not None and now - self._last_poll < self.poll_seconds:
            return False
        self._last_poll = now
        try:
            self.cancel_requested = job_rows.is_cancel_requested(self.db, self.job_id)
            self._unreadable = False
        except SQLAlchemyError as error:
            if not self._unreadable:  # once per outage, not once a second
                logger.warning("job %s: could not read the cancel flag (%s); asking again every %.0f s", self.job_id,
                               type(error).__name__, self.poll_seconds)
            self._unreadable = True
        if self.cancel_requested:
            logger.info("job %s: cancel requested; checkpointing and stopping", self.job_id)
        return self.cancel_requested


class Heartbeat:
    """Renews a job's lease every ``lease_seconds / 4`` from a daemon thread until stopped or lost.

    ``lost`` is set (and the thread ends) when the repository says this attempt no longer holds the job: the
    reaper requeued it after a missed lease (also when this process was merely paused past it: an expired
    lease is never renewed), or it finished elsewhere. A database error is logged and the next beat tries
    again (the lease has three more beats of slack).
    """

    def __init__(self, db: Database, job_id: str, worker_id: str, lease_seconds: float,
                 attempt: int | None = None, lost: threading.Event | None = None,
                 lease: AttemptLease | None = None) -> None:
        self.db, self.job_id, self.worker_id, self.attempt = db, job_id, worker_id, attempt
        self.lease = lease
        if lease is not None:
            lost = lease.lost
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 4
        self.lost = lost if lost is not None else threading.Event()
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
            if self.lease is not None and self.lease.is_lost():
                return  # lost by its own clock (or a refused write): renewing now would be too late
            sent_at = time.monotonic()
            try:
                held = job_rows.heartbeat(self.db, self.job_id, self.worker_id, self.lease_seconds, self.attempt)
            except SQLAlchemyError:
                logger.warning("job %s: heartbeat failed; retrying in %.1f s", self.job_id, self.interval, exc_info=True)
                continue
            if not held:
                logger.warning("job %s: lease lost by %s (attempt %s); stopping this attempt", self.job_id,
                               self.worker_id, self.attempt)
                self.lost.set()
                return
            if self.lease is not None:
                self.lease.renewed(sent_at)
