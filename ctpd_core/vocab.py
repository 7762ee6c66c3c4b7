"""The service's shared vocabulary: job statuses, stage names, event types, queue and task names.

Torch-free and dependency-free, so ``app`` (the API image carries no torch), ``worker`` and the core all name
these values through one module instead of repeating bare strings. Each is a :class:`~enum.StrEnum`: a member
*is* its string (``JobStatus.QUEUED == "queued"``), so it goes into SQL, JSON and Celery unchanged, and a
value read back from any of them compares equal to its member.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A job's lifecycle (docs/service-contract.md): queued -> running -> succeeded | failed | cancelled, with
    ``cancelling`` between a cancel request and the worker's stop."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A worker's attempt holds the job (a lease, a heartbeat) in these.
HELD_STATUSES: tuple[JobStatus, ...] = (JobStatus.RUNNING, JobStatus.CANCELLING)
# Not yet final: the job still needs a worker, or one is on it.
ACTIVE_STATUSES: tuple[JobStatus, ...] = (JobStatus.QUEUED, *HELD_STATUSES)
# Final: no transition leaves these.
TERMINAL_STATUSES: tuple[JobStatus, ...] = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Stage(StrEnum):
    """The stages of a job, in the order ``run_spec`` runs them (README, "Pipeline"). Training inside a stage
    reports progress under ``distill`` or ``contrastive:<direction>`` (:func:`fit_stage`)."""

    PREPARE = "prepare"
    REFERENCE = "reference"
    CONTRASTIVE = "contrastive"
    WEIGHTS = "weights"
    DISTILL = "distill"
    EVALUATE = "evaluate"
    EXPORT = "export"


def fit_stage(stage: Stage, direction: str | None = None) -> str:
    """The name a training loop reports under: the stage, or ``contrastive:positive`` / ``contrastive:negative``."""
    return str(stage) if direction is None else f"{stage}:{direction}"


class EventType(StrEnum):
    """The ``type`` of a row in a job's event log (``GET /v1/jobs/{id}/events``)."""

    JOB_CREATED = "job_created"
    JOB_QUEUED = "job_queued"
    JOB_STARTED = "job_started"
    STAGE_STARTED = "stage_started"
    STAGE_FINISHED = "stage_finished"
    CHECKPOINT_SAVED = "checkpoint_saved"
    JOB_RESTARTED = "job_restarted"
    JOB_HANDED_BACK = "job_handed_back"
    CANCEL_REQUESTED = "cancel_requested"
    JOB_SUCCEEDED = "job_succeeded"
    JOB_FAILED = "job_failed"
    JOB_CANCELLED = "job_cancelled"
    # A checkpoint made into a model folder (POST /v1/jobs/{id}/checkpoints/{checkpoint}/model): asked, built, or
    # not (data: checkpoint, step; error). The listing's model status is read from these and the folder on disk.
    CHECKPOINT_MODEL_REQUESTED = "checkpoint_model_requested"
    CHECKPOINT_MODEL_READY = "checkpoint_model_ready"
    CHECKPOINT_MODEL_FAILED = "checkpoint_model_failed"
    # A mirror of the job (MLflow, worker/tracking.py) could not be written; the job goes on without it.
    TRACKING_WARNING = "tracking_warning"


class EventLevel(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class QueueName(StrEnum):
    """Celery queues: jobs go to ``train`` (one worker process per GPU), light work to ``default``."""

    TRAIN = "train"
    DEFAULT = "default"


class TaskName(StrEnum):
    """Celery task names; the API sends them by name, so it never imports the worker."""

    RUN_JOB = "ctpd.run_job"
    REAP_STALE_JOBS = "ctpd.reap_stale_jobs"
    MATERIALIZE_CHECKPOINT = "ctpd.materialize_checkpoint"  # default queue: a checkpoint as a model folder
    PREFLIGHT = "ctpd.preflight"  # default queue: a dry run's data report (tokenizers, alignment, truncation)


class WebhookEventType(StrEnum):
    """What a webhook endpoint subscribes to (``POST /v1/webhooks``): each job transition, its checkpoints and its
    evaluation results. ``cancelling`` is announced by nobody: a cancel request ends in ``job.cancelled``."""

    JOB_QUEUED = "job.queued"
    JOB_RUNNING = "job.running"
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    JOB_CHECKPOINT = "job.checkpoint"
    JOB_EVALUATED = "job.evaluated"
