"""The outbox dispatcher: sends due webhook messages, signed, and schedules the retries.

One pass (:meth:`Dispatcher.run_once`) reads the due messages and hands them to a long-lived pool of senders
(one at a time per endpoint, oldest first, so one slow receiver holds one sender, never the pass: the next pass
goes on claiming the others' messages; a finished send wakes the loop for the endpoint's next one). Each is leased right before its send
(:func:`app.db.webhooks.claim`: a row lease by compare-and-set, so the API processes that each run a dispatcher
never send one message at once); the sender checks the URL again with the address guard (DNS can change; a
refusal is a failed attempt with the reason), POSTs the frozen body with the Standard Webhooks headers
(``webhook-id`` = the message id on every attempt; a fresh timestamp and signature per attempt), redirects not
followed, and records the outcome. ``webhook_timeout_seconds`` bounds the whole attempt by the wall clock, not
each read (a receiver that trickles its answer a byte at a time would pass every per-read timeout): a watchdog
shuts the connection's socket down at the deadline, a failed attempt ("deadline exceeded"), well inside the
lease (twice the timeout plus 30 s). A 2xx is delivered; anything else (another status, a timeout, a refused connection) is retried
with exponential backoff and full jitter until ``webhook_retry_window_seconds`` after the message was written,
then given up. ``webhook_disable_after_failures`` failed attempts in a row disable the endpoint.

A message is sent at least once and, unless a dispatcher dies between the receiver's answer and the record (or
the receiver answers after the timeout), exactly once: receivers deduplicate on ``webhook-id``.

:class:`DispatcherThread` runs passes every ``webhook_dispatch_interval_seconds`` in the API process (the
lifespan starts it when ``webhook_dispatcher`` is on); :func:`run_forever` is the same loop for a dedicated process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import httpx

from app.db import webhooks as webhook_rows
from app.db.engine import Database, is_unavailable
from app.db.models import utcnow
from app.settings import Settings
from app.webhooks.signing import signed_headers
from app.webhooks.targets import Resolver, TargetRefused, check_url, pinned_request, resolve

logger = logging.getLogger(__name__)

USER_AGENT = "ctpd-webhooks/1"
# The dispatch loop's senders: this many attempts at once, at most Dispatcher.per_endpoint (1) per endpoint.
LOOP_CONCURRENCY = 8
MAX_ERROR_CHARS = 500


class Backoff:
    """Retry delays: ``base * 2^(n-1)`` capped at ``cap``, with full jitter (a uniform draw from half of it to
    all of it), so endpoints that fail together are not retried in lock step. With the defaults a message is
    tried about 15 times over the first day (30 s, 1 min, 2 min, ... then every 2-4 h)."""

    def __init__(self, base_seconds: float = 30.0, cap_seconds: float = 4 * 3600.0,
                 rng: random.Random | None = None) -> None:
        self.base, self.cap = base_seconds, cap_seconds
        self.rng = rng or random.Random()

    def delay(self, failed_attempts: int) -> float:
        ceiling = min(self.cap, self.base * 2 ** max(0, failed_attempts - 1))
        return self.rng.uniform(ceiling / 2, ceiling)


class _Watchdog:
    """One attempt's wall-clock deadline: when it passes, the sockets the attempt connected are shut down, which
    ends a blocked read or write at once (httpx's timeouts are per read). It learns the sockets from httpcore's
    ``trace`` request extension (the connection's ``connect_tcp`` and ``start_tls`` results); the client keeps no
    idle connections, so every attempt connects afresh and is seen."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def trace(self, name: str, info: dict[str, Any]) -> None:
        if name not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut_down(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed (the attempt ended as the deadline came)
        sock.shutdown(socket.SHUT_RDWR)


class Dispatcher:
    """Sends due messages; ``run_once`` is one pass (tests call it directly, with their own clock).

    ``concurrency`` 1 (the default: a pass that has sent when it returns, for tests and one-off passes) sends in
    the pass itself, one after another, each bounded by its deadline; more (the dispatch loop:
    :data:`LOOP_CONCURRENCY`) hands the sends to a pool of that many threads that outlives the passes, with at
    most ``per_endpoint`` messages of one endpoint queued or in flight (1: in order, oldest first) and at most
    ``batch_size`` in all: a pass returns at once, and the next one claims what is due beside the sends still
    running."""

    def __init__(self, db: Database, settings: Settings, *, owner: str | None = None, backoff: Backoff | None = None,
                 clock: Callable[[], datetime] = utcnow, resolver: Resolver = resolve, batch_size: int = 50,
                 concurrency: int = 1, per_endpoint: int = 1, transport: httpx.BaseTransport | None = None) -> None:
        self.db, self.settings = db, settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.backoff = backoff or Backoff()
        self.clock, self.resolver = clock, resolver
        self.batch_size, self.concurrency, self.per_endpoint = batch_size, concurrency, max(1, per_endpoint)
        # The whole attempt (connect, send, the answer's status line and headers), by the wall clock.
        self.deadline_seconds = settings.webhook_timeout_seconds
        # A message is leased right before its send, so the lease only has to outlive one attempt (by a wide margin:
        # it exists to end a dead dispatcher's hold).
        self.lease_seconds = settings.webhook_timeout_seconds * 2 + 30
        # No redirects (a 3xx is a failure: a redirect could lead past the address guard), no proxies from the
        # environment (they would bypass it too), no cookies kept between endpoints, no idle connections (each
        # attempt connects afresh, so its watchdog knows its socket).
        self.client = httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False,
                                   headers={"user-agent": USER_AGENT}, transport=transport,
                                   limits=httpx.Limits(max_keepalive_connections=0))
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight: dict[str, str] = {}  # message id -> endpoint id, queued in the pool or sending
        self.wake = threading.Event()  # set when a pooled send ends (its endpoint's next message may be due)
        self._pool = (ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="webhook-send")
                      if concurrency > 1 else None)

    def close(self) -> None:
        """Stop: the sends not started are dropped (never claimed: another pass sends them), the ones in flight
        end by their deadline."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no send is queued or in flight; False if some still are after ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout)

    def run_once(self) -> int:
        """Send the messages due now (up to ``batch_size``), each leased right before its send. Returns how many
        attempts were made (``concurrency`` 1) or handed to the pool (the pass does not wait for them)."""
        if self._pool is None:
            due = webhook_rows.due_messages(self.db, now=self.clock(), limit=self.batch_size)
            return sum(self._attempt(message_id) for message_id in due)
        with self._lock:
            busy = Counter(self._in_flight.values())
            room = self.batch_size - len(self._in_flight)
            in_flight = set(self._in_flight)
        if room <= 0:
            return 0
        candidates = webhook_rows.due_candidates(
            self.db, now=self.clock(), limit=room, skip_messages=in_flight,
            skip_webhooks=[webhook_id for webhook_id, count in busy.items() if count >= self.per_endpoint])
        handed = 0
        for message_id, webhook_id in candidates:
            if busy[webhook_id] >= self.per_endpoint:
                continue
            busy[webhook_id] += 1
            with self._lock:
                self._in_flight[message_id] = webhook_id
            try:
                future = self._pool.submit(self._pooled_attempt, message_id)
            except RuntimeError:  # closed meanwhile
                self._done(message_id)
                break
            future.add_done_callback(functools.partial(self._if_cancelled, message_id))
            handed += 1
        return handed

    def _pooled_attempt(self, message_id: str) -> bool:
        try:
            return self._attempt(message_id)
        except Exception as error:  # the pool's thread boundary: the message stays due (or leased) for a later pass
            if is_unavailable(error):
                logger.warning("webhook message %s: the database is unavailable (%s)", message_id,
                               type(error).__name__)
            else:
                logger.exception("webhook message %s: the attempt failed", message_id)
            return False
        finally:
            self._done(message_id)

    def _if_cancelled(self, message_id: str, future: Future[bool]) -> None:
        if future.cancelled():  # dropped by close() before it started
            self._done(message_id)

    def _done(self, message_id: str) -> None:
        with self._idle:
            self._in_flight.pop(message_id, None)
            if not self._in_flight:
                self._idle.notify_all()
        self.wake.set()

    def _attempt(self, message_id: str) -> bool:
        """Claim, send and record one message; False when another dispatcher had it first."""
        message = webhook_rows.claim(self.db, message_id, self.owner, now=self.clock(), lease_seconds=self.lease_seconds)
        if message is None:
            return False
        result = self.send(message)
        now = self.clock()
        next_attempt_at = None
        if not result.delivered:
            candidate = now + timedelta(seconds=self.backoff.delay(message.window_attempt))
            window_ends = message.retry_from + timedelta(seconds=self.settings.webhook_retry_window_seconds)
            if candidate <= window_ends:
                next_attempt_at = candidate
            elif now < window_ends:
                next_attempt_at = window_ends  # one last try at the end of the window
        outcome = webhook_rows.record_attempt(self.db, message, self.owner, result, now=now,
                                              next_attempt_at=next_attempt_at,
                                              disable_after=self.settings.webhook_disable_after_failures)
        if outcome is not None and outcome != "delivered":
            logger.info("webhook %s message %s (%s) attempt %d %s: %s", message.webhook_id, message.message_id,
                        message.event_type, message.attempt, outcome, result.error)
        return True

    def send(self, message: webhook_rows.Claimed) -> webhook_rows.AttemptResult:
        """One signed POST of the message; never raises (every failure is a failed attempt with its reason)."""
        try:
            target = check_url(message.url, allow_private=self.settings.webhook_allow_private_targets,
                               resolver=self.resolver)
        except TargetRefused as refused:
            return webhook_rows.AttemptResult(False, None, None, f"refused: {refused}"[:MAX_ERROR_CHARS])
        body = message.body.encode("utf-8")
        headers = signed_headers(message.secret, message.message_id, int(time.time()), body)
        started = time.perf_counter()
        watchdog = _Watchdog(self.deadline_seconds)
        try:
            request = pinned_request(self.client, target, body, headers)
            request.extensions = {**request.extensions, "trace": watchdog.trace}
            with watchdog:
                response = self.client.send(request, stream=True)  # the status line is the answer: no body read
                response.close()
        # A URL httpx cannot use (InvalidURL, a host IDNA refuses: ValueError) fails like an unreachable one.
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as error:
            latency = (time.perf_counter() - started) * 1000
            if watchdog.expired:
                return webhook_rows.AttemptResult(
                    False, None, latency, f"deadline exceeded: no answer within {self.deadline_seconds:g} s "
                    f"(webhook_timeout_seconds bounds the whole attempt; {type(error).__name__})"[:MAX_ERROR_CHARS])
            return webhook_rows.AttemptResult(False, None, latency,
                                              f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS])
        latency = (time.perf_counter() - started) * 1000
        if 200 <= response.status_code < 300:
            return webhook_rows.AttemptResult(True, response.status_code, latency, None)
        reason = f"HTTP {response.status_code} {response.reason_phrase}".strip()
        if response.is_redirect:
            reason += " (redirects are not followed: give the final URL)"
        return webhook_rows.AttemptResult(False, response.status_code, latency, reason[:MAX_ERROR_CHARS])


def run_forever(db: Database, settings: Settings, stop: threading.Event, dispatcher: Dispatcher | None = None) -> None:
    """Passes every ``webhook_dispatch_interval_seconds`` until ``stop`` is set; a busy pass goes on at once. A
    database outage is waited out (logged once per outage), anything else logged and retried."""
    dispatcher = dispatcher or Dispatcher(db, settings, concurrency=LOOP_CONCURRENCY)
    outage = False
    try:
        while not stop.is_set():
            try:
                sent = dispatcher.run_once()
                outage = False
            except Exception as error:  # the loop's process boundary: one bad pass must not end the dispatcher
                sent = 0
                if is_unavailable(error):
                    if not outage:
                        logger.warning("webhook dispatcher: the database is unavailable (%s); waiting",
                                       type(error).__name__)
                    outage = True
                else:
                    logger.exception("webhook dispatcher: a pass failed")
            if sent < dispatcher.batch_size:
                _pause(dispatcher, stop, settings.webhook_dispatch_interval_seconds)
    finally:
        dispatcher.close()


def _pause(dispatcher: Dispatcher, stop: threading.Event, seconds: float) -> None:
    """Wait up to ``seconds`` for the next pass: less when a pooled send ends (its endpoint's next message goes
    out at once, not a pass interval later) or when ``stop`` is set."""
    deadline = time.monotonic() + seconds
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if dispatcher.wake.wait(min(left, 0.1)):
            dispatcher.wake.clear()
            return


class DispatcherThread:
    """The dispatcher as a daemon thread of the API process; ``stop()`` ends it after the current pass."""

    def __init__(self, db: Database, settings: Settings, dispatcher: Dispatcher | None = None) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=run_forever, args=(db, settings, self._stop, dispatcher),
                                        name="webhook-dispatcher", daemon=True)

    def start(self) -> DispatcherThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the loop to end and wait up to ``timeout`` (a blocking join: async code runs it in a thread);
        True if it ended, False if it is still running (it uses the database: do not dispose of it then)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("webhook dispatcher: still sending after %.0f s; left to finish in the background", timeout)
            return False
        return True
