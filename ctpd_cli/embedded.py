"""``ctpd up``: the embedded service on one machine (design.md, "Two ways to run, one code path").

SQLite for state and Celery's SQLAlchemy transport as the broker, both under ``$CTPD_HOME``; the API
(``ctpd serve``), a worker for jobs (``ctpd worker --queues train``) and a light one for everything else with beat
(``ctpd worker --queues default --beat``: the reaper, checkpoint models, preflights, never behind a training job)
run as child processes of ``ctpd up``, each in its own process group, logging to ``$CTPD_HOME/logs``. Before they start, ``ctpd up`` migrates the database,
makes sure there is an admin key (``$CTPD_HOME/api-key``, mode 0600), declares the queues and, since it owns
its database, hands the jobs a previous run left behind to the worker's own reaper pass
(:func:`worker.tasks.reap`) with every lease counted as lost. While they run it restarts an API that dies
(the worker's running job is not its business) and stops everything if a worker dies; on Ctrl-C or SIGTERM
it stops both, giving a running job ``--stop-timeout`` seconds to checkpoint and hand itself back.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from ctpd_core.vocab import QueueName

if TYPE_CHECKING:
    from app.db.engine import Database
    from app.settings import Settings

logger = logging.getLogger(__name__)

API_RESTARTS, API_RESTART_WINDOW_SECONDS = 5, 300.0
ADMIN_TENANT = "default"


def redacted_url(url: str) -> str:
    """A database or broker URL as the console shows it: without its password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # a URL SQLAlchemy cannot parse: show it without credentials
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}" if "@" in rest else url


def _die_with_parent(signum: int):
    """A preexec_fn: the child gets ``signum`` when ``ctpd up`` dies, even by SIGKILL (Linux only)."""

    def set_death_signal() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG

    return set_death_signal


