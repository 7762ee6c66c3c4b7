"""``GET /metrics`` for Prometheus, and the request middleware that feeds it and the logs.

Two kinds of figures, kept apart because they have different sources of truth:

* **Per process** (:class:`RequestTelemetry`, prometheus-client's own metrics): requests by method, route
  template and status, their latency, requests in flight. Each API process counts its own; with several
  processes (``uvicorn --workers N``, or several containers behind one scrape target) set
  ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder shared by the processes of one host, wiped before they
  start, and every scrape answers the sum (prometheus-client's ``MultiProcessCollector``; a process that
  stops marks itself dead, so its in-flight gauge leaves the sum while its counters stay in it).
* **Deployment-wide** (:class:`StateCollector`): read from SQL at scrape time, since SQL is the source of truth
  and the workers may run on other machines: jobs by status, queue depth and the oldest queued job's wait, stage
  durations (``stage_finished`` events), training steps, tokens and step time (``metric_points``), each running
  job's heartbeat age and tokens per second, lease expiries (``job_restarted`` events and ``worker_lost``
  failures) and webhook deliveries by outcome. Any API process answers the same figures. The result is cached
  for ``cache_seconds`` (a scrape storm costs one set of queries), and an unreachable database answers
  ``ctpd_state_up 0`` with the per-process figures still served. Job ids appear as labels only on the series
  of running jobs (at most one per worker), so the number of series stays bounded.

The middleware also gives every request an id (a valid incoming ``X-Request-ID``, else a new one), returns it
in the response's ``X-Request-ID`` header, stamps it on every log line the request writes
(``ctpd_core.logs``) and writes one access line per request in place of uvicorn's, on the ``app.access``
logger (so it can be silenced on its own).

``metrics_token`` (``CTPD_METRICS_TOKEN``): when set, ``/metrics`` asks for ``Authorization: Bearer <token>``.
Open, the scrape shows anyone who reaches it every running job's id and its worker's host name, and deployment-wide
counts (no tenant names, specs, datasets or metrics of a single finished job).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError

from app.api.errors import ApiError
from app.db import webhooks as webhook_rows
from app.db.models import Job, JobEvent, MetricPoint, utcnow
from ctpd_core import logs
from ctpd_core.vocab import HELD_STATUSES, EventType, JobStatus

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from app.db.engine import Database
    from app.settings import Settings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("app.access")

REQUEST_ID_HEADER = "X-Request-ID"
# What an incoming id may be: a UUID, a ULID, a trace id, a load balancer's token. Anything else (too long,
# spaces, quotes, control characters: what would forge or break a log line) is replaced by a new id.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=-]{0,127}")
UNMATCHED_ROUTE = "unmatched"  # every path no route matches: one label, however many paths are probed
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: access line at DEBUG when OK
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How long the figures read from SQL are reused: one typical scrape interval (Prometheus's default is 15 s), so
# each API process queries the database about once per scrape period however many scrapers or replicas ask.
STATE_CACHE_SECONDS = 15.0
# Most answers take milliseconds; an upload or a model download streams for minutes.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
# Stage wall times run from milliseconds (a cached stage) to many hours (a long distill).
STAGE_BUCKETS = (0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
                 86400.0)
# The metric_points fit writes once per optimizer step (ctpd_core/train.py): step_seconds always, tokens when
# the loss reports its token count.
STEP_SECONDS, TOKENS, TOKENS_PER_SECOND = "step_seconds", "tokens", "tokens_per_second"
QUEUED_AGAIN = (EventType.JOB_QUEUED, EventType.JOB_RESTARTED, EventType.JOB_HANDED_BACK)


# ------------------------------------------------------------------------------------ per-process metrics


def multiprocess_dir() -> Path | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when set (checked: a missing folder would fail every request, not the start)."""
    value = os.environ.get(MULTIPROC_ENV)
    if not value:
        return None
    path = Path(value)
    if not path.is_dir() or not os.access(path, os.W_OK):
        raise ValueError(f"{MULTIPROC_ENV}={value!r} is not a writable folder: create it (empty) before the API "
                         f"processes start and wipe it between deployments, or unset it for a single process")
    return path


