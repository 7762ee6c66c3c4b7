"""The Celery tasks: thin shells over the repository and ``worker.recipe`` (docs/service-contract.md, "Worker").

``ctpd.run_job(job_id)``
    claims the job by compare-and-set (a duplicate delivery, or a job cancelled while queued, does nothing),
    renews its lease from a heartbeat thread, runs the recipe with a :class:`~worker.sinks.DbObserver` and
    a :class:`~worker.sinks.DbStopSignal`, and records the end: ``succeeded`` (with the export folder),
    ``cancelled`` (the recipe checkpointed and returned "stopped"), or ``failed`` with a user error
    (``invalid_dataset``, ``model_not_found``, ``invalid_spec``) or a system error (``internal_error``).
    A restarted attempt resumes from the checkpoints in the job's run folder (the recipe does that itself).

``ctpd.reap_stale_jobs()``
    (beat, every 30 s, ``default`` queue) puts jobs whose lease ran out back to ``queued`` (or fails them
    with ``worker_lost`` after ``max_attempts``) and enqueues them again, together with queued jobs no worker
    claimed for ``requeue_after_seconds``, through ``app.queue.CeleryTaskQueue``.

The training stack (torch, transformers) is imported by ``run_job`` only; a worker that consumes ``train``
preloads it in the parent process (see :func:`_preload_training_stack`), so each fresh child forks with it
already imported. Importing torch touches no CUDA, so forking stays safe. The reaper's worker stays light.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import shared_task
from celery.signals import celeryd_after_setup

from app.db import repository
from ctpd_core.catalog import ModelLoadError
from ctpd_core.data import DatasetError
from worker.celery_app import REAP_STALE_JOBS, RUN_JOB, TRAIN_QUEUE
from worker.sinks import DbObserver, DbStopSignal, Heartbeat

if TYPE_CHECKING:
    from app.settings import Settings

logger = logging.getLogger(__name__)

MAX_ERROR_MESSAGE = 4000


@dataclass(frozen=True)
class JobOutcome:
    """What one delivery of ``run_job`` did (returned for logs and tests; results are not stored)."""

    job_id: str
    status: str  # succeeded | failed | cancelled | skipped (not claimed) | lost (the lease went elsewhere)
    error_code: str | None = None


# ---------------------------------------------------------------------------------------------- helpers


def _settings_of(app: Any) -> Settings:
    settings = getattr(app, "ctpd_settings", None)
    if settings is None:
        from app.settings import get_settings

        settings = get_settings()
    return settings


@lru_cache(maxsize=4)
def _database(url: str) -> repository.Database:
    """One Database per URL per process. Tasks run in fresh children (max_tasks_per_child=1), so the engine
    is always created after the fork and never shared with the parent."""
    return repository.Database(url)


def worker_id_for(hostname: str | None = None) -> str:
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


def classify_error(error: BaseException) -> tuple[str, str]:
    """``(error_kind, error_code)`` of an exception that ended a job."""
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


def dataset_resolver(db: repository.Database, tenant: str):
    """``dataset.id`` -> the uploaded file, for the job's own tenant only."""

    def resolve(dataset_id: str) -> Path:
        row = repository.get_dataset(db, dataset_id, tenant)
        if row is None:
            raise DatasetError(f"dataset {dataset_id!r} does not exist for tenant {tenant!r}; upload it with POST /v1/datasets")
        path = Path(row.path)
        if not path.is_file():
            raise DatasetError(f"the file of dataset {dataset_id!r} is missing from the artifact store ({path}); upload it again")
        return path

    return resolve


# ------------------------------------------------------------------------------------------------ run_job


