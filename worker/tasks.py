"""The Celery tasks: thin shells over the repository and ``worker.recipe`` (docs/service-contract.md, "Worker").

``ctpd.run_job(job_id)``
    claims the job by compare-and-set (a duplicate delivery, or a job cancelled while queued, does nothing),
    renews its lease from a heartbeat thread, runs the recipe with a :class:`~worker.sinks.DbObserver` and
    a :class:`~worker.sinks.DbStopSignal`, and records the end: ``succeeded`` (with the export folder),
    ``cancelled`` (the recipe checkpointed and returned "stopped"), or ``failed`` with a user error
    (``invalid_dataset``, ``model_not_found``, ``invalid_spec``) or a system error (``internal_error``).
    A restarted attempt resumes from the checkpoints in the job's run folder (the recipe does that itself).

``ctpd.preflight(preflight_id)``
    (``default`` queue) the worker's part of a dry run (``POST /v1/jobs?dry_run=true``): worker/preflight.py.

``ctpd.reap_stale_jobs()``
    (beat, every 30 s, ``default`` queue) puts jobs whose lease ran out back to ``queued`` (or fails them
    with ``worker_lost`` after ``max_attempts``) and enqueues them again, together with queued jobs no worker
    claimed for ``requeue_after_seconds``, through ``app.queue.CeleryTaskQueue``.

The training stack (torch, transformers) is imported by ``run_job`` only; a worker that consumes ``train``
preloads it in the parent process (see :func:`_preload_training_stack`), so each fresh child forks with it
already imported. Importing torch touches no CUDA, so forking stays safe. The reaper's worker stays light.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import shared_task
from celery.signals import celeryd_after_setup, worker_shutting_down
from sqlalchemy.exc import SQLAlchemyError

from app.db import datasets as dataset_rows
from app.db import jobs as job_rows
from app.db.engine import Database, is_unavailable
from app.db.models import utcnow
from app.policy import PolicyViolation
from app.storage import Storage, StorageMirror, configured_storage, fetch_upload
from ctpd_core import logs
from ctpd_core.catalog import ModelLoadError
from ctpd_core.data import DatasetError
from ctpd_core.vocab import JobStatus, QueueName, TaskName
from worker.capacity import Capacity, worker_capacity
from worker.launch import RankFailure, RanksLost, run_job_spec
from worker.orphan_sweep import sweep_orphans
from worker.sinks import AttemptLease, AttemptWriter, DbObserver, DbStopSignal, Heartbeat

if TYPE_CHECKING:
    from app.settings import Settings
    from worker.tracking import MlflowObserver

logger = logging.getLogger(__name__)

MAX_ERROR_MESSAGE = 4000

# Set in a worker's main process when its warm shutdown begins (_hand_back_running_jobs). Pool processes are
# forked from it, so one forked after that sees it set: a message the stopping worker still pulls (its own
# hand-back's doorbell, typically, which it rings a moment before its consumer stops) is passed on unclaimed
# instead of starting an attempt in a process the shutdown is about to end, which would then be counted lost.
_DRAINING = threading.Event()


@dataclass(frozen=True)
class JobOutcome:
    """What one delivery of ``run_job`` did (returned for logs and tests; results are not stored)."""

    job_id: str
    # succeeded | failed | cancelled | skipped (not claimed) | lost (the lease went elsewhere) | handed_back
    # (SIGTERM: queued again, the attempt not counted) | abandoned (the database stayed away: left to the reaper)
    # | passed_on (this worker is shutting down: not claimed, the doorbell rung again for another)
    status: str
    error_code: str | None = None


# ---------------------------------------------------------------------------------------------- helpers


def _settings_of(app: Any) -> Settings:
    settings = getattr(app, "ctpd_settings", None)
    if settings is None:
        from app.settings import get_settings

        settings = get_settings()
    return settings


@lru_cache(maxsize=4)
def _database(url: str) -> Database:
    """One Database per URL per process. Tasks run in fresh children (max_tasks_per_child=1), so the engine
    is always created after the fork and never shared with the parent."""
    return Database(url)


def worker_id_for(hostname: str | None = None) -> str:
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


def classify_error(error: BaseException) -> tuple[str, str]:
    """``(error_kind, error_code)`` of an exception that ended a job."""
    if isinstance(error, RankFailure):  # classified by the rank that raised it, with this very function
        return error.kind, error.code
    if isinstance(error, PolicyViolation):
        return "user", "policy_violation"
    if isinstance(error, DatasetError):
        return "user", "invalid_dataset"
    if isinstance(error, ModelLoadError):
        return "user", "model_not_found"
    if isinstance(error, ValueError):  # includes pydantic's ValidationError and the alignment errors
        return "user", "invalid_spec"
    return "system", "internal_error"


def _message_of(error: BaseException, kind: str) -> str:
    message = str(error) or type(error).__name__
    if kind == "system":
        message = f"{type(error).__name__}: {message}"
    return message if len(message) <= MAX_ERROR_MESSAGE else message[: MAX_ERROR_MESSAGE - 3] + "..."


def dataset_resolver(db: Database, tenant: str, storage: Storage | None = None, artifact_root: Path | None = None):
    """``dataset.id`` -> the uploaded file, for the job's own tenant only (from the shared storage, when another
    machine's API received it, into ``artifact_root``)."""

    def resolve(dataset_id: str) -> Path:
        row = dataset_rows.get_dataset(db, dataset_id, tenant)
        if row is None:
            raise DatasetError(f"dataset {dataset_id!r} does not exist for tenant {tenant!r}; upload it with POST /v1/datasets")
        path = Path(row.path)
        if not path.is_file() and storage is not None and artifact_root is not None:
            path = fetch_upload(storage, artifact_root, row.id, row.filename, row.sha256) or path
        if not path.is_file():
            raise DatasetError(f"the file of dataset {dataset_id!r} is missing from the artifact store ({path}); upload it again")
        return path

    return resolve