@dataclass(frozen=True)
class RequestMetrics:
    requests: Counter
    latency: Histogram
    in_flight: Gauge


@lru_cache(maxsize=1)
def request_metrics() -> RequestMetrics:
    """The process's request metrics, created once (in the default registry; in multiprocess mode their values
    live in files under ``PROMETHEUS_MULTIPROC_DIR``, which the scrape sums)."""
    disable_created_metrics()  # no *_created series: Prometheus does not use them and they double the output
    return RequestMetrics(
        requests=Counter("ctpd_http_requests", "HTTP requests answered, by method, route template and status.",
                         ["method", "route", "status"]),
        latency=Histogram("ctpd_http_request_duration_seconds",
                          "Time from a request's arrival to its last response byte, by method and route template.",
                          ["method", "route"], buckets=REQUEST_BUCKETS),
        in_flight=Gauge("ctpd_http_requests_in_flight", "Requests being answered now.", ["method"],
                        multiprocess_mode="livesum"),
    )


def route_label(scope: Scope) -> str:
    """The route template the router matched (``/v1/jobs/{job_id}``), never the raw path."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) and template else UNMATCHED_ROUTE


def request_id_of(scope: Scope) -> str:
    """The request's ``X-Request-ID`` if it is a valid one (a proxy's or the client's, so one id follows the
    request across services), else a new one."""
    for name, value in scope.get("headers") or ():
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestTelemetry:
    """Pure ASGI middleware (no BaseHTTPMiddleware: streamed bodies pass through untouched and the context
    variable reaches the endpoint): request id, access line, request metrics. See the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.metrics = request_metrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        method = scope["method"] if scope["method"] in METHODS else "other"
        status = 500  # if no response starts: the app raised and the server answers 500
        header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = logs.set_request_id(request_id)
        in_flight = self.metrics.in_flight.labels(method)
        in_flight.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            in_flight.dec()
            route = route_label(scope)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(seconds)
            quiet = route in QUIET_ROUTES and status < 400
            access_logger.log(
                logging.DEBUG if quiet else logging.INFO, "%s %s %d %.1f ms", scope["method"], route, status,
                seconds * 1000,
                extra={"method": scope["method"], "route": route, "path": scope.get("path"), "status": status,
                       "duration_ms": round(seconds * 1000, 3)},
            )
            logs.reset_request_id(token)


# --------------------------------------------------------------------------------- deployment-wide figures


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    worker_id: str | None
    lease_expires_at: datetime | None


