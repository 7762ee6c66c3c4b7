"""/v1/jobs: submit, list, read, cancel; events, metrics, artifacts and the model download."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from app.api.artifacts import (
    Folder,
    download_responses,
    export_files,
    file_download,
    open_folder,
    ranged_response,
    tar_gz_stream,
    tar_layout,
)
from app.api.deps import DbDep, PrincipalDep, QueueDep, SettingsDep, StorageDep
from app.api.errors import ApiError, error_responses, invalid_request
from app.api.preflights import PreflightReport, dry_run
from app.api.schemas import (
    Artifact,
    ArtifactList,
    Job,
    JobEventList,
    JobList,
    JobMetrics,
    MetricPoint,
    event_object,
    job_object,
)
from app.db import events as job_log
from app.db import jobs as job_rows
from app.db import models as orm
from app.db.auth import Principal
from app.db.engine import Database, InvalidCursor
from app.services import jobs as job_service
from app.settings import Settings
from app.storage import Storage, export_key
from ctpd_core.spec import JobSpec
from ctpd_core.vocab import JobStatus

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"],
    # Every route checks the API key (401), validates its ids and query parameters (422: a NUL in an id is refused
    # before any query) and reads the database (503 while it is unreachable).
    responses=error_responses((401, 422, 503)),
)

# One level of the deepObject style: metadata[team]=nlp. A nested metadata[a][b] is not a filter (values are strings).
_METADATA_QUERY = re.compile(r"^metadata\[([^\[\]]*)\]$")
_LIST_QUERY = ("limit", "after", "status")  # list_jobs' named query parameters, besides the metadata filters

# The routes under /v1/jobs/{job_id}, besides the router's.
_ERRORS = error_responses((404,), {404: "No such job for this API key's tenant (`not_found`)."})


async def _raw_body(request: Request) -> bytes:
    return await request.body()  # already read (and cached) by FastAPI for the JobSpec


def _request_hash(body: bytes) -> str:
    canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _job_for(db: Database, job_id: str, principal: Principal) -> orm.Job:
    job = job_rows.get_job(db, job_id, principal.tenant)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r} for this API key", "job_id")
    return job


def _place_or_none(db: Database, settings: Settings, job: orm.Job) -> job_rows.QueuePlace | None:
    """The queue place of a job just created; a database gone after the commit costs the place, not the job."""
    try:
        return job_rows.queue_places(db, [job], settings.tenant_max_running).get(job.id)
    except SQLAlchemyError:
        logger.warning("job %s created; its queue position could not be read", job.id, exc_info=True)
        return None


def _view(db: Database, settings: Settings, job: orm.Job) -> Job:
    places = job_rows.queue_places(db, [job], settings.tenant_max_running)
    return job_object(job, job_log.job_transitions(db, [job.id])[job.id], places.get(job.id))


# ------------------------------------------------------------------------------------------- endpoints


@router.post(
    "",
    operation_id="create_job",
    status_code=201,
    response_model=Job,
    summary="Submit a job",
    description=(
        "The body is a JobSpec; the stored and returned `spec` is the resolved spec (every default filled in). "
        "Invalid input is a 422 naming the field (`error.param`) and the fix, and nothing is stored.\n\n"
        "**Idempotency:** with an `Idempotency-Key` header, the first request creates the job (201); repeating "
        "the same key with the same body returns that same job with **200** and `Idempotent-Replayed: true`, "
        "and nothing is enqueued again; the same key with a different body is a 409 `idempotency_conflict`. "
        "Keys are per tenant and never expire.\n\n"
        "**Dry run:** with `dry_run=true` nothing is stored as a job and nothing is queued: the answer is a "
        "preflight report (the resolved spec, errors and warnings each with its fix, tokenizers, alignment and "
        "truncation on a sample of the dataset, steps per stage, the memory plan, an estimated duration): 200 when "
        "complete, 202 with `status: pending` while a worker's part is still due (poll `GET /v1/preflights/{id}`)."
    ),
    responses={
        200: {"model": Job | PreflightReport,
              "description": "Replay of an earlier request with the same Idempotency-Key and body (a Job); with "
                             "`dry_run=true`, the complete preflight report.",
              "headers": {"Idempotent-Replayed": {"description": "`true`: the job an earlier request created "
                                                                 "(absent from a dry run's report).",
                                                  "schema": {"type": "string", "enum": ["true"]}}}},
        202: {"model": PreflightReport,
              "description": "`dry_run=true`: the API's part of the report; a worker's part is pending (`poll`)."},
        **error_responses((403, 409, 422, 429), {
            403: "`trust_remote_code` without the deployment's and an admin's permission (`remote_code_forbidden`).",
            409: "The Idempotency-Key was used with a different body (`idempotency_conflict`).",
            429: "The tenant has `max_queued` queued jobs already (`queue_full`); nothing is stored. Wait for some "
                 "to start, cancel queued ones, or have an admin raise the limit (`PUT /v1/tenants/{tenant}/limits`).",
            422: "Invalid spec (`invalid_request`): `error.param` names the field, `error.errors` lists every problem "
                 "with its fix; nothing is stored.",
        }),
    },
)
def create_job(
    spec: JobSpec,
    response: Response,
    principal: PrincipalDep,
    db: DbDep,
    queue: QueueDep,
    settings: SettingsDep,
    body: Annotated[bytes, Depends(_raw_body)],
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=255,
               description="Any unique string (e.g. a UUID); retrying with it never creates a second job."),
    ] = None,
    dry_run_only: Annotated[
        bool,
        Query(alias="dry_run", description="Check the job and report (a preflight) instead of queueing it."),
    ] = False,
) -> Job | JSONResponse:
    if dry_run_only:  # nothing of the job is stored or queued; the Idempotency-Key has nothing to protect
        report, status_code = dry_run(spec, principal, db, queue, settings)
        return JSONResponse(report.model_dump(mode="json"), status_code=status_code)
    try:
        submitted = job_service.submit_job(db, queue, settings, principal, spec, request_hash=_request_hash(body),
                                           idempotency_key=idempotency_key)
    except job_service.RemoteCodeForbidden as error:
        problems = error.problems
        raise ApiError(403, "remote_code_forbidden", str(error), problems[0][0],
                       errors=[{"param": param, "message": message} for param, message in problems]) from None
    except job_service.InvalidSubmission as error:
        raise invalid_request(error.problems) from None
    except job_service.QueueFull as full:
        raise ApiError(429, "queue_full", str(full), None) from None
    except job_service.IdempotencyConflict as conflict:
        raise ApiError(409, "idempotency_conflict",
                       f"{conflict}; use a new Idempotency-Key for a different request", "Idempotency-Key") from None
    if not submitted.created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    # A created job answers 201 even when the broker or the database failed after its commit (submit_job).
    return job_object(submitted.job, submitted.transitions, _place_or_none(db, settings, submitted.job))


@router.get(
    "",
    operation_id="list_jobs",
    response_model=JobList,
    summary="List jobs",
    description=(
        "Newest first. Cursor pagination: pass the last job's `id` of a page as `after` for the next one, while "
        "`has_more` is true. Filter by `status` and by metadata with `metadata[key]=value` (repeatable; all must "
        "match). Any other query parameter is a 422, so a misspelt filter never lists every job."
    ),
    openapi_extra={
        "parameters": [
            {
                "name": "metadata",
                "in": "query",
                "required": False,
                "style": "deepObject",
                "explode": True,
                "schema": {"type": "object", "additionalProperties": {"type": "string"}},
                "description": "Filter by metadata: `metadata[team]=nlp&metadata[run]=3`.",
            }
        ]
    },
)
def list_jobs(
    request: Request,
    principal: PrincipalDep,
    db: DbDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    # min_length=1 rather than reading '' as "from the start": a client whose cursor went missing would
    # otherwise restart at the newest job and page forever; refused, the bug shows (and the schema says so).
    after: Annotated[
        str | None,
        Query(min_length=1, description="The id of the last job of the previous page; leave it out for the first page."),
    ] = None,
    status: Annotated[
        JobStatus | None,
        Query(description="Only jobs in this status."),
    ] = None,
) -> JobList:
    metadata = {}
    for key, value in request.query_params.multi_items():
        if key in _LIST_QUERY:
            continue
        if key != "metadata" and not key.startswith("metadata["):
            # Refused rather than ignored, as unknown spec fields are: a typo (?staus=failed) would list every job.
            shown = key or "(a parameter without a name)"
            raise invalid_request([(key or None, f"{shown}: unknown query parameter; use {', '.join(_LIST_QUERY)} "
                                                 "or metadata[key]=value")])
        match = _METADATA_QUERY.match(key)
        if match is None:  # refused rather than ignored: a filter that silently matched everything would mislead
            raise invalid_request([(key, f"{key}: not a metadata filter; filter as metadata[key]=value (one level, "
                                         "the key without brackets), e.g. metadata[team]=nlp")])
        metadata[match.group(1)] = value
    try:
        rows, has_more = job_rows.list_jobs(db, principal.tenant, limit=limit, after=after, status=status, metadata=metadata)
    except InvalidCursor as error:
        raise ApiError(422, "invalid_request", str(error), "after") from None
    transitions = job_log.job_transitions(db, [row.id for row in rows])
    places = job_rows.queue_places(db, rows, settings.tenant_max_running)
    return JobList(data=[job_object(row, transitions[row.id], places.get(row.id)) for row in rows], has_more=has_more)


@router.get(
    "/{job_id}", operation_id="get_job", response_model=Job, summary="Get a job", responses=_ERRORS,
    description="A queued job's `queue` says where it stands (its `position` in claim order among every queued "
    "job) and why it waits (`reason`: tenant_limit, no_worker_with_gpus, behind_higher_priority, behind_older, "
    "waiting_for_worker; `detail` for a person).",
)
def get_job(job_id: str, principal: PrincipalDep, db: DbDep, settings: SettingsDep) -> Job:
    return _view(db, settings, _job_for(db, job_id, principal))


@router.post(
    "/{job_id}/cancel",
    operation_id="cancel_job",
    response_model=Job,
    summary="Cancel a job",
    description=(
        "A queued job is `cancelled` at once. A running job becomes `cancelling`: the worker checkpoints and "
        "stops at its next check, then the job is `cancelled`. Cancelling a cancelling or cancelled job returns "
        "it unchanged; a succeeded or failed job is a 409."
    ),
    responses={**_ERRORS, **error_responses((409,), {409: "The job already succeeded or failed (`job_not_cancellable`)."})},
)
def cancel_job(job_id: str, principal: PrincipalDep, db: DbDep, settings: SettingsDep) -> Job:
    try:
        job = job_service.cancel_job(db, principal, job_id)
    except job_service.JobNotCancellable as error:
        raise ApiError(409, "job_not_cancellable", str(error), "job_id") from None
    except job_service.NoSuchJob as error:
        raise ApiError(404, "not_found", str(error), "job_id") from None
    return _view(db, settings, job)


@router.get(
    "/{job_id}/events",
    operation_id="list_job_events",
    response_model=JobEventList,
    summary="List a job's events",
    description=(
        "Oldest first, so a client follows a running job by passing the last event `id` it saw as `after`. "
        "Each event has a `type` (job_created, job_queued, job_started, stage_started, stage_finished, "
        "checkpoint_saved, job_restarted, cancel_requested, job_succeeded, job_failed, job_cancelled), a "
        "`level` and typed `data`."
    ),
    responses=_ERRORS,
)
def list_job_events(
    job_id: str,
    principal: PrincipalDep,
    db: DbDep,
    # le: event ids are 64-bit; a larger cursor overflowed the database driver (a 500) instead of a 422.
    after: Annotated[int | None, Query(ge=0, le=2**63 - 1, description="Only events with a larger id.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobEventList:
    _job_for(db, job_id, principal)
    rows, has_more = job_log.list_events(db, job_id, after=after, limit=limit)
    return JobEventList(data=[event_object(row) for row in rows], has_more=has_more)


@router.get(
    "/{job_id}/metrics",
    operation_id="get_job_metrics",
    response_model=JobMetrics,
    summary="Get a job's metric series",
    description=(
        "`data` maps `<stage>/<metric>` to its points `[{step, value}, ...]` in step order, for training "
        "(`distill/loss`, `contrastive:positive/loss`, ...) and evaluation (`evaluate/...`, at the final distill "
        "step). Example: `{\"object\": \"job.metrics\", \"job_id\": \"job_...\", \"data\": {\"distill/loss\": "
        "[{\"step\": 1, \"value\": 0.69}, {\"step\": 2, \"value\": 0.65}]}}`."
    ),
    responses=_ERRORS,
)
def get_job_metrics(job_id: str, principal: PrincipalDep, db: DbDep) -> JobMetrics:
    _job_for(db, job_id, principal)
    data: dict[str, dict[int, float]] = {}
    for name, points in job_log.metric_series(db, job_id).items():
        for stage, step, value in points:
            data.setdefault(f"{stage}/{name}", {})[step] = value  # a repeated step keeps its last value
    return JobMetrics(
        job_id=job_id,
        data={key: [MetricPoint(step=step, value=value) for step, value in sorted(points.items())]
              for key, points in sorted(data.items())},
    )


def _downloadable_export(db: Database, job_id: str, principal: Principal, storage: Storage | None) -> Folder:
    """The export folder of the caller's succeeded job; 404 / 409 otherwise."""
    job = _job_for(db, job_id, principal)
    if job.status != JobStatus.SUCCEEDED:
        raise ApiError(409, "job_not_succeeded",
                       f"job {job_id} is {job.status}; the model can be downloaded once it has succeeded", "job_id")
    folder = _export_folder(job, storage)
    if folder is None:
        raise ApiError(409, "artifacts_unavailable", f"the export folder of job {job_id} is no longer on disk", "job_id")
    return folder


