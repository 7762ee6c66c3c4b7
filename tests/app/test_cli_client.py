"""ctpd_cli.client against real servers over loopback: the ctpd API (uvicorn in a thread), a small Starlette file
server (Range, ETag, If-Range as Starlette serves them), and a flaky proxy in front of either that answers 503,
drops answers or cuts connections on cue, and counts what it saw."""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, StreamingResponse
from starlette.routing import Route

from app.main import create_app
from ctpd_cli.client import Client, ServiceError
from tests.app.conftest import SPEC
from tests.live_service import free_port, serving


@pytest.fixture
def database_url(tmp_path, migrated_sqlite_template) -> str:
    """SQLite only: these tests are about the client, not the database (the API tests cover both)."""
    import shutil

    path = tmp_path / "ctpd.db"
    shutil.copyfile(migrated_sqlite_template, path)
    return f"sqlite:///{path}"

# An action for one request: None forwards it; ("status", code, headers) answers that instead; ("drop", code)
# forwards it and answers code instead of the real answer; ("cut", n) relays the answer's first n body bytes and
# closes the connection.
Action = tuple[Any, ...] | None


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FlakyProxy:
    """A threaded HTTP/1.1 proxy to ``upstream``; ``plan(index, method, path)`` picks each request's action."""

    upstream: str
    plan: Callable[[int, str, str], Action] = lambda *_: None
    seen: list[Seen] = field(default_factory=list)

    def start(self) -> str:
        proxy = self
        upstream = httpx.Client(base_url=self.upstream, timeout=60)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {name: value for name, value in self.headers.items()}
                index = len(proxy.seen)
                proxy.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in headers.items()}))
                action = proxy.plan(index, self.command, self.path)
                if action is not None and action[0] == "status":
                    self._answer(action[1], b'{"error": {"code": "flaky", "message": "try again", "param": null}}',
                                 {"Content-Type": "application/json", **action[2]})
                    return
                forwarded = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}
                request = upstream.build_request(self.command, self.path, content=body, headers=forwarded)
                response = upstream.send(request, stream=True)
                try:
                    if action is not None and action[0] == "drop":
                        response.read()  # the upstream did the work; its answer is lost on the way back
                        self._answer(action[1], b"<html>bad gateway</html>", {"Content-Type": "text/html"})
                        return
                    self.send_response(response.status_code)
                    for name, value in response.headers.items():
                        if name.lower() not in ("transfer-encoding", "connection", "content-encoding"):
                            self.send_header(name, value)
                    if "content-length" not in response.headers:
                        data = response.read()
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                        return
                    self.end_headers()
                    budget = action[1] if action is not None and action[0] == "cut" else None
                    for chunk in response.iter_raw(64 * 1024):
                        if budget is not None:
                            chunk = chunk[:budget]
                            budget -= len(chunk)
                        self.wfile.write(chunk)
                        if budget == 0:
                            self.wfile.flush()
                            self.connection.shutdown(socket.SHUT_RDWR)
                            self.close_connection = True
                            return
                finally:
                    response.close()

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = do_PATCH = _any

        port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self._upstream = upstream
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._upstream.close()


@pytest.fixture
def api(app) -> Iterator[str]:
    with serving(app) as url:
        yield url


@pytest.fixture
def proxy(api) -> Iterator[FlakyProxy]:
    flaky = FlakyProxy(api)
    flaky.url = flaky.start()  # type: ignore[attr-defined]
    yield flaky
    flaky.stop()


def _client(url: str, key: str, sleeps: list[float] | None = None, **options: Any) -> Client:
    return Client(url, key, sleep=(sleeps.append if sleeps is not None else lambda _: None), **options)


def test_a_get_is_retried_through_two_503s_with_retry_after(proxy, alice):
    job_id = alice.post("/v1/jobs", json=SPEC).json()["id"]
    proxy.plan = lambda index, *_: ("status", 503, {"Retry-After": "2"}) if index < 2 else None
    sleeps: list[float] = []
    with _client(proxy.url, alice.api_key, sleeps) as client:
        assert client.job(job_id)["id"] == job_id
    assert [seen.method for seen in proxy.seen] == ["GET"] * 3
    assert sleeps == [2.0, 2.0]  # the server's Retry-After, not the client's own backoff
    assert proxy.seen[0].headers["authorization"] == f"Bearer {alice.api_key}"
    assert proxy.seen[0].headers["user-agent"].startswith("ctpd-cli/")


def test_backoff_is_exponential_with_jitter_and_gives_up_with_the_service_error(proxy, alice):
    proxy.plan = lambda *_: ("status", 502, {})
    sleeps: list[float] = []
    with _client(proxy.url, alice.api_key, sleeps, retries=3, backoff=1.0) as client, \
            pytest.raises(ServiceError) as raised:
        client.list_jobs()
    assert len(proxy.seen) == 4  # the first try and three retries
    assert len(sleeps) == 3 and all(0 <= delay <= cap for delay, cap in zip(sleeps, (1.0, 2.0, 4.0), strict=True))
    assert raised.value.status == 502 and raised.value.code == "flaky" and "try again" in str(raised.value)


def test_an_upload_is_not_sent_twice_on_a_503(proxy, alice, tmp_path):
    proxy.plan = lambda *_: ("status", 503, {"Retry-After": "0"})
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    with _client(proxy.url, alice.api_key) as client, pytest.raises(ServiceError) as raised:
        client.upload_dataset(data)
    assert raised.value.status == 503 and len(proxy.seen) == 1


