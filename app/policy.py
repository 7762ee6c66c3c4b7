"""What a job spec may point at, for whom: one policy, applied by the API when a job is submitted and again by
the worker right before it opens anything (issue 9, items 1-3).

The API and the worker run on different machines with different working directories and disks, so a check on
the API host alone proves nothing about what the worker will read. Both sides call :func:`reference_problems`
with their own view of the disk; the worker also re-resolves every reference the way the loader will.

Rules for a key that is not an admin's, when the deployment does not allow server paths (the default outside
the embedded single-user ``ctpd up``):

* ``dataset.path`` and ``dataset.validation_path`` are refused, relative or absolute: tenants upload data
  (``POST /v1/datasets``) and name it by ``dataset.id``.
* A model (student, teacher, contrastive π±) is a catalog name, ``job:<job_id>`` (one of the tenant's own
  succeeded jobs: its exported student), or a hub id (``org/name``) that does **not** exist as a file or
  folder where the check runs (the loader would read that from disk instead of the hub).
* Any other path-shaped reference is refused, except a folder inside the artifact root that belongs to one of
  the tenant's own jobs or datasets (resolved with symlinks followed, so ``..`` and links cannot escape).

``trust_remote_code: true`` runs the model repository's Python on the workers: it is refused unless the
deployment allows it (``CTPD_ALLOW_REMOTE_CODE=true``) *and* the key is an admin's.

``tracking.mlflow.uri`` (the job mirrored into an MLflow run, worker/tracking.py) is, for the same keys, an
``http(s)`` MLflow server on a public address: a ``sqlite:``, ``file:`` or database URI would write to the
worker's disk or a database it can reach, and a loopback or private address would make the workers call the
service's own internals. Every address the host resolves to must be public (:func:`tracking_address_refused`,
the webhooks' address guard); the API lets a name it cannot resolve pass, the worker (``require_resolved``)
refuses it, and the worker's MLflow client checks the addresses again when it connects. The deployment's own
``CTPD_MLFLOW_TRACKING_URI`` is trusted (the spec leaves the URI unset to use it).

Torch-free and database-free: the callers pass what they know (``owns_job`` / ``owns_dataset`` lookups).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from app.webhooks.targets import why_not_public
from ctpd_core.catalog import CATALOG
from ctpd_core.spec import JobSpec

if TYPE_CHECKING:
    from app.settings import Settings

JOB_MODEL_PREFIX = "job:"
# A Hugging Face hub id: "name" or "org/name", letters, digits, '-', '_', '.', at most 96 characters each (the
# hub's own limit); never '..' or a leading '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")

UPLOAD_HINT = ("upload the dataset with POST /v1/datasets and pass {\"dataset\": {\"id\": ...}}, or use a model id "
               "from GET /v1/models (a catalog name, a hub id, or job:<id> for one of your exported students)")


class PolicyViolation(ValueError):
    """A spec names something its submitter may not use; ``problems`` are ``(param, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], status: int = 422) -> None:
        self.problems, self.status = problems, status
        super().__init__("; ".join(message for _, message in problems))


@dataclass(frozen=True)
class Caller:
    """Who submitted the job, and what this deployment allows."""

    tenant: str
    is_admin: bool
    allow_server_paths: bool
    allow_remote_code: bool
    artifact_root: Path

    @classmethod
    def of(cls, settings: Settings, *, tenant: str, is_admin: bool) -> Caller:
        """The caller as this deployment's settings see it (the API and the worker build it the same way)."""
        return cls(tenant=tenant, is_admin=is_admin, allow_server_paths=settings.allow_server_paths,
                   allow_remote_code=settings.allow_remote_code, artifact_root=Path(settings.artifact_root))


def model_references(spec: JobSpec) -> dict[str, str | None]:
    positive, negative = spec.contrastive.positive, spec.contrastive.negative
    return {
        "student.model": spec.student.model,
        "teacher.model": spec.teacher.model if spec.teacher else None,
        "contrastive.positive.model": positive.model if positive else None,
        "contrastive.negative.model": negative.model if negative else None,
    }


