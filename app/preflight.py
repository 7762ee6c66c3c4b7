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
from typing import TYPE_CHECKING, Any

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


# --------------------------------------------------------------------------------------------- the dry run
# POST /v1/jobs?dry_run=true (app/api/preflights.py): the API's part of the report is the memory plan above, the
# live workers and the checks every submission runs; a worker adds the data part (worker/preflight.py, which may
# open the files and load the tokenizers); the duration is estimated when the report is read, from the stages
# this deployment's finished jobs measured.

_THROUGHPUT_JOBS = 50  # the most recent succeeded jobs the duration is estimated from


def issue(level: str, code: str, message: str, fix: str, param: str | None = None) -> dict[str, Any]:
    """One problem of a preflight report (the API's and the worker's, worker/preflight.py, alike)."""
    return {"level": level, "code": code, "param": param, "message": message, "fix": fix}


def memory_issues(plan: MemoryPlan) -> list[dict[str, Any]]:
    """Each stage that does not fit one GPU: an error whose fix is the planner's (what submission refuses, 422)."""
    failing = [stage for stage in plan.stages if stage.fits is False]
    # problems() walks the same stages in the same order: each failing stage's numbers and fixes.
    return [issue("error", "does_not_fit", message, "; ".join(stage.fixes) if stage.fixes else
                  "no single change fits: a GPU with more memory, LoRA, or more devices", param)
            for stage, (param, message) in zip(failing, plan.problems(), strict=True)]


def worker_facts(spec: JobSpec, settings: Settings, db: Database) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The live workers that could run the job, and a warning when none could right now (it would wait)."""
    workers = _live_workers(db)
    if workers is None:
        return {"live": None, "note": "the workers table cannot be read"}, []
    needed = spec.gpus_required
    able = [worker_id for worker_id, gpus, _ in workers if gpus >= needed or (needed == 1 and gpus == 0)]
    facts = {"live": len(workers), "able": len(able), "gpus_required": needed,
             "gpus": sorted({gpus for _, gpus, _ in workers})}
    if able:
        return facts, []
    if not workers:
        return facts, [issue("warning", "no_live_worker",
                             "no worker that consumes the train queue has been seen recently: the job would wait",
                             "start one (ctpd worker --queues train), or submit anyway: it waits queued")]
    return facts, [issue("warning", "no_worker_with_gpus",
                         f"the job needs {needed} GPUs on one worker and no live worker has them: it would wait",
                         f"lower training.devices / contrastive.devices to at most {max(g for _, g, _ in workers)}, "
                         "or start a worker with more GPUs")]


def _sequence_tokens(spec: dict[str, Any]) -> int:
    sequence = spec.get("sequence") or {}
    return int(sequence.get("max_prompt_tokens") or 1) + int(sequence.get("max_response_tokens") or 1)


def _stage_work(spec: dict[str, Any], stage: str, counts: dict[str, float]) -> tuple[str | None, float | None]:
    """(the model whose speed a stage runs at, its work in pair-tokens) for a spec and its counts: train/validation
    pairs and the training steps (contrastive: both runs together)."""
    tokens = _sequence_tokens(spec)
    student = (spec.get("student") or {}).get("model")
    teacher = (spec.get("teacher") or {}).get("model")
    method = spec.get("method")
    train, validation = counts.get("train_pairs"), counts.get("validation_pairs")
    if stage == "prepare":
        return f"{student}+{teacher}", None if train is None or validation is None else (train + validation) * tokens
    if stage == "reference":
        model = teacher if method == "ctpd" else student
        return model, None if train is None or validation is None else (train + validation) * tokens
    if stage == "contrastive":
        source = (spec.get("weights") or {}).get("source")
        model = teacher if source == "teacher_contrastive" else student
        steps, batch = counts.get("contrastive_steps"), (spec.get("training") or {}).get("batch_size") or 1
        return model, None if steps is None else steps * batch * tokens
    if stage == "weights":
        source = (spec.get("weights") or {}).get("source")
        model = teacher if source == "teacher_contrastive" else student
        return model, None if train is None else 2 * train * tokens  # π+ and π− over the training pairs
    if stage == "distill":
        steps, batch = counts.get("distill_steps"), (spec.get("training") or {}).get("batch_size") or 1
        return f"{student}:{method}", None if steps is None else steps * batch * tokens
    if stage == "evaluate":
        return student, None if validation is None else max(validation, 1) * tokens
    return student, 1.0  # export: one write of the student


def stages_run(spec: JobSpec) -> list[str]:
    """The stages of ``spec`` that cost time (a fixed-weights or given-π± stage is seconds: not estimated)."""
    stages = ["prepare", "reference"]
    if spec.method != "dpo" and spec.trains_contrastive:
        stages.append("contrastive")
    if spec.method in ("ctpd", "tisdpo") and spec.needs_contrastive:
        stages.append("weights")
    return [*stages, "distill", "evaluate", "export"]


def measured_rates(db: Database) -> dict[tuple[str, str], list[float]]:
    """Seconds per unit of work of each (stage, model) from this deployment's recent succeeded jobs: the
    ``stage_finished`` events (not cached) over the work their spec and counts give (:func:`_stage_work`);
    contrastive steps are the highest steps its two runs recorded as metrics."""
    from sqlalchemy import func

    from app.db.models import Job, JobEvent, MetricPoint

    with db.read() as session:
        jobs = session.execute(select(Job.id, Job.spec).where(Job.status == "succeeded")
                               .order_by(Job.finished_at.desc()).limit(_THROUGHPUT_JOBS)).all()
        ids = [job_id for job_id, _ in jobs]
        events = session.execute(select(JobEvent.job_id, JobEvent.stage, JobEvent.data)
                                 .where(JobEvent.job_id.in_(ids), JobEvent.type == "stage_finished")
                                 .order_by(JobEvent.id)).all() if ids else []
        contrastive_steps = session.execute(
            select(MetricPoint.job_id, MetricPoint.stage, func.max(MetricPoint.step))
            .where(MetricPoint.job_id.in_(ids), MetricPoint.stage.like("contrastive:%"))
            .group_by(MetricPoint.job_id, MetricPoint.stage)).all() if ids else []
    finished: dict[str, dict[str, dict[str, Any]]] = {}
    for job_id, stage, data in events:
        summary = (data or {}).get("summary") or {}
        if stage == "contrastive" and "positive" not in summary:
            continue  # the reference pass of π±' own base, reported under contrastive too
        finished.setdefault(job_id, {})[str(stage)] = data or {}  # the last attempt's
    steps: dict[str, float] = {}
    for job_id, _stage, step in contrastive_steps:
        steps[job_id] = steps.get(job_id, 0.0) + float(step or 0)
    rates: dict[tuple[str, str], list[float]] = {}
    for job_id, spec in jobs:
        stages = finished.get(job_id) or {}
        prepared = (stages.get("prepare") or {}).get("summary") or {}
        counts = {"train_pairs": prepared.get("train_pairs"), "validation_pairs": prepared.get("validation_pairs"),
                  "distill_steps": ((stages.get("distill") or {}).get("summary") or {}).get("steps"),
                  "contrastive_steps": steps.get(job_id)}
        for stage, data in stages.items():
            if data.get("cached") or not isinstance(data.get("seconds"), int | float):
                continue
            model, work = _stage_work(spec or {}, stage, {k: v for k, v in counts.items() if v is not None})
            if model is not None and work:
                rates.setdefault((stage, model), []).append(float(data["seconds"]) / work)
    return rates


def _described(stage: str, model: str | None) -> str:
    """A rate's model key (:func:`_stage_work`) for a person."""
    if stage == "prepare" and model and "+" in model:
        student, teacher = model.split("+", 1)
        return f"the tokenizers of student {student} and teacher {teacher}"
    if stage == "distill" and model and ":" in model:
        student, method = model.rsplit(":", 1)
        return f"student {student} (method {method})"
    return f"model {model}"