def test_a_submit_whose_answer_is_lost_is_retried_into_the_same_job(proxy, alice):
    """The bug it guards against: a 502 after the job was created, retried without the same Idempotency-Key,
    makes a second job."""
    proxy.plan = lambda index, method, path: ("drop", 502) if (index, method) == (0, "POST") else None
    with _client(proxy.url, alice.api_key) as client:
        job = client.create_job(SPEC)
    posts = [seen for seen in proxy.seen if seen.method == "POST"]
    assert len(posts) == 2 and posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
    assert [j["id"] for j in alice.get("/v1/jobs").json()["data"]] == [job["id"]]


def test_errors_carry_the_service_code_message_and_param(api, alice):
    with _client(api, alice.api_key) as client:
        with pytest.raises(ServiceError) as raised:
            client.create_job({**SPEC, "training": {"batch_size": 0}})
        assert (raised.value.status, raised.value.code, raised.value.param) == (422, "invalid_request",
                                                                               "training.batch_size")
        assert raised.value.errors and "training.batch_size" in str(raised.value)
        with pytest.raises(ServiceError) as raised:
            client.job("job_nope")
        assert (raised.value.status, raised.value.code) == (404, "not_found")
    with _client(api, "ctpd_wrong") as client, pytest.raises(ServiceError) as raised:
        client.list_jobs()
    assert (raised.value.status, raised.value.code) == (401, "invalid_api_key")


def test_a_service_that_is_not_there_is_retried_then_named():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sleeps: list[float] = []
    with _client(url, "k", sleeps, retries=2) as client, pytest.raises(ServiceError) as raised:
        client.create_api_key("t")  # a POST: retried too, since the connection never opened
    assert len(sleeps) == 2 and raised.value.status is None
    assert f"cannot reach the service at {url}" in str(raised.value)


def test_an_upload_streams_from_the_file_in_bounded_memory(settings, queue, db, tmp_path):
    """A 32 MiB dataset goes up with the client's (and the server's) Python allocations peaking at a fixed few
    MiB (measured: 5.7 MiB for 4, 24 and 48 MiB files), far below the file's size: nothing reads it whole."""
    from app.db import auth as key_rows

    settings.max_upload_bytes = 64 * 1024 * 1024
    application = create_app(settings, queue=queue)
    key = key_rows.create_api_key(db, "acme", "upload test")
    row = json.dumps({"prompt": "p" * 100, "chosen": "c" * 4000, "rejected": "r" * 4000}) + "\n"
    data = tmp_path / "big.jsonl"
    rows = 32 * 1024 * 1024 // len(row) + 1
    with data.open("w") as out:
        for _ in range(rows):
            out.write(row)
    size = data.stat().st_size
    try:
        with serving(application) as url, _client(url, key) as client:
            tracemalloc.start()
            try:
                uploaded = client.upload_dataset(data)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    finally:
        application.state.db.dispose()
    assert uploaded["num_rows"] == rows and uploaded["size_bytes"] == size
    assert peak < 12 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB of Python allocations for a {size / 2**20:.0f} MiB upload"


# ------------------------------------------------------------------------------------------------ downloads


@pytest.fixture
def file_server(tmp_path) -> Iterator[tuple[str, Path]]:
    """``/ranged``: Starlette's FileResponse (Accept-Ranges, 206, 416, ETag, If-Range); ``/whole``: the same bytes
    streamed without Range support (always 200), as the archive route of an older service."""
    served = tmp_path / "served.bin"
    served.write_bytes(os.urandom(3 * 1024 * 1024 + 123))

    async def ranged(_request: Request) -> FileResponse:
        return FileResponse(served)

    async def whole(_request: Request) -> StreamingResponse:
        return StreamingResponse(iter([served.read_bytes()]), headers={"Content-Length": str(served.stat().st_size)})

    application = Starlette(routes=[Route("/ranged", ranged), Route("/whole", whole)])
    with serving(application) as url:
        yield url, served


def test_a_download_cut_midway_resumes_with_range_and_if_range(file_server, tmp_path):
    url, served = file_server
    flaky = FlakyProxy(url, plan=lambda index, *_: ("cut", 1024 * 1024) if index == 0 else None)
    proxy_url = flaky.start()
    try:
        target = tmp_path / "out" / "model.bin"
        with _client(proxy_url, "k") as client:
            client.download("/ranged", target)
    finally:
        flaky.stop()
    assert target.read_bytes() == served.read_bytes()
    assert not target.with_name("model.bin.part").exists() and not target.with_name("model.bin.part.json").exists()
    first, second = flaky.seen
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={1024 * 1024}-"
    assert second.headers["if-range"].startswith('"')  # the ETag of the first answer


def test_a_partial_file_is_completed_from_where_it_stopped(file_server, tmp_path):
    url, served = file_server
    target = tmp_path / "model.bin"
    part = tmp_path / "model.bin.part"
    part.write_bytes(served.read_bytes()[:1000])
    flaky = FlakyProxy(url)
    proxy_url = flaky.start()
    try:
        with _client(proxy_url, "k") as client:
            client.download("/ranged", target)
            assert target.read_bytes() == served.read_bytes()
            assert flaky.seen[-1].headers["range"] == "bytes=1000-"
            # A part file that already holds every byte: the service answers 416 */size and the file is done.
            part.write_bytes(served.read_bytes())
            client.download("/ranged", target)
    finally:
        flaky.stop()
    assert target.read_bytes() == served.read_bytes()


def test_a_service_without_range_support_starts_the_file_over(file_server, tmp_path):
    url, served = file_server
    target = tmp_path / "model.bin"
    (tmp_path / "model.bin.part").write_bytes(b"stale bytes of another file")
    with _client(url, "k") as client:
        client.download("/whole", target)
    assert target.read_bytes() == served.read_bytes()  # the 200 replaced the part file, not appended to it
