"""The Celery app of the data plane: one documented conf dict (design.md, "State lives in SQL").

SQL is the source of truth; Celery is only a doorbell that carries a job id and delivers at least once.
Every setting below follows from that:

* A job survives a lost message or a dead worker because of the SQL lease and the reaper
  (``ctpd.reap_stale_jobs``, run by beat every 30 s), not because of broker redelivery. So messages are
  acknowledged early (``task_acks_late=False``): a broker never hands a multi-hour training task to a second
  worker because the first one is still busy with it (the Redis ``visibility_timeout`` trap), and a
  duplicate delivery is harmless anyway, since ``run_job`` claims the row by compare-and-set.
* One job per GPU and a fresh process per job: ``worker_concurrency=1``, ``worker_prefetch_multiplier=1``
  (and, on Redis, ``worker_disable_prefetch`` so an idle GPU elsewhere gets the next job instead of a busy
  worker sitting on it), ``worker_max_tasks_per_child=1`` (the child that ran a job exits and returns every
  byte of GPU memory; the parent never touches CUDA, so forking is safe).
* No result backend (``task_ignore_result=True``): status, metrics and artifacts are rows in SQL.
* Two queues: ``train`` for jobs (GPU workers) and ``default`` for light work (the reaper, checkpoint models,
  preflights), routed by task name, so light work never waits behind a training job on a worker that consumes
  only ``train``.

Run one worker per GPU, each seeing one device::

    CUDA_VISIBLE_DEVICES=0 ctpd worker --queues train
    CUDA_VISIBLE_DEVICES=1 ctpd worker --queues train
    ctpd worker --queues default --beat          # exactly one beat per deployment: the reaper's clock

``celery -A worker.celery_app worker`` works too: the module builds its app on first access of ``app``
(nothing is created at import).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from celery import Celery, current_app
from celery.signals import (
    celeryd_after_setup,
    celeryd_init,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_ready,
    worker_shutdown,
)
from kombu import Exchange, Queue

from ctpd_core import logs
from ctpd_core.vocab import QueueName, TaskName

if TYPE_CHECKING:
    from app.settings import Settings

logger = logging.getLogger(__name__)


def _scheme(broker_url: str) -> str:
    return broker_url.split("://", 1)[0].lower()


def celery_conf(settings: Settings) -> dict[str, Any]:
    """The whole Celery configuration of a ctpd worker, derived from the service settings."""
    scheme = _scheme(settings.broker_url)
    is_redis = scheme in ("redis", "rediss")
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        # --- results: none. SQL holds every outcome.
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        # --- delivery: early ack; correctness comes from the SQL claim (CAS), lease and reaper.
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,  # only meaningful with late acks; the reaper requeues instead
        # --- one job per GPU worker, a fresh child process per job.
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,
        "worker_send_task_events": False,
        # --- queues and routes (by task name: the API sends by name and imports no task code).
        # Each queue has its own direct exchange of the same name: what Celery creates for a publisher that
        # names only the queue (app.queue's send_task(..., queue="train")), so both sides always agree.
        "task_queues": tuple(
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in (QueueName.TRAIN, QueueName.DEFAULT)
        ),
        "task_default_queue": QueueName.DEFAULT,
        "task_routes": {
            TaskName.RUN_JOB: {"queue": QueueName.TRAIN, "routing_key": QueueName.TRAIN},
            TaskName.REAP_STALE_JOBS: {"queue": QueueName.DEFAULT, "routing_key": QueueName.DEFAULT},
            TaskName.MATERIALIZE_CHECKPOINT: {"queue": QueueName.DEFAULT, "routing_key": QueueName.DEFAULT},
            TaskName.PREFLIGHT: {"queue": QueueName.DEFAULT, "routing_key": QueueName.DEFAULT},
        },
        # --- beat: the reaper every reaper_interval_seconds (30 s). A reaper message nobody ran within one interval is dropped (a
        # newer one follows), so a busy single-worker setup does not pile them up behind a training job.
        "beat_schedule": {
            "reap-stale-jobs": {
                "task": TaskName.REAP_STALE_JOBS,
                "schedule": settings.reaper_interval_seconds,
                "options": {"queue": QueueName.DEFAULT, "expires": settings.reaper_interval_seconds},
            }
        },
        "beat_schedule_filename": str(settings.home / "celerybeat-schedule"),
        "timezone": "UTC",
        "enable_utc": True,
    }
    if is_redis:
        # Consume only when the (single) process is free: no job waits behind a long one on a busy worker.
        conf["worker_disable_prefetch"] = True
        # Early acks leave nothing unacked while a job runs, so the visibility timeout only bounds how
        # long a message reserved by a worker that died before starting it stays invisible.
        conf["broker_transport_options"] = {"visibility_timeout": 3600}
    elif scheme.startswith(("sqla+", "sqlalchemy+")):
        # Celery's SQLAlchemy transport: a SQLite file as the embedded broker. These options go to
        # create_engine(): wait for the file lock instead of failing while another process publishes.
        conf["broker_transport_options"] = {"connect_args": {"timeout": 30}} if "sqlite" in scheme else {}
    return conf


def declare_queues(settings: Settings, *, purge_delivered: bool = False) -> None:
    """Declare the queues once, before any process uses the broker: with Celery's SQLAlchemy transport this
    creates its tables and queue rows here, instead of the API and the worker racing to create them. It
    also fails early, with the URL, when the broker is unreachable.

    That transport keeps every delivered message as a row with ``visible = false`` and never deletes it;
    ``purge_delivered`` removes those (only safe while nothing consumes)."""
    celery = create_celery(settings)
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3)
            channel = connection.default_channel
            for queue in celery.conf.task_queues:
                queue.bind(channel).declare()
            if purge_delivered and settings.broker_url.startswith(("sqla+", "sqlalchemy+")):
                from sqlalchemy import delete

                message = channel.message_cls
                channel.session.execute(delete(message).where(message.visible.is_(False)))
                channel.session.commit()
    finally:
        celery.close()


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (default: the environment's) with the ctpd tasks registered."""
    if settings is None:
        from app.settings import get_settings

        settings = get_settings()
    from app.storage import configured_storage

    configured_storage(settings)  # probed now: a bad CTPD_STORAGE_URL stops the worker at start-up, named
    celery = Celery("ctpd", include=["worker.tasks"])
    celery.conf.update(celery_conf(settings))
    celery.ctpd_settings = settings  # the tasks read their settings from the app that runs them
    return celery


