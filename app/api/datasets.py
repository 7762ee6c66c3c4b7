"""/v1/datasets: upload (validated row by row, all or nothing, its statistics counted), list, read, statistics
and delete.

An upload is received as a stream (``app.upload_stream``): the file goes to a held temporary file under
``<artifact root>/datasets/`` while it is counted against the size limit, hashed and validated with the same
row validator the worker's loader uses (``ctpd_core.data``). Only a complete, valid file is renamed to
``datasets/<id>/<filename>`` and recorded. An invalid or oversized upload leaves nothing behind: it ends with
a 413 as soon as it passes the limit, and a 422 lists its bad rows.

With a shared storage (CTPD_STORAGE_URL, ``app.storage``) the valid file is put there, under the same key
(``datasets/<id>/<filename>``), before the row is recorded, and the local copy is removed: the bucket is the
upload's home, and a worker on any machine fetches it from there (``app.storage.fetch_upload``). A delete removes
it from the storage too.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app.api.artifacts import storage_unavailable
from app.api.deps import DbDep, PrincipalDep, SettingsDep, StorageDep
from app.api.errors import ApiError, error_responses, invalid_request
from app.api.schemas import Dataset, DatasetStats, dataset_object, dataset_stats_object
from app.db import datasets as dataset_rows
from app.db import models as orm
from app.db.auth import Principal
from app.db.engine import Database, InvalidCursor
from app.settings import Settings
from app.storage import Storage, StorageError, store_upload
from app.storage_gc import datasets_dir
from app.upload_stream import FORMATS, ReceivedDataset, receive_dataset

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/datasets", tags=["datasets"],
    # Every route checks the API key (401), validates its input (422) and reads the database (503 while it is
    # unreachable).
    responses=error_responses((401, 422, 503)),
)

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "Preference pairs as .jsonl, .json or .parquet (the format comes from "
                            "the filename's extension), in TRL's preference formats (standard or conversational, "
                            "explicit or implicit prompt) or OpenAI's preference fine-tuning format "
                            "(docs/datasets.md). The part's filename must "
                            "end in `.jsonl`, `.json` or `.parquet` (any case; e.g. `pairs.jsonl`); any other "
                            "filename, or none, is a 422 with `error.param` `file`.",
                        }
                    },
                }
            }
        },
    },
}


def _refuse_unknown_query(request: Request, allowed: tuple[str, ...]) -> None:
    """Refused rather than ignored, as on GET /v1/jobs: a typo (``?limt=5``) would otherwise answer as if unasked."""
    for key in request.query_params:
        if key not in allowed:
            shown = key or "(a parameter without a name)"
            use = f"use {', '.join(allowed)}" if allowed else "this route takes none"
            raise invalid_request([(key or None, f"{shown}: unknown query parameter; {use}")])


def _safe_filename(name: str, suffix: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "dataset"
    if not base.lower().endswith(suffix):
        base += suffix
    return base[-200:]


def _publish(received: ReceivedDataset, principal: Principal, db: Database, settings: Settings,
             storage: Storage | None) -> orm.Dataset:
    """Move a received, valid file to ``datasets/<id>/`` (and into the shared storage) and record it; on any
    failure, nothing stays."""
    dataset_id = dataset_rows.new_dataset_id()
    final_dir = datasets_dir(settings) / dataset_id
    final_dir.mkdir()
    stored = False
    try:
        final = final_dir / _safe_filename(received.filename, received.suffix)
        received.publish(final)
        if storage is not None:
            try:
                store_upload(storage, final, dataset_id)
            except StorageError as error:
                raise storage_unavailable(error) from None
            stored = True
        row = dataset_rows.create_dataset(
            db, tenant=principal.tenant, filename=final.name, format=FORMATS[received.suffix],
            num_rows=received.num_rows, sha256=received.sha256, size_bytes=received.size_bytes, path=str(final),
            dataset_id=dataset_id, stats=received.stats,
        )
    except BaseException:
        shutil.rmtree(final_dir, ignore_errors=True)
        if stored:
            _remove_stored(storage, dataset_id)
        raise
    if storage is not None:  # the storage holds it now; this API process's disk need not
        shutil.rmtree(final_dir, ignore_errors=True)
    return row


def _remove_stored(storage: Storage | None, dataset_id: str) -> None:
    """Remove ``datasets/<id>/`` from the storage; a failure leaves an object without a row (logged), never the
    reverse."""
    if storage is None:
        return
    try:
        storage.delete(f"datasets/{dataset_id}")
    except StorageError as error:
        logger.warning("dataset %s: could not remove it from the shared storage (%s); remove datasets/%s/ there "
                       "by hand", dataset_id, error, dataset_id)


@router.post(
    "",
    operation_id="upload_dataset",
    status_code=201,
    response_model=Dataset,
    summary="Upload a dataset",
    description=(
        "Multipart upload, field `file`: JSONL, JSON or Parquet preference pairs: TRL's preference formats "
        "(prompt/chosen/rejected text, implicit-prompt chosen/rejected, conversational with system turns and "
        "several turns, whole chosen/rejected conversations as in ultrafeedback_binarized) or OpenAI's preference "
        "fine-tuning rows (input/preferred_output/non_preferred_output). Every row is validated; any bad row "
        "makes it a 422 `invalid_dataset` whose `error.errors` lists `{row, message}` (JSONL: the line number), "
        "and nothing is stored. The rows' statistics are counted as they arrive (`stats`). Over the size limit: 413."
    ),
    responses=error_responses((400, 413, 422), {
        400: "The multipart body is malformed (no boundary, bad part headers, cut short) or the client "
             "disconnected (`invalid_request`, `error.param` `file`).",
        413: "Larger than CTPD_MAX_UPLOAD_BYTES (`file_too_large`).",
        422: "Invalid rows (`invalid_dataset`: `error.errors` lists `{row, message}`), an unsupported extension or "
             "no `file` field (`invalid_request`).",
    }),
    openapi_extra=_UPLOAD_BODY,
)
async def upload_dataset(request: Request, principal: PrincipalDep, db: DbDep, settings: SettingsDep,
                         storage: StorageDep) -> Dataset:
    received = await receive_dataset(request, settings)
    try:
        row = await run_in_threadpool(_publish, received, principal, db, settings, storage)
    finally:
        received.discard()  # the temporary file, unless it was published; and its hold
    return dataset_object(row)


def _not_found(dataset_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no dataset {dataset_id!r} for this API key", "dataset_id")


def _tenant_dataset(db: Database, dataset_id: str, principal: Principal) -> orm.Dataset:
    """The caller's tenant's dataset, or the 404 (another tenant's id reads as no dataset at all)."""
    row = dataset_rows.get_dataset(db, dataset_id, principal.tenant)
    if row is None:
        raise _not_found(dataset_id)
    return row


@router.get(
    "/{dataset_id}",
    operation_id="get_dataset",
    response_model=Dataset,
    summary="Get a dataset",
    responses=error_responses((404,), {404: "No such dataset for this API key's tenant (`not_found`)."}),
)
def get_dataset(dataset_id: str, request: Request, principal: PrincipalDep, db: DbDep) -> Dataset:
    _refuse_unknown_query(request, ())
    return dataset_object(_tenant_dataset(db, dataset_id, principal))


@router.get(
    "/{dataset_id}/stats",
    operation_id="get_dataset_stats",
    response_model=DatasetStats,
    summary="Get a dataset's statistics",
    description="What the upload's validator counted (rows per shape, system and multi-turn rows, duplicate rows "
                "and prompts, identical chosen/rejected pairs, length distributions in characters) and the token "
                "lengths per tokenizer that preflights measured. A dataset stored before statistics existed has "
                "`counted` false and `missing` says how to get them (upload it again).",
    responses=error_responses((404,), {404: "No such dataset for this API key's tenant (`not_found`)."}),
)
def get_dataset_stats(dataset_id: str, request: Request, principal: PrincipalDep, db: DbDep) -> DatasetStats:
    _refuse_unknown_query(request, ())
    return dataset_stats_object(_tenant_dataset(db, dataset_id, principal))


# ------------------------------------------------------------------------------------- listing and deleting


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Dataset]
    has_more: bool = Field(description="Pass the last dataset's id as `after` for the next page.")


