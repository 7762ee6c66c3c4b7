"""Response shapes (what OpenAPI documents), and the functions that build them from rows.

The request body of ``POST /v1/jobs`` is the JobSpec itself (``ctpd_core.spec``); these are only outputs. A job's
``spec`` is that same JobSpec model, so the document has one ``JobSpec`` component for the request and the
response, and a generated client reads back the type it sent. Statuses, event types and levels are the shared
vocabulary's enums (``ctpd_core.vocab``), so the document lists every value a client must handle.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.db import models as orm  # the SQL rows; the names without a prefix here are the API's schemas
from app.db.jobs import QueuePlace
from app.policy import JOB_MODEL_PREFIX
from ctpd_core.spec import JobSpec
from ctpd_core.vocab import EventLevel, EventType, JobStatus


class FieldProblem(BaseModel):
    """One problem of a request (invalid_request, remote_code_forbidden)."""

    param: str | None = Field(description="The offending field, as `error.param` names it.")
    message: str = Field(description="What is wrong with it and how to fix it.")


class RowProblem(BaseModel):
    """One bad row of an uploaded dataset (invalid_dataset)."""

    row: int = Field(description="1-based: the JSONL line, or the JSON / Parquet row number.")
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable, e.g. invalid_request, not_found, idempotency_conflict.")
    message: str = Field(description="What is wrong and how to fix it.")
    param: str | None = Field(
        description="The offending field as a dotted path (training.batch_size), query parameter, header or 'file'."
    )
    errors: list[FieldProblem | RowProblem] | None = Field(
        default=None, description="422 only: one {param, message} per problem (invalid_request), or one "
        "{row, message} per bad row (invalid_dataset; rows are 1-based JSONL lines or JSON/Parquet row numbers)."
    )
    total_errors: int | None = Field(
        default=None, description="invalid_dataset only: how many rows are bad (`errors` lists the first ones)."
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Progress(BaseModel):
    step: int | None = Field(description="Optimizer steps (or items) done in the current stage.")
    total: int | None = Field(description="Steps of the current stage in total.")
    eta_seconds: float | None = Field(description="Estimated seconds until the current stage finishes.")
    detail: str | None = Field(
        default=None,
        description="What the stage is counting: positive / negative (training π+ / π− in contrastive), chosen / "
        "rejected (a log-prob pass over those responses); null when the stage has one part.",
    )


class JobError(BaseModel):
    code: str | None = Field(description="invalid_dataset, model_not_found, invalid_spec, worker_lost, internal_error, ...")
    message: str | None
    kind: Literal["user", "system"] | None = Field(
        description="user: fix the request and submit again; system: the service failed (retrying may help)."
    )


class Transition(BaseModel):
    status: JobStatus
    at: datetime


class ExportedModel(BaseModel):
    id: str = Field(description="Use as a model reference ({\"model\": id}), e.g. as the teacher of another job.")
    object: Literal["model"] = "model"
    download_url: str = Field(description="The folder as a streamed tar.gz (cannot resume).")
    archive_url: str = Field(description="The folder as a plain tar with Range support: resumable (`Range: bytes=N-`).")
    artifacts_url: str = Field(description="The folder's files, each with its own (resumable) download URL.")


class QueuePosition(BaseModel):
    """Where a queued job stands and why it waits (docs/service-contract.md, "Scheduling")."""

    position: int = Field(description="1-based, among every queued job in claim order (priority, then oldest first).")
    reason: Literal["tenant_limit", "no_worker_with_gpus", "behind_higher_priority", "behind_older",
                    "waiting_for_worker"] = Field(
        description="tenant_limit: the tenant runs its max_running jobs; no_worker_with_gpus: no live worker has "
        "the GPUs the job needs; behind_higher_priority / behind_older: other queued jobs go first; "
        "waiting_for_worker: no live worker, or the job is next and every worker is busy."
    )
    detail: str = Field(description="The reason for a person, with the figures (\"tenant acme runs 2 of its 2 jobs\").")


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    stage: str | None = Field(description="prepare, contrastive, weights, reference, distill, evaluate or export.")
    progress: Progress
    attempt: int = Field(description="Deliveries so far (0 until a worker claims the job).")
    max_attempts: int
    error: JobError | None
    name: str | None
    metadata: dict[str, str]
    created_at: datetime
    started_at: datetime | None = Field(description="The first time a worker started the job.")
    cancel_requested_at: datetime | None
    finished_at: datetime | None
    transitions: list[Transition] = Field(description="Every status change, oldest first.")
    spec: JobSpec = Field(description="The resolved JobSpec: the request with every default filled in.")
    model: ExportedModel | None = Field(description="The exported student, once the job succeeded.")
    queue: QueuePosition | None = Field(
        default=None, description="While the job is queued: its place in the queue and why it waits; else null."
    )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool = Field(description="Pass the last job's id as `after` for the next page.")


class JobEvent(BaseModel):
    id: int = Field(description="Increasing; pass the last one seen as `after` to read only newer events.")
    object: Literal["job.event"] = "job.event"
    job_id: str
    created_at: datetime
    type: EventType = Field(
        description="job_created, job_queued, job_started, stage_started, stage_finished, checkpoint_saved, "
        "job_restarted, job_handed_back, cancel_requested, job_succeeded, job_failed, job_cancelled."
    )
    level: EventLevel
    stage: str | None
    message: str
    data: dict[str, Any]


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class MetricPoint(BaseModel):
    step: int
    value: float


class JobMetrics(BaseModel):
    object: Literal["job.metrics"] = "job.metrics"
    job_id: str
    data: dict[str, list[MetricPoint]] = Field(
        description="One series per `<stage>/<metric>` (e.g. `distill/loss`, `contrastive:positive/loss`, "
        "`evaluate/accuracy`), points in step order; a step recorded twice (a resumed attempt) keeps its last value."
    )


class Artifact(BaseModel):
    path: str = Field(description="Relative to the export folder, '/'-separated.")
    size_bytes: int
    download_url: str = Field(description="This file alone, with Range support.")


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Artifact]
    has_more: bool = False


class LengthDistribution(BaseModel):
    """Lengths over the rows (nearest-rank percentiles)."""

    min: int
    mean: float
    p50: int
    p90: int
    p99: int
    max: int


STATS_MISSING = ("stored before dataset statistics existed (migration 0007_dataset_stats): upload the file again "
                 "(POST /v1/datasets) to have them counted; token lengths appear once a preflight measures them")


class DatasetStats(BaseModel):
    """What an upload's rows hold, counted by the upload's validator, and the token lengths measured per tokenizer
    by a job's preflight (``POST /v1/jobs?dry_run=true``). docs/datasets.md, "Statistics"."""

    object: Literal["dataset.stats"] = "dataset.stats"
    dataset_id: str
    counted: bool = Field(description="Whether the upload's counts below exist: false for a dataset stored before "
                                      "they were computed (see `missing`).")
    missing: str | None = Field(default=None, description="Why the counts are absent, and how to get them.")
    rows: int | None = None
    shapes: dict[str, int] | None = Field(
        default=None, description="Rows per detected row shape: standard_explicit, standard_implicit, "
        "conversational_explicit, conversational_implicit (ultrafeedback's), openai_preference.")
    system_turn_rows: int | None = Field(default=None, description="Conversational rows whose prompt has a system turn.")
    multi_turn_rows: int | None = Field(default=None, description="Conversational rows with more than one user turn.")
    duplicate_rows: int | None = Field(default=None, description="Rows equal to an earlier row (prompt, chosen, rejected).")
    duplicate_prompts: int | None = Field(default=None, description="Rows whose prompt (text or messages) an earlier "
                                          "row has.")
    identical_pairs: int | None = Field(default=None, description="Rows whose chosen and rejected are identical: valid, "
                                        "but they carry no preference and are left out of training.")
    length_chars: dict[str, LengthDistribution] | None = Field(
        default=None, description="Characters of prompt (a conversation's plain rendering), chosen and rejected.")
    token_lengths: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per tokenizer (model reference), the lengths a preflight measured.")