def _model_refs(spec: JobSpec) -> dict[str, object]:
    return {"student": spec.student, "teacher": spec.teacher, "contrastive.positive": spec.contrastive.positive,
            "contrastive.negative": spec.contrastive.negative}


def remote_code_problems(spec: JobSpec, caller: Caller) -> list[tuple[str, str]]:
    problems = []
    for name, ref in _model_refs(spec).items():
        if ref is None or not getattr(ref, "trust_remote_code", False):
            continue
        if not caller.allow_remote_code:
            why = ("this deployment does not run model repositories' own code (CTPD_ALLOW_REMOTE_CODE is off); "
                   "use a model that transformers supports natively, or ask an operator")
        elif not caller.is_admin:
            why = "only an admin key may enable it; ask an operator to submit the job, or drop the flag"
        else:
            continue
        problems.append((f"{name}.trust_remote_code", f"{name}.trust_remote_code: {why}"))
    return problems


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _artifact_problem(value: str, resolved: Path, caller: Caller, owns_job: Callable[[str], bool],
                      owns_dataset: Callable[[str], bool]) -> str | None:
    """A reference inside the artifact root must be one of the caller's own jobs or datasets."""
    parts = resolved.relative_to(Path(os.path.realpath(caller.artifact_root))).parts
    if len(parts) >= 2 and parts[0] == "jobs" and owns_job(parts[1]):
        return None
    if len(parts) >= 2 and parts[0] == "datasets" and owns_dataset(parts[1]):
        return None
    return f"{value!r} is inside the service's artifact root but not one of your jobs or datasets; {UPLOAD_HINT}"


class _Unusable(ValueError):
    """A reference that cannot even be resolved as a path (an unknown ~user, a name too long for the OS)."""


def _resolve(value: str, cwd: Path, *, expand_user: bool) -> Path:
    """The file the loader would open: models expand ``~`` (ctpd_core.models), dataset paths do not."""
    try:
        path = Path(value).expanduser() if expand_user else Path(value)
        return Path(os.path.realpath(path if path.is_absolute() else cwd / path))
    except (OSError, RuntimeError, ValueError) as error:
        raise _Unusable(str(error)) from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # e.g. a component longer than the OS allows: nothing is there either way
        return False


def reference_problems(
    spec: JobSpec,
    caller: Caller,
    *,
    owns_job: Callable[[str], bool],
    owns_dataset: Callable[[str], bool],
    cwd: Path | None = None,
    where: str = "the server",
    require_resolved: bool = False,
) -> list[tuple[str, str]]:
    """Every reference of ``spec`` that ``caller`` may not use, as ``(param, message)``; empty when all is well.

    ``cwd`` is the directory relative references would be read from (the worker's own, on the worker);
    ``require_resolved``: a tracking host that resolves to nothing here is refused (the worker's check)."""
    cwd = cwd or Path.cwd()
    problems: list[tuple[str, str]] = []
    for param, value in model_references(spec).items():
        if value and value.startswith(JOB_MODEL_PREFIX) and not owns_job(value[len(JOB_MODEL_PREFIX):]):
            problems.append((param, f"{param}: {value!r} is not one of your succeeded jobs; see GET /v1/models"))
    if caller.is_admin:
        return problems  # operators may point anywhere
    root = Path(os.path.realpath(caller.artifact_root))
    locked = not caller.allow_server_paths
    references = {"dataset.path": spec.dataset.path, "dataset.validation_path": spec.dataset.validation_path,
                  **model_references(spec)}
    for param, value in references.items():
        is_model = param.endswith(".model")
        if not value or (is_model and (value.startswith(JOB_MODEL_PREFIX) or value in CATALOG)):
            continue  # job:<id> was checked above; catalog names are resolved before any path by the loader
        try:
            resolved = _resolve(value, cwd, expand_user=is_model)
        except _Unusable as error:
            problems.append((param, f"{param}: {value[:80]!r} is not a usable path or hub id ({error}); "
                             f"{UPLOAD_HINT}"))
            continue
        if _inside(resolved, root):
            problem = _artifact_problem(value, resolved, caller, owns_job, owns_dataset)
        elif not locked:
            problem = None  # the embedded single-user service: the server's files are the user's own
        elif param.startswith("dataset."):
            problem = (f"{value!r} names a file on {where}, which this service does not allow for your key (datasets "
                       f"are uploaded); {UPLOAD_HINT}")
        elif not _HUB_ID.match(value) or _exists(resolved):
            problem = (f"{value!r} names a file or folder on {where}, which this service does not allow for your "
                       f"key; {UPLOAD_HINT}")
        else:
            problem = None  # a hub id that is nothing on this disk: the loader fetches it from the hub
        if problem:
            problems.append((param, f"{param}: {problem}"))
    return problems + tracking_problems(spec, caller, where=where, require_resolved=require_resolved)


