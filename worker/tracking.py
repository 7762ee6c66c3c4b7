"""A job mirrored into an MLflow run: an :class:`~ctpd_core.observe.Observer` that reports, never decides.

When the spec (``tracking.mlflow.uri``) or the deployment (``CTPD_MLFLOW_TRACKING_URI``) names a tracking URI,
each job is one MLflow run in its experiment (``tracking.mlflow.experiment``, else ``CTPD_MLFLOW_EXPERIMENT``):

* **params**: the resolved spec, flattened to dotted keys (``training.learning_rate``); values longer than
  MLflow allows are cut with a ``...[truncated]`` marker. Params are immutable in MLflow, so a resumed run
  logs only the keys it lacks (a key already there with another value is left, and a log line says so).
* **metrics**: every point the job records in SQL, under the key the API uses (``<stage>/<name>``:
  ``distill/loss``, ``distill/reward_accuracy``, ``distill/reward_margin``, ``distill/learning_rate``,
  ``contrastive:positive/loss``, ``evaluate/preference_accuracy``...), at the same step. Non-finite values are
  skipped, as in SQL.
* **tags**: ``ctpd.job_id``, ``ctpd.tenant``, ``ctpd.method``, ``ctpd.attempt`` (rewritten by each attempt),
  ``mlflow.runName`` (the job's name, else its id), ``mlflow.user`` (the tenant), ``mlflow.source.name``
  (``ctpd``), and at the end ``ctpd.status`` (``succeeded``, ``failed``, ``cancelled``).
* **artifact**: the exported model folder as ``model/``, once the job succeeded.
* **status**: FINISHED (succeeded), FAILED, KILLED (cancelled); a hand-back, or an attempt that lost its
  lease or its database, leaves the run RUNNING for the attempt that resumes the job.

One run per job, found again by its ``ctpd.job_id`` tag: a retried attempt (a new worker process after a crash
or a hand-back) resumes that run instead of opening a second one. Its series stay clean by one rule, per
metric key: **only steps beyond the last step the run already has are logged**. A resumed training stage
first replays the steps before its checkpoint (``replay_metrics``), and a crashed attempt's successor re-runs
the steps between that checkpoint and the crash; the rule drops both where the run has them (the re-run
steps follow the same trajectory: resume is exact), and logs replayed steps the run lacks (an attempt that
died before it could send them).

Tracking must never fail or slow a job. The observer's methods only append to an in-memory buffer (a few
tuples per step); one daemon thread owns the ``MlflowClient`` (explicit, never MLflow's fluent global run:
the worker has threads) and sends the buffer with ``log_batch`` every ``flush_interval`` seconds and at every
stage end and checkpoint. A store that cannot be reached or refuses a write is retried with backoff; its first
failure (per outage) becomes a ``tracking_warning`` event on the job and a log line, and the job goes on. The
buffer is bounded (the oldest points go first, and the warning at the end says how many). Warnings are handed
to the ``warn`` callback on the job's own thread (the attempt's SQL writer is not thread-safe), at the next
report or at :meth:`MlflowObserver.finish`. The job's end (before its outcome is recorded, so a job seen
ended has its run ended) waits at most ``FINISH_SECONDS`` for the last sends and the model upload, and
``UNHEALTHY_FINISH_SECONDS`` when the run never opened or the store is failing; the client itself gives up
after ``MLFLOW_CLIENT_ENV``'s retries and timeout (MLflow's defaults spend minutes per call), unless the
operator set those variables.

Artifacts of a local store (``sqlite:///path/mlflow.db``) go to ``path/mlflow-artifacts/``, set as the
experiment's artifact location when this module creates the experiment, so nothing lands in the worker's
working directory as ``./mlruns``. An MLflow server decides its own artifact location; for a tenant's own
server (one the deployment does not trust: app/policy.py) the model is written only through the server's
proxied store (``mlflow-artifacts:``), never to a ``file:`` or bucket location the server names, which the worker
would write with its own disk or credentials. MLflow 3's file store (``file:``) is retired: MLflow refuses it
unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set on the workers.

A tenant's own server gets nothing of the worker's (:func:`isolate_untrusted_client`, before the client
connects). MLflow sends whatever credentials the process has to any host (``MLFLOW_TRACKING_TOKEN``,
``..._USERNAME``/``..._PASSWORD``, ``~/.mlflow/credentials``, ``..._AUTH``, ``..._AWS_SIGV4``, a client
certificate; requests adds a ``~/.netrc`` entry), so the job's process drops them first and checks that MLflow
would send none (else the job is not tracked); only the deployment's own store (and the stores of trusted specs:
an admin's, the embedded single-user service's, ``ctpd run``'s) is sent them. The client also follows no
redirects there, uses no presigned multipart uploads (URLs the server names), and connects only to addresses
resolved and checked at connect time (app/policy.py's :func:`~app.policy.tracking_address_refused`): a name that
resolves to an internal address by then (DNS rebinding) is refused, not called. This is process-wide on purpose:
a worker's job process runs that one job (``worker_max_tasks_per_child=1``). Through an HTTP(S) proxy from the
environment the proxy resolves the name, so the connect-time check is the proxy's. Its errors reach the
tenant's ``tracking_warning`` events as the error's type and HTTP status only: MLflow puts the server's
response body in its exceptions, and the worker's log has them whole.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from app.db.events import EventWrite
from ctpd_core.observe import Progress
from ctpd_core.spec import JobSpec
from ctpd_core.vocab import EventLevel, EventType

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from app.settings import Settings
    from worker.sinks import AttemptWriter

logger = logging.getLogger(__name__)

TAG_JOB_ID, TAG_TENANT, TAG_ATTEMPT, TAG_METHOD, TAG_STATUS = (
    "ctpd.job_id", "ctpd.tenant", "ctpd.attempt", "ctpd.method", "ctpd.status")
TAG_RUN_NAME = "mlflow.runName"
MODEL_ARTIFACT_PATH = "model"
LOCAL_ARTIFACT_FOLDER = "mlflow-artifacts"  # next to a sqlite store's database file

FLUSH_INTERVAL_SECONDS = 5.0  # a live run shows its metrics this late at most
FINISH_SECONDS = 300.0  # the most a job's end waits for the last sends and the model upload
UNHEALTHY_FINISH_SECONDS = 15.0  # ... when the run was never opened, or the store is failing: one last short try
# The workers' MLflow client gives up sooner than MLflow's defaults (7 retries of up to 120 s each: minutes per
# call), so a store that went away costs a job's end seconds; an operator's own values win.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 2.0, 60.0
MAX_PENDING_POINTS = 200_000  # per attempt, while the store is away (~15 keys per step: >10k steps)
MAX_WARNING_DETAIL = 300  # characters of an MLflow error in a job's event (its response body is not the tenant's)

# What MLflow reads from the environment for any host (mlflow.utils.credentials.get_default_host_creds): the
# deployment's, never a tenant's server's. A job tracked on a tenant's server runs without them.
MLFLOW_WORKER_ONLY_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                          "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
                          "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS")
UNTRUSTED_CLIENT_ENV = {
    "MLFLOW_ALLOW_HTTP_REDIRECTS": "false",  # MLflow follows redirects by default, wherever they point
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",  # uploads to presigned URLs the server names
    "NETRC": os.path.join(os.devnull, "netrc"),  # requests' netrc lookup (a ``default`` entry fits any host): none
}
_NO_CREDENTIALS_FILE = os.path.join(os.devnull, "credentials")  # a path that never exists

# MLflow's limits (mlflow.utils.validation), fixed here so the module imports MLflow only in its thread.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
PARAMS_PER_BATCH = 100  # also the tag limit
METRICS_PER_BATCH = 1000
TRUNCATED = "...[truncated]"


class TrackingProblem(ValueError):
    """A problem this module words itself, never with the server's text: shown to the tenant as it is."""


