"""/v1/models: the packaged catalog, plus the students the tenant's succeeded jobs exported.

Every ``id`` is a valid model reference (``{"model": id}``): a catalog name, or ``job:<job_id>`` for an
exported student (no server path is ever shown), so a distilled student can be the teacher (or the student)
of the next job.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from fastapi import APIRouter

from app.api.deps import DbDep, PrincipalDep
from app.api.errors import error_responses
from app.api.schemas import Model, ModelList
from app.db import jobs as job_rows
from app.policy import JOB_MODEL_PREFIX
from ctpd_core.catalog import CATALOG

router = APIRouter(prefix="/v1/models", tags=["models"])


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@router.get(
    "",
    operation_id="list_models",
    response_model=ModelList,
    summary="List models",
    description="The catalog (`source: catalog`) and this tenant's exported students (`source: job`), newest first.",
    responses=error_responses((401, 503)),
)
def list_models(principal: PrincipalDep, db: DbDep) -> ModelList:
    models = [
        Model(id=entry.name, source="catalog", description=entry.description, available=_installed(entry.distribution),
              architecture=entry.architecture, tokenizer_kind=entry.tokenizer_kind, license=entry.license,
              install=entry.install)
        for entry in CATALOG.values()
    ]
    for job in job_rows.list_exported_models(db, principal.tenant):
        student = (job.spec.get("student") or {}).get("model")
        label = job.name or job.id
        # job:<id>, never the folder: a tenant learns nothing about the server's disk (the worker resolves it).
        models.append(Model(
            id=f"{JOB_MODEL_PREFIX}{job.id}", source="job", available=Path(job.export_dir or "").is_dir(),
            description=f"{job.spec.get('method', 'ctpd')} student of job {label} (from {student})",
            job_id=job.id, base_model=student, created_at=job.finished_at,
        ))
    return ModelList(data=models)
