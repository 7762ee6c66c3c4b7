"""A real webhook receiver on loopback for the tests: a threaded ``http.server`` that verifies every request's
signature with the Standard Webhooks reference library (``standardwebhooks.Webhook(secret).verify``), records
what came, and can be told to fail its first N requests (or every request) to exercise retries and disabling.

    with WebhookReceiver() as receiver:
        created = client.post("/v1/webhooks", json={"url": receiver.url}).json()
        receiver.secret = created["secret"]
        ...
        receiver.wait_for(lambda r: len(r.delivered()) == 3, 10, "three deliveries")

A request that fails verification is answered 400 and recorded with ``verified=False``; tests assert there is none.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import standardwebhooks


@dataclass(frozen=True)
class Received:
    message_id: str
    timestamp: str
    body: bytes
    headers: dict[str, str]
    verified: bool
    verify_error: str | None
    answered: int | None  # the status this receiver answered with; None: held, never answered (stall_first)

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def type(self) -> str:
        return self.payload["type"]


class WebhookReceiver:
    """``fail_first``: answer the first N requests with ``fail_status`` (whatever their id); ``fail_all``: every one;
    ``stall_first``: hold the first N requests unanswered until the receiver stops (a sender that dies mid-send)."""

    def __init__(self, *, secret: str | None = None, fail_first: int = 0, fail_status: int = 503,
                 fail_all: bool = False, stall_first: int = 0) -> None:
        self.secret = secret
        self.fail_first, self.fail_status, self.fail_all = fail_first, fail_status, fail_all
        self.stall_first = stall_first
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.requests: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver._handle(self, body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/ctpd"

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {key.lower(): value for key, value in handler.headers.items()}
        verified, error = False, None
        try:
            if self.secret is None:
                raise standardwebhooks.WebhookVerificationError("the receiver has no secret yet")
            standardwebhooks.Webhook(self.secret).verify(body, headers)
            verified = True
        except standardwebhooks.WebhookVerificationError as refused:
            error = str(refused) or type(refused).__name__
        with self._lock:
            stalled = len(self.requests) < self.stall_first
            failing = self.fail_all or len(self.requests) < self.fail_first
            status = 400 if not verified else self.fail_status if failing else 204
            self.requests.append(Received(headers.get("webhook-id", ""), headers.get("webhook-timestamp", ""), body,
                                          headers, verified, error, None if stalled else status))
        if stalled:
            self._stopping.wait(120)
            return
        try:
            handler.send_response(status)
            handler.send_header("content-length", "0")
            handler.end_headers()
        except OSError:  # the sender hung up (its timeout, or it died)
            pass

    # ---------------------------------------------------------------------------------------- reading

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def delivered(self) -> list[Received]:
        """The requests answered 2xx, in arrival order."""
        return [request for request in self.received() if request.answered is not None and 200 <= request.answered < 300]

    def unverified(self) -> list[Received]:
        return [request for request in self.received() if not request.verified]

    def wait_for(self, predicate: Callable[[WebhookReceiver], Any], timeout: float, what: str,
                 diagnostics: Callable[[], str] = str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate(self)
            if value:
                return value
            time.sleep(0.05)
        got = [(request.type if request.body else "?", request.message_id, request.answered)
               for request in self.received()]
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; received {got}\n{diagnostics()}")

    # ---------------------------------------------------------------------------------------- lifetime

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def serving_receiver(**options: Any) -> Iterator[WebhookReceiver]:
    """For a pytest fixture: ``yield from serving_receiver(fail_first=2)``."""
    with WebhookReceiver(**options) as receiver:
        yield receiver


class TricklingReceiver:
    """A receiver that reads each request and then answers it a byte every ``interval`` seconds (a status line,
    then an endless header), for at most ``for_seconds``: every read of the sender gets its byte well within any
    per-read timeout, so only a deadline for the whole attempt ends it. ``hang_ups`` lists, per request, how many
    seconds after the request the sender hung up (None while it is still listening)."""

    def __init__(self, *, interval: float = 0.2, for_seconds: float = 20.0) -> None:
        self.interval, self.for_seconds = interval, for_seconds
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.hang_ups: list[float | None] = []
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/hooks/slow"

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            thread = threading.Thread(target=self._trickle, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _trickle(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(5)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    request += chunk
            except OSError:
                return
            with self._lock:
                index = len(self.hang_ups)
                self.hang_ups.append(None)
            started = time.monotonic()
            answer = b"HTTP/1.1 204 No Content\r\nx-trickle: "
            sent = 0
            while not self._stopping.is_set() and time.monotonic() - started < self.for_seconds:
                try:
                    connection.sendall(answer[sent:sent + 1] if sent < len(answer) else b"a")
                except OSError:  # the sender hung up
                    with self._lock:
                        self.hang_ups[index] = time.monotonic() - started
                    return
                sent += 1
                self._stopping.wait(self.interval)

    def __enter__(self) -> TricklingReceiver:
        thread = threading.Thread(target=self._serve, name="trickling-receiver", daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._listener.close()
