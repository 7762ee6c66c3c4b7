"""End to end through real processes: no mocked broker or database.

* Production shape: PostgreSQL (a throw-away database on 127.0.0.1:5432) for state, Redis
  (``redis://127.0.0.1:6379/7``, flushed first) as the broker, ``ctpd serve`` and a real
  ``celery -A worker.celery_app worker`` as subprocesses. A tiny-model CTPD job submitted over HTTP succeeds
  with metrics and artifacts; a long one is cancelled while it distils; a job whose worker "died" mid-run is
  requeued by the reaper and resumes from its checkpoint.
* Embedded shape: ``ctpd up`` (SQLite + Celery's SQLAlchemy transport) with a temporary CTPD_HOME runs the
  same job and stops cleanly on SIGTERM.

Every subprocess is in its own process group and killed in teardown; every wait has a deadline.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_service import (
    TERMINAL,
    Proc,
    api_ready,
    free_port,
    job_events,
    reachable,
    run_cli,
    scratch_database,
    service_env,
    tiny_job,
    up_logs,
    upload_dataset,
    wait_for_job,
    wait_until,
)

REDIS_URL = "redis://127.0.0.1:6379/7"


def assert_succeeded_with_metrics_and_artifacts(client: httpx.Client, job: dict[str, Any], logs: str) -> None:
    job_id = job["id"]
    assert job["status"] == "succeeded", f"{json.dumps(job, default=str)[:3000]}\n{logs}"
    assert job["error"] is None and job["attempt"] == 1
    assert [t["status"] for t in job["transitions"]] == ["queued", "running", "succeeded"]
    assert job["started_at"] and job["finished_at"]
    assert job["spec"]["training"]["max_steps"] == 2 and job["spec"]["beta"] is not None  # resolved spec

    events = job_events(client, job_id)
    types = [event["type"] for event in events]
    assert types[0] == "job_created" and types[-1] == "job_succeeded"
    stages = ["prepare", "reference", "contrastive", "weights", "distill", "evaluate", "export"]
    assert [e["stage"] for e in events if e["type"] == "stage_started"] == stages
    assert [e["stage"] for e in events if e["type"] == "stage_finished"] == stages
    distill_checkpoints = [e["data"]["step"] for e in events
                           if e["type"] == "checkpoint_saved" and e["data"]["stage"] == "distill"]
    assert distill_checkpoints == [1, 2]

    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert [point["step"] for point in metrics["distill/loss"]] == [1, 2]
    assert {"contrastive:positive/loss", "contrastive:negative/loss"} <= set(metrics)
    assert any(name.startswith("evaluate/") for name in metrics), sorted(metrics)

    files = {item["path"] for item in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    assert {"config.json", "model.safetensors", "metrics.json"} <= files, files
    download = client.get(f"/v1/jobs/{job_id}/artifacts/model.tar.gz")
    assert download.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as archive:
        names = set(archive.getnames())
    assert f"{job_id}/config.json" in names, sorted(names)[:20]


# ------------------------------------------------------------------------------ the production-shaped stack


@dataclass
class Stack:
    client: httpx.Client
    api: Proc
    worker: Proc
    home: Path
    database_url: str
    tenant: str

    def logs(self) -> str:
        return f"{self.api.tail(30)}\n{self.worker.tail(80)}"


@pytest.fixture(scope="module")
def postgres_url():
    with scratch_database("ctpd_e2e") as url:
        yield url


@pytest.fixture(scope="module")
def redis_stack(tmp_path_factory, postgres_url):
    if not reachable(6379):
        pytest.skip("Redis is not running on 127.0.0.1:6379 (.ci/run starts it)")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()

    home = tmp_path_factory.mktemp("e2e-redis")
    # The tiny models are folders on this machine: a deployment that lets its tenants name server paths.
    env = service_env(home, database_url=postgres_url, broker_url=REDIS_URL, lease_seconds="20",
                      allow_server_paths="true")
    run_cli(["db", "upgrade"], env)
    key = run_cli(["keys", "create", "--tenant", "e2e", "--name", "test"], env).strip().splitlines()[-1]
    assert key.startswith("ctpd_")
    port = free_port()
    api = Proc("api", [sys.executable, "-m", "ctpd_cli.main", "serve", "--port", str(port)], env, home / "api.log")
    worker = Proc(
        "worker",
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--queues", "train,default",
         "--concurrency", "1", "--hostname", "e2e@%h", "--loglevel", "INFO"],
        env, home / "worker.log",
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    stack = Stack(http, api, worker, home, postgres_url, "e2e")
    try:
        wait_until(lambda: api_ready(http) or not api.alive(), 60, "the API's /readyz", stack.logs)
        assert api.alive(), stack.logs()
        yield stack
    finally:
        http.close()
        worker.stop()
        api.stop()


@pytest.fixture(scope="module")
def redis_dataset_id(redis_stack, tiny_dataset_path) -> str:
    return upload_dataset(redis_stack.client, tiny_dataset_path)


def test_job_succeeds_through_redis_and_postgres(redis_stack, redis_dataset_id, tiny_student_folder, tiny_teacher_folder):
    client = redis_stack.client
    response = client.post("/v1/jobs", json=tiny_job(tiny_student_folder, tiny_teacher_folder, redis_dataset_id),
                           headers={"Idempotency-Key": f"e2e-{uuid.uuid4().hex}"})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert response.json()["status"] == "queued"

    job = wait_for_job(client, job_id, lambda job: job["status"] in TERMINAL, "finished", redis_stack.logs)
    assert_succeeded_with_metrics_and_artifacts(client, job, redis_stack.logs())
    assert job["stage"] == "export"
    assert "Task ctpd.run_job" in redis_stack.worker.log()  # it ran in the real worker process


def test_cancel_a_running_job(redis_stack, redis_dataset_id, tiny_student_folder, tiny_teacher_folder):
    client = redis_stack.client
    spec = tiny_job(tiny_student_folder, tiny_teacher_folder, redis_dataset_id, weights={"source": "uniform"},
                    training={"max_steps": 5000, "checkpoint_every": 10000})
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]

    wait_for_job(
        client, job_id,
        lambda job: job["status"] in TERMINAL or (job["status"] == "running" and job["stage"] == "distill"
                                                 and (job["progress"]["step"] or 0) >= 1),
        "running in distill", redis_stack.logs,
    )
    cancel = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancel.status_code == 200, cancel.text
    assert cancel.json()["status"] == "cancelling"

    job = wait_for_job(client, job_id, lambda job: job["status"] in TERMINAL, "finished", redis_stack.logs, timeout=60)
    assert job["status"] == "cancelled", redis_stack.logs()
    assert [t["status"] for t in job["transitions"]] == ["queued", "running", "cancelling", "cancelled"]
    assert job["error"] is None and job["cancel_requested_at"] and job["finished_at"]
    assert job["progress"]["step"] < 5000

    events = job_events(client, job_id)
    types = [event["type"] for event in events]
    assert types.index("cancel_requested") < types.index("job_cancelled")
    (checkpoint,) = [e for e in events if e["type"] == "checkpoint_saved"]  # the stop's own checkpoint
    assert checkpoint["data"]["stage"] == "distill" and 1 <= checkpoint["data"]["step"] < 5000
    assert Path(checkpoint["data"]["path"]).is_dir()
    assert types.index("checkpoint_saved") < types.index("job_cancelled")
    assert client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []


def test_a_lost_worker_is_reaped_and_the_job_resumes_from_its_checkpoint(
    redis_stack, redis_dataset_id, tiny_student_folder, tiny_teacher_folder
):
    """Attempt 1 runs in this process as a worker that dies after 2 of 4 distill steps (it checkpointed each
    step and stops heartbeating); the reaper, sent through the real broker, requeues it; the real worker
    resumes at step 2 and finishes."""
    import torch

    from app.db import events as job_log
    from app.db import jobs as job_rows
    from app.db.engine import Database
    from app.db.models import utcnow
    from app.queue import CeleryTaskQueue
    from app.settings import Settings
    from ctpd_core.spec import JobSpec
    from worker.recipe import RunContext, run_spec
    from worker.sinks import DbObserver
    from worker.tasks import dataset_resolver

    settings = Settings(home=redis_stack.home, database_url=redis_stack.database_url, broker_url=REDIS_URL)
    db = Database(settings.database_url)
    spec = JobSpec.model_validate(tiny_job(tiny_student_folder, tiny_teacher_folder, redis_dataset_id,
                                           weights={"source": "uniform"}, training={"max_steps": 4}))
    job, _ = job_rows.create_job(db, tenant=redis_stack.tenant, spec=spec.model_dump(mode="json"), name="resume",
                                   metadata={}, idempotency_key=None, request_hash="e2e-resume", max_attempts=3)
    assert job_rows.claim_job(db, job.id, "doomed-worker:1", lease_seconds=3) is not None

    class StopAfterTwoSteps:
        """Fires once two distill steps are recorded (it is also polled at every stage boundary, so it counts
        what was done, not how often it was asked)."""

        def should_stop(self) -> bool:
            losses = job_log.metric_series(db, job.id).get("loss", [])
            return sum(1 for stage, _, _ in losses if stage == "distill") >= 2

    context = RunContext(
        artifact_root=settings.artifact_root, run_dir=settings.artifact_root / "jobs" / job.id,
        model_cache=settings.model_cache, device=torch.device("cpu"), observer=DbObserver(db, job.id),
        stop_signal=StopAfterTwoSteps(), dataset_resolver=dataset_resolver(db, redis_stack.tenant),
    )
    assert run_spec(spec, context).status == "stopped"  # ... and the "worker" dies here, its lease running out
    time.sleep(max(0.0, (job_rows.get_job(db, job.id).lease_expires_at - utcnow()).total_seconds()) + 0.2)

    queue = CeleryTaskQueue(REDIS_URL)
    queue.enqueue_reaper()
    queue.close()
    client = redis_stack.client
    done = wait_for_job(client, job.id, lambda job: job["status"] in TERMINAL, "finished", redis_stack.logs)
    assert done["status"] == "succeeded", redis_stack.logs()
    assert done["attempt"] == 2
    assert [t["status"] for t in done["transitions"]] == ["queued", "running", "queued", "running", "succeeded"]
    events = job_events(client, job.id)
    assert any(e["type"] == "job_restarted" for e in events)
    distill = [e for e in events if e["type"] == "stage_finished" and e["stage"] == "distill"]
    assert distill[-1]["data"]["summary"]["resumed_from"] == 2
    metrics = client.get(f"/v1/jobs/{job.id}/metrics").json()["data"]
    assert [point["step"] for point in metrics["distill/loss"]] == [1, 2, 3, 4]  # attempt 1 wrote 1-2, attempt 2 3-4
    db.dispose()


# ------------------------------------------------------------------------------------------ embedded: ctpd up


def _processes_with_env(name: str, value: str) -> list[int]:
    """Pids whose environment has ``name=value`` (to prove nothing of ``ctpd up`` outlives it)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_embedded_ctpd_up_runs_a_job_and_stops_cleanly(tmp_path, tiny_student_folder, tiny_teacher_folder,
                                                       tiny_dataset_path):
    home = tmp_path / "home"
    port = free_port()
    up = Proc("ctpd up", [sys.executable, "-m", "ctpd_cli.main", "up", "--port", str(port), "--stop-timeout", "15"],
              service_env(home), tmp_path / "up.log")

    def logs() -> str:
        return up_logs(home, up, lines=60)

    try:
        wait_until(lambda: "ctpd is up" in up.log() or not up.alive(), 120, "`ctpd up` to be ready", logs)
        assert up.alive(), logs()
        key_file = home / "api-key"
        key = key_file.read_text().strip()
        assert key.startswith("ctpd_") and stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key in up.log()  # printed once, on first start
        assert (home / "ctpd.db").exists() and (home / "broker.db").exists()
        # The client commands find the service and its key in the home alone (ctpd_cli.client.resolve_connection).
        assert (home / "url").read_text().strip() == f"http://127.0.0.1:{port}"
        assert "id  status" in run_cli(["jobs", "list"], service_env(home))

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            dataset_id = upload_dataset(client, tiny_dataset_path)
            response = client.post("/v1/jobs", json=tiny_job(tiny_student_folder, tiny_teacher_folder, dataset_id))
            assert response.status_code == 201, response.text
            job = wait_for_job(client, response.json()["id"], lambda job: job["status"] in TERMINAL, "finished", logs)
            assert_succeeded_with_metrics_and_artifacts(client, job, logs())

        up.popen.send_signal(signal.SIGTERM)
        assert up.popen.wait(timeout=45) == 0, logs()
        assert "ctpd up: stopped" in up.log()
        assert not (home / "url").exists()  # no service there any more
        assert not reachable(port)
        wait_until(lambda: not _processes_with_env("CTPD_HOME", str(home)), 10, "the API and worker to exit",
                   lambda: f"left: {_processes_with_env('CTPD_HOME', str(home))}\n{logs()}")
    finally:
        up.stop()
