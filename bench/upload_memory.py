"""Memory and disk of ``POST /v1/datasets``: a big valid upload, and a chunked body far over the limit.

Starts the real API in a subprocess (uvicorn on a free port, SQLite, a temporary CTPD_HOME), then

1. uploads a generated valid dataset of ``--size-mb`` MB (``--format``: jsonl, json or parquet; streamed
   from disk by the client) and prints the
   API's peak RSS (``VmHWM`` in ``/proc/<pid>/status``) before and after, and the growth against the file;
2. sends a chunked body (no Content-Length) of ``--oversize-mb`` MB against a limit of ``--limit-mb`` MB,
   watching ``datasets/`` on disk while it is sent, and prints the most bytes that were ever there, at the
   413 and after it, against the body's size and the limit.

    .venv/bin/python bench/upload_memory.py                 # 200 MB valid; 792 MB chunked over a 264 MB limit
    .venv/bin/python bench/upload_memory.py --size-mb 450   # the issue's case: 1.5 GB chunked over 514 MB

Before the streaming receiver (issue 9.8) a 450 MB upload took the API from 163 MB to 2.7 GB resident, and a
chunked 1.5 GB body was written to disk in full before the 413.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from app.db import auth as key_rows
from app.db.engine import Database
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
BOUNDARY = "ctpd-bench-boundary-7f3a"
SEND_CHUNK = 256 * 1024


# ------------------------------------------------------------------------------- the API in a subprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiProcess:
    """``uvicorn --factory app.main:app_from_env`` on a free port over SQLite in ``home``, with an API key.
    Also used by tests/app/test_upload_orphans.py (a SIGKILL mid-upload)."""

    def __init__(self, home: Path, *, max_upload_bytes: int) -> None:
        self.home = home
        self.port = free_port()
        database_url = f"sqlite:///{home / 'ctpd.db'}"
        self.settings = Settings(home=home, database_url=database_url, broker_url="memory://",
                                 artifact_root=home / "artifacts", max_upload_bytes=max_upload_bytes)
        database = Database(self.settings.database_url)
        database.upgrade()
        self.api_key = key_rows.create_api_key(database, "bench", "upload benchmark")
        database.dispose()
        env = {key: value for key, value in os.environ.items() if not key.startswith("CTPD_")}
        env.update(CTPD_HOME=str(home), CTPD_DATABASE_URL=database_url, CTPD_BROKER_URL="memory://",
                   CTPD_ARTIFACT_ROOT=str(home / "artifacts"), CTPD_MAX_UPLOAD_BYTES=str(max_upload_bytes),
                   PYTHONUNBUFFERED="1")
        self.log_path = home / "api.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:app_from_env", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    @property
    def datasets_dir(self) -> Path:
        return Path(self.settings.artifact_root) / "datasets"

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the API exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the API did not listen on port {self.port} within {timeout} s")

    def memory(self) -> dict[str, int]:
        """``VmHWM`` (peak resident) and ``VmRSS`` in bytes, from /proc/<pid>/status."""
        figures = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                figures[key] = int(value.split()[0]) * 1024
        return figures

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# ------------------------------------------------------------------------------------- a raw HTTP client


def multipart_head(filename: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


MULTIPART_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def open_upload(port: int, api_key: str, *, content_length: int | None = None) -> socket.socket:
    """A connection with the request line and headers of ``POST /v1/datasets`` sent; the body follows."""
    sock = socket.create_connection(("127.0.0.1", port))
    framing = f"Content-Length: {content_length}" if content_length is not None else "Transfer-Encoding: chunked"
    sock.sendall((f"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {api_key}\r\n"
                  f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{framing}\r\nConnection: close\r\n\r\n"
                  ).encode())
    return sock


def send_body(sock: socket.socket, pieces, *, chunked: bool, last: bool = True) -> tuple[int, bool]:
    """Send ``pieces`` until they end or the server answers (or hangs up) first; returns (bytes sent, whether
    the server answered before the body ended). ``last=False`` leaves a chunked body open for more."""
    sent = 0
    for piece in pieces:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            return sent, True
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            return sent, True
        sent += len(piece)
    if chunked and last:
        try:
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return sent, True
    return sent, False


def read_response(sock: socket.socket, timeout: float = 600.0) -> tuple[int, dict]:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            block = sock.recv(65536)
        except ConnectionResetError:
            break
        if not block:
            break
        data += block
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        raise RuntimeError("the server closed the connection without a response")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2:]
        body = decoded
    return status, json.loads(body) if body else {}


# ------------------------------------------------------------------------------------------ the two runs


def _row(number: int) -> dict[str, str]:
    return {
        "prompt": f"Question {number}: what does the review of product {number % 9973} say about its quality?",
        "chosen": f" It praises the build quality and says it lasted {number % 17 + 1} years of daily use.",
        "rejected": f" It is about something else entirely, number {number * 7919 % 100003}.",
    }


def write_dataset(path: Path, size_bytes: int) -> int:
    """A valid dataset of about ``size_bytes`` (varied rows of about 250 bytes as JSON) in the format of
    ``path``'s suffix; returns the row count. Parquet is written with pyarrow's default row groups."""
    rows = 0
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        try:
            while writer is None or path.stat().st_size < size_bytes:
                table = pa.Table.from_pylist([_row(rows + i) for i in range(100_000)])
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table)
                rows += 100_000
        finally:
            if writer is not None:
                writer.close()
        return rows
    with path.open("w", encoding="utf-8") as out:
        out.write("[\n" if path.suffix == ".json" else "")
        while out.tell() < size_bytes:
            separator = ",\n" if path.suffix == ".json" and rows else ""
            out.write(separator + json.dumps(_row(rows)) + ("\n" if path.suffix == ".jsonl" else ""))
            rows += 1
        out.write("\n]\n" if path.suffix == ".json" else "")
    return rows


def file_pieces(path: Path):
    yield multipart_head(path.name)
    with path.open("rb") as handle:
        while piece := handle.read(SEND_CHUNK):
            yield piece
    yield MULTIPART_TAIL


class DiskWatcher(threading.Thread):
    """The most bytes ever under ``folder`` (sampled every few ms while an upload runs)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder, self.peak, self._done = folder, 0, threading.Event()

    def bytes_now(self) -> int:
        total = 0
        for root, _, files in os.walk(self.folder):
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # renamed or removed while we looked
                    total += os.stat(os.path.join(root, name)).st_size
        return total

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.bytes_now())
            time.sleep(0.002)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def mb(value: float) -> str:
    return f"{value / MiB:,.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200, help="size of the valid upload (default 200)")
    parser.add_argument("--format", choices=("jsonl", "json", "parquet"), default="jsonl",
                        help="format of the valid upload (default jsonl)")
    parser.add_argument("--limit-mb", type=int, default=None,
                        help="CTPD_MAX_UPLOAD_BYTES in MB (default: 256, or --size-mb + 64 if that is larger)")
    parser.add_argument("--oversize-mb", type=int, default=None,
                        help="size of the chunked body sent over the limit (default: 3x the limit)")
    args = parser.parse_args()
    limit = (args.limit_mb or max(256, args.size_mb + 64)) * MiB
    oversize = (args.oversize_mb or 3 * limit // MiB) * MiB

    with tempfile.TemporaryDirectory(prefix="ctpd-upload-bench-") as scratch:
        scratch_dir = Path(scratch)
        dataset = scratch_dir / f"pairs.{args.format}"
        rows = write_dataset(dataset, args.size_mb * MiB)
        file_size = dataset.stat().st_size
        api = ApiProcess(scratch_dir / "home", max_upload_bytes=limit)
        try:
            print(f"API pid {api.process.pid} on port {api.port}; upload limit {mb(limit)}")
            before = api.memory()
            sock = open_upload(api.port, api.api_key,
                               content_length=len(multipart_head(dataset.name)) + file_size + len(MULTIPART_TAIL))
            started = time.monotonic()
            send_body(sock, file_pieces(dataset), chunked=False)
            status, body = read_response(sock)
            seconds = time.monotonic() - started
            after = api.memory()
            if status != 201:
                raise SystemExit(f"the valid upload failed with {status}: {body}")
            growth = after["VmHWM"] - before["VmHWM"]
            print(f"\n1. valid {args.format} upload: {mb(file_size)}, {rows:,} rows -> {status} {body['id']} "
                  f"({body['num_rows']:,} rows) in {seconds:.1f} s ({file_size / MiB / seconds:.0f} MB/s)")
            print(f"   API peak RSS (VmHWM): before {mb(before['VmHWM'])}, after {mb(after['VmHWM'])}; "
                  f"growth {mb(growth)} = {growth / file_size:.3f} x the file")
            print(f"   API RSS (VmRSS) now: {mb(after['VmRSS'])}")

            stored = api.datasets_dir / body["id"]
            for path in stored.iterdir():
                path.unlink()
            stored.rmdir()  # so the watcher below sees only the oversized upload

            watcher = DiskWatcher(api.datasets_dir)
            watcher.start()
            sock = open_upload(api.port, api.api_key)
            block = b'{"prompt": "p", "chosen": " a", "rejected": " b"}\n' * (SEND_CHUNK // 48)

            def oversized():
                yield multipart_head("huge.jsonl")
                sent = 0
                while sent < oversize:
                    yield block
                    sent += len(block)
                yield MULTIPART_TAIL

            started = time.monotonic()
            sent, answered_early = send_body(sock, oversized(), chunked=True)
            status, body = read_response(sock)
            seconds = time.monotonic() - started
            peak = watcher.stop()
            left = watcher.bytes_now()
            print(f"\n2. chunked body of {mb(oversize)} against the {mb(limit)} limit -> {status} "
                  f"{body.get('error', {}).get('code')} after {seconds:.1f} s")
            print(f"   the client got to send {mb(sent)} ({sent / oversize:.3f} of the body) before the server "
                  f"{'answered' if answered_early else 'read it all'}")
            print(f"   most bytes ever on disk under datasets/: {mb(peak)} = {peak / oversize:.3f} x the body, "
                  f"{peak / limit:.3f} x the limit; left after the 413: {left} bytes")
            print(f"   API peak RSS (VmHWM) after both: {mb(api.memory()['VmHWM'])}")
        finally:
            api.stop()


if __name__ == "__main__":
    main()
