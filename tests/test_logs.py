"""ctpd_core.logs: JSON lines that always parse, the job and request context on every line, text for people.

The worker's side end to end (a real Celery worker's JSON log during a real job) is in
``tests/app/test_metrics.py``, which runs one job for both the scrape and the logs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctpd_core import logs


@pytest.fixture
def captured() -> Iterator[tuple[logging.Handler, io.StringIO]]:
    """A root handler of ctpd_core.logs writing to a buffer (the root's own handlers are put back after)."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    yield logs.log_handler("json", stream), stream
    root.handlers[:] = saved
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict]:
    lines = [line for line in stream.getvalue().splitlines() if line]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object, tracebacks included
    assert all(isinstance(item, dict) for item in parsed)
    return parsed


def test_json_lines_carry_the_job_context_and_put_it_back(captured):
    _, stream = captured
    logs.configure_logging("json", "INFO", stream)
    log = logging.getLogger("worker.example")
    log.info("before the job")
    with logs.job_context("job_1"):
        log.info("claiming")
        logs.update_job_context(attempt=2, tenant="acme")
        logs.update_job_context(stage="distill")
        log.warning("step %d of %d", 3, 10, extra={"loss": 0.25})
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            log.exception("failed")
    log.info("after the job")
    logs.update_job_context(stage="ignored")  # no open context: nothing is stamped by accident
    log.info("still outside")

    before, claiming, step, failed, after, outside = json_lines(stream)
    assert before["message"] == "before the job" and "job_id" not in before
    assert before["level"] == "INFO" and before["logger"] == "worker.example" and before["pid"] == os.getpid()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", before["time"])
    # While the job runs every line has all four fields; what is not known yet is null, not missing.
    assert {k: claiming[k] for k in logs.JOB_FIELDS} == {"job_id": "job_1", "attempt": None, "stage": None,
                                                        "tenant": None}
    assert step["message"] == "step 3 of 10" and step["loss"] == 0.25
    assert {k: step[k] for k in logs.JOB_FIELDS} == {"job_id": "job_1", "attempt": 2, "stage": "distill",
                                                    "tenant": "acme"}
    assert failed["level"] == "ERROR" and "RuntimeError: boom\nsecond line" in failed["exc_info"]
    assert failed["job_id"] == "job_1"
    assert not any(key in after or key in outside for key in logs.JOB_FIELDS)


def test_threads_the_job_starts_carry_its_context(captured):
    """The heartbeat thread, the SIGTERM timer, a library's threads: a process-wide context reaches them all."""
    _, stream = captured
    logs.configure_logging("json", "INFO", stream)
    with logs.job_context("job_2", attempt=1, tenant="globex"):
        logs.update_job_context(stage="reference")
        thread = threading.Thread(target=lambda: logging.getLogger("worker.sinks").warning("heartbeat failed"))
        thread.start()
        thread.join()
    (line,) = json_lines(stream)
    assert (line["job_id"], line["attempt"], line["tenant"], line["stage"]) == ("job_2", 1, "globex", "reference")


def test_a_request_id_is_per_context_not_per_process(captured):
    _, stream = captured
    logs.configure_logging("json", "INFO", stream)
    log = logging.getLogger("app.example")
    token = logs.set_request_id("req-1")
    seen: list[str | None] = []
    other = threading.Thread(target=lambda: (seen.append(logs.current_request_id()), log.info("other thread")))
    other.start()
    other.join()
    log.info("in the request")
    logs.reset_request_id(token)
    log.info("after it")
    other_line, in_request, after = json_lines(stream)
    assert seen == [None] and "request_id" not in other_line  # a thread nobody handed the context to
    assert in_request["request_id"] == "req-1" and "request_id" not in after


def test_a_field_passed_by_the_call_wins_over_the_context(captured):
    _, stream = captured
    logs.configure_logging("json", "INFO", stream)
    with logs.job_context("job_3"):
        logging.getLogger("x").info("about another job", extra={"job_id": "job_other"})
    (line,) = json_lines(stream)
    assert line["job_id"] == "job_other"


def test_text_format_is_for_people(captured):
    _, _ = captured
    stream = io.StringIO()
    logs.configure_logging("text", "INFO", stream)
    log = logging.getLogger("worker.tasks")
    log.info("plain")
    with logs.job_context("job_4", attempt=1, tenant="acme"):
        logs.update_job_context(stage="distill")
        log.info("training")
    token = logs.set_request_id("abc")
    log.info("serving")
    logs.reset_request_id(token)
    plain, training, serving = stream.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(rf"{stamp} INFO worker\.tasks: plain", plain)
    assert re.fullmatch(rf"{stamp} INFO worker\.tasks \[job=job_4 attempt=1 stage=distill tenant=acme\]: training",
                        training)
    assert re.fullmatch(rf"{stamp} INFO worker\.tasks \[request_id=abc\]: serving", serving)


def test_auto_is_text_at_a_terminal_and_json_elsewhere(tmp_path: Path):
    assert logs.resolve_format("auto", io.StringIO()) == "json"
    with open(tmp_path / "log", "w") as file:
        assert logs.resolve_format("auto", file) == "json"
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as terminal:
            assert logs.resolve_format("auto", terminal) == "text"
            assert logs.resolve_format("json", terminal) == "json"  # an explicit choice is kept
    finally:
        os.close(leader)
        os.close(follower)
    with pytest.raises(ValueError, match="'yaml' is not one of auto, json, text"):
        logs.resolve_format("yaml")