@router.get(
    "",
    operation_id="list_datasets",
    response_model=DatasetList,
    summary="List datasets",
    description="The tenant's uploads, newest first. Cursor pagination: pass the last dataset's `id` of a page as "
                "`after` for the next one, while `has_more` is true.",
)
def list_datasets(
    request: Request,
    principal: PrincipalDep,
    db: DbDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    after: Annotated[
        str | None,
        Query(min_length=1, description="The id of the last dataset of the previous page; leave it out for the first."),
    ] = None,
) -> DatasetList:
    _refuse_unknown_query(request, ("limit", "after"))
    try:
        rows, has_more = dataset_rows.list_datasets(db, principal.tenant, limit=limit, after=after)
    except InvalidCursor as error:
        raise ApiError(422, "invalid_request", str(error), "after") from None
    return DatasetList(data=[dataset_object(row) for row in rows], has_more=has_more)


@router.delete(
    "/{dataset_id}",
    operation_id="delete_dataset",
    status_code=204,
    response_class=Response,
    summary="Delete a dataset",
    description="The row and the file. Refused (409 `dataset_in_use`, the jobs listed in the message) while a queued, "
                "running or cancelling job names it as `dataset.id` or `dataset.validation_id`: cancel them, or wait "
                "for them to end. Ended jobs keep what they computed from it.",
    responses={204: {"description": "Deleted."}, **error_responses((404, 409), {
        404: "No such dataset for this API key's tenant (`not_found`).",
        409: "An active job uses it (`dataset_in_use`).",
    })},
)
def delete_dataset(dataset_id: str, principal: PrincipalDep, db: DbDep, settings: SettingsDep,
                   storage: StorageDep) -> Response:
    # The in-use check is inside the delete's transaction, after the row is locked (app/db/datasets.py): a job
    # submitted while this request runs is seen as long as it was committed before the check.
    try:
        row = dataset_rows.delete_dataset(db, dataset_id, principal.tenant)
    except dataset_rows.DatasetInUse as error:
        raise ApiError(409, "dataset_in_use", f"dataset {dataset_id} is used by active job(s) "
                       f"{', '.join(error.job_ids)}; cancel them or wait until they end, then delete it",
                       "dataset_id") from None
    if row is None:
        raise _not_found(dataset_id)
    # Its own folder (datasets/<id>/, where the upload put it), and nothing outside the upload area.
    folder = datasets_dir(settings) / dataset_id
    if Path(row.path).parent == folder:
        shutil.rmtree(folder, ignore_errors=True)
    _remove_stored(storage, dataset_id)  # datasets/<id>/ in the storage is this upload's alone
    logger.info("dataset %s of tenant %s deleted", dataset_id, principal.tenant)
    return Response(status_code=204)