def _export_folder(job: orm.Job, storage: Storage | None) -> Folder | None:
    """On this disk when it is here; else (workers on other machines) from the shared storage (app/storage)."""
    if job.status != JobStatus.SUCCEEDED or not job.export_dir:
        return None
    return open_folder(Path(job.export_dir), storage, export_key(job.id))


@router.get(
    "/{job_id}/artifacts",
    operation_id="list_job_artifacts",
    response_model=ArtifactList,
    summary="List a job's exported files",
    description="The files of the exported model folder with their sizes; empty until the job succeeded.",
    responses=_ERRORS,
)
def list_job_artifacts(job_id: str, principal: PrincipalDep, db: DbDep, storage: StorageDep) -> ArtifactList:
    folder = _export_folder(_job_for(db, job_id, principal), storage)
    files = export_files(folder) if folder is not None else []
    return ArtifactList(data=[Artifact(path=relative, size_bytes=size, download_url=f"/v1/jobs/{job_id}/model/files/{relative}")
                              for relative, _, size in files])


@router.get(
    "/{job_id}/artifacts/model.tar.gz",
    operation_id="download_job_model",
    summary="Download the exported model folder",
    description="The exported Hugging Face folder as a streamed tar.gz whose top folder is the job id.",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The model folder as tar.gz."},
        **_ERRORS,
        **error_responses((409,), {409: "The job has not succeeded (`job_not_succeeded`), or its export is gone "
                                        "(`artifacts_unavailable`)."}),
    },
)
def download_job_model(job_id: str, principal: PrincipalDep, db: DbDep, storage: StorageDep) -> StreamingResponse:
    folder = _downloadable_export(db, job_id, principal, storage)
    return StreamingResponse(
        tar_gz_stream(folder, job_id), media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-model.tar.gz"'},
    )


