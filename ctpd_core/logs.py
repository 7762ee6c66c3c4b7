"""Log lines for the service's processes: JSON for machines, text for a person at a terminal, and the context
that stamps every line with the job or the request it belongs to.

Library modules only call ``logging.getLogger(__name__)``; an entry point (``ctpd serve``, a Celery worker, the
CLI) calls :func:`configure_logging` once. Two formats (the ``log_format`` setting, ``CTPD_LOG_FORMAT``):

* ``json``: one JSON object per line, by python-json-logger: ``level``, ``logger``, ``message``, ``pid``, ``time``,
  the context fields below when they are set, whatever a call passed in ``extra=`` (the API's access line: ``method``,
  ``route``, ``status``, ``duration_ms``) and ``exc_info`` for a traceback (inside the object, so a traceback is
  one line too).
* ``text``: ``2026-01-01 12:00:00,000 INFO worker.tasks [job=job_1 attempt=1 stage=distill tenant=acme]: ...``.
* ``auto`` (the default): text when the stream is a terminal, json otherwise (a file, a pipe, a container's log).

The context, and why it lives where it does:

* **Job** (``job_id``, ``attempt``, ``tenant``, ``stage``): process-wide, opened around the worker's task (Celery's
  ``task_prerun`` / ``task_postrun``, so Celery's own line about the task's end carries it too), completed once
  the job is claimed and updated as stages start (:func:`update_job_context`). A worker child runs
  exactly one job (``worker_max_tasks_per_child=1``), so a process-wide value is exact there, and it reaches
  every thread of the process: the heartbeat thread, the SIGTERM timer, threads a library starts. Context
  variables would not: in Python 3.11 a new thread starts with an empty context.
* **Request** (``request_id``): a context variable, set by the API's request middleware. One API process serves
  many requests at once, so it must be per request; asyncio tasks and FastAPI's threadpool (``anyio``'s
  ``run_sync`` copies the context) both carry it into the code a request runs.

Torch-free and service-free: ``app`` and the CLI import it as they import ``ctpd_core.spec``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("auto", "json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"
JOB_FIELDS = ("job_id", "attempt", "stage", "tenant")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("ctpd_request_id", default=None)


@dataclass(frozen=True)
class JobFields:
    """What every line of a job's process carries while the job runs (``stage``: None before the first)."""

    job_id: str
    attempt: int | None = None
    tenant: str | None = None
    stage: str | None = None


_job: JobFields | None = None
_job_lock = threading.Lock()  # update_job_context reads and replaces: one writer at a time


# ------------------------------------------------------------------------------------------- the context


def open_job_context(job_id: str, *, attempt: int | None = None, tenant: str | None = None) -> JobFields | None:
    """Stamp ``job_id`` (and whatever else is known yet) on every line of this process from now on; returns the
    context it replaced, for :func:`close_job_context`. For a pair of hooks (Celery's task_prerun/postrun);
    elsewhere use :func:`job_context`."""
    global _job
    with _job_lock:
        previous, _job = _job, JobFields(job_id, attempt, tenant)
    return previous


def close_job_context(previous: JobFields | None = None) -> None:
    """End the job context: ``previous`` (what :func:`open_job_context` returned) comes back."""
    global _job
    with _job_lock:
        _job = previous


@contextlib.contextmanager
def job_context(job_id: str, *, attempt: int | None = None, tenant: str | None = None) -> Iterator[None]:
    """:func:`open_job_context` for the block; the previous context comes back afterwards (a nested or an
    in-process call leaves nothing behind)."""
    previous = open_job_context(job_id, attempt=attempt, tenant=tenant)
    try:
        yield
    finally:
        close_job_context(previous)


def update_job_context(*, attempt: int | None = None, tenant: str | None = None, stage: str | None = None) -> None:
    """Fill in or change fields of the open job context (the attempt and tenant once the job is claimed, the
    stage as each starts); None leaves a field as it is. Outside :func:`job_context` it does nothing, so a
    caller that runs without one (a test calling the task body) stamps nothing by accident."""
    global _job
    with _job_lock:
        if _job is not None:
            _job = replace(_job, attempt=_job.attempt if attempt is None else attempt,
                           tenant=_job.tenant if tenant is None else tenant,
                           stage=_job.stage if stage is None else stage)


def current_job() -> JobFields | None:
    return _job


def set_request_id(request_id: str | None) -> contextvars.Token[str | None]:
    """Stamp ``request_id`` on every line of the current request (its task and the threads it hands work to);
    returns the token :func:`reset_request_id` takes."""
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


def current_request_id() -> str | None:
    return _request_id.get()


def context_fields() -> dict[str, Any]:
    """The context of the calling thread as flat fields: the job's (all four while a job runs, None where not
    known yet, so a query for ``stage`` finds the key) and ``request_id`` when set."""
    fields: dict[str, Any] = {}
    job = _job
    if job is not None:
        fields.update(asdict(job))
    request_id = _request_id.get()
    if request_id is not None:
        fields["request_id"] = request_id
    return fields


class ContextFilter(logging.Filter):
    """Puts the context on each record (a handler's filter, so it sees the records of every logger: ours, the
    core's, Celery's, uvicorn's). A field the call passed itself (``extra={"job_id": ...}``) wins. Also sets
    ``record.context``, the text format's rendering of the same fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = context_fields()
        for name, value in fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        shown = {name: getattr(record, name, None) for name in (*JOB_FIELDS, "request_id")}
        rendered = " ".join(f"{'job' if name == 'job_id' else name}={value}"
                            for name, value in shown.items() if value is not None)
        record.context = f" [{rendered}]" if rendered else ""
        return True


# ---------------------------------------------------------------------------------------------- formats


def resolve_format(log_format: str, stream: IO[str] | None = None) -> str:
    """``json`` or ``text`` for ``log_format`` (``auto``: text when ``stream``, default stderr, is a terminal)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)} (CTPD_LOG_FORMAT or "
                         "--log-format)")
    if log_format != "auto":
        return log_format
    stream = stream if stream is not None else sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or unusual stream: not a person's terminal
        return "json"


def json_formatter() -> logging.Formatter:
    """One JSON object per line: level, logger, message, pid (which of a worker's processes), then the context,
    the extras and time (ISO 8601, UTC)."""
    return JsonFormatter(
        ["levelname", "name", "message", "process"],
        rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
        timestamp="time",
        reserved_attrs=[*logging.LogRecord("", 0, "", 0, "", None, None).__dict__, "message", "asctime",
                        "context", "color_message"],  # color_message: uvicorn's ANSI copy of the message
        json_ensure_ascii=False,
    )


def text_formatter() -> logging.Formatter:
    return logging.Formatter(TEXT_FORMAT)


def log_handler(log_format: str = "auto", stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (default stderr) in ``log_format`` that stamps the context on every record."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter() if resolve_format(log_format, stream) == "json" else text_formatter())
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(log_format: str = "auto", level: str | int = "INFO", stream: IO[str] | None = None) -> str:
    """The root logger of an entry point: one handler in ``log_format`` at ``level``, replacing any handler
    configured before (``logging.basicConfig`` of an earlier step, Celery's own). Python warnings become log
    lines too, so a JSON log stays JSON. Returns the format chosen (``json`` or ``text``)."""
    handler = log_handler(log_format, stream)
    root = logging.getLogger()
    for previous in list(root.handlers):
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)
    return "json" if isinstance(handler.formatter, JsonFormatter) else "text"
