"""/v1/jobs/{id}/checkpoints: a job's training checkpoints, made into model folders and downloaded.

A checkpoint holds only the trained tensors; ``POST .../checkpoints/{checkpoint_id}/model`` asks a worker to build
the Hugging Face folder (``app.services.checkpoints``), which the listing then shows ready with its download URLs:
every file alone and the folder as one plain tar, both resumable with Range (``app.api.artifacts``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from app.api.artifacts import download_responses, export_files, file_download, ranged_response, tar_layout
from app.api.deps import DbDep, PrincipalDep, QueueDep, SettingsDep
from app.api.errors import ApiError, error_responses
from app.api.schemas import Artifact, Checkpoint, CheckpointList, CheckpointModel
from app.db import jobs as job_rows
from app.db import models as orm
from app.db.auth import Principal
from app.db.engine import Database
from app.services import checkpoints as checkpoint_service

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"], responses=error_responses((401, 422, 503)))

CheckpointId = Annotated[str, PathParam(description="A checkpoint id from the listing, e.g. `distill-00000040`.",
                                   max_length=64)]
FilePath = Annotated[str, PathParam(description="The file's path inside the folder, '/'-separated (e.g. `config.json`).",
                               max_length=1024)]

_NOT_FOUND = {404: "No such job for this API key's tenant, or no such checkpoint (`not_found`)."}
_GONE = {410: "The job saved this checkpoint, but it is no longer on disk (`checkpoint_pruned`): a job keeps only "
              "its newest checkpoints."}
_RANGE = {416: "The Range starts past the end (`range_not_satisfiable`); `Content-Range: bytes */<size>`."}
_NOT_READY = {409: "The checkpoint's model folder is not built (`checkpoint_model_not_ready`): POST .../model first, "
                   "then wait for `model.status` ready."}


def _job_for(db: Database, job_id: str, principal: Principal) -> orm.Job:
    job = job_rows.get_job(db, job_id, principal.tenant)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r} for this API key", "job_id")
    return job


def _base_url(job_id: str, checkpoint: str) -> str:
    return f"/v1/jobs/{job_id}/checkpoints/{checkpoint}/model"


def _checkpoint_object(job_id: str, view: checkpoint_service.CheckpointView) -> Checkpoint:
    base = _base_url(job_id, view.id)
    model = CheckpointModel(status=view.model_status, error=view.model_error)
    if view.model_status == "ready":
        model = CheckpointModel(
            status="ready", size_bytes=view.model_bytes, archive_url=f"{base}.tar",
            files=[Artifact(path=relative, size_bytes=size, download_url=f"{base}/files/{relative}")
                   for relative, _, size in export_files(view.stored.model_folder)],
        )
    return Checkpoint(id=view.id, job_id=job_id, stage=view.stored.stage, step=view.stored.step,
                      created_at=view.saved_at, size_bytes=view.stored.size_bytes(), metrics=view.metrics,
                      model=model, model_url=base)


def _lookup(db: Database, artifact_root: Path, job: orm.Job, checkpoint: str) -> checkpoint_service.CheckpointView:
    try:
        return checkpoint_service.get_checkpoint(db, artifact_root, job, checkpoint)
    except checkpoint_service.CheckpointPruned as error:
        raise ApiError(410, "checkpoint_pruned", str(error), "checkpoint_id") from None
    except checkpoint_service.NoSuchCheckpoint as error:
        raise ApiError(404, "not_found", str(error), "checkpoint_id") from None


def _ready_model(db: Database, settings: SettingsDep, principal: Principal, job_id: str, checkpoint: str
                 ) -> checkpoint_service.CheckpointView:
    view = _lookup(db, settings.artifact_root, _job_for(db, job_id, principal), checkpoint)
    if view.model_status != "ready":
        raise ApiError(409, "checkpoint_model_not_ready",
                       f"checkpoint {checkpoint} is not a model folder yet (model.status {view.model_status}); POST "
                       f"{_base_url(job_id, checkpoint)} and wait until GET .../checkpoints/{checkpoint} shows it ready",
                       "checkpoint_id")
    return view


# ------------------------------------------------------------------------------------------ endpoints


@router.get(
    "/{job_id}/checkpoints",
    operation_id="list_job_checkpoints",
    response_model=CheckpointList,
    summary="List a job's checkpoints",
    description=(
        "The student's training checkpoints still on disk, oldest first, each with its step, the training metrics "
        "of that step, its size and whether it has been made into a model folder (`model.status`). While the job "
        "trains, older checkpoints are pruned (a job keeps its newest two); once it has succeeded, the ones left "
        "stay, without their optimizer state. π+/π− checkpoints (teacher-sized, shared through the stage cache) are "
        "not listed."
    ),
    responses=error_responses((404,), _NOT_FOUND),
)
def list_job_checkpoints(job_id: str, principal: PrincipalDep, db: DbDep, settings: SettingsDep) -> CheckpointList:
    job = _job_for(db, job_id, principal)
    views = checkpoint_service.list_checkpoints(db, settings.artifact_root, job)
    return CheckpointList(data=[_checkpoint_object(job_id, view) for view in views])


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}",
    operation_id="get_job_checkpoint",
    response_model=Checkpoint,
    summary="Get one checkpoint",
    responses=error_responses((404, 410), {**_NOT_FOUND, **_GONE}),
)
def get_job_checkpoint(job_id: str, checkpoint_id: CheckpointId, principal: PrincipalDep, db: DbDep,
                       settings: SettingsDep) -> Checkpoint:
    view = _lookup(db, settings.artifact_root, _job_for(db, job_id, principal), checkpoint_id)
    return _checkpoint_object(job_id, view)


@router.post(
    "/{job_id}/checkpoints/{checkpoint_id}/model",
    operation_id="build_checkpoint_model",
    response_model=Checkpoint,
    status_code=202,
    summary="Make a checkpoint a model folder",
    description=(
        "Asks a worker to build the checkpoint as a Hugging Face folder: the student's base with the checkpoint's "
        "tensors, the tokenizer and a model card naming the step, in the spec's `export.dtype`. **202** with "
        "`model.status` pending; poll GET .../checkpoints/{checkpoint_id} until it is `ready` (or `failed`, with "
        "`model.error`). **200** when it is ready already (nothing is queued). Asking again is harmless."
    ),
    responses={200: {"model": Checkpoint, "description": "The model folder is ready already."},
               **error_responses((404, 410), {**_NOT_FOUND, **_GONE})},
)
def build_checkpoint_model(job_id: str, checkpoint_id: CheckpointId, response: Response, principal: PrincipalDep,
                           db: DbDep, queue: QueueDep, settings: SettingsDep) -> Checkpoint:
    job = _job_for(db, job_id, principal)
    _lookup(db, settings.artifact_root, job, checkpoint_id)  # 404 / 410 before anything is recorded
    try:
        view, enqueued = checkpoint_service.request_model(db, queue, settings.artifact_root, job, checkpoint_id)
    except checkpoint_service.QueueUnavailable as error:
        raise ApiError(503, "service_unavailable", str(error), None, headers={"Retry-After": "5"}) from None
    except checkpoint_service.CheckpointPruned as error:  # pruned between the two looks
        raise ApiError(410, "checkpoint_pruned", str(error), "checkpoint_id") from None
    if not enqueued:
        response.status_code = 200
    return _checkpoint_object(job_id, view)


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/model.tar",
    operation_id="download_checkpoint_model",
    summary="Download a checkpoint's model folder",
    description=(
        "The folder as a plain (uncompressed, deterministic) tar whose top folder is `<job id>-<checkpoint id>`, "
        "with Range support: resume an interrupted download with `Range: bytes=<bytes you have>-` and "
        "`If-Range: <ETag>`."
    ),
    response_class=StreamingResponse,
    responses={**download_responses("application/x-tar", "The tar"),
               **error_responses((404, 409, 410, 416), {**_NOT_FOUND, **_NOT_READY, **_GONE, **_RANGE})},
)
def download_checkpoint_model(request: Request, job_id: str, checkpoint_id: CheckpointId, principal: PrincipalDep,
                              db: DbDep, settings: SettingsDep) -> StreamingResponse:
    view = _ready_model(db, settings, principal, job_id, checkpoint_id)
    name = f"{job_id}-{checkpoint_id}"
    return ranged_response(request, tar_layout(view.stored.model_folder, name), media_type="application/x-tar",
                           filename=f"{name}.tar")


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/model/files/{path:path}",
    operation_id="download_checkpoint_model_file",
    summary="Download one file of a checkpoint's model folder",
    description="One file (from `model.files`), with Range support.",
    response_class=StreamingResponse,
    responses={**download_responses("application/octet-stream", "The file"),
               **error_responses((404, 409, 410, 416), {
                   404: "No such job, checkpoint or file (`not_found`).", **_NOT_READY, **_GONE, **_RANGE})},
)
def download_checkpoint_model_file(request: Request, job_id: str, checkpoint_id: CheckpointId, path: FilePath,
                                   principal: PrincipalDep, db: DbDep, settings: SettingsDep) -> StreamingResponse:
    view = _ready_model(db, settings, principal, job_id, checkpoint_id)
    return file_download(request, view.stored.model_folder, path)

