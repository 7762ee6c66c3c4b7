"""GET /metrics, scraped and parsed with prometheus-client's own parser.

* In process, on SQLite and PostgreSQL: the request metrics (route templates, statuses, the token), and the
  deployment's figures from SQL on rows built through the repository (queue age, stage durations, steps and
  tokens, heartbeat ages, lease expiries, webhook deliveries), the cache and a database that is down.
* ``uvicorn --workers 2`` sharing ``PROMETHEUS_MULTIPROC_DIR``: requests answered by both processes, one scrape
  sees their sum; a stopped process leaves no in-flight gauge behind.
* A real job end to end (PostgreSQL, Redis, ``ctpd serve`` with its webhook dispatcher, ``ctpd worker``, JSON
  logs, a real webhook receiver): the scrape shows what the job implies, its ``job.succeeded`` delivery
  included, and every line of the worker's log is JSON carrying the job's fields while it runs.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from app.db import events as event_rows
from app.db import jobs as job_rows
from app.db.engine import Database
from app.db.models import Job, utcnow
from app.metrics import STAGE_BUCKETS, STATE_CACHE_SECONDS, StateCollector
from ctpd_core.vocab import EventType
from tests.live_service import (
    TERMINAL,
    Proc,
    api_ready,
    free_port,
    reachable,
    run_cli,
    service_env,
    tiny_job,
    upload_dataset,
    wait_for_job,
    wait_until,
    worker_process,
    worker_ready,
)
from tests.webhook_receiver import WebhookReceiver

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, Any], Samples]:
    """The families by name and every sample by (sample name, labels)."""
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples: Samples = {}
    for family in families.values():
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


def assert_histograms_consistent(families: dict[str, Any], name: str) -> None:
    """Buckets cumulative (monotone in le), +Inf last and equal to _count, for every label set."""
    by_labels: dict[frozenset, list[tuple[float, float]]] = {}
    counts: dict[frozenset, float] = {}
    for sample in families[name].samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        key = frozenset(labels.items())
        if sample.name == f"{name}_bucket":
            by_labels.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
        elif sample.name == f"{name}_count":
            counts[key] = sample.value
    assert by_labels, f"{name} has no buckets"
    for key, buckets in by_labels.items():
        values = [count for _, count in sorted(buckets)]
        assert values == sorted(values), f"{name}{dict(key)} buckets are not cumulative: {buckets}"
        assert sorted(buckets)[-1][0] == float("inf") and values[-1] == counts[key], (name, dict(key))


def scrape_collector(collector: StateCollector) -> tuple[dict[str, Any], Samples]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return parse(generate_latest(registry).decode())


# ------------------------------------------------------------------------------------- request metrics


def test_requests_are_counted_by_route_template_and_status(app, alice):
    def scrape() -> Samples:
        response = alice.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return parse(response.text)[1]

    job_route = "/v1/jobs/{job_id}"
    before = scrape()
    for job_id in ("job_a", "job_b", "job_c"):  # three raw paths, one route
        assert alice.get(f"/v1/jobs/{job_id}").status_code == 404
    assert alice.get("/no/such/path").status_code == 404
    assert alice.get(f"/no/such/{uuid.uuid4().hex}").status_code == 404
    assert alice.delete("/v1/jobs").status_code == 405  # a known path, a method it does not take
    families, after = parse(alice.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return (value(after, name, **labels) or 0.0) - (value(before, name, **labels) or 0.0)

    assert delta("ctpd_http_requests_total", method="GET", route=job_route, status="404") == 3
    assert delta("ctpd_http_requests_total", method="GET", route="unmatched", status="404") == 2
    assert delta("ctpd_http_requests_total", method="DELETE", route="/v1/jobs", status="405") == 1
    assert delta("ctpd_http_requests_total", method="GET", route="/metrics", status="200") >= 1
    assert delta("ctpd_http_request_duration_seconds_count", method="GET", route=job_route) == 3
    assert delta("ctpd_http_request_duration_seconds_sum", method="GET", route=job_route) > 0
    assert not any(labels.get("route", "").startswith("/v1/jobs/job_") for labels in
                   series(after, "ctpd_http_requests_total"))  # no raw path ever becomes a label
    assert_histograms_consistent(families, "ctpd_http_request_duration_seconds")
    assert value(after, "ctpd_http_requests_in_flight", method="GET") == 1  # the scrape itself
    assert value(after, "ctpd_state_up") == 1
    assert "/metrics" not in alice.get("/openapi.json").json()["paths"]  # not part of the client's API


def test_the_metrics_token_is_asked_when_set(settings, queue, client):
    from fastapi.testclient import TestClient

    from app.main import create_app

    open_scrape = client.get("/metrics")
    assert open_scrape.status_code == 200  # the default: an internal scrape network
    guarded = create_app(settings.model_copy(update={"metrics_token": "s3cret"}), queue=queue)
    try:
        with TestClient(guarded) as scraper:
            missing = scraper.get("/metrics")
            wrong = scraper.get("/metrics", headers={"Authorization": "Bearer nope"})
            right = scraper.get("/metrics", headers={"Authorization": "Bearer s3cret"})
            other = scraper.get("/healthz")  # nothing else asks for it
    finally:
        guarded.state.db.dispose()
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_metrics_token"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "CTPD_METRICS_TOKEN" in missing.json()["error"]["message"]
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_metrics_token"
    assert right.status_code == 200 and "ctpd_jobs" in right.text
    assert other.status_code == 200


# ------------------------------------------------------------------------------ the figures from SQL


def _job(db: Database, tenant: str = "acme", *, max_attempts: int = 3) -> str:
    job, created = job_rows.create_job(db, tenant=tenant, spec={"student": {"model": "s"}}, name=None, metadata={},
                                       idempotency_key=None, request_hash="h", max_attempts=max_attempts)
    assert created
    return job.id


def _set(db: Database, job_id: str, **values: Any) -> None:
    with db.write() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_the_deployment_figures_come_from_sql(db, settings):
    now = utcnow()
    # Requeued by the reaper a minute ago, though submitted an hour ago: it has waited a minute.
    requeued = _job(db)
    _set(db, requeued, created_at=now - timedelta(hours=1))
    lost = _job(db, max_attempts=1)  # its only attempt's lease runs out: failed, worker_lost
    for job_id in (requeued, lost):
        assert job_rows.claim_job(db, job_id, "w-old:1", lease_seconds=60)
    assert job_rows.reap_stale_jobs(db, now=now - timedelta(seconds=60),
                                    expired_before=now + timedelta(hours=1)) == [requeued]
    fresh = _job(db)
    _set(db, fresh, created_at=now - timedelta(seconds=10))

    running = _job(db, tenant="globex")
    assert job_rows.claim_job(db, running, "gpu0@host:4242", lease_seconds=settings.lease_seconds)
    # Its last heartbeat was 25 s ago: the lease it set then ends lease_seconds after it.
    _set(db, running, lease_expires_at=now + timedelta(seconds=settings.lease_seconds - 25))
    event_rows.add_metrics(db, running, "contrastive:positive", 1,
                           {"loss": 0.7, "tokens": 50, "step_seconds": 1.0, "tokens_per_second": 50.0})
    event_rows.add_metrics(db, running, "distill", 1,
                           {"loss": 0.6, "tokens": 100, "step_seconds": 0.5, "tokens_per_second": 200.0})
    event_rows.add_metrics(db, running, "distill", 2,
                           {"loss": 0.5, "tokens": 120, "step_seconds": 0.4, "tokens_per_second": 300.0})
    event_rows.add_metrics(db, running, "evaluate", 0, {"reward_accuracy": 0.5})  # not a training step

    done = _job(db)
    assert job_rows.claim_job(db, done, "gpu1@host:7", lease_seconds=60)
    for stage, seconds, cached in (("prepare", 0.5, False), ("distill", 90.0, False), ("distill", 0.01, True)):
        event_rows.add_event(db, done, EventType.STAGE_FINISHED, f"{stage} finished", stage=stage,
                             data={"seconds": seconds, "cached": cached, "summary": {}})
    assert job_rows.finish_job(db, done, "gpu1@host:7", "succeeded") == "succeeded"

    families, samples = scrape_collector(StateCollector(db, lease_seconds=settings.lease_seconds))
    assert value(samples, "ctpd_state_up") == 1
    assert {status: value(samples, "ctpd_jobs", status=status) for status in
            ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")} == {
        "queued": 2, "running": 1, "cancelling": 0, "succeeded": 1, "failed": 1, "cancelled": 0}
    assert value(samples, "ctpd_queue_depth") == 2
    assert 59 <= value(samples, "ctpd_queue_oldest_age_seconds") < 90  # the requeue, not the submission

    assert value(samples, "ctpd_stage_duration_seconds_count", stage="distill", cached="false") == 1
    assert value(samples, "ctpd_stage_duration_seconds_sum", stage="distill", cached="false") == 90.0
    assert value(samples, "ctpd_stage_duration_seconds_bucket", stage="distill", cached="false", le="60.0") == 0
    assert value(samples, "ctpd_stage_duration_seconds_bucket", stage="distill", cached="false", le="120.0") == 1
    assert value(samples, "ctpd_stage_duration_seconds_bucket", stage="distill", cached="true", le="0.1") == 1
    assert value(samples, "ctpd_stage_duration_seconds_bucket", stage="prepare", cached="false", le="1.0") == 1
    assert len([s for s in families["ctpd_stage_duration_seconds"].samples
                if s.name.endswith("_bucket") and s.labels["stage"] == "prepare"]) == len(STAGE_BUCKETS) + 1
    assert_histograms_consistent(families, "ctpd_stage_duration_seconds")

    assert value(samples, "ctpd_training_steps_total", stage="distill") == 2
    assert value(samples, "ctpd_training_steps_total", stage="contrastive:positive") == 1
    assert value(samples, "ctpd_training_tokens_total", stage="distill") == 220
    assert value(samples, "ctpd_training_step_seconds_total", stage="distill") == pytest.approx(0.9)
    assert {labels["stage"] for labels in series(samples, "ctpd_training_steps_total")} == {
        "distill", "contrastive:positive"}

    # Job ids only on the running job's series.
    assert series(samples, "ctpd_worker_heartbeat_age_seconds") == [{"job_id": running, "worker": "gpu0@host:4242"}]
    assert 24 <= value(samples, "ctpd_worker_heartbeat_age_seconds", job_id=running, worker="gpu0@host:4242") < 40
    assert series(samples, "ctpd_job_tokens_per_second") == [{"job_id": running, "stage": "distill"}]
    assert value(samples, "ctpd_job_tokens_per_second", job_id=running, stage="distill") == 300.0

    assert value(samples, "ctpd_lease_expiries_total", outcome="requeued") == 1
    assert value(samples, "ctpd_lease_expiries_total", outcome="failed") == 1
    assert value(samples, "ctpd_webhook_deliveries_total", outcome="delivered") == 0  # every outcome present
    assert {labels["outcome"] for labels in series(samples, "ctpd_webhook_deliveries_total")} >= {
        "delivered", "failed"}


def test_the_figures_are_cached_and_a_database_outage_is_a_gauge(db, settings):
    now = [100.0]
    collector = StateCollector(db, lease_seconds=settings.lease_seconds, cache_seconds=10, clock=lambda: now[0])
    assert value(scrape_collector(collector)[1], "ctpd_jobs", status="queued") == 0
    _job(db)
    now[0] += 5
    assert value(scrape_collector(collector)[1], "ctpd_jobs", status="queued") == 0  # a scrape storm: one read
    now[0] += 5
    assert value(scrape_collector(collector)[1], "ctpd_jobs", status="queued") == 1

    unreachable = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/ctpd?connect_timeout=2")
    try:
        down = StateCollector(unreachable, lease_seconds=60, cache_seconds=0)
        families, samples = scrape_collector(down)
    finally:
        unreachable.dispose()
    assert value(samples, "ctpd_state_up") == 0
    assert set(families) == {"ctpd_state_up"}  # no stale or made-up figures


def test_by_default_the_figures_are_read_once_per_scrape_interval(db, settings):
    """Every uncached scrape runs the deployment's queries; by default one API process runs them at most once per
    15 s, a typical scrape interval, whatever the number of scrapers."""
    now = [100.0]
    collector = StateCollector(db, lease_seconds=settings.lease_seconds, clock=lambda: now[0])
    assert collector.cache_seconds == STATE_CACHE_SECONDS == 15.0
    assert value(scrape_collector(collector)[1], "ctpd_jobs", status="queued") == 0
    _job(db)
    now[0] += 14.9
    assert value(scrape_collector(collector)[1], "ctpd_jobs", status="queued") == 0
    now[0] += 0.1
    assert value(scrape_collector(collector)[1], "ctpd_jobs", status="queued") == 1


def test_a_bad_multiprocess_folder_fails_the_start(settings, queue, monkeypatch, tmp_path):
    from app.main import create_app

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR=.*missing.* is not a writable folder"):
        create_app(settings, queue=queue)


# ------------------------------------------------------------------------------- several API processes


def test_uvicorn_workers_share_one_multiprocess_folder(tmp_path: Path):
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    home = tmp_path / "home"
    env = service_env(home, broker_url="memory://", webhook_dispatcher="false")
    env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
    run_cli(["db", "upgrade"], env)
    # uvicorn run directly logs through its --log-config: ctpd_core.logs' handler by dictConfig (the README's).
    log_config = tmp_path / "logging.json"
    log_config.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "handlers": {"ctpd": {"()": "ctpd_core.logs.log_handler", "log_format": "json"}},
        "loggers": {"uvicorn": {"handlers": [], "propagate": True}},
        "root": {"handlers": ["ctpd"], "level": "INFO"},
    }))
    port = free_port()
    api = Proc("uvicorn x2", [sys.executable, "-m", "uvicorn", "--factory", "app.main:app_from_env", "--port",
                              str(port), "--workers", "2", "--log-config", str(log_config), "--no-access-log"],
               env, tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            wait_until(lambda: api_ready(http) or not api.alive(), 90, "uvicorn's /readyz", api.tail)
            assert api.alive(), api.tail()

        def one_request(_: int) -> int:  # a connection of its own, so either process may accept it
            with httpx.Client(base_url=base, timeout=30) as fresh:
                return fresh.get("/healthz").status_code

        def per_process() -> dict[str, float]:
            counts = {}
            for path in multiproc.glob("counter_*.db"):
                for family in MultiProcessCollector.merge([str(path)], accumulate=True):
                    for sample in family.samples:
                        if sample.name == "ctpd_http_requests_total" and sample.labels["route"] == "/healthz":
                            counts[path.stem] = counts.get(path.stem, 0) + sample.value
            return counts

        sent = 0
        deadline = time.monotonic() + 120
        with ThreadPoolExecutor(max_workers=8) as pool:
            while time.monotonic() < deadline:
                statuses = list(pool.map(one_request, range(40)))
                assert statuses == [200] * 40
                sent += len(statuses)
                if len([count for count in per_process().values() if count > 0]) >= 2:
                    break
        counts = per_process()
        assert len([c for c in counts.values() if c > 0]) == 2, f"one process answered everything: {counts}"

        with httpx.Client(base_url=base, timeout=30) as http:
            refused = [http.get("/v1/models", headers={"X-Request-ID": f"mp-{n}"}) for n in range(4)]
            _, samples = parse(http.get("/metrics").text)
        assert [response.status_code for response in refused] == [401] * 4
        assert value(samples, "ctpd_http_requests_total", method="GET", route="/healthz", status="200") == sent
        assert value(samples, "ctpd_http_requests_total", method="GET", route="/readyz", status="200") >= 1
        assert value(samples, "ctpd_state_up") == 1  # the SQL figures beside the summed request figures
        assert sum(counts.values()) == sent
    finally:
        api.stop()
    lines = [json.loads(line) for line in api.log().splitlines() if line.strip()]  # every line is JSON
    access = {line["request_id"]: line for line in lines if line["logger"] == "app.access"}
    assert {f"mp-{n}" for n in range(4)} <= set(access)
    assert {(access[f"mp-{n}"]["route"], access[f"mp-{n}"]["status"]) for n in range(4)} == {("/v1/models", 401)}
    assert len({line["pid"] for line in lines if line["logger"] == "uvicorn.error"}) >= 3  # supervisor + 2 workers
    # Both processes stopped through their lifespan and marked themselves dead: their in-flight gauges left the sum.
    assert not list(multiproc.glob("gauge_livesum_*.db")), sorted(p.name for p in multiproc.iterdir())
    assert len(list(multiproc.glob("counter_*.db"))) == 2  # the counters stay: they only ever go up


# ------------------------------------------------------------------------------------- a real job


REDIS_URL = "redis://127.0.0.1:6379/12"  # a database of its own: the e2e suite flushes 7
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=5"
TENANT = "metrics"


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, tiny_dataset_path, tiny_student_folder, tiny_teacher_folder) -> Iterator[dict]:
    """One tiny CTPD job through PostgreSQL, Redis, ``ctpd serve`` and ``ctpd worker``, both logging JSON."""
    if not (reachable(5432) and reachable(6379)):
        pytest.skip("PostgreSQL (5432) and Redis (6379) must run on 127.0.0.1 (.ci/run starts them)")
    import psycopg
    import redis

    name = f"ctpd_metrics_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    broker.close()
    home = tmp_path_factory.mktemp("metrics-e2e")
    env = service_env(home, single_thread=True, database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
                      broker_url=REDIS_URL, lease_seconds="20", allow_server_paths="true", log_format="json",
                      webhook_allow_private_targets="true", webhook_dispatch_interval_seconds="0.2")
    run_cli(["db", "upgrade"], env)
    key = run_cli(["keys", "create", "--tenant", TENANT, "--name", "test"], env).strip().splitlines()[-1]
    port = free_port()
    api = Proc("api", [sys.executable, "-m", "ctpd_cli.main", "serve", "--port", str(port)], env, home / "api.log")
    worker = worker_process("metrics", env, home / "worker.log")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    receiver = WebhookReceiver().__enter__()

    def logs() -> str:
        return f"{api.tail(30)}\n{worker.tail(80)}"

    try:
        wait_until(lambda: api_ready(http) or not api.alive(), 60, "the API's /readyz", logs)
        wait_until(lambda: worker_ready(worker), 120, "the worker", logs)
        assert api.alive() and worker.alive(), logs()
        hook = http.post("/v1/webhooks", json={"url": receiver.url, "event_types": ["job.succeeded"]})
        assert hook.status_code == 201, hook.text
        receiver.secret = hook.json()["secret"]
        dataset_id = upload_dataset(http, tiny_dataset_path)
        submitted = http.post("/v1/jobs", json=tiny_job(tiny_student_folder, tiny_teacher_folder, dataset_id),
                              headers={"X-Request-ID": "submit-metrics-e2e"})
        assert submitted.status_code == 201, submitted.text
        assert submitted.headers["x-request-id"] == "submit-metrics-e2e"
        job = wait_for_job(http, submitted.json()["id"], lambda job: job["status"] in TERMINAL, "finished", logs)
        assert job["status"] == "succeeded", logs()
        receiver.wait_for(lambda r: len(r.delivered()) == 1, 60, "the job.succeeded delivery")

        def scrape_after_the_delivery() -> str | None:  # the SQL figures are cached for a few seconds
            text = http.get("/metrics").text
            return text if value(parse(text)[1], "ctpd_webhook_deliveries_total", outcome="delivered") else None

        metrics_text = wait_until(scrape_after_the_delivery, 30, "the delivery in /metrics", logs)
        worker.stop()  # its part is over; its log is then complete, the shutdown's lines included
        yield {"job": job, "metrics": metrics_text, "http": http, "api": api, "worker": worker, "logs": logs}
    finally:
        http.close()
        worker.stop()
        api.stop()
        receiver.__exit__(None, None, None)
        with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


STAGES = ("prepare", "reference", "contrastive", "weights", "distill", "evaluate", "export")


def test_a_real_job_shows_in_the_scrape(finished_job):
    families, samples = parse(finished_job["metrics"])
    job_id = finished_job["job"]["id"]
    assert value(samples, "ctpd_state_up") == 1
    assert value(samples, "ctpd_jobs", status="succeeded") == 1
    assert value(samples, "ctpd_jobs", status="queued") == 0 and value(samples, "ctpd_jobs", status="running") == 0
    assert value(samples, "ctpd_queue_depth") == 0 and value(samples, "ctpd_queue_oldest_age_seconds") == 0

    assert value(samples, "ctpd_http_requests_total", method="POST", route="/v1/jobs", status="201") == 1
    assert value(samples, "ctpd_http_requests_total", method="POST", route="/v1/datasets", status="201") == 1
    assert value(samples, "ctpd_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="200") >= 1
    assert not any(job_id in json.dumps(labels) for labels in series(samples, "ctpd_http_requests_total"))
    assert_histograms_consistent(families, "ctpd_http_request_duration_seconds")

    for stage in STAGES:  # each stage ran once, none from the cache (a fresh deployment)
        assert value(samples, "ctpd_stage_duration_seconds_count", stage=stage, cached="false") == 1, stage
        assert value(samples, "ctpd_stage_duration_seconds_sum", stage=stage, cached="false") > 0, stage
    assert_histograms_consistent(families, "ctpd_stage_duration_seconds")

    spec = finished_job["job"]["spec"]
    assert value(samples, "ctpd_training_steps_total", stage="distill") == spec["training"]["max_steps"]
    for direction in ("positive", "negative"):
        assert value(samples, "ctpd_training_steps_total", stage=f"contrastive:{direction}") == \
            spec["contrastive"]["max_steps"]
    tokens = value(samples, "ctpd_training_tokens_total", stage="distill")
    seconds = value(samples, "ctpd_training_step_seconds_total", stage="distill")
    assert tokens and tokens > 0 and seconds and seconds > 0
    assert tokens / seconds > 0  # the distill throughput while training, tokens per second

    # Nothing runs any more: no job id is left in any label, no lease ran out, no heartbeat is pending.
    assert series(samples, "ctpd_worker_heartbeat_age_seconds") == []
    assert series(samples, "ctpd_job_tokens_per_second") == []
    assert value(samples, "ctpd_lease_expiries_total", outcome="requeued") == 0
    assert value(samples, "ctpd_lease_expiries_total", outcome="failed") == 0
    assert value(samples, "ctpd_webhook_deliveries_total", outcome="delivered") == 1  # job.succeeded, once
    assert value(samples, "ctpd_webhook_deliveries_total", outcome="failed") == 0


def _json_lines(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{path.name} line {number} is not JSON: {line[:300]}")
        assert isinstance(item, dict), line
        parsed.append(item)
    return parsed


def test_the_job_logs_json_lines_with_its_fields(finished_job):
    job = finished_job["job"]
    worker_lines = _json_lines(finished_job["worker"].log_path)  # every line, start-up and shutdown included
    in_job = [line for line in worker_lines if line.get("job_id") == job["id"]]
    assert in_job, finished_job["logs"]()
    claimed = next(i for i, line in enumerate(in_job) if line["message"].startswith(f"job {job['id']}: attempt 1"))
    job_pid = in_job[claimed]["pid"]
    assert {line["pid"] for line in in_job} == {job_pid}  # the job's own process, not the parent that received it
    for line in in_job[claimed:]:  # from the claim on, every line names the attempt and the tenant
        assert (line["attempt"], line["tenant"]) == (1, TENANT), line
        assert "stage" in line
    job_process = [line for line in worker_lines if line.get("pid") == job_pid]
    assert all(line.get("job_id") == job["id"] for line in job_process[job_process.index(in_job[claimed]):]), \
        "a line of the job process lacks the job"
    # The core's own loggers carry the stage that was running.
    fits = [line for line in in_job if line["logger"] == "ctpd_core.train" and " items, " in line["message"]]
    assert {(line["message"].split(":")[0], line["stage"]) for line in fits} >= {
        ("distill", "distill"), ("contrastive", "contrastive")}
    # Celery's own line about the task's end is inside the context too.
    assert any(line["logger"] == "celery.app.trace" and "succeeded" in line["message"] for line in in_job)

    api_lines = _json_lines(finished_job["api"].log_path)
    (submit,) = [line for line in api_lines if line.get("request_id") == "submit-metrics-e2e"
                 and line["logger"] == "app.access"]
    assert (submit["method"], submit["route"], submit["status"]) == ("POST", "/v1/jobs", 201)
    assert not any(line["logger"] == "uvicorn.access" for line in api_lines)  # ours replaces it