def test_configure_replaces_earlier_handlers_and_captures_warnings(captured):
    import warnings

    _, stream = captured
    logging.captureWarnings(False)  # pytest restores warnings.showwarning after each test; start from scratch
    logging.basicConfig(format="%(message)s")  # what an earlier step of an entry point may have installed
    logs.configure_logging("json", "INFO", stream)
    assert len(logging.getLogger().handlers) == 1
    with logs.job_context("job_5"):
        warnings.warn("a deprecated call", UserWarning, stacklevel=1)
    (line,) = json_lines(stream)
    assert line["logger"] == "py.warnings" and "a deprecated call" in line["message"] and line["job_id"] == "job_5"
    logging.captureWarnings(False)


# ------------------------------------------------------------------------------------------------- the API


def test_every_line_of_a_request_carries_its_id(captured, tmp_path: Path):
    """A valid incoming X-Request-ID is used (and returned); the endpoint's own lines, in the event loop or in
    FastAPI's threadpool, carry it; the access line names the route template; a forged id is replaced."""
    from fastapi.testclient import TestClient

    from app.db.engine import Database
    from app.main import create_app
    from app.settings import Settings

    _, stream = captured
    logs.configure_logging("json", "DEBUG", stream)
    settings = Settings(home=tmp_path, broker_url="memory://")
    Database(settings.database_url).upgrade()
    app = create_app(settings)
    endpoint_log = logging.getLogger("app.api.example")

    @app.get("/test/sync/{item}")
    def sync_route(item: str) -> dict:  # runs in the threadpool
        endpoint_log.info("sync handler for %s", item)
        return {}

    @app.get("/test/async")
    async def async_route() -> dict:
        endpoint_log.info("async handler")
        return {}

    @app.get("/test/bug")
    def buggy_route() -> dict:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        sync = client.get("/test/sync/42", headers={"X-Request-ID": "req-sync.1"})
        async_ = client.get("/test/async", headers={"X-Request-ID": "req-async"})
        forged = client.get("/test/async", headers={"X-Request-ID": 'x" injected="1'})
        missing = client.get("/v1/jobs/job_nope")  # 401: no key
        bug = client.get("/test/bug", headers={"X-Request-ID": "req-bug"})
    app.state.db.dispose()

    assert sync.headers["x-request-id"] == "req-sync.1" and async_.headers["x-request-id"] == "req-async"
    assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", missing.headers["x-request-id"])
    lines = json_lines(stream)
    by_request: dict[str, list[dict]] = {}
    for line in lines:
        if "request_id" in line:
            by_request.setdefault(line["request_id"], []).append(line)
    sync_lines = by_request["req-sync.1"]
    assert [line["message"] for line in sync_lines] == ["sync handler for 42", sync_lines[1]["message"]]
    access = sync_lines[1]
    assert access["logger"] == "app.access" and access["level"] == "INFO"
    assert (access["method"], access["route"], access["path"], access["status"]) == (
        "GET", "/test/sync/{item}", "/test/sync/42", 200)
    assert access["duration_ms"] >= 0 and access["message"].startswith("GET /test/sync/{item} 200 ")
    assert [line["message"] for line in by_request["req-async"]][0] == "async handler"
    assert by_request[forged.headers["x-request-id"]][0]["message"] == "async handler"
    (unauthorized,) = by_request[missing.headers["x-request-id"]]
    assert (unauthorized["route"], unauthorized["status"]) == ("/v1/jobs/{job_id}", 401)
    # An unhandled exception: the server's 500 carries the id, and so does the handler's traceback line.
    assert bug.status_code == 500 and bug.json()["error"]["code"] == "internal_error"
    assert bug.headers["x-request-id"] == "req-bug"
    traceback, bug_access = by_request["req-bug"]
    assert traceback["level"] == "ERROR" and "RuntimeError: a bug" in traceback["exc_info"]
    assert (bug_access["route"], bug_access["status"]) == ("/test/bug", 500)


# ------------------------------------------------------------------------------------------------- the CLI


def _ctpd(args: list[str], home: Path, **env: str) -> tuple[str, str]:
    import subprocess
    import sys

    clean = {key: value for key, value in os.environ.items() if not key.startswith("CTPD_")}
    result = subprocess.run([sys.executable, "-m", "ctpd_cli.main", *args], capture_output=True, text=True,
                            timeout=120, env={**clean, "CTPD_HOME": str(home), **env},
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


def test_the_cli_logs_in_the_format_asked(tmp_path: Path):
    """``--log-format`` (or CTPD_LOG_FORMAT) for the CLI's own lines; Alembic's INFO lines stand in for them."""
    _, as_json = _ctpd(["-v", "--log-format", "json", "db", "upgrade"], tmp_path / "a")
    lines = [json.loads(line) for line in as_json.splitlines() if line]
    assert lines and all(line["logger"].startswith("alembic") for line in lines)
    assert any("Running upgrade" in line["message"] for line in lines)

    _, as_text = _ctpd(["-v", "db", "upgrade"], tmp_path / "b", CTPD_LOG_FORMAT="text")
    assert re.search(r"^\S+ \S+ INFO alembic\.runtime\.migration: Running upgrade", as_text, re.MULTILINE)
    assert not any(line.startswith("{") for line in as_text.splitlines())


def test_ctpd_up_passes_the_resolved_format_to_its_children(tmp_path: Path):
    from app.settings import Settings
    from ctpd_cli.embedded import _child_env

    assert _child_env(Settings(home=tmp_path, log_format="text"))["CTPD_LOG_FORMAT"] == "text"
    # auto follows ctpd up's own stderr (here pytest's capture, not a terminal), not the children's log files
    assert _child_env(Settings(home=tmp_path))["CTPD_LOG_FORMAT"] == logs.resolve_format("auto")