def dataset_stats_object(row: orm.Dataset) -> DatasetStats:
    stats = dict(row.stats or {})
    token_lengths = stats.pop("token_lengths", None) or {}
    counted = "rows" in stats
    return DatasetStats(dataset_id=row.id, counted=counted, missing=None if counted else STATS_MISSING,
                        token_lengths=token_lengths, **(stats if counted else {}))


class Dataset(BaseModel):
    id: str = Field(description="Reference it in a spec as {\"dataset\": {\"id\": ...}}.")
    object: Literal["dataset"] = "dataset"
    filename: str
    format: Literal["jsonl", "json", "parquet"]
    num_rows: int
    sha256: str = Field(description="sha256 of the uploaded file's bytes.")
    size_bytes: int
    created_at: datetime
    stats: DatasetStats = Field(description="What the rows hold (also at GET /v1/datasets/{id}/stats); `counted` "
                                            "is false for a dataset stored before statistics were computed.")


class Model(BaseModel):
    id: str = Field(description="Use as a model reference: {\"model\": id}.")
    object: Literal["model"] = "model"
    source: Literal["catalog", "job"]
    description: str
    available: bool = Field(description="catalog: its package is installed here; job: the folder exists.")
    architecture: str | None = None
    tokenizer_kind: str | None = None
    license: str | None = None
    install: str | None = Field(default=None, description="catalog: the command that installs it.")
    job_id: str | None = None
    base_model: str | None = Field(default=None, description="job: the student the job started from.")
    created_at: datetime | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
    has_more: bool = False


class Check(BaseModel):
    ok: bool
    error: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, Check]


class NotReady(Readiness):
    """/readyz's 503: the readiness body plus the standard error (``not_ready``) naming the failing checks."""

    status: Literal["unavailable"] = "unavailable"
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"


# ------------------------------------------------------------------------------ checkpoints (app/api/checkpoints.py)


