"""Preflight at submission: will the job fit its GPUs? The API-side glue of ctpd_core.memory_plan.

The planner (torch-free) needs two things the API has to find:

* **The models' sizes.** A catalog name or a well-known hub id: the planner's tables. ``job:<id>`` (a tenant's
  exported student): the export folder's config.json and safetensors headers, else the shape of the model that
  job started from. A local folder (an admin's, or any where the deployment allows server paths): its config.json
  and safetensors headers. Anything else, such as a hub id the tables lack (the service cannot reach the Hub), is
  unknown, and its stages are "not checked": never refused.
* **One GPU's memory.** The live workers first (the ``workers`` table: each advertises its GPU count and the
  memory of its smallest GPU): the largest memory among those with the GPUs the job needs. When every live worker
  is a CPU host and the job needs one device, there is no GPU budget at all: the job will run on CPU, in host
  memory the planner does not budget, so nothing is refused (the embedded ``ctpd up`` and CI are such
  deployments). With no live worker that has the GPUs (none started yet, or the job waits for a bigger one), the
  setting ``CTPD_GPU_MEMORY_GB`` (default 80; 0 declares a CPU-only deployment: no budget).

Run it after the reference checks (app.policy): it opens the folders the spec names, and only those the caller
may use should be opened. ``check_job`` raises :class:`PreflightRefused` (the API's 422, with the numbers and the
fixes); ``plan_for`` returns the whole plan (``ctpd plan``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from app.policy import JOB_MODEL_PREFIX, model_references
from ctpd_core.memory_plan import (
    GiB,
    MemoryPlan,
    ModelShape,
    ShapeUnknown,
    known_shape,
    plan_job,
    shape_from_folder,
)
from ctpd_core.spec import JobSpec

if TYPE_CHECKING:
    from app.db.engine import Database
    from app.settings import Settings

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
_MAX_JOB_HOPS = 4  # job:<a> trained from job:<b> trained from ...: how far back a size is looked for


class PreflightRefused(ValueError):
    """The job does not fit the deployment's GPUs. ``problems`` are ``(param, message)`` pairs for the API's 422
    (the stage's numbers and the fixes); ``plan`` is the whole plan."""

    def __init__(self, plan: MemoryPlan) -> None:
        self.plan = plan
        self.problems = plan.problems()
        super().__init__("; ".join(message for _, message in self.problems))


@dataclass(frozen=True)
class GpuBudget:
    memory_bytes: int | None  # one GPU's memory; None: no GPU budget (CPU workers)
    source: str  # where it came from, for the plan's text and the 422


def _setting_budget(settings: Settings) -> GpuBudget:
    gb = settings.gpu_memory_gb
    if gb <= 0:
        return GpuBudget(None, "CTPD_GPU_MEMORY_GB=0: a CPU-only deployment")
    return GpuBudget(int(gb * GiB), f"CTPD_GPU_MEMORY_GB={gb:g}")


def gpu_budget(spec: JobSpec, settings: Settings, db: Database | None = None) -> GpuBudget:
    """One GPU's memory for ``spec``'s plan (see the module docstring for the order)."""
    workers = _live_workers(db) if db is not None else None
    if workers:
        needed = spec.gpus_required
        able = [(memory, worker_id) for worker_id, gpus, memory in workers if gpus >= needed and gpus > 0 and memory]
        if able:
            memory_mb, worker_id = max(able)
            return GpuBudget(memory_mb * MiB, f"the largest GPU of the live workers with {needed}+ GPUs ({worker_id})")
        if needed == 1 and all(gpus == 0 for _, gpus, _ in workers):
            return GpuBudget(None, "the live workers are CPU hosts: a 1-device job runs on CPU, in host memory the "
                             "planner does not budget")
    return _setting_budget(settings)


def _live_workers(db: Database) -> list[tuple[str, int, int | None]] | None:
    """(worker_id, gpus, gpu_memory_mb) of the workers seen recently; None where this deployment has no workers
    table yet (a database before its migration) or it cannot be read: the setting decides then."""
    try:
        from app.db.models import Worker
        from app.db.workers import STALE_SECONDS
    except ImportError:  # a build without the scheduling tables
        return None
    from app.db.models import utcnow

    cutoff = utcnow() - timedelta(seconds=STALE_SECONDS)
    try:
        with db.read() as session:
            rows = session.execute(select(Worker.worker_id, Worker.gpus, Worker.gpu_memory_mb)
                                   .where(Worker.last_seen_at >= cutoff)).all()
    except SQLAlchemyError as error:
        logger.warning("preflight: the workers table cannot be read (%s); using CTPD_GPU_MEMORY_GB", error)
        return None
    return [(str(worker_id), int(gpus), None if memory is None else int(memory)) for worker_id, gpus, memory in rows]


def model_shape(reference: str, *, db: Database | None = None, hops: int = 0) -> ModelShape | None:
    """The shape of a model reference as the API can see it, or None when it cannot be sized here."""
    shape = known_shape(reference)
    if shape is not None:
        return shape
    if reference.startswith(JOB_MODEL_PREFIX):
        return _exported_shape(reference[len(JOB_MODEL_PREFIX):], db, hops)
    try:
        folder = Path(reference).expanduser()
        if not folder.is_dir():
            return None
        return shape_from_folder(folder)
    except (OSError, ValueError) as error:  # ShapeUnknown is a ValueError; so is a path the OS refuses
        logger.info("preflight: cannot size %r: %s", reference[:200], error)
        return None


def _exported_shape(job_id: str, db: Database | None, hops: int) -> ModelShape | None:
    """An exported student: its folder, else the model its job started from (the same architecture)."""
    if db is None or hops >= _MAX_JOB_HOPS:
        return None
    from app.db import jobs as job_rows

    try:
        job = job_rows.get_job(db, job_id)
    except SQLAlchemyError:
        return None
    if job is None:
        return None
    if job.export_dir:
        try:
            return shape_from_folder(Path(job.export_dir))
        except ShapeUnknown:
            pass  # not on this host's disk (a bucket deployment): size it by its base below
    student = (job.spec or {}).get("student") or {}
    base = student.get("model") if isinstance(student, dict) else None
    return model_shape(base, db=db, hops=hops + 1) if isinstance(base, str) else None


def model_shapes(spec: JobSpec, db: Database | None = None) -> dict[str, ModelShape | None]:
    """Each model role the spec names (student, teacher, contrastive.positive / negative) and its shape."""
    shapes: dict[str, ModelShape | None] = {}
    for param, reference in model_references(spec).items():
        if reference:
            shapes[param.removesuffix(".model")] = model_shape(reference, db=db)
    return shapes


def plan_for(spec: JobSpec, settings: Settings, db: Database | None = None) -> MemoryPlan:
    """The memory plan of ``spec`` on this deployment's GPUs."""
    budget = gpu_budget(spec, settings, db)
    return plan_job(spec, model_shapes(spec, db), gpu_memory_bytes=budget.memory_bytes, gpu_source=budget.source)


def check_job(spec: JobSpec, settings: Settings, db: Database | None = None) -> None:
    """Refuse a job that cannot fit: raises :class:`PreflightRefused` (a ValueError whose ``problems`` the API
    returns as a 422). Stages the planner cannot size, and CPU-only deployments, are never refused."""
    plan = plan_for(spec, settings, db)
    if not plan.fits:
        logger.info("preflight refused a job: %s", "; ".join(s.summary() for s in plan.stages if s.fits is False))
        raise PreflightRefused(plan)
