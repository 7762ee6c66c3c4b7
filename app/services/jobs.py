"""Submitting and cancelling a job: the checks, the row, the doorbell and the events, in that order.

``submit_job`` is the whole of ``POST /v1/jobs`` but the HTTP: the remote-code policy (a 403), the metadata
limits and every reference the spec names (a 422), the row with its idempotency key, then the enqueue and
its ``job_queued`` event. Once the row is committed the submission has succeeded, whatever else fails (the
broker, the event, reading the transitions back): a job that exists is never reported as an error, or a
client without an Idempotency-Key would submit it twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app import policy, preflight
from app.db import datasets as dataset_rows
from app.db import events as job_log
from app.db import jobs as job_rows
from app.db.auth import Principal
from app.db.engine import Database
from app.db.jobs import IdempotencyConflict, JobNotCancellable, QueueFull
from app.db.models import PRIORITY_RANKS, Job
from app.policy import Caller
from app.queue import TaskQueue
from app.settings import Settings
from ctpd_core.spec import JobSpec
from ctpd_core.vocab import EventLevel, EventType, JobStatus, QueueName

logger = logging.getLogger(__name__)

MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512

Problems = list[tuple[str | None, str]]  # (param, message): the field and what to do about it

__all__ = [
    "IdempotencyConflict",
    "InvalidSubmission",
    "JobNotCancellable",
    "NoSuchJob",
    "QueueFull",
    "RemoteCodeForbidden",
    "SubmitResult",
    "cancel_job",
    "dataset_problems",
    "submit_job",
]


class RemoteCodeForbidden(Exception):
    """``trust_remote_code`` without the deployment's and an admin's permission (the API's 403)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))


class InvalidSubmission(Exception):
    """The spec breaks a limit or names something its submitter may not use (the API's 422)."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))


class NoSuchJob(LookupError):
    """No such job for this tenant (another tenant's job is none too)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} for this API key")


@dataclass(frozen=True)
class SubmitResult:
    """The job, whether this request created it (False: an idempotent replay), and its status changes."""

    job: Job
    created: bool
    transitions: list[tuple[str, datetime]]


def caller_of(principal: Principal, settings: Settings) -> Caller:
    return Caller.of(settings, tenant=principal.tenant, is_admin=principal.is_admin)


def metadata_problems(metadata: dict[str, str]) -> Problems:
    problems: Problems = []
    if len(metadata) > MAX_METADATA_PAIRS:
        problems.append(("metadata", f"metadata: at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}"))
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_KEY:
            problems.append((f"metadata.{key}", f"metadata keys need 1 to {MAX_METADATA_KEY} characters, got {key!r}"))
        elif len(value) > MAX_METADATA_VALUE:
            problems.append((f"metadata.{key}", f"metadata.{key}: at most {MAX_METADATA_VALUE} characters"))
    return problems


def _named_uploads(spec: JobSpec) -> dict[str, str]:
    """The uploads the spec names, by the field that names them (``dataset.id``, ``dataset.validation_id``)."""
    named = {"dataset.id": spec.dataset.id, "dataset.validation_id": spec.dataset.validation_id}
    return {param: dataset_id for param, dataset_id in named.items() if dataset_id is not None}


def dataset_problems(db: Database, spec: JobSpec, tenant: str) -> list[tuple[str, str]]:
    """``dataset.id`` and ``dataset.validation_id`` must each name one of the tenant's own uploads (the API
    checks this at submission, the worker again before it opens anything)."""
    problems: list[tuple[str, str]] = []
    for param, dataset_id in _named_uploads(spec).items():
        if dataset_rows.get_dataset(db, dataset_id, tenant) is None:
            problems.append((param, f"{param}: no dataset {dataset_id!r} for this API key; upload the file with "
                             "POST /v1/datasets and use the id it returns"))
    return problems


def reference_problems(db: Database, spec: JobSpec, principal: Principal, settings: Settings) -> Problems:
    """Every reference of the spec that the caller may not use, as the API sees the disk."""
    problems: Problems = list(dataset_problems(db, spec, principal.tenant))
    problems += policy.experiment_problems(spec, settings.mlflow_tracking_uri)  # the tracking URI: in the next call
    problems += policy.reference_problems(
        spec, caller_of(principal, settings),
        # job:<id> and the artifact folders of a job: only the tenant's own jobs that exported a student.
        owns_job=lambda job_id: job_rows.has_export(db, job_id, principal.tenant),
        owns_dataset=lambda dataset_id: dataset_rows.get_dataset(db, dataset_id, principal.tenant) is not None,
    )
    return problems


def submit_job(
    db: Database,
    queue: TaskQueue,
    settings: Settings,
    principal: Principal,
    spec: JobSpec,
    *,
    request_hash: str,
    idempotency_key: str | None = None,
) -> SubmitResult:
    """Check, create and enqueue a job. Raises :class:`RemoteCodeForbidden`, :class:`InvalidSubmission`,
    :class:`IdempotencyConflict` or :class:`QueueFull` (the tenant's ``max_queued``; nothing stored either way);
    ``request_hash`` identifies the request body for replays."""
    remote_code = policy.remote_code_problems(spec, caller_of(principal, settings))
    if remote_code:
        raise RemoteCodeForbidden(remote_code)
    problems = metadata_problems(spec.metadata) + reference_problems(db, spec, principal, settings)
    if problems:
        raise InvalidSubmission(problems)
    # After the policy checks: the memory plan reads the model folders the spec names (app/preflight.py). A job
    # that cannot fit the deployment's GPUs is refused with the numbers and the fix before anything is queued.
    try:
        preflight.check_job(spec, settings, db)
    except preflight.PreflightRefused as refused:
        raise InvalidSubmission(refused.problems) from None
    uploads = _named_uploads(spec)
    try:
        job, created = job_rows.create_job(
            db, tenant=principal.tenant, spec=spec.model_dump(mode="json"), name=spec.name, metadata=spec.metadata,
            idempotency_key=idempotency_key, request_hash=request_hash, max_attempts=settings.max_attempts,
            submitted_by_admin=principal.is_admin, dataset_ids=sorted(set(uploads.values())),
            priority=PRIORITY_RANKS[spec.priority], gpus_required=spec.gpus_required,
            default_max_queued=settings.tenant_max_queued,
        )
    except job_rows.DatasetsGone as gone:  # deleted between the check above and the insert
        raise InvalidSubmission([
            (param, f"{param}: dataset {dataset_id!r} was deleted while this job was submitted; upload the file "
                    "again with POST /v1/datasets and use the id it returns")
            for param, dataset_id in uploads.items() if dataset_id in gone.dataset_ids
        ]) from None
    if not created:
        return SubmitResult(job, False, job_log.job_transitions(db, [job.id])[job.id])
    # The row is committed: from here on the submission has succeeded. Ring the doorbell: a failure loses
    # nothing, the job stays queued and the reaper enqueues it again after requeue_after_seconds.
    try:
        queue.enqueue_job(job.id)
    except Exception as error:  # the broker is down or misconfigured: record it and answer anyway
        logger.warning("could not enqueue job %s: %s", job.id, error)
        _note_queued(db, job.id, f"could not reach the broker ({type(error).__name__}: {error}); the job stays "
                     f"queued and is enqueued again within {settings.requeue_after_seconds} s",
                     level=EventLevel.WARNING, data={"enqueued": False, "error": f"{type(error).__name__}: {error}"})
    else:
        _note_queued(db, job.id, "enqueued for a worker", data={"enqueued": True, "queue": QueueName.TRAIN})
    try:
        transitions = job_log.job_transitions(db, [job.id])[job.id]
    except SQLAlchemyError:  # the database went away after the commit: answer from the row in hand
        logger.warning("job %s created; its transitions could not be read back", job.id, exc_info=True)
        transitions = [(JobStatus.QUEUED, job.created_at)]
    return SubmitResult(job, True, transitions)


def _note_queued(db: Database, job_id: str, message: str, **kwargs: Any) -> None:
    """The job_queued event; a database that went away after the job's commit costs the event, not the job."""
    try:
        job_log.add_event(db, job_id, EventType.JOB_QUEUED, message, **kwargs)
    except SQLAlchemyError:
        logger.warning("job %s created; its job_queued event could not be written", job_id, exc_info=True)


def cancel_job(db: Database, principal: Principal, job_id: str) -> Job:
    """Request the cancel of one of the tenant's jobs (see :func:`app.db.jobs.request_cancel`). Raises
    :class:`NoSuchJob` or :class:`JobNotCancellable` (it already succeeded or failed)."""
    job = job_rows.request_cancel(db, job_id, principal.tenant)
    if job is None:
        raise NoSuchJob(job_id)
    return job
