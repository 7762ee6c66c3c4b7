"""Fixtures of the fault suite: a PostgreSQL and a Redis of the suite's own, which a test may stop and start.

The shared services on 5432 and 6379 belong to everyone working on this machine and are never touched here:
each :class:`PrivatePostgres` / :class:`PrivateRedis` runs on a free port with its data under a temporary
folder, and only the processes it started are ever signalled. PostgreSQL refuses to run as root, so its
binaries run as the ``postgres`` OS user (``runuser``), with trust authentication on 127.0.0.1 and the socket
in the temporary folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_service import Proc, free_port, reachable, wait_until

INSTALL_HINT = (
    "install the server packages the service tests use: `apt-get install -y postgresql redis-server` "
    "(.ci/run expects both, and scripts/setup installs the Python side)"
)


def _postgres_bin() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin that has every server binary we run."""
    needed = ("initdb", "pg_ctl", "postgres")

    def version(folder: Path) -> int:
        return int(folder.parent.name) if folder.parent.name.isdigit() else 0

    for folder in sorted(map(Path, glob.glob("/usr/lib/postgresql/*/bin")), key=version, reverse=True):
        if all(os.access(folder / name, os.X_OK) for name in needed):
            return folder
    pytest.fail(f"PostgreSQL server binaries ({', '.join(needed)}) not found under /usr/lib/postgresql/*/bin; "
                f"{INSTALL_HINT}")


def _require_postgres_user() -> None:
    if shutil.which("runuser") is None:
        pytest.fail(f"runuser (util-linux) is missing: the private PostgreSQL runs as the postgres user; {INSTALL_HINT}")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(f"there is no `postgres` OS user to run the private PostgreSQL as; {INSTALL_HINT}")


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>, started with :meth:`start`, stopped with
    :meth:`stop` (fast shutdown: clients are disconnected, like a database that goes away), started again
    with :meth:`start`, always with the same data and port."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        _require_postgres_user()
        # Not under pytest's tmp_path: that tree is root-only (0700), and the postgres user must reach its data.
        self.root = Path(tempfile.mkdtemp(prefix="ctpd-faults-pg-"))
        self.data, self.socket_dir, self.log_path = self.root / "data", self.root / "socket", self.root / "postgres.log"
        self.socket_dir.mkdir()
        shutil.chown(self.root, "postgres", "postgres")
        shutil.chown(self.socket_dir, "postgres", "postgres")
        self.port = free_port()
        self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                           "-E", "UTF8", "--locale=C", "--no-sync"], timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/ctpd"

    def _as_postgres(self, argv: list[str], timeout: float) -> str:
        result = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                                timeout=timeout, cwd=self.root)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{self.tail()}")
        return result.stdout

    def start(self) -> None:
        # fsync off: the suite never crashes the machine, and every stop is a clean (fast) shutdown.
        options = (f"-k {self.socket_dir} -h 127.0.0.1 -p {self.port} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=200")
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                           "-w", "-t", "60", "start"], timeout=90)
        wait_until(lambda: reachable(self.port), 30, f"the private PostgreSQL on port {self.port}", self.tail)

    def stop(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"],
                          timeout=90)

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return self._postmaster_pid() is not None

    def create_database(self, name: str = "ctpd") -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=5",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')

    def _postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        return f"--- private PostgreSQL ({self.log_path}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def destroy(self) -> None:
        """Stop the cluster (by its own postmaster pid if pg_ctl cannot) and remove its folder."""
        pid = self._postmaster_pid()
        if pid is not None:
            subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.data),
                            "-m", "immediate", "-w", "-t", "20", "stop"], capture_output=True, timeout=40)
            if self._postmaster_pid() == pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """A redis-server on 127.0.0.1:<free port> without persistence: a restart loses every message, as a
    broker that went away does."""

    def __init__(self, folder: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail(f"redis-server not found on PATH; {INSTALL_HINT}")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = Proc(
            "private Redis",
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, self.folder / "redis.log",
        )
        wait_until(lambda: reachable(self.port) or not self.process.alive(), 30,
                   f"the private Redis on port {self.port}", self.tail)
        assert self.process.alive(), self.tail()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return self.process is not None and self.process.alive()

    def tail(self, lines: int = 20) -> str:
        return self.process.tail(lines) if self.process is not None else "(private Redis never started)"


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        server.create_database()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("private-redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