class AddressRefused(TrackingProblem, OSError):
    """A connection to a tenant's tracking server that would reach a non-public address (an OSError, so urllib3
    reports it as a failed connection)."""


RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
_RUN_STATUS_OF_OUTCOME: dict[str, RunStatus] = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}


@dataclass(frozen=True)
class TrackingTarget:
    """Where one job is tracked. ``from_spec``: the URI is the submitter's own (it may be named in the job's
    warnings); the deployment's URI never is."""

    uri: str
    experiment: str
    from_spec: bool


@dataclass(frozen=True)
class RunIdentity:
    """The job a run mirrors. ``attempt`` None (``ctpd run``): one more than the run's previous attempt."""

    job_id: str
    tenant: str
    attempt: int | None
    name: str | None
    method: str


def tracking_target(spec: JobSpec, *, default_uri: str, default_experiment: str) -> TrackingTarget | None:
    """The spec's tracking URI and experiment, falling back to the deployment's; None: the job is not tracked."""
    mlflow = spec.tracking.mlflow
    uri = mlflow.uri or default_uri
    if not uri:
        return None
    return TrackingTarget(uri=uri, experiment=mlflow.experiment or default_experiment,
                          from_spec=mlflow.uri is not None)


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested mapping as MLflow params: dotted keys, scalars as JSON (``null``, ``true``, ``0.1``) except
    strings (as they are), lists and empty mappings as JSON; values cut to MLflow's limit with a marker."""
    params: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            params.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
        if len(name) > MAX_KEY:
            logger.warning("MLflow param %s... has a key longer than %d characters; not logged", name[:60], MAX_KEY)
            continue
        params[name] = text
    return params