# ------------------------------------------------------------------------------------------------ logging


def _current_settings() -> Settings:
    settings = getattr(current_app, "ctpd_settings", None)
    if settings is None:
        from app.settings import get_settings

        settings = get_settings()
    return settings


@setup_logging.connect
def _configure_worker_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """The worker's logs are ctpd's (``ctpd_core.logs``): one root handler in the ``log_format`` setting (JSON
    lines by default where stderr is not a terminal), which Celery's own loggers, beat's and the pool children
    (forked from this process) share. Handling this signal replaces Celery's logging set-up; Celery then also
    skips redirecting stdout and stderr, so that is done here, as ``worker_redirect_stdouts`` asks: a stray
    print() becomes a log line (``celery.redirected``) instead of a line that is not JSON."""
    app = current_app
    chosen = logs.configure_logging(_current_settings().log_format, loglevel or logging.INFO)
    if app.conf.worker_redirect_stdouts:
        app.log.redirect_stdouts(app.conf.worker_redirect_stdouts_level)
        if chosen == "json":
            # Celery writes its notices for a person at the terminal ("worker: Warm shutdown (MainProcess)",
            # "Hitting Ctrl+C again ...") to the descriptor of sys.__stdout__, past the redirect; pointed at the
            # proxy, which has none, they are skipped, and a JSON log stays JSON (the warm shutdown has its own
            # line: worker.tasks._hand_back_running_jobs). SIGUSR1's thread dump still goes to stderr.
            sys.__stdout__ = sys.stdout  # type: ignore[misc,assignment]  # typeshed calls it final; it is not


@celeryd_init.connect
def _quiet_banner_for_json(instance: Any = None, **_: Any) -> None:
    """Celery prints its start-up banner straight to the real stdout, many lines of text: in a JSON log it is
    one log line instead (:func:`_log_banner`)."""
    banner_due = instance is not None and not getattr(instance, "quiet", True)
    if banner_due and logs.resolve_format(_current_settings().log_format) == "json":
        instance.quiet = True
        instance.ctpd_log_banner = True


@celeryd_after_setup.connect
def _log_banner(sender: Any = None, instance: Any = None, **_: Any) -> None:
    startup_info = getattr(instance, "startup_info", None)
    if getattr(instance, "ctpd_log_banner", False) and callable(startup_info):
        logger.info("worker %s starting:\n%s", sender, startup_info(artlines=False).strip("\n"))


# A job's process runs that one job (worker_max_tasks_per_child=1): the job context is process-wide, opened
# before the task body and closed after Celery has logged the task's end (so that line carries it too).
_job_log_previous: list[logs.JobFields | None] = []


@task_prerun.connect
def _open_job_log(sender: Any = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) != TaskName.RUN_JOB:
        return
    job_id = (list(args or ()) or [None])[0] or (kwargs or {}).get("job_id")
    if isinstance(job_id, str):
        _job_log_previous.append(logs.open_job_context(job_id))


@task_postrun.connect
def _close_job_log(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) == TaskName.RUN_JOB and _job_log_previous:
        logs.close_job_context(_job_log_previous.pop())


# ------------------------------------------------------------------------------------ the workers table


_registration: list[Any] = []  # this process's worker/capacity.WorkerRegistration, while it runs


@worker_ready.connect
def _advertise_capacity(sender: Any = None, **_: Any) -> None:
    """A worker that consumes ``train`` advertises its GPUs in the ``workers`` table (worker/capacity.py), under
    its Celery node name, until it stops: the queue view reads it to say why a job waits. The claim itself uses
    the worker's own capacity, so a worker whose row could not be written still claims what it can run."""
    app = getattr(sender, "app", None) or current_app
    try:
        queues = set(app.amqp.queues.consume_from)
    except AttributeError:
        return
    if QueueName.TRAIN not in queues or _registration:
        return
    from worker.capacity import WorkerRegistration

    settings = getattr(app, "ctpd_settings", None) or _current_settings()
    node = getattr(sender, "hostname", None) or "worker"
    _registration.append(WorkerRegistration(settings, node).start())


@worker_shutdown.connect
def _withdraw_capacity(**_: Any) -> None:
    while _registration:
        _registration.pop().stop()


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """``worker.celery_app.app``: built on first access (``celery -A worker.celery_app`` finds it)."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_celery()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
