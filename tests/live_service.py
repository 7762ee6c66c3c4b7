"""Driving a real ctpd service from a test: subprocesses, deadlines, and the HTTP calls every service test makes.

Shared by the end-to-end suite (``tests/worker/test_service_e2e.py``) and the fault suite (``tests/faults/``).
Every subprocess runs in its own process group and logs to a file, so a test can signal exactly the process it
means, show the logs' tails when a wait runs out, and leave nothing behind in teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 180.0
TERMINAL = ("succeeded", "failed", "cancelled")
CTPD = [sys.executable, "-m", "ctpd_cli.main"]


def reachable(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


SHARED_PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=5"


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A database of its own on the shared PostgreSQL (127.0.0.1:5432; skips the test when it is not running),
    dropped afterwards even with connections still open: yields its SQLAlchemy URL."""
    if not reachable(5432):
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432 (.ci/run starts it)")
    import uuid

    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(SHARED_PG_ADMIN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(SHARED_PG_ADMIN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` served over HTTP by uvicorn in a thread of this process; yields its base URL."""
    import uvicorn

    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=30)


def service_env(home: Path, *, single_thread: bool = False, **ctpd: str) -> dict[str, str]:
    """This process's environment without any CTPD_* of the caller's, plus ``CTPD_HOME`` and ``ctpd``
    (``lease_seconds="5"`` becomes ``CTPD_LEASE_SECONDS=5``).

    ``single_thread``: one torch intra-op thread. The tiny models gain nothing from a second one, and on cores
    shared with other test runs two threads per process oversubscribe them: distill steps then take 30 times
    longer (measured: 100 steps in 1.1 s with one thread, 40 s with two under load)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CTPD_")}
    env.update(
        CTPD_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
        **{f"CTPD_{key.upper()}": value for key, value in ctpd.items()},
    )
    if single_thread:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


class Proc:
    """A subprocess in its own process group, logging to a file; ``stop()`` always leaves nothing behind."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(self.log().splitlines()[-lines:])

    def send(self, signum: int) -> None:
        """``signum`` to this process only (not its group)."""
        self.popen.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            # A member of the group may be SIGSTOPped (a fault test's frozen job process): wake it, or a
            # warm shutdown would wait for it until the timeout.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGCONT)
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # the group: a Celery pool child, beat
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
        if not self._log.closed:
            self._log.close()
        return self.popen.returncode

    def kill(self) -> int | None:
        """SIGKILL to the whole group at once: the quick teardown of a process whose part in a test is over
        (an idle Celery worker's warm shutdown takes seconds)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.stop()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, diagnostics: Callable[[], str] = str,
               interval: float = 0.25) -> Any:
    """``predicate()``'s first truthy value, polled every ``interval`` s; a test failure naming ``what`` with
    ``diagnostics()`` (the logs' tails) when ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{diagnostics()}")


def run_cli(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run([*CTPD, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ctpd {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def create_key(env: dict[str, str], tenant: str) -> str:
    key = run_cli(["keys", "create", "--tenant", tenant, "--name", "test"], env).strip().splitlines()[-1]
    assert key.startswith("ctpd_"), key
    return key


def api_ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def api_process(env: dict[str, str], port: int, log_path: Path) -> Proc:
    return Proc("api", [*CTPD, "serve", "--port", str(port)], env, log_path)


def worker_process(name: str, env: dict[str, str], log_path: Path, *, queues: str = "train,default",
                   beat: bool = False) -> Proc:
    """``ctpd worker`` (the production entry point) with the Celery node name ``<name>@<host>``."""
    argv = [*CTPD, "worker", "--queues", queues, "--hostname", f"{name}@%h", "--log-level", "info"]
    return Proc(f"worker {name}", [*argv, "--beat"] if beat else argv, env, log_path)


def worker_ready(worker: Proc) -> bool:
    """Celery prints ``<node> ready.`` once it consumes; a worker that exited is "ready" so the wait ends."""
    return " ready." in worker.log() or not worker.alive()


FAILPOINT_LINE = re.compile(r"failpoint (?P<point>\S+) reached \(attempt (?P<attempt>\d+|None), pid (?P<pid>\d+)\)")


def failpoint_pid(worker: Proc, point: str, attempt: int) -> int | None:
    """The pid of the job process that announced ``point`` for ``attempt`` in ``worker``'s log (worker/failpoints.py)."""
    for match in FAILPOINT_LINE.finditer(worker.log()):
        if match["point"] == point and match["attempt"] == str(attempt):
            return int(match["pid"])
    return None


def tiny_job(student: Path, teacher: Path, dataset_id: str, **overrides: Any) -> dict[str, Any]:
    """A CTPD job on the tiny conftest models that takes seconds on 2 CPU cores."""
    spec: dict[str, Any] = {
        "method": "ctpd",
        "student": {"model": str(student)},
        "teacher": {"model": str(teacher)},
        "dataset": {"id": dataset_id, "validation_fraction": 0.2},
        "sequence": {"max_response_tokens": 32, "max_prompt_tokens": 32},
        "contrastive": {"max_steps": 2, "learning_rate": 1e-3},
        "training": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3,
                     "checkpoint_every": 1},
        "evaluation": {"max_pairs": 8},
        "metadata": {"suite": "e2e"},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def upload_dataset(client: httpx.Client, path: Path) -> str:
    response = client.post("/v1/datasets", files={"file": ("pairs.jsonl", path.read_bytes(), "application/jsonl")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit(client: httpx.Client, spec: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def wait_for_job(client: httpx.Client, job_id: str, until: Callable[[dict], bool], what: str, logs: Callable[[], str],
                 timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
    def diagnostics() -> str:
        try:
            job = client.get(f"/v1/jobs/{job_id}").json()
            events = [(e["type"], e.get("stage"), e["message"]) for e in job_events(client, job_id)]
        except (httpx.HTTPError, AssertionError, ValueError) as error:
            job, events = f"unreadable: {error}", []
        return f"job: {json.dumps(job, default=str)[:2000]}\nevents: {events}\n{logs()}"

    def check() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if until(job) else None

    return wait_until(check, timeout, f"job {job_id} to be {what}", diagnostics)


def process_state(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` from /proc (state R, S, T for stopped, Z for a zombie ...), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may itself hold spaces
    return fields[0], int(fields[1])


def exited(pid: int) -> bool:
    """Gone, or a zombie its parent has not reaped yet: either way it runs no more code."""
    state = process_state(pid)
    return state is None or state[0] in ("Z", "X")


def job_process_pid(worker_id: str | None) -> int | None:
    """The pid in a job row's ``worker_id`` (``<celery node>:<pid>``, worker/tasks.py)."""
    if not worker_id or ":" not in worker_id:
        return None
    tail = worker_id.rsplit(":", 1)[1]
    return int(tail) if tail.isdigit() else None


def up_logs(home: Path, *procs: Proc | None, lines: int = 50) -> str:
    """The tails of ``ctpd up`` processes and of the API and worker logs it keeps under ``home/logs``."""
    parts = [proc.tail(lines) for proc in procs if proc is not None]
    for name in ("api.log", "worker.log"):
        path = home / "logs" / name
        if path.exists():
            parts.append(f"--- {name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(parts)
