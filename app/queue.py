"""The doorbell to the workers (docs/service-contract.md, "Queue"). SQL is the source of truth; a message
only carries a job id, and a lost one loses no job (the reaper enqueues stale queued jobs again).

:class:`CeleryTaskQueue` sends tasks **by name** from a Celery app that registers no tasks, so ``app/``
never imports ``worker/``. Celery is imported on first use: importing this module is cheap.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from ctpd_core.vocab import QueueName, TaskName

logger = logging.getLogger(__name__)


# A publish against a dead broker gives up after a few seconds instead of blocking the API request;
# the job row is already committed and the reaper enqueues it again.
_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


class TaskQueue(Protocol):
    def enqueue_job(self, job_id: str) -> None: ...
    def enqueue_reaper(self) -> None: ...
    def enqueue_checkpoint_model(self, job_id: str, checkpoint_id: str) -> None: ...
    def enqueue_preflight(self, preflight_id: str) -> None: ...


class CeleryTaskQueue:
    """Publishes ``ctpd.run_job`` (queue ``train``), ``ctpd.reap_stale_jobs``, ``ctpd.materialize_checkpoint`` and
    ``ctpd.preflight`` (queue ``default``)."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self._app: Any = None
        self._lock = threading.Lock()

    @property
    def celery(self) -> Any:
        with self._lock:
            if self._app is None:
                from celery import Celery

                app = Celery("ctpd-api", broker=self.broker_url, set_as_current=False)
                app.conf.update(
                    task_ignore_result=True,
                    broker_connection_timeout=2,
                    broker_connection_retry=False,
                    task_default_queue=QueueName.DEFAULT,
                )
                if self.broker_url.startswith("sqla+sqlite"):
                    # SQLite's default 5 s lock wait is short while a worker polls the same file; the worker
                    # sets the same option (worker/celery_app.py).
                    app.conf.broker_transport_options = {"connect_args": {"timeout": 30}}
                self._app = app
            return self._app

    def _send(self, name: str, args: list[Any], queue: str) -> None:
        self.celery.send_task(name, args=args, queue=queue, retry=True, retry_policy=_PUBLISH_RETRY_POLICY)

    def enqueue_job(self, job_id: str) -> None:
        self._send(TaskName.RUN_JOB, [job_id], QueueName.TRAIN)
        logger.info("enqueued %s for job %s on %s", TaskName.RUN_JOB, job_id, QueueName.TRAIN)

    def enqueue_reaper(self) -> None:
        self._send(TaskName.REAP_STALE_JOBS, [], QueueName.DEFAULT)

    def enqueue_checkpoint_model(self, job_id: str, checkpoint_id: str) -> None:
        """A checkpoint made into a model folder: light work (a base model load and a write) for ``default``."""
        self._send(TaskName.MATERIALIZE_CHECKPOINT, [job_id, checkpoint_id], QueueName.DEFAULT)
        logger.info("enqueued %s for %s of job %s", TaskName.MATERIALIZE_CHECKPOINT, checkpoint_id, job_id)

    def enqueue_preflight(self, preflight_id: str) -> None:
        """A dry run's data part: tokenizers and a sample of the dataset, light work for ``default`` (a training
        job on a ``train`` worker never delays it)."""
        self._send(TaskName.PREFLIGHT, [preflight_id], QueueName.DEFAULT)
        logger.info("enqueued %s for %s", TaskName.PREFLIGHT, preflight_id)

    def close(self) -> None:
        with self._lock:
            if self._app is not None:
                self._app.close()
                self._app = None