# ------------------------------------------------------------------------------------------------ run_job


class _ShutdownHandler:
    """SIGTERM in the job process: a hand-back, not a death (issue 9.6).

    The first SIGTERM asks the run to stop (the stop signal fires; training checkpoints after its current
    step, inference stops after its current batch) and starts a timer: if the run has not stopped within
    ``grace_seconds``, the lease is released anyway, without a new checkpoint (the next attempt resumes from
    the previous one), and the process exits. Installed only in the main thread (where Python delivers
    signals), for the duration of one job."""

    def __init__(self, stop_signal: DbStopSignal, release: Any, grace_seconds: float) -> None:
        self.stop_signal, self.release, self.grace_seconds = stop_signal, release, grace_seconds
        self._previous: Any = None
        self._timer: threading.Timer | None = None
        self.installed = False

    def __enter__(self) -> _ShutdownHandler:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self.installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.stop_signal.shutdown_requested.is_set():
            return  # a repeated SIGTERM changes nothing: the timer already bounds the wait
        logger.warning("SIGTERM: stopping the job at its next check and handing it back (at most %.0f s)",
                       self.grace_seconds)
        self.stop_signal.request_shutdown()
        self._timer = threading.Timer(self.grace_seconds, self._force)
        self._timer.daemon = True
        self._timer.start()

    def _force(self) -> None:
        logger.error("the job did not stop within %.0f s of SIGTERM; releasing its lease without a new checkpoint "
                     "and exiting", self.grace_seconds)
        try:
            self.release("SIGTERM; the grace period ran out before a checkpoint, so it resumes from the previous one")
        finally:
            logging.shutdown()
            os._exit(0)


