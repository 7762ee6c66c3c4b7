"""/v1/datasets: upload (validated row by row, all or nothing) and read.

An upload is copied to a temporary file under ``<artifact root>/datasets/`` while it is counted and
hashed, validated with ``ctpd_core.data.parse_pairs`` (the same parser the worker uses), and only then
renamed to ``datasets/<id>/<filename>`` and recorded. An invalid or oversized file leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.deps import DbDep, PrincipalDep, SettingsDep
from app.api.errors import ApiError
from app.api.schemas import Dataset, ErrorResponse, dataset_object
from app.db import repository as repo
from app.db.repository import Database, Principal
from app.settings import Settings
from ctpd_core.data import DatasetError, parse_pairs

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/datasets", tags=["datasets"],
    responses={422: {"model": ErrorResponse, "description": "Invalid request; `error.param` names the field."}},
)

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file in a multipart body
CHUNK = 1 << 20

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
                            "the filename's extension), in TRL's preference formats. The part's filename must "
                            "end in `.jsonl`, `.json` or `.parquet` (any case; e.g. `pairs.jsonl`); any other "
                            "filename, or none, is a 422 with `error.param` `file`.",
                        }
                    },
                }
            }
        },
    },
    # Merged into the decorator's responses: the upload answers a multipart body it cannot parse with a 400.
    "responses": {
        "400": {"description": "The multipart body is malformed (no boundary, bad part headers, cut short).",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}},
    },
}


def _safe_filename(name: str, suffix: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "dataset"
    if not base.lower().endswith(suffix):
        base += suffix
    return base[-200:]


def _store(upload: UploadFile, principal: Principal, db: Database, settings: Settings) -> repo.DatasetRow:
    filename = upload.filename or ""
    suffix = Path(filename).suffix.lower()
    if suffix not in FORMATS:
        shown = suffix or "no extension"
        raise ApiError(422, "invalid_request", f"file: unsupported file type ({shown}, from the filename "
                       f"{filename!r}); name the file *.jsonl, *.json or *.parquet", "file")
    datasets_dir = Path(settings.artifact_root) / "datasets"  # type: ignore[arg-type]
    datasets_dir.mkdir(parents=True, exist_ok=True)
    temporary = datasets_dir / f".incoming-{uuid.uuid4().hex}"
    final_dir: Path | None = None
    try:
        digest, size = hashlib.sha256(), 0
        with temporary.open("wb") as out:
            while chunk := upload.file.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise ApiError(413, "file_too_large", f"file: larger than the upload limit of "
                                   f"{settings.max_upload_bytes} bytes (CTPD_MAX_UPLOAD_BYTES)", "file")
                digest.update(chunk)
                out.write(chunk)
        try:
            pairs = parse_pairs(temporary.read_bytes(), suffix)
        except DatasetError as error:
            raise ApiError(
                422, "invalid_dataset", f"file: {error}", "file",
                errors=[{"row": row.row, "message": row.message} for row in error.errors],
                total_errors=error.total_errors,
            ) from None
        dataset_id = repo.new_dataset_id()
        final_dir = datasets_dir / dataset_id
        final_dir.mkdir()
        final = final_dir / _safe_filename(filename, suffix)
        temporary.replace(final)
        return repo.create_dataset(
            db, tenant=principal.tenant, filename=final.name, format=FORMATS[suffix], num_rows=len(pairs),
            sha256=digest.hexdigest(), size_bytes=size, path=str(final), dataset_id=dataset_id,
        )
    except BaseException:
        temporary.unlink(missing_ok=True)
        if final_dir is not None:
            shutil.rmtree(final_dir, ignore_errors=True)
        raise


@router.post(
    "",
    operation_id="upload_dataset",
    status_code=201,
    response_model=Dataset,
    summary="Upload a dataset",
    description=(
        "Multipart upload, field `file`: JSONL, JSON or Parquet preference pairs (prompt/chosen/rejected, "
        "implicit-prompt chosen/rejected, or single-turn conversational). Every row is validated; any bad row "
        "makes it a 422 `invalid_dataset` whose `error.errors` lists `{row, message}` (JSONL: the line number), "
        "and nothing is stored. Over the size limit: 413."
    ),
    responses={
        401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
        413: {"model": ErrorResponse, "description": "Larger than CTPD_MAX_UPLOAD_BYTES."},
        422: {"model": ErrorResponse, "description": "Invalid rows, unsupported extension or no `file` field."},
    },
    openapi_extra=_UPLOAD_BODY,
)
async def upload_dataset(request: Request, principal: PrincipalDep, db: DbDep, settings: SettingsDep) -> Dataset:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + MULTIPART_OVERHEAD:
        raise ApiError(413, "file_too_large", f"file: larger than the upload limit of {settings.max_upload_bytes} "
                       "bytes (CTPD_MAX_UPLOAD_BYTES)", "file")
    async with request.form(max_files=1, max_fields=16) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_request", "file: required; send the dataset as the multipart/form-data field "
                           "'file' (curl -F file=@pairs.jsonl)", "file")
        row = await run_in_threadpool(_store, upload, principal, db, settings)
    return dataset_object(row)


@router.get(
    "/{dataset_id}",
    operation_id="get_dataset",
    response_model=Dataset,
    summary="Get a dataset",
    responses={
        401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
        404: {"model": ErrorResponse, "description": "No such dataset for this API key's tenant."},
    },
)
def get_dataset(dataset_id: str, principal: PrincipalDep, db: DbDep) -> Dataset:
    row = repo.get_dataset(db, dataset_id, principal.tenant)
    if row is None:
        raise ApiError(404, "not_found", f"no dataset {dataset_id!r} for this API key", "dataset_id")
    return dataset_object(row)
