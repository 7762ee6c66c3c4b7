"""Preflights: ``POST /v1/jobs?dry_run=true`` (:func:`dry_run`, called by app/api/jobs.py) and
``GET /v1/preflights/{id}`` (a report that was answered 202, polled).

A dry run checks what a submission checks, and more, and queues nothing (no job row, no job message):

1. here, torch-free: the remote-code policy, the metadata and every reference (as ``POST /v1/jobs`` does), then the
   memory plan (app/preflight.py) and the live workers;
2. on a worker (``ctpd.preflight``, ``default`` queue; worker/preflight.py), only when step 1 found no reference the
   caller may not use (the worker opens the files the spec names): the tokenizers, the whole dataset validated, a
   sample encoded and aligned, truncation, the steps of each training stage;
3. when the report is read: the duration, from the stages this deployment's finished jobs measured.

The API waits up to ``CTPD_PREFLIGHT_WAIT_SECONDS`` for step 2 and answers 200 with the whole report, else 202 with
its own part (``status: pending``) and ``poll``, the URL to read it from.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app import policy, preflight
from app.api.deps import DbDep, PrincipalDep
from app.api.errors import ApiError, error_responses
from app.db import jobs as job_rows
from app.db import preflights as preflight_rows
from app.db.auth import Principal
from app.db.engine import Database
from app.db.models import Preflight
from app.queue import TaskQueue
from app.settings import Settings
from ctpd_core.spec import JobSpec

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often the waiting request reads the row while the worker works

router = APIRouter(prefix="/v1/preflights", tags=["preflights"], responses=error_responses((401, 422, 503)))


class PreflightIssue(BaseModel):
    level: Literal["error", "warning"]
    code: str = Field(description="What kind of problem: invalid_dataset, tokenizer_without_offsets, does_not_fit, "
                      "responses_truncated, ...")
    param: str | None = Field(default=None, description="The spec field the fix starts from.")
    message: str
    fix: str = Field(description="What to change so that the job works.")


class PreflightReport(BaseModel):
    """A dry run's report. ``ok`` is true when it has no errors (null while the worker's part is pending): a job
    submitted with this spec then fails for no reason the preflight could see."""

    object: Literal["preflight"] = "preflight"
    id: str
    status: Literal["pending", "done"] = Field(description="pending: the worker's part has not arrived yet (poll).")
    ok: bool | None
    errors: list[PreflightIssue]
    warnings: list[PreflightIssue]
    spec: dict[str, Any] = Field(description="The resolved spec (every default filled in).")
    memory: dict[str, Any] | None = Field(description="The memory plan per device for each stage (`ctpd plan`).")
    workers: dict[str, Any] | None = Field(description="The live workers and how many could run the job.")
    models: dict[str, Any] | None = Field(description="Per role: loadable, vocabulary size, positions.")
    tokenizers: dict[str, Any] | None = Field(description="Per side: class, tokens, offsets, EOS, chat template.")
    dataset: dict[str, Any] | None = Field(description="Valid or not (the bad rows), train and validation pairs; "
                                           "`conversations`: rows, shapes rendered through the chat templates, "
                                           "rows left untried.")
    sample: dict[str, Any] | None = Field(description="The prepare stage on a sample: spans per response, alignment "
                                          "(share_1:1 ...), span_length_histogram, dropped pairs, truncation.")
    steps: dict[str, Any] | None = Field(description="Steps per training stage (contrastive: each of π+ and π−), "
                                         "evaluation batches.")
    duration: dict[str, Any] = Field(description="Estimated seconds per stage from measured throughput, or "
                                     "`status: unknown` and the reason.")
    created_at: datetime
    finished_at: datetime | None
    poll: str | None = Field(description="While pending: GET this URL for the whole report.")


def _step_counts(steps: dict[str, Any] | None) -> dict[str, float] | None:
    """What the duration needs from the worker's steps: pairs and training steps (contrastive: both runs)."""
    if not steps or "distill" not in steps:
        return None
    counts: dict[str, float] = {"train_pairs": steps["train_pairs"], "validation_pairs": steps["validation_pairs"],
                                "distill_steps": steps["distill"]["total_steps"]}
    if "contrastive" in steps:
        contrastive = steps["contrastive"]
        counts["contrastive_steps"] = contrastive["total_steps"] * contrastive.get("runs", 2)
    return counts


def report_object(db: Database, row: Preflight) -> PreflightReport:
    """The whole report of a row: the API's part, the worker's (once there), the duration estimated now."""
    stored = row.report or {}
    api = stored.get("api") or {}
    data = stored.get("data")
    part: dict[str, Any] = data or {}  # the worker's part: empty while pending
    issues = [*api.get("issues", []), *(part.get("issues") or [])]
    done = row.status == preflight_rows.DONE
    errors = [PreflightIssue(**entry) for entry in issues if entry["level"] == "error"]
    try:
        spec: JobSpec | None = JobSpec.model_validate(row.spec)
    except ValueError:  # stored by an older build whose spec this one no longer accepts: the report still reads
        spec = None
    return PreflightReport(
        id=row.id, status="done" if done else "pending",
        ok=not errors if done else None, errors=errors,
        warnings=[PreflightIssue(**entry) for entry in issues if entry["level"] == "warning"],
        spec=row.spec, memory=api.get("memory"), workers=api.get("workers"),
        models=part.get("models"), tokenizers=part.get("tokenizers"), dataset=part.get("dataset"),
        sample=part.get("sample"), steps=part.get("steps"),
        duration=preflight.estimate_duration(db, spec, _step_counts(part.get("steps"))) if spec is not None else
        {"seconds": None, "status": "unknown", "reason": "the stored spec is not valid for this version of the service"},
        created_at=row.created_at, finished_at=row.finished_at,
        poll=None if done else f"/v1/preflights/{row.id}",
    )