def _retrying(what: str, write: Any, deadline_seconds: float) -> Any:
    """``write()``, retried with backoff while the database is unreachable, for up to ``deadline_seconds``.
    Re-raises the last error after the deadline (the caller then leaves the job to its lease and the reaper),
    and any error that is not unavailability at once."""
    deadline = time.monotonic() + deadline_seconds
    delay = 0.5
    while True:
        try:
            return write()
        except SQLAlchemyError as error:
            if not is_unavailable(error) or time.monotonic() + delay > deadline:
                raise  # bad data or a bug is not waited out: it would fail the same way every time
            logger.warning("could not record %s (database unreachable); retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def execute_job(
    db: Database, settings: Settings, job_id: str, worker_id: str, *, device: Any = None,
    requeue: Callable[[str], None] | None = None, capacity: Capacity | None = None,
) -> JobOutcome:
    """The body of ``ctpd.run_job``, callable without Celery (``device``: "cpu", "cuda:0"...; default cuda if any).

    ``job_id`` is the doorbell's hint: the worker claims the best queued job it may run (priority, age, the
    tenants' limits, its ``capacity``: default what worker/capacity.py detects), which may be another one, or
    nothing (``skipped``). ``requeue(job_id)`` rings a doorbell: again after a hand-back, so another worker
    resumes the job at once, and after a job ended when queued work can start (the reaper's net still catches a
    lost message)."""
    if _DRAINING.is_set():
        logger.info("job %s: this worker is shutting down; passing the job on unclaimed", job_id)
        if requeue is not None:
            try:
                requeue(job_id)
            except Exception as error:  # the broker is down: the reaper enqueues it after requeue_after_seconds
                logger.warning("job %s: not enqueued again (%s); the reaper will", job_id, error)
        return JobOutcome(job_id, "passed_on")
    asked_at = time.monotonic()  # the lease runs from (at the latest) here, by this process's own clock
    capacity = capacity or worker_capacity(settings.worker_gpus)
    row = job_rows.claim_next_job(db, worker_id, settings.lease_seconds, devices=capacity.devices,
                                  default_max_running=settings.tenant_max_running, hint=job_id)
    if row is None:
        current = job_rows.get_job(db, job_id)
        logger.info("doorbell of job %s (now %s): no queued job this worker may run (limits, GPUs, or a duplicate "
                    "delivery); nothing to do", job_id, current.status if current else "missing")
        return JobOutcome(job_id, "skipped")
    if row.id != job_id:
        logger.info("doorbell of job %s: claimed job %s, the best this worker may run", job_id, row.id)
        job_id = row.id
        if logs.current_job() is not None:  # the task's log context named the doorbell's job
            logs.open_job_context(job_id)
    attempt = row.attempt
    logs.update_job_context(attempt=attempt, tenant=row.tenant)  # every log line from here on names them
    logger.info("job %s: attempt %d of %d on %s", job_id, attempt, row.max_attempts, worker_id)

    # Everything this attempt writes is fenced by (worker_id, attempt): see worker/sinks.py.
    lease = AttemptLease(db, job_id, worker_id, attempt, lease_seconds=settings.lease_seconds, granted_at=asked_at)
    heartbeat = Heartbeat(db, job_id, worker_id, settings.lease_seconds, attempt=attempt, lease=lease).start()
    writer = AttemptWriter(lease)
    stop_signal = DbStopSignal(db, job_id, lease=lease, writer=writer)
    observer = DbObserver(db, job_id, writer=writer)  # reports only; the core loops ask stop_signal
    def release(reason: str) -> str | None:
        released = job_rows.release_job(db, job_id, worker_id, attempt, reason)
        if released == JobStatus.QUEUED and requeue is not None:
            try:
                requeue(job_id)
            except Exception as error:  # the broker is down: the reaper enqueues it after requeue_after_seconds
                logger.warning("job %s: handed back but not enqueued again (%s); the reaper will", job_id, error)
        return released

    shutdown = _ShutdownHandler(stop_signal, release, settings.shutdown_grace_seconds)
    status, error_code, error_kind, error_message, export_dir = JobStatus.FAILED, None, None, None, None
    tracker: MlflowObserver | None = None  # the job's MLflow run (worker/tracking.py), when the spec or the deployment names one
    try:
        with shutdown:
            try:
                import torch

                from ctpd_core.observe import FanOut
                from ctpd_core.spec import JobSpec
                from worker.policy import enforce_job_policy
                from worker.recipe import RunContext, default_device
                from worker.tracking import RunIdentity, job_outcome, start_job_tracking, warning_events

                spec = enforce_job_policy(db, JobSpec.model_validate(row.spec), row, settings)
                tracker = start_job_tracking(
                    spec, settings, RunIdentity(job_id, row.tenant, attempt, row.name, spec.method),
                    warn=warning_events(writer), still_current=lambda: not lease.is_lost(),
                    submitted_by_admin=bool(row.submitted_by_admin))
                storage = configured_storage(settings, check=False)  # probed when the worker started
                context = RunContext(
                    artifact_root=settings.artifact_root,
                    run_dir=settings.artifact_root / "jobs" / job_id,
                    model_cache=settings.model_cache,
                    observer=observer if tracker is None else FanOut(observer, tracker),
                    stop_signal=stop_signal,
                    dataset_resolver=dataset_resolver(db, row.tenant, storage, settings.artifact_root),
                    mirror=StorageMirror(storage) if storage is not None else None,
                    publish_guard=lease.holds,
                    generation=attempt,
                    device=torch.device(device) if device is not None else default_device(),
                )
                result = run_job_spec(spec, context, log_format=settings.log_format)  # on N ranks when it asks for N GPUs
                if result.status == "succeeded":
                    status, export_dir = JobStatus.SUCCEEDED, result.export_dir
                else:  # stopped: cancelled, or handed back / abandoned by the stop's reason below
                    status = JobStatus.CANCELLED
            except RanksLost as error:
                # A rank died (killed, out of memory): the attempt is lost, not the job. Nothing is recorded; the
                # lease runs out once this process stops renewing it and the reaper retries from the last checkpoint.
                logger.error("job %s: %s; leaving attempt %d to its lease and the reaper", job_id, error, attempt)
                if tracker is not None:  # None: the run stays RUNNING for the attempt that resumes it
                    tracker.finish(None, export_dir=None)
                observer.close(deadline_seconds=settings.lease_seconds)
                return JobOutcome(job_id, "abandoned")
            except (DatasetError, ModelLoadError, ValueError) as error:
                error_kind, error_code = classify_error(error)
                error_message = _message_of(error, error_kind)
                logger.info("job %s: failed with a user error (%s): %s", job_id, error_code, error_message)
            except Exception as error:  # the task boundary: anything else is our fault, recorded as a system error
                error_kind, error_code = classify_error(error)
                error_message = _message_of(error, error_kind)
                logger.exception("job %s: failed with a system error", job_id)
            if tracker is not None:  # before the outcome: a job seen ended has its run ended (warnings as events)
                tracker.finish(job_outcome(status, stop_signal.reason), export_dir=export_dir)
            # Buffered writes go out before the outcome (in order), waiting out a short database outage.
            flushed = observer.close(deadline_seconds=settings.lease_seconds)
            outcome = _record_outcome(db, settings, job_id, worker_id, attempt, lease, stop_signal, flushed,
                                      status, error_code, error_kind, error_message, export_dir, release)
    finally:
        heartbeat.stop()
    if outcome.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED) and requeue is not None:
        _ring_for_waiting_work(db, settings, requeue)
    return outcome