# The final model, resumable: the plain tar and each file, with Range (app/api/artifacts.py).
_EXPORT_ERRORS = error_responses((409, 416), {
    409: "The job has not succeeded (`job_not_succeeded`), or its export is gone (`artifacts_unavailable`).",
    416: "The Range starts past the end (`range_not_satisfiable`); `Content-Range: bytes */<size>`.",
})


@router.get(
    "/{job_id}/model.tar",
    operation_id="download_job_model_tar",
    summary="Download the exported model folder (resumable)",
    description=(
        "The exported Hugging Face folder as a plain (uncompressed, deterministic) tar whose top folder is the job "
        "id, with Range support: resume an interrupted download with `Range: bytes=<bytes you have>-` and "
        "`If-Range: <ETag>` (a stale ETag gets the whole archive again, 200)."
    ),
    response_class=StreamingResponse,
    responses={**download_responses("application/x-tar", "The tar"), **_ERRORS, **_EXPORT_ERRORS},
)
def download_job_model_tar(request: Request, job_id: str, principal: PrincipalDep, db: DbDep,
                           storage: StorageDep) -> StreamingResponse:
    folder = _downloadable_export(db, job_id, principal, storage)
    return ranged_response(request, tar_layout(folder, job_id), media_type="application/x-tar",
                           filename=f"{job_id}-model.tar")


@router.get(
    "/{job_id}/model/files/{path:path}",
    operation_id="download_job_model_file",
    summary="Download one file of the exported model",
    description="One file of the export (as `GET .../artifacts` lists them), with Range support.",
    response_class=StreamingResponse,
    responses={**download_responses("application/octet-stream", "The file"),
               **error_responses((404,), {404: "No such job for this API key's tenant, or no such file (`not_found`)."}),
               **_EXPORT_ERRORS},
)
def download_job_model_file(request: Request, job_id: str, path: str, principal: PrincipalDep,
                            db: DbDep, storage: StorageDep) -> StreamingResponse:
    return file_download(request, _downloadable_export(db, job_id, principal, storage), path)