class CheckpointModel(BaseModel):
    """A checkpoint made into a Hugging Face folder (POST .../checkpoints/{id}/model builds it on a worker)."""

    status: Literal["absent", "pending", "ready", "failed"] = Field(
        description="absent: never asked for (POST .../model); pending: a worker is building it; ready: download it; "
        "failed: see `error`, then POST again."
    )
    error: str | None = Field(default=None, description="Why the last build failed (status failed).")
    size_bytes: int | None = Field(default=None, description="The folder's bytes on disk (status ready).")
    archive_url: str | None = Field(
        default=None, description="The folder as a plain tar with Range support (status ready)."
    )
    files: list[Artifact] = Field(default_factory=list, description="The folder's files (status ready).")


class Checkpoint(BaseModel):
    id: str = Field(description="`<stage>-<step, 8 digits>`, e.g. `distill-00000040`: stable and URL-safe.")
    object: Literal["checkpoint"] = "checkpoint"
    job_id: str
    stage: str = Field(description="The training stage: `distill` (the student). π+/π− checkpoints are not listed.")
    step: int = Field(description="Optimizer steps done when it was saved.")
    created_at: datetime | None = Field(description="When it was saved (its checkpoint_saved event).")
    size_bytes: int = Field(description="Bytes on disk of the checkpoint itself (its materialised model not counted).")
    metrics: dict[str, float] = Field(description="The training metrics of that step (`loss`, `reward_margin`, ...).")
    model: CheckpointModel
    model_url: str = Field(description="POST here to make it a model folder; GET its files once `model.status` is ready.")


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint] = Field(description="The checkpoints still on disk, oldest first.")
    has_more: bool = False


# --------------------------------------------------------------------------------------------- builders


def job_object(row: orm.Job, transitions: list[tuple[str, datetime]], place: QueuePlace | None = None) -> Job:
    error = None
    if row.error_code or row.error_message:
        error = JobError(code=row.error_code, message=row.error_message, kind=row.error_kind)  # type: ignore[arg-type]
    model = None
    if row.status == JobStatus.SUCCEEDED and row.export_dir:
        # Named as /v1/models lists it: a reference any of the tenant's jobs may use, not the server path
        # (which a multi-tenant service refuses as a model reference, and which is the server's business).
        model = ExportedModel(
            id=f"{JOB_MODEL_PREFIX}{row.id}", download_url=f"/v1/jobs/{row.id}/artifacts/model.tar.gz",
            archive_url=f"/v1/jobs/{row.id}/model.tar", artifacts_url=f"/v1/jobs/{row.id}/artifacts",
        )
    return Job(
        id=row.id, status=JobStatus(row.status), stage=row.stage,
        progress=Progress(step=row.progress_step, total=row.progress_total, eta_seconds=row.eta_seconds,
                          detail=row.progress_detail),
        attempt=row.attempt, max_attempts=row.max_attempts, error=error, name=row.name,
        metadata=dict(row.job_metadata or {}), created_at=row.created_at, started_at=row.started_at,
        cancel_requested_at=row.cancel_requested_at, finished_at=row.finished_at,
        transitions=[Transition(status=JobStatus(status), at=at) for status, at in transitions],
        # Stored resolved, so validating it again changes nothing; a row the current JobSpec cannot read would be
        # refused by the worker too (a spec change that breaks stored jobs needs a migration, not a lenient type).
        spec=JobSpec.model_validate(row.spec), model=model,
        queue=QueuePosition(position=place.position, reason=place.reason, detail=place.detail)  # type: ignore[arg-type]
        if place is not None and row.status == JobStatus.QUEUED else None,
    )


def event_object(row: orm.JobEvent) -> JobEvent:
    return JobEvent(
        id=row.id, job_id=row.job_id, created_at=row.created_at, type=EventType(row.type), level=EventLevel(row.level),
        stage=row.stage, message=row.message, data=dict(row.data or {}),
    )


def dataset_object(row: orm.Dataset) -> Dataset:
    return Dataset(
        id=row.id, filename=row.filename, format=row.format, num_rows=row.num_rows,  # type: ignore[arg-type]
        sha256=row.sha256, size_bytes=row.size_bytes, created_at=row.created_at, stats=dataset_stats_object(row),
    )


# ------------------------------------------------------------------------------- tenants (app/api/tenants.py)


class TenantLimits(BaseModel):
    """A tenant's scheduling limits: the effective values, the admin's overrides, and the tenant's jobs now."""

    object: Literal["tenant.limits"] = "tenant.limits"
    tenant: str
    max_running: int = Field(description="Jobs the tenant may have running at once (enforced at claim time).")
    max_queued: int = Field(description="Queued jobs the tenant may have; a submission beyond it is a 429.")
    max_running_override: int | None = Field(description="The admin's override; null: the deployment's default.")
    max_queued_override: int | None = Field(description="The admin's override; null: the deployment's default.")
    running: int = Field(description="The tenant's jobs running (or cancelling) now.")
    queued: int = Field(description="The tenant's jobs queued now.")