def _ring_for_waiting_work(db: Database, settings: Settings, requeue: Callable[[str], None]) -> None:
    """A job ended, so a worker (this one) and its tenant's slot are free: ring one doorbell if a queued job may
    start now. Doorbells that found nothing earlier (a tenant at its limit) were dropped; this is what starts the
    next job then. A failure loses nothing: the reaper enqueues unclaimed jobs after requeue_after_seconds."""
    try:
        waiting = job_rows.next_eligible_job(db, settings.tenant_max_running)
        if waiting is not None:
            requeue(waiting)
            logger.info("rang the doorbell of job %s, which may start now", waiting)
    except Exception as error:
        logger.warning("could not ring the doorbell for queued work (%s); the reaper will", error)


def _record_outcome(db: Database, settings: Settings, job_id: str, worker_id: str, attempt: int,
                    lease: AttemptLease, stop_signal: DbStopSignal, flushed: bool, status: str,
                    error_code: str | None, error_kind: str | None, error_message: str | None,
                    export_dir: Path | None, release: Callable[[str], str | None]) -> JobOutcome:
    if lease.is_lost():
        # The reaper requeued the job (or it ended elsewhere): whatever this attempt did is not the record.
        logger.warning("job %s: attempt %d lost the job; leaving it to its new owner", job_id, attempt)
        return JobOutcome(job_id, "lost")
    if not flushed:
        # The database did not come back in time: this attempt's outcome cannot be recorded in order. Leave the
        # job running; its lease runs out and the reaper retries it from its last checkpoint.
        logger.error("job %s: the database stayed unreachable; abandoning attempt %d to the reaper", job_id, attempt)
        return JobOutcome(job_id, "abandoned")
    deadline = settings.lease_seconds
    try:
        if status == JobStatus.CANCELLED and stop_signal.reason == "storage":
            # Its writes could not reach the database for a very long time: that is a failure of this attempt,
            # not a hand-back (which never counts), so it is left to its lease and the reaper, which count it.
            logger.error("job %s: attempt %d stopped, its writes could not reach the database", job_id, attempt)
            return JobOutcome(job_id, "abandoned")
        if status == JobStatus.CANCELLED and stop_signal.reason == "shutdown":
            reason = "SIGTERM"
            released = _retrying("the hand-back", lambda: release(reason), deadline)
            if released is None:
                return JobOutcome(job_id, "lost")
            logger.info("job %s: attempt %d handed back (%s): now %s", job_id, attempt, reason, released)
            return JobOutcome(job_id, "handed_back" if released == JobStatus.QUEUED else released)
        recorded = _retrying(f"the outcome ({status})", lambda: job_rows.finish_job(
            db, job_id, worker_id, status, error_code=error_code, error_message=error_message, error_kind=error_kind,
            export_dir=export_dir, attempt=attempt), deadline)
    except SQLAlchemyError:
        logger.error("job %s: could not record the outcome %s; leaving the job to its lease and the reaper",
                     job_id, status, exc_info=True)
        return JobOutcome(job_id, "abandoned")
    if recorded is None:
        logger.warning("job %s: %s not recorded: this worker no longer holds the job", job_id, status)
        return JobOutcome(job_id, "lost")
    logger.info("job %s: %s%s", job_id, recorded, f" ({error_code})" if error_code and recorded == JobStatus.FAILED else "")
    return JobOutcome(job_id, recorded, error_code if recorded == JobStatus.FAILED else None)


