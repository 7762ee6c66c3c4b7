"""The worker's side of app/policy.py: the same rules, checked where the files are opened, with the worker's
own disk and working directory, and ``job:<id>`` model references resolved to that job's export folder.

The API already refused what it could see; this catches what it could not (a relative path that exists only
where the worker runs, a folder created after the submit) and any job row that reached the queue some other
way. The submitter's admin-ness travels on the job row (``submitted_by_admin``).

``tracking.mlflow.uri`` is among the references (``app.policy.tracking_problems``, through
``reference_problems``): a tenant's ``sqlite:``/``file:``/database URI is refused here too, and an http(s) host is
resolved with the worker's own resolver, which is the one the MLflow client will use (a name that resolves
differently on the workers' network is judged here, and one that resolves to nothing here is refused). The
MLflow client checks the addresses once more when it connects (worker/tracking.py), so a name that resolves
elsewhere by then (DNS rebinding) still reaches no internal address."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from app.db import datasets as dataset_rows
from app.db import jobs as job_rows
from app.db.engine import Database
from app.db.models import Job
from app.policy import (
    JOB_MODEL_PREFIX,
    Caller,
    PolicyViolation,
    model_references,
    reference_problems,
    remote_code_problems,
)
from ctpd_core.spec import JobSpec
from ctpd_core.vocab import JobStatus

if TYPE_CHECKING:
    from app.settings import Settings


def _exported_folder(db: Database, tenant: str, job_id: str) -> Path | None:
    row = job_rows.get_job(db, job_id, tenant)
    if row is None or row.status != JobStatus.SUCCEEDED or not row.export_dir or not Path(row.export_dir).is_dir():
        return None
    return Path(row.export_dir)


def enforce_job_policy(db: Database, spec: JobSpec, job: Job, settings: Settings) -> JobSpec:
    """``spec`` with ``job:<id>`` references resolved; raises :class:`PolicyViolation` (a user error)."""
    caller = Caller.of(settings, tenant=job.tenant, is_admin=bool(job.submitted_by_admin))
    problems = remote_code_problems(spec, caller) + reference_problems(
        spec, caller,
        owns_job=lambda job_id: _exported_folder(db, job.tenant, job_id) is not None,
        owns_dataset=lambda dataset_id: dataset_rows.get_dataset(db, dataset_id, job.tenant) is not None,
        cwd=Path.cwd(), where="the worker", require_resolved=True,
    )
    if problems:
        raise PolicyViolation(problems)
    data = spec.model_dump(mode="json")
    for param, value in model_references(spec).items():
        if value and value.startswith(JOB_MODEL_PREFIX):
            folder = _exported_folder(db, job.tenant, value[len(JOB_MODEL_PREFIX):])
            if folder is None:  # gone since the check above: never fall through to the string "None"
                raise PolicyViolation([(param, f"{param}: the export of {value!r} is no longer on disk")])
            target = data
            *parents, leaf = param.split(".")
            for part in parents:
                target = target[part]
            target[leaf] = str(folder)
    return JobSpec.model_validate(data)
