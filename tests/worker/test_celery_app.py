"""The Celery configuration (design.md, "State lives in SQL") and what the light processes import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import Settings
from worker.celery_app import celery_conf, create_celery

REPO = Path(__file__).resolve().parents[2]
TORCH = {"torch", "transformers", "tokenizers", "accelerate", "safetensors", "numpy"}


def test_conf_follows_the_design(tmp_path):
    conf = celery_conf(Settings(home=tmp_path, broker_url="redis://127.0.0.1:6379/3"))
    assert conf["task_acks_late"] is False
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_concurrency"] == 1
    assert conf["worker_max_tasks_per_child"] == 1
    assert conf["task_ignore_result"] is True
    assert conf["broker_url"] == "redis://127.0.0.1:6379/3"
    assert conf["worker_disable_prefetch"] is True  # Redis only
    queues = {queue.name: queue for queue in conf["task_queues"]}
    assert set(queues) == {"train", "default"}
    for name, queue in queues.items():  # what Celery creates for a publisher naming only the queue
        assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == (name, "direct", name)
    assert conf["task_routes"]["ctpd.run_job"]["queue"] == "train"
    assert conf["task_routes"]["ctpd.reap_stale_jobs"]["queue"] == "default"
    (entry,) = conf["beat_schedule"].values()
    assert entry["task"] == "ctpd.reap_stale_jobs" and entry["schedule"] == 30.0
    assert entry["options"]["queue"] == "default"
    assert conf["beat_schedule_filename"] == str(tmp_path / "celerybeat-schedule")


def test_embedded_broker_is_the_sqlalchemy_transport(tmp_path):
    settings = Settings(home=tmp_path)
    conf = celery_conf(settings)
    assert conf["broker_url"] == f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    assert "worker_disable_prefetch" not in conf
    assert conf["broker_transport_options"] == {"connect_args": {"timeout": 30}}


def test_create_celery_registers_the_tasks_by_name(tmp_path):
    celery = create_celery(Settings(home=tmp_path))
    celery.loader.import_default_modules()
    assert {"ctpd.run_job", "ctpd.reap_stale_jobs"} <= set(celery.tasks)
    assert celery.ctpd_settings.home == tmp_path


def test_sqlalchemy_transport_round_trip(tmp_path):
    """kombu 5.7's SQLAlchemy transport with SQLAlchemy 2.x: declare, publish by queue name (as app.queue
    does), consume."""
    from kombu import Connection

    from app.queue import CeleryTaskQueue

    celery = create_celery(Settings(home=tmp_path))
    with celery.connection_for_write() as connection:
        for queue in celery.conf.task_queues:
            queue.bind(connection.default_channel).declare()
    sender = CeleryTaskQueue(celery.conf.broker_url)
    sender.enqueue_job("job_123")
    sender.close()
    with Connection(celery.conf.broker_url) as connection:
        queue = celery.conf.task_queues[0].bind(connection.default_channel)
        assert queue.name == "train"
        message = queue.get(no_ack=True)
        assert message is not None
        assert message.headers["task"] == "ctpd.run_job"
        assert json.loads(message.body)[0] == ["job_123"]


def _modules_after(code: str, env: dict | None = None) -> set[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    return {name.split(".")[0] for name in json.loads(result.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("module", ["worker.celery_app", "worker.tasks", "worker.sinks"])
def test_the_reaper_side_of_the_worker_imports_no_torch(module):
    """run_job imports the training stack itself, so the `default` queue worker (the reaper) and beat can run
    from the API image."""
    assert not (_modules_after(f"import {module}") & TORCH)


def test_service_commands_import_no_torch(tmp_path):
    import os

    env = {**os.environ, "CTPD_HOME": str(tmp_path)}
    code = "from ctpd_cli.main import main\nassert main(['db', 'upgrade']) == 0\nassert main(['keys', 'create', '--tenant', 't']) == 0"
    assert not (_modules_after(code, env) & TORCH)