def execute_job(
    db: repository.Database, settings: Settings, job_id: str, worker_id: str, *, device: Any = None
) -> JobOutcome:
    """The body of ``ctpd.run_job``, callable without Celery (``device``: "cpu", "cuda:0"...; default cuda if any)."""
    row = repository.claim_job(db, job_id, worker_id, settings.lease_seconds)
    if row is None:
        current = repository.get_job(db, job_id)
        logger.info("job %s: not claimed (status %s): a duplicate delivery or a cancelled job; nothing to do",
                    job_id, current.status if current else "missing")
        return JobOutcome(job_id, "skipped")
    logger.info("job %s: attempt %d of %d on %s", job_id, row.attempt, row.max_attempts, worker_id)

    heartbeat = Heartbeat(db, job_id, worker_id, settings.lease_seconds).start()
    stop_signal = DbStopSignal(db, job_id, lease_lost=heartbeat.lost)
    observer = DbObserver(db, job_id, stop_signal=stop_signal, attempt=row.attempt)
    status, error_code, error_kind, error_message, export_dir = "failed", None, None, None, None
    try:
        import torch

        from ctpd_core.spec import JobSpec
        from worker.recipe import RunContext, run_spec

        spec = JobSpec.model_validate(row.spec)
        context = RunContext(
            artifact_root=settings.artifact_root,
            run_dir=settings.artifact_root / "jobs" / job_id,
            model_cache=settings.model_cache,
            observer=observer,
            stop_signal=stop_signal,
            dataset_resolver=dataset_resolver(db, row.tenant),
            **({"device": torch.device(device)} if device is not None else {}),
        )
        result = run_spec(spec, context)
        if result.status == "succeeded":
            status, export_dir = "succeeded", result.export_dir
        else:
            status = "cancelled"
    except (DatasetError, ModelLoadError, ValueError) as error:
        error_kind, error_code = classify_error(error)
        error_message = _message_of(error, error_kind)
        logger.info("job %s: failed with a user error (%s): %s", job_id, error_code, error_message)
    except Exception as error:  # the task boundary: anything else is our fault, recorded as a system error
        error_kind, error_code = classify_error(error)
        error_message = _message_of(error, error_kind)
        logger.exception("job %s: failed with a system error", job_id)
    finally:
        observer.close()
        heartbeat.stop()

    if heartbeat.lost.is_set():
        # The reaper requeued the job (or it ended elsewhere): whatever this attempt did is not the record.
        logger.warning("job %s: lease lost during the attempt; leaving the job to its new owner", job_id)
        return JobOutcome(job_id, "lost")
    recorded = repository.finish_job(
        db, job_id, worker_id, status, error_code=error_code, error_message=error_message, error_kind=error_kind,
        export_dir=export_dir,
    )
    if not recorded:
        logger.warning("job %s: %s not recorded: this worker no longer holds the job", job_id, status)
        return JobOutcome(job_id, "lost")
    logger.info("job %s: %s%s", job_id, status, f" ({error_code})" if error_code else "")
    return JobOutcome(job_id, status, error_code)


@shared_task(name=RUN_JOB, bind=True, ignore_result=True)
def run_job(self: Any, job_id: str) -> str:
    settings = _settings_of(self.app)
    outcome = execute_job(_database(settings.database_url), settings, job_id, worker_id_for(self.request.hostname))
    return outcome.status


# ------------------------------------------------------------------------------------------ the reaper


def reap(db: repository.Database, settings: Settings, queue: Any) -> list[str]:
    """One reaper pass: requeue expired leases and unclaimed queued jobs; returns the ids enqueued."""
    requeued = repository.reap_stale_jobs(db)
    unclaimed = repository.stale_queued_jobs(db, settings.requeue_after_seconds)
    job_ids = list(dict.fromkeys(requeued + unclaimed))
    for job_id in job_ids:
        queue.enqueue_job(job_id)
    if job_ids:
        logger.info("reaper: enqueued %d job(s) again: %s", len(job_ids), ", ".join(job_ids))
    return job_ids


@shared_task(name=REAP_STALE_JOBS, bind=True, ignore_result=True)
def reap_stale_jobs(self: Any) -> int:
    from app.queue import CeleryTaskQueue

    settings = _settings_of(self.app)
    queue = CeleryTaskQueue(settings.broker_url)
    try:
        return len(reap(_database(settings.database_url), settings, queue))
    finally:
        queue.close()


# ---------------------------------------------------------------------------------------- worker set-up


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
    if TRAIN_QUEUE in queues:
        import worker.recipe  # noqa: F401

        logger.info("preloaded the training stack for the %s queue", TRAIN_QUEUE)
