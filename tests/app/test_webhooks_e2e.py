"""End to end: a real job through a real worker notifies a real receiver.

PostgreSQL (a throw-away database) and Redis (db 13, flushed first) as in production; the API is the real app
served by uvicorn in this process, so its lifespan runs the webhook dispatcher thread; the worker is
``ctpd worker``, a real Celery worker in its own process, whose transitions, checkpoints and evaluation write the
outbox rows in their own transactions. The receiver verifies every signature with ``standardwebhooks``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

from app.db import auth as key_rows
from app.db.engine import Database
from app.main import create_app
from app.settings import Settings
from tests.live_service import (
    TERMINAL,
    reachable,
    scratch_database,
    service_env,
    serving,
    tiny_job,
    upload_dataset,
    wait_for_job,
    wait_until,
    worker_process,
    worker_ready,
)
from tests.webhook_receiver import WebhookReceiver

REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with scratch_database("ctpd_webhooks_e2e") as url:
        yield url


def test_a_real_job_notifies_the_receiver(tmp_path, postgres_url, tiny_student_folder, tiny_teacher_folder,
                                          tiny_dataset_path):
    if not reachable(6379):
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    import redis

    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    broker.close()
    home = tmp_path / "home"
    settings = Settings(home=home, database_url=postgres_url, broker_url=REDIS_URL, allow_server_paths=True,
                        lease_seconds=20, webhook_allow_private_targets=True, webhook_dispatch_interval_seconds=0.2)
    db = Database(postgres_url)
    db.upgrade()
    key = key_rows.create_api_key(db, "e2e", "webhooks e2e")
    worker = worker_process("webhooks-e2e", service_env(home, single_thread=True, database_url=postgres_url,
                                                        broker_url=REDIS_URL, allow_server_paths="true"),
                            tmp_path / "worker.log", queues="train")
    app = create_app(settings)
    try:
        with WebhookReceiver() as receiver, serving(app) as url, \
                httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            created = client.post("/v1/webhooks", json={"url": receiver.url, "description": "e2e"})
            assert created.status_code == 201, created.text
            receiver.secret = created.json()["secret"]
            webhook_id = created.json()["id"]
            wait_until(lambda: worker_ready(worker), 120, "the worker to consume", worker.tail)
            assert worker.alive(), worker.tail()

            dataset_id = upload_dataset(client, tiny_dataset_path)
            submitted = client.post("/v1/jobs", json=tiny_job(tiny_student_folder, tiny_teacher_folder, dataset_id))
            assert submitted.status_code == 201, submitted.text
            job_id = submitted.json()["id"]
            job = wait_for_job(client, job_id, lambda job: job["status"] in TERMINAL, "finished", worker.tail)
            assert job["status"] == "succeeded", worker.tail()

            receiver.wait_for(lambda r: any(request.type == "job.succeeded" for request in r.delivered()), 30,
                              "job.succeeded at the receiver", worker.tail)
            assert receiver.unverified() == []
            delivered = receiver.delivered()
            assert len({request.message_id for request in delivered}) == len(delivered)  # each message once
            by_time = sorted(delivered, key=lambda request: datetime.fromisoformat(request.payload["timestamp"]))
            types = [request.type for request in by_time]
            assert [kind for kind in types if kind != "job.checkpoint"] == [
                "job.queued", "job.running", "job.evaluated", "job.succeeded"], types
            assert "job.checkpoint" in types
            assert all(request.payload["data"]["job_id"] == job_id for request in delivered)
            running = next(request for request in by_time if request.type == "job.running")
            assert running.payload["data"]["attempt"] == 1 and running.payload["data"]["status"] == "running"

            # The evaluation's metrics are the job's evaluate/* series.
            evaluated = next(request for request in by_time if request.type == "job.evaluated")
            metrics = evaluated.payload["data"]["metrics"]
            series = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
            evaluate = {name.split("/", 1)[1]: points[-1]["value"] for name, points in series.items()
                        if name.startswith("evaluate/")}
            assert evaluate and {name: metrics[name] for name in evaluate} == pytest.approx(evaluate)

            log = client.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": 100}).json()["data"]
            assert {entry["message_id"] for entry in log} == {request.message_id for request in delivered}
            assert {entry["outcome"] for entry in log} == {"delivered"}
            assert all(entry["status_code"] == 204 for entry in log)
            print(json.dumps(types))
    finally:
        worker.stop()
        app.state.db.dispose()
        db.dispose()
