"""The service subcommands' own logic (`ctpd up`'s key, broker and orphan handling in ctpd_cli/embedded.py;
`ctpd worker`'s checks),
against real SQLite files and Celery's SQLAlchemy transport. `ctpd up` as a whole runs in test_service_e2e.py."""

from __future__ import annotations

import stat

import pytest
from kombu import Connection

from app.db import auth as key_rows
from app.db import jobs as job_rows
from app.settings import Settings
from ctpd_cli.embedded import ensure_api_key, prepare_broker, requeue_orphans
from ctpd_cli.main import main


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", lease_seconds=60, allow_server_paths=True)  # the embedded shape


def test_embedded_api_key_is_created_once_with_mode_0600(db, tmp_path):
    key_file = tmp_path / "api-key"
    key, created = ensure_api_key(db, key_file)
    assert created and key.startswith("ctpd_")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() == key
    principal = key_rows.authenticate(db, key)
    assert principal.is_admin and principal.tenant == "default"
    assert ensure_api_key(db, key_file) == (key, False)
    key_file.write_text("ctpd_not-a-key\n")  # e.g. the database was deleted: a new key replaces it
    replaced, created = ensure_api_key(db, key_file)
    assert created and replaced != key and stat.S_IMODE(key_file.stat().st_mode) == 0o600


def _train_messages(settings) -> list[str]:
    from worker.celery_app import create_celery

    celery = create_celery(settings)
    ids = []
    with Connection(settings.broker_url) as connection:
        queue = celery.conf.task_queues[0].bind(connection.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            ids.append(message.decode()[0][0])
    return ids


def test_a_job_left_running_by_a_dead_ctpd_up_is_requeued_at_start(db, settings):
    job, _ = job_rows.create_job(db, tenant="t", spec={}, name=None, metadata={}, idempotency_key=None,
                                   request_hash="h", max_attempts=3)
    job_rows.claim_job(db, job.id, "previous-run:123", settings.lease_seconds)  # its lease is still valid
    prepare_broker(settings)
    assert requeue_orphans(db, settings) == [job.id]
    row = job_rows.get_job(db, job.id)
    assert (row.status, row.worker_id, row.attempt) == ("queued", None, 1)
    assert _train_messages(settings) == [job.id]


def test_prepare_broker_creates_the_queues_and_purges_delivered_messages(settings):
    from app.queue import CeleryTaskQueue

    settings.home.mkdir(parents=True)
    prepare_broker(settings)
    queue = CeleryTaskQueue(settings.broker_url)
    queue.enqueue_job("job_a")
    queue.enqueue_job("job_b")
    queue.close()
    with Connection(settings.broker_url) as connection:
        channel = connection.default_channel
        assert channel._size("train") == 2
        assert _train_messages(settings) == ["job_a", "job_b"]  # delivered: kept as invisible rows
        assert channel.session.query(channel.message_cls).count() == 2
        prepare_broker(settings)
        channel.session.expire_all()
        assert channel.session.query(channel.message_cls).count() == 0


def test_worker_rejects_unknown_queues(capsys):
    assert main(["worker", "--queues", "train,gpu"]) == 2
    assert "--queues 'train,gpu'" in capsys.readouterr().err
