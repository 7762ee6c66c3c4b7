"""CeleryTaskQueue sends by name to the right queues (through kombu's in-memory transport; the real
brokers are exercised end to end by the worker tests), and importing app.queue does not import Celery."""

from __future__ import annotations

import json
import subprocess
import sys

from kombu import Connection

from app.queue import CeleryTaskQueue
from tests.app.conftest import REPO_ROOT


def test_tasks_are_sent_by_name_with_only_the_id():
    queue = CeleryTaskQueue("memory://")
    queue.enqueue_job("job_123")
    queue.enqueue_reaper()
    received = {}
    with Connection("memory://") as connection:
        for name in ("train", "default"):
            simple = connection.SimpleQueue(name)
            message = simple.get(timeout=5)
            received[name] = (message.headers["task"], message.payload[0], message.payload[1])
            message.ack()
            simple.close()
    assert received == {"train": ("ctpd.run_job", ["job_123"], {}), "default": ("ctpd.reap_stale_jobs", [], {})}
    queue.close()


def test_importing_the_queue_is_cheap():
    code = "import json, sys; import app.queue, app.main; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert not loaded & {"celery", "kombu", "redis", "worker", "torch"}