@shared_task(name=TaskName.RUN_JOB, bind=True, ignore_result=True)
def run_job(self: Any, job_id: str) -> str:
    from app.queue import CeleryTaskQueue

    settings = _settings_of(self.app)

    def requeue(handed_back: str) -> None:
        queue = CeleryTaskQueue(settings.broker_url)
        try:
            queue.enqueue_job(handed_back)
        finally:
            queue.close()

    outcome = execute_job(_database(settings.database_url), settings, job_id, worker_id_for(self.request.hostname),
                          requeue=requeue)
    return outcome.status


# ------------------------------------------------------------------------------------------ the reaper


def reap(db: Database, settings: Settings, queue: Any, *, leases_lost: bool = False) -> list[str]:
    """One reaper pass: requeue expired leases and unclaimed queued jobs; returns the ids enqueued.

    ``leases_lost``: every lease is counted as expired, as if ``lease_seconds`` had passed. For ``ctpd up`` at
    start, which owns its database: whatever still holds a job was left there by a previous run that died."""
    # Stamped with the real time either way: only the cutoff moves.
    expired_before = utcnow() + timedelta(seconds=settings.lease_seconds + 1) if leases_lost else None
    requeued = job_rows.reap_stale_jobs(db, expired_before=expired_before)
    unclaimed = job_rows.stale_queued_jobs(db, settings.requeue_after_seconds)
    job_ids = list(dict.fromkeys(requeued + unclaimed))
    for job_id in job_ids:
        queue.enqueue_job(job_id)
    if job_ids:
        logger.info("reaper: enqueued %d job(s) again: %s", len(job_ids), ", ".join(job_ids))
    sweep_orphans(settings)  # files killed uploads and stage builds left behind (worker/orphan_sweep.py)
    return job_ids