class ServiceProcess:
    """A service process of ``ctpd up``, in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str], death_signal: int) -> None:
        self.name, self.log_path = name, log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with_parent(death_signal),
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the child's process group (a worker's pool process, beat)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def ensure_api_key(db: Database, key_file: Path) -> tuple[str, bool]:
    """The admin key of the embedded service: the stored one if it still authenticates, else a new one."""
    from app.db.auth import authenticate, create_api_key

    if key_file.exists():
        stored = key_file.read_text().strip()
        if stored and authenticate(db, stored) is not None:
            return stored, False
    key = create_api_key(db, ADMIN_TENANT, "ctpd up", is_admin=True)
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, (key + "\n").encode())
    finally:
        os.close(descriptor)
    return key, True


def prepare_broker(settings: Settings) -> None:
    """Declare the queues before the API and the worker start (``worker.celery_app.declare_queues``); nothing
    consumes while ``ctpd up`` starts (it holds the home's lock), so delivered messages are purged too."""
    from worker.celery_app import declare_queues

    declare_queues(settings, purge_delivered=True)


def requeue_orphans(db: Database, settings: Settings) -> list[str]:
    """Embedded mode owns its SQLite database, so a job still ``running`` at start was left by a previous
    ``ctpd up`` that died: one pass of the worker's reaper with every lease counted as lost requeues it now
    (it resumes from its checkpoints) instead of after its lease, and rings the doorbell for it (and for any
    queued job nobody claimed for ``requeue_after_seconds``). Returns the ids enqueued."""
    from app.queue import CeleryTaskQueue
    from worker.tasks import reap

    queue = CeleryTaskQueue(settings.broker_url)
    try:
        return reap(db, settings, queue, leases_lost=True)
    finally:
        queue.close()


def _wait_ready(url: str, children: list[ServiceProcess], stop: threading.Event, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        for child in children:
            if not child.alive():
                raise RuntimeError(f"the {child.name} exited during start-up (code {child.process.returncode}); "
                                   f"its log {child.log_path} ends with:\n{child.tail()}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(0.5)
    return False


def _stop_children(children: list[ServiceProcess], grace: float) -> None:
    """SIGTERM (uvicorn: graceful; Celery: warm shutdown, in which a running job checkpoints and hands itself
    back) and, after ``grace`` seconds, SIGKILL to each child's whole process group. A job killed here stays
    ``running`` in SQL and is requeued by the next ``ctpd up``, resuming from its last checkpoint."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"ctpd up: the {child.name} did not stop within {grace:g} s; killing it", file=sys.stderr)
        child.kill_group()


def _may_restart(restarts: list[float]) -> bool:
    """At most API_RESTARTS restarts within API_RESTART_WINDOW_SECONDS: a crash loop stops ``ctpd up``."""
    now = time.monotonic()
    restarts[:] = [at for at in restarts if now - at < API_RESTART_WINDOW_SECONDS]
    if len(restarts) >= API_RESTARTS:
        return False
    restarts.append(now)
    return True


def _child_env(settings: Settings) -> dict[str, str]:
    from ctpd_core.logs import resolve_format

    return {
        **os.environ,
        "CTPD_HOME": str(settings.home),
        "CTPD_DATABASE_URL": settings.database_url,
        "CTPD_BROKER_URL": settings.broker_url,
        "CTPD_ARTIFACT_ROOT": str(settings.artifact_root),
        "CTPD_MODEL_CACHE": str(settings.model_cache),
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
        # The children log to files; "auto" follows the terminal of `ctpd up` itself: text for the person who
        # started it there, JSON when a supervisor (systemd, a container) did.
        "CTPD_LOG_FORMAT": resolve_format(settings.log_format),
        # One user who owns the machine: their own files are fair game (a multi-tenant deployment keeps the
        # safe default, off). An explicit CTPD_ALLOW_SERVER_PATHS still wins.
        "CTPD_ALLOW_SERVER_PATHS": os.environ.get("CTPD_ALLOW_SERVER_PATHS", "true"),
    }


def run_embedded(settings: Settings, *, host: str, port: int, start_timeout: float, stop_timeout: float) -> int:
    """The body of ``ctpd up``: returns its exit code (0 after a stop, 1 if a child died, 130 if stopped while
    starting); raises ``ValueError`` if another ``ctpd up`` holds this home, ``RuntimeError`` if the API never
    became ready."""
    from app.db.engine import Database

    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    lock = open(home / "up.lock", "w")  # noqa: SIM115 (held for the life of the command)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        raise ValueError(f"another `ctpd up` is already running on CTPD_HOME={home}; stop it first") from error

    db = Database(settings.database_url)
    try:
        db.upgrade()
        key, created = ensure_api_key(db, home / "api-key")
        prepare_broker(settings)
        orphans = requeue_orphans(db, settings) if db.is_sqlite else []
    finally:
        db.dispose()
    if orphans:
        print(f"requeued {len(orphans)} job(s) a previous start left running or unclaimed: {', '.join(orphans)}")

    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    env = _child_env(settings)
    command = [sys.executable, "-m", "ctpd_cli.main"]
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    api_argv = [*command, "serve", "--host", host, "--port", str(port)]
    # Two workers: jobs on `train` (concurrency 1, so a job runs alone), and light work on `default` with beat (the
    # reaper, checkpoint models, preflights), so a dry run is answered in seconds even while a job trains. One
    # worker on both queues would leave a preflight queued behind a training job for as long as the job runs.
    worker_argv = [*command, "worker", "--queues", QueueName.TRAIN]
    light_argv = [*command, "worker", "--queues", QueueName.DEFAULT, "--beat", "--hostname", "ctpd-light@%h"]
    children = [
        ServiceProcess("API", api_argv, logs / "api.log", env, signal.SIGTERM),
        # SIGTERM (a warm shutdown) also if ctpd up dies: the running job checkpoints and hands itself back
        # within CTPD_SHUTDOWN_GRACE_SECONDS (worker/tasks.py), so the next start resumes it.
        ServiceProcess("worker", worker_argv, logs / "worker.log", env, signal.SIGTERM),
        # The same log file (appended line by line; each line names its worker): one place to read the workers.
        ServiceProcess("light worker", light_argv, logs / "worker.log", env, signal.SIGTERM),
    ]
    api_restarts: list[float] = []
    local_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{local_host}:{port}"
    code = 0
    try:
        if not _wait_ready(url, children, stop, start_timeout):
            if stop.is_set():
                return 130
            raise RuntimeError(f"the API did not answer {url}/readyz within {start_timeout:g} s; "
                               f"see {children[0].log_path}:\n{children[0].tail()}")
        print(f"ctpd is up at {url} (OpenAPI: {url}/docs)")
        # The remote commands (`ctpd jobs list`, ...) read it when neither --url nor CTPD_URL names a service.
        (home / "url").write_text(url + "\n")
        if created:
            print(f"admin API key (shown once; stored in {home / 'api-key'}, mode 0600):\n  {key}")
        else:
            print(f"admin API key: in {home / 'api-key'}")
        print(f"state {redacted_url(settings.database_url)}, broker {redacted_url(settings.broker_url)}, "
              f"artifacts {settings.artifact_root}")
        print(f"logs: {logs / 'api.log'}, {logs / 'worker.log'}. Ctrl-C stops.", flush=True)
        while not stop.wait(0.5):
            if not children[0].alive() and all(child.alive() for child in children[1:]) and _may_restart(api_restarts):
                # The API died (OOM, a crash): the worker's running job is not its business. Start a new API
                # beside it instead of stopping everything.
                print(f"ctpd up: the API exited (code {children[0].process.returncode}); restarting it "
                      f"({len(api_restarts)} of {API_RESTARTS} in {API_RESTART_WINDOW_SECONDS:g} s). "
                      f"{children[0].log_path} ends with:\n{children[0].tail()}", file=sys.stderr, flush=True)
                children[0].kill_group()
                children[0] = ServiceProcess("API", api_argv, logs / "api.log", env, signal.SIGTERM)
                continue
            dead = [child for child in children if not child.alive()]
            if dead:
                child = dead[0]
                print(f"ctpd up: the {child.name} exited (code {child.process.returncode}); stopping. "
                      f"{child.log_path} ends with:\n{child.tail()}", file=sys.stderr)
                code = 1
                break
    finally:
        print("ctpd up: stopping", flush=True)
        (home / "url").unlink(missing_ok=True)  # no service there any more
        _stop_children(children, stop_timeout)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        lock.close()
    print("ctpd up: stopped", flush=True)
    return code