def estimate_duration(db: Database, spec: JobSpec, counts: dict[str, float] | None) -> dict[str, Any]:
    """Seconds per stage on this deployment's workers, from what its finished jobs measured, or "unknown" with
    the reason. ``counts`` (train/validation pairs and training steps) come from the worker's part."""
    if counts is None:
        return {"seconds": None, "status": "unknown",
                "reason": "the dataset's pairs and the training steps are not known: the worker's part is pending, "
                          "or stopped at an error above"}
    try:
        rates = measured_rates(db)
    except SQLAlchemyError as error:
        return {"seconds": None, "status": "unknown", "reason": f"the finished jobs cannot be read ({error})"}
    data = spec.model_dump(mode="json")
    stages: dict[str, Any] = {}
    total, unknown = 0.0, []
    for stage in stages_run(spec):
        model, work = _stage_work(data, stage, counts)
        samples = sorted(rates.get((stage, model or ""), []))
        if work is None or not samples:
            unknown.append(stage)
            stages[stage] = {"seconds": None, "reason": (
                f"no succeeded job on this deployment has run the {stage} stage with {_described(stage, model)} "
                "(not from its cache)" if work is not None else "its work is not known")}
            continue
        seconds = samples[len(samples) // 2] * work  # the median rate: one slow job does not move it
        total += seconds
        stages[stage] = {"seconds": round(seconds, 1), "measured_jobs": len(samples)}
    status = "estimated" if not unknown else ("partial" if len(unknown) < len(stages) else "unknown")
    result: dict[str, Any] = {
        "seconds": round(total, 1) if not unknown else None, "status": status, "stages": stages,
        "basis": "the median seconds per pair-token of each stage with the same model in this deployment's last "
                 f"{_THROUGHPUT_JOBS} succeeded jobs; stages a finished job already computed with the same inputs "
                 "come from the stage cache in seconds",
    }
    if unknown:
        result["known_seconds"] = round(total, 1)
        result["reason"] = (f"no measurement for {', '.join(unknown)}: the first job that runs "
                            f"{'them' if len(unknown) > 1 else 'it'} with these models measures it")
    return result