@shared_task(name=TaskName.REAP_STALE_JOBS, bind=True, ignore_result=True)
def reap_stale_jobs(self: Any) -> int:
    from app.queue import CeleryTaskQueue

    settings = _settings_of(self.app)
    queue = CeleryTaskQueue(settings.broker_url)
    try:
        return len(reap(_database(settings.database_url), settings, queue))
    finally:
        queue.close()


# ------------------------------------------------------------------------------------ checkpoint models


@shared_task(name=TaskName.MATERIALIZE_CHECKPOINT, bind=True, ignore_result=True)
def materialize_checkpoint(self: Any, job_id: str, checkpoint_id: str) -> str:
    """A training checkpoint as a model folder (``default`` queue; worker/checkpoint_models.py)."""
    from worker.checkpoint_models import build_checkpoint_model

    settings = _settings_of(self.app)
    return build_checkpoint_model(_database(settings.database_url), settings, job_id, checkpoint_id)


# ------------------------------------------------------------------------------------------ preflights


@shared_task(name=TaskName.PREFLIGHT, bind=True, ignore_result=True)
def preflight(self: Any, preflight_id: str) -> str:
    """A dry run's data part (``default`` queue; worker/preflight.py): the tokenizers, the whole dataset read and
    validated, a sample encoded and aligned, written to the ``preflights`` row the API polls."""
    from worker.preflight import run_preflight

    settings = _settings_of(self.app)
    return run_preflight(_database(settings.database_url), settings, preflight_id)


# ---------------------------------------------------------------------------------------- worker set-up


# What every job process imports lazily on its way to the first stage, imported once in the parent instead: ~1,500
# modules (transformers' auto classes, accelerate, sympy through torch's symbolic shapes) that otherwise cost each
# fresh child ~6 s on a busy 2-core host (measured: a tiny DPO job 7.0 s -> 1.2 s). Imports only: nothing here
# initialises CUDA or starts a thread pool, so forking stays safe.
TRAINING_PRELOADS = (
    "worker.policy",
    "worker.tracking",
    "sympy",
    "accelerate",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
)


@celeryd_after_setup.connect
def _preload_training_stack(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """In a worker that consumes ``train``: import the training stack once in the parent (no CUDA is
    touched), so each per-job child starts with it loaded instead of importing torch again.

    Also quiets what does not belong in a worker log: progress bars (Celery logs stderr as warnings; the
    job's progress is in SQL) and the tokenizers' thread pool, which must not run across fork()."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        queues = set(instance.app.amqp.queues.consume_from)
    except AttributeError:
        return
    if QueueName.TRAIN in queues:
        import worker.recipe  # noqa: F401

        for name in TRAINING_PRELOADS:
            try:
                importlib.import_module(name)
            except ImportError as error:  # an optional part: the job imports it itself, or does without
                logger.info("not preloaded: %s (%s)", name, error)
        logger.info("preloaded the training stack for the %s queue", QueueName.TRAIN)


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc): the Celery pool processes (and an embedded beat)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


@worker_shutting_down.connect
def _hand_back_running_jobs(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    """Warm shutdown (SIGTERM/SIGINT to the worker): Celery would wait for the running job to *finish*, which
    holds a deploy for as long as the job has left. Forward SIGTERM to the pool children instead: a job
    process checkpoints and hands its job back within ``shutdown_grace_seconds`` (``_ShutdownHandler``), an
    idle one just exits, and the warm shutdown completes as soon as they have."""
    if how != "Warm":
        return  # a cold shutdown terminates the children itself
    _DRAINING.set()  # before the children hand back: their doorbells must not start a new attempt here
    for child in child_pids(os.getpid()):
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            continue
    logger.info("warm shutdown (%s): asked the job processes to hand their jobs back", sig)