def local_artifact_location(uri: str, fallback_root: Path | None) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite store's file; under ``fallback_root`` for
    another database store (else MLflow would use ``./mlruns`` in the worker's working directory); None (the
    server's own choice, or a file store's own root) otherwise."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https", "file") or scheme.startswith("databricks"):
        return None
    if scheme == "sqlite":
        from sqlalchemy.engine import make_url

        database = make_url(uri).database
        if database and database != ":memory:":
            return (Path(database).expanduser().resolve().parent / LOCAL_ARTIFACT_FOLDER).as_uri()
    if fallback_root is not None:
        return (Path(fallback_root).resolve() / LOCAL_ARTIFACT_FOLDER).as_uri()
    return None


def run_status_of(outcome: str | None) -> RunStatus | None:
    """The MLflow run status of a job's outcome; None leaves the run RUNNING (the job goes on elsewhere)."""
    return _RUN_STATUS_OF_OUTCOME.get(outcome) if outcome else None


class MlflowObserver:
    """Mirrors one attempt of one job into its MLflow run (see the module docstring). Call :meth:`start`, pass
    it to the run (beside the SQL observer, through :class:`~ctpd_core.observe.FanOut`), then :meth:`finish`."""

    def __init__(
        self,
        target: TrackingTarget,
        identity: RunIdentity,
        spec: JobSpec,
        *,
        warn: Callable[[str], None] | None = None,
        still_current: Callable[[], bool] | None = None,
        artifact_fallback_root: Path | None = None,
        trusted_store: bool = True,
        flush_interval: float = FLUSH_INTERVAL_SECONDS,
        finish_seconds: float = FINISH_SECONDS,
        max_pending: int = MAX_PENDING_POINTS,
    ) -> None:
        self.target, self.identity = target, identity
        self.params = flatten_params(spec.model_dump(mode="json"))
        self.warn = warn or (lambda message: None)
        # False once this attempt no longer owns the job: a stale attempt sends nothing more to the shared run.
        self.still_current = still_current or (lambda: True)
        self.artifact_fallback_root = artifact_fallback_root
        # False for a tenant's own server in a multi-tenant deployment: the server names where the model is
        # written, so only its own proxied store is used (see _artifact_problem).
        self.trusted_store = trusted_store
        self.flush_interval, self.finish_seconds, self.max_pending = flush_interval, finish_seconds, max_pending
        self.run_id: str | None = None
        # (key, value, timestamp ms, step), appended by the job's thread, taken by the tracking thread.
        self._points: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._dropped = 0
        self._last_step: dict[str, int] = {}  # per metric key: the last step the run has (tracking thread only)
        self._warnings: list[str] = []  # handed to ``warn`` on the job's thread
        self._warnings_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._final: tuple[RunStatus | None, str | None, Path | None] = (None, None, None)
        self._failing_since: float | None = None
        self._retry_delay = RETRY_FIRST_SECONDS
        self._client: MlflowClient | None = None
        self._thread = threading.Thread(target=self._run, name=f"mlflow-{identity.job_id}", daemon=True)

    def start(self) -> MlflowObserver:
        for name, value in MLFLOW_CLIENT_ENV.items():  # read by MLflow at each request; process-wide on purpose
            os.environ.setdefault(name, value)
        self._thread.start()
        return self

    # ---------------------------------------------------------------------- the protocol (the job's thread)

    def stage_started(self, stage: str, cached: bool) -> None:
        self._relay_warnings()

    def stage_finished(self, stage: str, seconds: float, cached: bool, summary: Mapping[str, Any]) -> None:
        self._wake.set()  # the stage's points go out now, not after flush_interval
        self._relay_warnings()

    def progress(self, progress: Progress) -> None:
        pass  # a level, not a series: the job's row has it

    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        self._add(stage, ((step, metrics),))

    def replay_metrics(self, stage: str, history: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        self._add(stage, history)  # the steps the run already has are dropped when sent (module docstring)

    def checkpoint(self, stage: str, step: int, path: Path) -> None:
        self._wake.set()  # what a checkpoint protects is in the run too, so a successor has little to replay
        self._relay_warnings()

    # --------------------------------------------------------------------------------------- the end

    def finish(self, outcome: str | None, *, export_dir: Path | None = None) -> None:
        """Send what is left, log ``export_dir`` as ``model/`` (a succeeded job), and end the run with the status
        of ``outcome`` (``succeeded``, ``failed``, ``cancelled``; None leaves it RUNNING for the next attempt).
        Waits at most ``finish_seconds``; the warnings go to ``warn`` before it returns."""
        self._final = (run_status_of(outcome), outcome, export_dir if outcome == "succeeded" else None)
        healthy = self.run_id is not None and self._failing_since is None
        wait = self.finish_seconds if healthy else min(self.finish_seconds, UNHEALTHY_FINISH_SECONDS)
        self._closing.set()
        self._wake.set()
        self._thread.join(wait)
        if self._thread.is_alive():
            self._warning(f"{self._where()}: the run was not complete {wait:.0f} s after the job's end (the store is "
                          "slow or away); it may lack the last metrics, its status or the model")
        self._relay_warnings()

    # ------------------------------------------------------------------------------------ internals

    def _add(self, stage: str, steps: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        now = int(time.time() * 1000)
        for step, metrics in steps:
            for name, value in metrics.items():
                number = float(value)
                if math.isfinite(number):
                    self._points.append((f"{stage}/{name}", number, now, int(step)))
        while len(self._points) > self.max_pending:  # the store has been away long: the oldest go first
            self._points.popleft()
            self._dropped += 1
        self._relay_warnings()

    def _where(self) -> str:
        return f"MLflow tracking ({self.target.uri})" if self.target.from_spec else "MLflow tracking"

    def _detail(self, error: Exception) -> str:
        """An MLflow error for the job's event, short. The deployment's own store is not described to tenants
        (its errors name its host or its files): they get the error's type, the worker's log the whole error."""
        logger.warning("job %s: MLflow tracking (%s) failed: %s: %s", self.identity.job_id, self.target.uri,
                       type(error).__name__, error)
        if not self.target.from_spec:
            return f"{type(error).__name__} (the worker's log has the details)"
        if not self.trusted_store:
            return untrusted_detail(error)
        return f"{type(error).__name__}: {error}"[:MAX_WARNING_DETAIL]

    def _warning(self, message: str) -> None:
        logger.warning("job %s: %s", self.identity.job_id, message)
        with self._warnings_lock:
            self._warnings.append(message)

    def _relay_warnings(self) -> None:
        if not self._warnings:
            return
        with self._warnings_lock:
            messages, self._warnings = self._warnings, []
        for message in messages:
            try:
                self.warn(message)
            except Exception:  # noqa: BLE001 -- a warning that cannot be recorded must not fail the job
                logger.warning("job %s: could not record the tracking warning %r", self.identity.job_id, message,
                               exc_info=True)

    def _run(self) -> None:
        """The tracking thread: open the run, then send the buffer until the job ends."""
        while True:
            closing = self._closing.is_set()
            try:
                if self.still_current():
                    self._send()
                    if closing:
                        self._end()
                else:
                    self._points.clear()  # another attempt owns the job and its run now
                if self._failing_since is not None:
                    logger.info("job %s: MLflow tracking is back after %.0f s", self.identity.job_id,
                                time.monotonic() - self._failing_since)
                self._failing_since, self._retry_delay = None, RETRY_FIRST_SECONDS
                wait = self.flush_interval
            except Exception as error:  # noqa: BLE001 -- the tracking thread's boundary: never the job's failure
                detail = self._detail(error)
                if closing:
                    unsent = len(self._points) + self._dropped
                    self._warning(f"{self._where()}: the run could not be completed ({detail}); it lacks "
                                  f"{unsent} metric points" + (" and the model" if self._final[2] else ""))
                    return
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    self._warning(f"{self._where()}: {detail}; the job goes on, and tracking is retried every "
                                  f"{RETRY_MAX_SECONDS:.0f} s at most")
                wait = self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_SECONDS)
            if closing:
                if self._dropped:
                    self._warning(f"{self._where()}: {self._dropped} metric points were dropped while the store was "
                                  "away (the buffer is bounded)")
                return
            self._wake.wait(wait)
            self._wake.clear()

    def _connect(self) -> MlflowClient:
        """The client, with the job's run found again by its tag (or created), its params and attempt tag set."""
        if self._client is not None:
            return self._client
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        if not self.trusted_store:  # before anything is sent: the worker's credentials stay with the worker
            isolate_untrusted_client(self.target.uri)
        client = MlflowClient(tracking_uri=self.target.uri)
        experiment_id = self._experiment(client)
        identity = self.identity
        found = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_JOB_ID}` = '{identity.job_id}'",
                                   max_results=10, order_by=["attributes.start_time ASC"])
        tags = {TAG_JOB_ID: identity.job_id, TAG_TENANT: identity.tenant, TAG_METHOD: identity.method,
                # MLflow's own columns: "User" shows the tenant, "Source" the service (not the worker's script).
                "mlflow.user": identity.tenant, "mlflow.source.name": "ctpd", "mlflow.source.type": "JOB"}
        if found:
            run = found[0]
            if len(found) > 1:
                logger.warning("job %s: %d MLflow runs carry its tag; resuming the oldest, %s", identity.job_id,
                               len(found), run.info.run_id)
            previous = run.data.tags.get(TAG_ATTEMPT, "0")
            attempt = identity.attempt or (int(previous) + 1 if previous.isdigit() else 1)
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")  # ended by an attempt whose outcome was not the last
            known = dict(run.data.params)
            for key in run.data.metrics:
                history = client.get_metric_history(run_id, key)
                self._last_step[key] = max((metric.step for metric in history), default=-1)
        else:
            attempt = identity.attempt or 1
            run = client.create_run(experiment_id, tags={**tags, TAG_ATTEMPT: str(attempt)},
                                    run_name=identity.name or identity.job_id)
            run_id, known = run.info.run_id, {}
        for key, value in self.params.items():
            if key in known and known[key] != value:
                logger.warning("job %s: MLflow param %s is %r in the run, %r now; params are immutable, so the "
                               "run keeps the first", identity.job_id, key, known[key][:80], value[:80])
        params = [Param(key, value) for key, value in self.params.items() if key not in known]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[start:start + PARAMS_PER_BATCH])
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in {**tags, TAG_ATTEMPT: str(attempt)}.items()])
        logger.info("job %s: tracked as MLflow run %s (%s, attempt %d)", identity.job_id, run_id,
                    "resumed" if found else "new", attempt)
        self.run_id, self._client = run_id, client
        return client

    def _experiment(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        name = self.target.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = local_artifact_location(self.target.uri, self.artifact_fallback_root)
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException:  # another worker created it a moment ago
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            restore = "mlflow experiments restore" + (  # the id is the server's text: only a trusted one's is shown
                f" --experiment-id {experiment.experiment_id}" if self.trusted_store else "")
            raise TrackingProblem(f"the MLflow experiment {name!r} is deleted; restore it ({restore}) or name another")
        return experiment.experiment_id

    def _send(self) -> None:
        """Every buffered point the run does not have yet (steps beyond its last, per key), in batches. A batch
        that fails goes back to the front of the buffer for the next try."""
        from mlflow.entities import Metric

        client = self._connect()
        assert self.run_id is not None  # set by _connect
        while self._points:
            taken: list[tuple[str, float, int, int]] = []
            try:
                while self._points and len(taken) < METRICS_PER_BATCH:
                    taken.append(self._points.popleft())
            except IndexError:  # the job's thread dropped the oldest meanwhile (a full buffer)
                pass
            before = dict(self._last_step)
            batch = []
            for key, value, timestamp, step in taken:
                if step > self._last_step.get(key, -1):
                    batch.append(Metric(key, value, timestamp, step))
                    self._last_step[key] = step
            try:
                if batch:
                    client.log_batch(self.run_id, metrics=batch)
            except Exception:
                self._last_step = before
                self._points.extendleft(reversed(taken))
                raise

    def _artifact_problem(self, artifact_uri: str) -> str | None:
        """Why the model may not be written to ``artifact_uri``, the location the tracking server gave the run.

        The MLflow client writes artifacts wherever the server says: ``file:`` is the worker's own disk, ``s3:``
        a bucket reached with the worker's credentials. For a tenant's own server (not trusted) only the
        server's proxied store is used: ``mlflow-artifacts:`` without another host, uploaded through the
        tracking server itself (``mlflow server`` serves artifacts so by default)."""
        if self.trusted_store:
            return None
        parsed = urlsplit(artifact_uri)
        if parsed.scheme == "mlflow-artifacts" and parsed.netloc in ("", urlsplit(self.target.uri).netloc):
            return None
        # The server's text, so only its scheme, and only when it looks like one.
        scheme = parsed.scheme if re.fullmatch(r"[a-z][a-z0-9+.-]{0,30}", parsed.scheme) else "another"
        return (f"the tracking server keeps this run's artifacts in a {scheme}: location, which the workers do not "
                "write to for your key; serve artifacts through the tracking server (mlflow server "
                "--serve-artifacts, an mlflow-artifacts: location)")

    def _end(self) -> None:
        """The job's end: the model, the status tag and the run's status."""
        status, outcome, export_dir = self._final
        client = self._connect()
        assert self.run_id is not None
        if export_dir is not None and Path(export_dir).is_dir():
            problem = self._artifact_problem(client.get_run(self.run_id).info.artifact_uri or "")
            if problem:
                self._warning(f"{self._where()}: the model was not logged: {problem}")
            else:
                client.log_artifacts(self.run_id, str(export_dir), artifact_path=MODEL_ARTIFACT_PATH)
        if outcome:
            client.set_tag(self.run_id, TAG_STATUS, outcome)
        if status is not None:
            client.set_terminated(self.run_id, status=status)


def isolate_untrusted_client(uri: str) -> None:
    """Ready this process's MLflow client for a tenant's server at ``uri`` (see the module docstring): the
    worker's credentials dropped, no redirects or presigned uploads, connections to the host checked at connect
    time. Raises :class:`TrackingProblem` when MLflow would still send a credential (then nothing is sent)."""
    import requests.utils
    from mlflow.utils import credentials

    for name in MLFLOW_WORKER_ONLY_ENV:
        os.environ.pop(name, None)
    os.environ.update(UNTRUSTED_CLIENT_ENV)
    credentials._get_credentials_path = lambda: _NO_CREDENTIALS_FILE  # MLflow reads ~/.mlflow/credentials through it
    host = urlsplit(uri).hostname
    if host:  # an http(s) server (the only kind app/policy.py lets a tenant name)
        _guard_connections(host)
    # The proof, the way MLflow itself gathers what it sends (a later MLflow that reads credentials elsewhere
    # fails here, closed, instead of sending them).
    creds = credentials.get_default_host_creds(uri)
    kept = [field for field in ("username", "password", "token", "auth", "aws_sigv4", "client_cert_path")
            if getattr(creds, field, None)]
    if kept or requests.utils.get_netrc_auth(uri):
        logger.error("MLflow would still send the worker's credentials (%s) to a tenant's server; not tracked",
                     ", ".join(kept) or "netrc")
        raise TrackingProblem("the worker could not drop its own MLflow credentials, so it does not call your "
                              "server; tell an operator")


_guarded_hosts: set[str] = set()  # the tenant's tracking host in this process (normalized: _host_key)
_guard_lock = threading.Lock()
_guard_installed = False


def _host_key(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _guard_connections(host: str) -> None:
    """From now on every connection this process opens to ``host`` through urllib3 (MLflow's requests, its
    artifact uploads) goes to an address resolved and checked right then, never to a second lookup's answer."""
    global _guard_installed
    import urllib3.util.connection as connection

    with _guard_lock:
        _guarded_hosts.add(_host_key(host))
        if _guard_installed:
            return
        unguarded = connection.create_connection

        def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
            name, port = address
            if _host_key(str(name)) not in _guarded_hosts:
                return unguarded(address, *args, **kwargs)
            error: OSError | None = None
            for checked in checked_addresses(str(name), port):
                try:
                    return unguarded((checked, port), *args, **kwargs)
                except OSError as failed:  # the next address, as urllib3 itself would
                    error = failed
            assert error is not None
            raise error

        connection.create_connection = create_connection
        _guard_installed = True


def checked_addresses(host: str, port: int) -> list[str]:
    """The addresses of a tenant's tracking host, each one allowed (app/policy.py), for a connection now;
    :class:`AddressRefused` if any is not (or there is none)."""
    from app.policy import tracking_address_refused

    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise AddressRefused(f"the tracking server's host {host!r} resolves to no address on the worker")
    for address in addresses:
        reason = tracking_address_refused(ipaddress.ip_address(address.split("%", 1)[0]))
        if reason is not None:
            logger.warning("refused a connection to the tracking host %r: it resolves to %s (%s)", host, address,
                           reason)
            raise AddressRefused(f"the tracking server's host {host!r} resolves to a non-public address ({reason}) "
                                 "on the worker, which the workers do not call")
    return addresses


_STATUS_OF_MESSAGE = re.compile(r"API request to endpoint \S+ failed with error code (\d{3}) ")


def untrusted_detail(error: BaseException) -> str:
    """A tenant's server's error, for its job's event: this module's own words (:class:`TrackingProblem`), else
    the error's type, the HTTP status and the type of the root cause; never the error's text (MLflow puts the
    response body in it, and the worker's side of the connection)."""
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain and len(chain) < 20:
        chain.append(link)
        link = link.__cause__ or link.__context__
    for link in chain:
        if isinstance(link, TrackingProblem):
            return str(link)[:MAX_WARNING_DETAIL]
    status: int | None = None
    for link in chain:
        response = getattr(link, "response", None)
        if isinstance(getattr(response, "status_code", None), int):
            status = response.status_code  # type: ignore[union-attr]
            break
        matched = _STATUS_OF_MESSAGE.match(str(link))  # MLflow's own words, before the body
        if matched:
            status = int(matched.group(1))
            break
    if status is None and type(error).__name__ == "RestException":  # a JSON error: its code's HTTP status
        try:
            status = int(error.get_http_status_code())  # type: ignore[attr-defined]
        except (TypeError, ValueError, AttributeError):
            status = None
    parts = [f"HTTP {status}"] if status is not None else []
    if len(chain) > 1:
        parts.append(type(chain[-1]).__name__)
    return type(error).__name__ + (f" ({', '.join(parts)})" if parts else "")


def start_job_tracking(
    spec: JobSpec, settings: Settings, identity: RunIdentity, *, warn: Callable[[str], None],
    still_current: Callable[[], bool] | None = None, submitted_by_admin: bool = False,
) -> MlflowObserver | None:
    """The started observer of a job the spec or the deployment tracks; None when neither names a URI. The
    deployment's store is trusted, and so is a spec's for the keys that may name server paths (app/policy.py)."""
    target = tracking_target(spec, default_uri=settings.mlflow_tracking_uri,
                             default_experiment=settings.mlflow_experiment)
    if target is None:
        if spec.tracking.mlflow.experiment is not None:  # the API refuses this; a worker configured apart may not
            warn("tracking.mlflow.experiment is set, but neither the spec nor this worker names an MLflow tracking "
                 "URI (CTPD_MLFLOW_TRACKING_URI), so the job is not tracked")
        return None
    return MlflowObserver(target, identity, spec, warn=warn, still_current=still_current,
                          artifact_fallback_root=Path(settings.artifact_root),
                          trusted_store=not target.from_spec or settings.allow_server_paths or submitted_by_admin,
                          ).start()


def job_outcome(status: str, stop_reason: str | None) -> str | None:
    """What the run should say of an attempt that ended with ``status``: a stop for a hand-back, a lost lease
    or a database outage is not the job's end (None: the run stays RUNNING for the attempt that resumes it)."""
    if status == "cancelled" and stop_reason not in (None, "cancel"):
        return None
    return status


def warning_events(writer: AttemptWriter) -> Callable[[str], None]:
    """``warn`` for a worker's attempt: a ``tracking_warning`` event on the job, through its fenced writer."""

    def warn(message: str) -> None:
        writer.submit(EventWrite(EventType.TRACKING_WARNING, message, level=EventLevel.WARNING))

    return warn


def start_local_tracking(spec: JobSpec, run_key: str, artifact_root: Path) -> MlflowObserver | None:
    """``ctpd run``'s observer, when the spec names a tracking URI (a local run has no deployment settings).
    The run folder's key stands for the job id, so rerunning the same spec resumes the same MLflow run as it
    resumes the same checkpoints; warnings go to stderr."""
    from app.settings import Settings

    target = tracking_target(spec, default_uri="",
                             default_experiment=Settings.model_fields["mlflow_experiment"].default)
    if target is None:
        return None

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    identity = RunIdentity(job_id=f"local-{run_key}", tenant="local", attempt=None, name=spec.name,
                           method=spec.method)
    return MlflowObserver(target, identity, spec, warn=warn, artifact_fallback_root=artifact_root).start()