class StateCollector(Collector):
    """The deployment's figures from SQL (module docstring), cached for ``cache_seconds``.

    ``lease_seconds`` turns a lease's expiry back into the time of its last renewal (a heartbeat sets
    ``lease_expires_at = now + lease_seconds``), so the workers and the API must share that setting, as they
    share the database."""

    def __init__(self, db: Database, *, lease_seconds: float, cache_seconds: float = STATE_CACHE_SECONDS,
                 clock: Any = time.monotonic) -> None:
        self.db, self.lease_seconds, self.cache_seconds, self.clock = db, lease_seconds, cache_seconds, clock
        self._lock = threading.Lock()  # one refresh at a time; concurrent scrapes wait for it and share it
        self._cached: list[Metric] | None = None
        self._cached_at = -math.inf
        self._failing = False

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cached is None or self.clock() - self._cached_at >= self.cache_seconds:
                self._cached, self._cached_at = self._refresh(), self.clock()
            cached = self._cached
        yield from cached

    def _refresh(self) -> list[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily("ctpd_state_up", "1 when the figures read from SQL are current, 0 when the database "
                               "could not be read (the other ctpd_ figures of SQL are then absent).")
        try:
            families = list(self._read())
        except SQLAlchemyError as error:
            if not self._failing:
                logger.warning("metrics: could not read the deployment's figures from the database (%s)",
                               type(error).__name__)
            self._failing = True
            up.add_metric([], 0)
            return [up]
        if self._failing:
            logger.info("metrics: the database answers again")
        self._failing = False
        up.add_metric([], 1)
        duration = GaugeMetricFamily("ctpd_state_read_seconds", "How long reading the figures from SQL took.")
        duration.add_metric([], time.perf_counter() - started)
        return [up, duration, *families]

    def _read(self) -> Iterator[Metric]:
        now = utcnow()
        with self.db.read() as session:
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            queued = session.execute(
                select(Job.created_at, select(func.max(JobEvent.created_at))
                       .where(JobEvent.job_id == Job.id, JobEvent.type.in_(QUEUED_AGAIN))
                       .scalar_subquery())
                .where(Job.status == JobStatus.QUEUED)
            ).all()
            stage_rows = session.execute(_stage_duration_query()).all()
            training_rows = session.execute(
                select(MetricPoint.stage, MetricPoint.name, func.count(), func.sum(MetricPoint.value))
                .where(MetricPoint.name.in_((STEP_SECONDS, TOKENS)))
                .group_by(MetricPoint.stage, MetricPoint.name)
            ).all()
            running = [RunningJob(*row) for row in session.execute(
                select(Job.id, Job.worker_id, Job.lease_expires_at)
                .where(Job.status.in_(HELD_STATUSES)).order_by(Job.id)
            ).all()]
            live_rates = {job.job_id: session.execute(
                select(MetricPoint.stage, MetricPoint.value)
                .where(MetricPoint.job_id == job.job_id, MetricPoint.name == TOKENS_PER_SECOND)
                .order_by(MetricPoint.id.desc()).limit(1)
            ).first() for job in running}
            restarted = session.scalar(select(func.count()).select_from(JobEvent)
                                       .where(JobEvent.type == EventType.JOB_RESTARTED)) or 0
            lost = session.scalar(select(func.count()).select_from(Job)
                                  .where(Job.status == JobStatus.FAILED, Job.error_code == "worker_lost")) or 0
        deliveries = webhook_rows.delivery_outcome_counts(self.db)

        jobs = GaugeMetricFamily("ctpd_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status.value, 0))
        yield jobs

        depth = GaugeMetricFamily("ctpd_queue_depth", "Jobs queued and not yet claimed by a worker.")
        depth.add_metric([], len(queued))
        yield depth
        since = [max(at for at in (created, requeued) if at is not None) for created, requeued in queued]
        oldest = GaugeMetricFamily("ctpd_queue_oldest_age_seconds",
                                   "How long the longest-waiting queued job has waited since it was last queued "
                                   "(submitted, requeued by the reaper, or handed back); 0 when none waits.")
        oldest.add_metric([], max(0.0, (now - min(since)).total_seconds()) if since else 0.0)
        yield oldest

        yield _stage_histogram(stage_rows)
        yield from _training_families(training_rows)

        heartbeat = GaugeMetricFamily(
            "ctpd_worker_heartbeat_age_seconds",
            "Seconds since the worker holding a running job last renewed its lease (one series per running job; a "
            "value past the lease means the reaper will take the job back).", labels=["job_id", "worker"])
        for job in running:
            if job.lease_expires_at is not None:
                renewed_at = job.lease_expires_at.timestamp() - self.lease_seconds
                heartbeat.add_metric([job.job_id, job.worker_id or ""], max(0.0, now.timestamp() - renewed_at))
        yield heartbeat

        live = GaugeMetricFamily("ctpd_job_tokens_per_second",
                                 "The latest optimizer step's tokens per second of each running job, by its "
                                 "training stage (distill, contrastive:positive, ...).", labels=["job_id", "stage"])
        for job_id, rate in live_rates.items():
            if rate is not None:
                live.add_metric([job_id, rate[0]], rate[1])
        yield live

        expiries = CounterMetricFamily(
            "ctpd_lease_expiries", "Leases that ran out (a worker died or stalled), by what the reaper did: requeued "
            "the job, or failed it (worker_lost) with no attempts left.", labels=["outcome"])
        expiries.add_metric(["requeued"], restarted)
        expiries.add_metric(["failed"], lost)
        yield expiries

        webhooks = CounterMetricFamily("ctpd_webhook_deliveries", "Webhook delivery attempts, by outcome.",
                                       labels=["outcome"])
        for outcome, count in sorted(deliveries.items()):
            webhooks.add_metric([outcome], count)
        yield webhooks


def _stage_duration_query() -> Any:
    seconds = JobEvent.data["seconds"].as_float()
    cached = JobEvent.data["cached"].as_boolean()
    buckets = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in STAGE_BUCKETS]
    return (select(JobEvent.stage, cached, func.count(), func.sum(seconds), *buckets)
            .where(JobEvent.type == EventType.STAGE_FINISHED, seconds.is_not(None))
            .group_by(JobEvent.stage, cached))


def _stage_histogram(rows: Sequence[Sequence[Any]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        "ctpd_stage_duration_seconds", "Wall time of finished stages (stage_finished events), by stage and whether "
        "the stage reused its cached output.", labels=["stage", "cached"])
    for stage, cached, count, total, *in_buckets in rows:
        buckets = [(floatToGoString(bound), float(n or 0)) for bound, n in zip(STAGE_BUCKETS, in_buckets, strict=True)]
        family.add_metric([stage or "", "true" if cached else "false"], [*buckets, ("+Inf", float(count))],
                          sum_value=float(total or 0.0))
    return family


def _training_families(rows: Iterable[Sequence[Any]]) -> Iterator[Metric]:
    steps = CounterMetricFamily("ctpd_training_steps", "Optimizer steps run, by training stage (a step an attempt "
                                "re-runs after resuming from its checkpoint counts again).", labels=["stage"])
    tokens = CounterMetricFamily("ctpd_training_tokens", "Tokens trained on, by training stage; "
                                 "rate(ctpd_training_tokens_total[5m]) is the deployment's throughput.",
                                 labels=["stage"])
    seconds = CounterMetricFamily("ctpd_training_step_seconds", "Wall time spent in optimizer steps, by training "
                                  "stage; tokens_total / step_seconds_total is the tokens per second while training.",
                                  labels=["stage"])
    for stage, name, count, total in rows:
        if name == STEP_SECONDS:
            steps.add_metric([stage], count)
            seconds.add_metric([stage], float(total or 0.0))
        else:
            tokens.add_metric([stage], float(total or 0.0))
    yield from (steps, tokens, seconds)


# ------------------------------------------------------------------------------------------- the route


def metrics_registry(db: Database, settings: Settings) -> CollectorRegistry:
    """What one app's ``/metrics`` serves: this host's request metrics (summed over its processes in
    multiprocess mode) and the deployment's figures from ``db``."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir() is not None:
        prometheus_multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ProcessCollector())
    registry.register(StateCollector(db, lease_seconds=settings.lease_seconds))
    return registry


class _ProcessCollector(Collector):
    """The default registry (this process's request metrics, and prometheus-client's process_ and python_
    figures) inside an app's registry, next to its StateCollector."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def check_metrics_token(request: Request, token: str) -> None:
    if not token:
        return
    scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "missing_metrics_token", "GET /metrics needs `Authorization: Bearer <token>` with the "
                       "deployment's CTPD_METRICS_TOKEN (set it as the scrape job's bearer token)",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "invalid_metrics_token", "the bearer token is not this deployment's CTPD_METRICS_TOKEN",
                       headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text exposition (a sync route: the SQL reads run in the threadpool, not on the event loop)."""
    check_metrics_token(request, request.app.state.settings.metrics_token)
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: Any, db: Database, settings: Settings) -> None:
    """The request middleware and ``GET /metrics`` on ``app`` (checks ``PROMETHEUS_MULTIPROC_DIR`` now, at
    creation, so a bad folder fails the start and not every request)."""
    multiprocess_dir()
    app.state.metrics_registry = metrics_registry(db, settings)
    app.include_router(router)
    # Outermost, outside Starlette's ServerErrorMiddleware (app.add_middleware would put it inside): the 500 that
    # answers an unhandled exception gets the request id header and is counted as a 500, and the error handler's
    # traceback line carries the id, like every other line of the request.
    build_stack = app.build_middleware_stack

    def build_with_telemetry() -> ASGIApp:
        return RequestTelemetry(build_stack())

    app.build_middleware_stack = build_with_telemetry


def process_exiting() -> None:
    """Call as an API process stops: in multiprocess mode its in-flight gauge leaves the sum (its counters stay)."""
    if os.environ.get(MULTIPROC_ENV):
        prometheus_multiprocess.mark_process_dead(os.getpid())