TRACKING_HINT = ("name an http(s) MLflow tracking server on a public address, or leave tracking.mlflow.uri unset to "
                 "use this deployment's (if it has one)")


# Networks a tenant's tracking server may be on although they are not public: none. A test with a loopback
# "tracking server" for an untrusted target adds 127.0.0.0/8 here (the API's check and the worker's at connect time).
TRACKING_ALLOWED_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


def tracking_address_refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a tenant's tracking server may not be at ``address`` ("loopback", "private", ...); None: it may."""
    if any(address.version == network.version and address in network for network in TRACKING_ALLOWED_NETWORKS):
        return None
    return why_not_public(address)


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses ``host`` resolves to where the check runs; empty when it resolves to none here."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError, ValueError):  # ValueError: a NUL in the name
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def experiment_problems(spec: JobSpec, deployment_uri: str) -> list[tuple[str, str]]:
    """An experiment with no tracking URI to put it in (the API's check: a worker without the deployment's URI
    just warns on the job)."""
    mlflow = spec.tracking.mlflow
    if mlflow.experiment is None or mlflow.uri is not None or deployment_uri:
        return []
    return [("tracking.mlflow.experiment", "tracking.mlflow.experiment: this deployment has no MLflow tracking "
             "server (CTPD_MLFLOW_TRACKING_URI is unset), so the job would not be tracked; add tracking.mlflow.uri "
             "or drop tracking.mlflow.experiment")]


def tracking_problems(spec: JobSpec, caller: Caller, *, where: str = "the server",
                      require_resolved: bool = False) -> list[tuple[str, str]]:
    """``tracking.mlflow.uri`` for a key that may not name the server's own stores (see the module docstring).
    ``require_resolved``: a host that resolves to no address here is refused (the worker, which connects)."""
    uri = spec.tracking.mlflow.uri
    if uri is None or caller.is_admin or caller.allow_server_paths:
        return []
    param = "tracking.mlflow.uri"
    parsed = urlsplit(uri)
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https"):
        return [(param, f"{param}: {uri[:80]!r} is a {scheme}: store, which writes to a disk or database of "
                 f"{where}; this service does not allow that for your key; {TRACKING_HINT}")]
    try:
        host = parsed.hostname
    except ValueError:
        host = None
    if not host:
        return [(param, f"{param}: {uri[:80]!r} names no host; {TRACKING_HINT}")]
    local_name = host.lower() == "localhost" or host.lower().endswith(".localhost")
    addresses = _addresses(host)
    if local_name or any(tracking_address_refused(address) for address in addresses):
        return [(param, f"{param}: {host!r} is a loopback, private or otherwise non-public address of {where}, "
                 f"which this service does not let your key call; {TRACKING_HINT}")]
    if require_resolved and not addresses:
        return [(param, f"{param}: {host!r} resolves to no address on {where}, so the job's run would have "
                 f"nowhere to go; {TRACKING_HINT}")]
    return []