def _api_part(db: Database, spec: JobSpec, settings: Settings, principal: Principal) -> tuple[dict[str, Any], bool]:
    """The API's checks as report issues, the memory plan and the workers; and whether a worker may open what the
    spec names (no reference problem)."""
    from app.services import jobs as job_service

    caller = job_service.caller_of(principal, settings)
    issues = [preflight.issue("error", "remote_code_forbidden", message,
                              "set trust_remote_code only where the deployment allows it (CTPD_ALLOW_REMOTE_CODE) "
                              "and submit with an admin key", param)
              for param, message in policy.remote_code_problems(spec, caller)]
    issues += [preflight.issue("error", "invalid_metadata", message, "shorten or drop the metadata the message "
                               "names", param) for param, message in job_service.metadata_problems(spec.metadata)]
    issues += [preflight.issue("error", "invalid_reference", message,
                               "name only models and files this API key may use (the message says which)", param)
               for param, message in job_service.reference_problems(db, spec, principal, settings)]
    issues += _queue_room(db, principal.tenant, settings)
    part: dict[str, Any] = {"memory": None, "workers": None, "issues": issues}
    if issues:  # the plan opens the folders the spec names: only those the caller may use
        return part, False
    plan = preflight.plan_for(spec, settings, db)
    part["memory"] = {**plan.to_dict(), "text": plan.to_text()}
    issues += preflight.memory_issues(plan)
    part["workers"], waits = preflight.worker_facts(spec, settings, db)
    issues += waits
    return part, True


def _queue_room(db: Database, tenant: str, settings: Settings) -> list[dict[str, Any]]:
    """The submission's 429 seen ahead: the tenant already has ``max_queued`` queued jobs. A warning, not an error:
    it changes as queued jobs start or are cancelled, and the submission counts again (app/db/jobs.py)."""
    with db.read() as session:
        full = job_rows.queue_full(session, tenant, settings.tenant_max_queued)
    if full is None:
        return []
    return [preflight.issue(
        "warning", "queue_full",
        f"tenant {tenant} has {full.queued} queued jobs, its limit (max_queued {full.max_queued}): submitted now, this "
        "job would be refused with a 429 (queue_full)",
        f"wait for queued jobs to start, cancel some (POST /v1/jobs/{{id}}/cancel), or ask an admin to raise the "
        f"limit (PUT /v1/tenants/{tenant}/limits)", None)]


def dry_run(spec: JobSpec, principal: Principal, db: Database, queue: TaskQueue,
            settings: Settings) -> tuple[PreflightReport, int]:
    """The report and its status code: 200 complete, 202 while the worker's part is pending."""
    api_part, needs_worker = _api_part(db, spec, settings, principal)
    row = preflight_rows.create_preflight(db, tenant=principal.tenant, spec=spec.model_dump(mode="json"),
                                          api_report=api_part, submitted_by_admin=principal.is_admin,
                                          needs_worker=needs_worker)
    if needs_worker:
        try:
            queue.enqueue_preflight(row.id)
        except Exception as error:  # the broker is down: nobody will answer; say so instead of waiting
            logger.warning("preflight %s: could not be sent to a worker: %s", row.id, error)
            preflight_rows.finish_preflight(db, row.id, {"issues": [preflight.issue(
                "error", "preflight_unavailable",
                f"the worker's part could not be requested: the broker did not take the message "
                f"({type(error).__name__}: {error})",
                "retry once the service's broker is reachable; this is not a problem of the spec")]})
        deadline = time.monotonic() + settings.preflight_wait_seconds
        while True:
            current = preflight_rows.get_preflight(db, row.id)
            if current is not None:
                row = current
            if row.status == preflight_rows.DONE or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
    report = report_object(db, row)
    return report, 200 if report.status == preflight_rows.DONE else 202


@router.get(
    "/{preflight_id}", operation_id="get_preflight", response_model=PreflightReport, summary="Get a preflight report",
    description="A dry run's report (`POST /v1/jobs?dry_run=true`); `status: pending` until a worker has added the "
    "data part (tokenizers, dataset, alignment, truncation, steps).",
    responses=error_responses((404,), {404: "No such preflight for this API key's tenant (`not_found`)."}),
)
def get_preflight(preflight_id: str, principal: PrincipalDep, db: DbDep) -> PreflightReport:
    row = preflight_rows.get_preflight(db, preflight_id, principal.tenant)
    if row is None:
        raise ApiError(404, "not_found", f"no preflight {preflight_id!r} for this API key", "preflight_id")
    return report_object(db, row)
