"""The outbox dispatcher: sends due webhook messages, signed, and schedules the retries.

One pass (:meth:`Dispatcher.run_once`) reads the due messages and leases each right before its send
(:func:`app.db.webhooks.claim`: a row lease by compare-and-set, so the API processes that each run a dispatcher
never send one message at once), checks each
URL again with the address guard (DNS can change; a refusal is a failed attempt with the reason), POSTs the
frozen body with the Standard Webhooks headers (``webhook-id`` = the message id on every attempt; a fresh
timestamp and signature per attempt), redirects not followed, within ``webhook_timeout_seconds``, and records
the outcome. A 2xx is delivered; anything else (another status, a timeout, a refused connection) is retried
with exponential backoff and full jitter until ``webhook_retry_window_seconds`` after the message was written,
then given up. ``webhook_disable_after_failures`` failed attempts in a row disable the endpoint.

A message is sent at least once and, unless a dispatcher dies between the receiver's answer and the record (or
the receiver answers after the timeout), exactly once: receivers deduplicate on ``webhook-id``.

:class:`DispatcherThread` runs passes every ``webhook_dispatch_interval_seconds`` in the API process (the
lifespan starts it when ``webhook_dispatcher`` is on); :func:`run_forever` is the same loop for a dedicated process.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import httpx

from app.db import webhooks as webhook_rows
from app.db.engine import Database, is_unavailable
from app.db.models import utcnow
from app.settings import Settings
from app.webhooks.signing import signed_headers
from app.webhooks.targets import Resolver, TargetRefused, check_url, pinned_request, resolve

logger = logging.getLogger(__name__)

USER_AGENT = "ctpd-webhooks/1"
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


class Dispatcher:
    """Sends due messages; ``run_once`` is one pass (tests call it directly, with their own clock)."""

    def __init__(self, db: Database, settings: Settings, *, owner: str | None = None, backoff: Backoff | None = None,
                 clock: Callable[[], datetime] = utcnow, resolver: Resolver = resolve, batch_size: int = 50,
                 concurrency: int = 4, transport: httpx.BaseTransport | None = None) -> None:
        self.db, self.settings = db, settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.backoff = backoff or Backoff()
        self.clock, self.resolver = clock, resolver
        self.batch_size, self.concurrency = batch_size, concurrency
        # A message is leased right before its send, so the lease only has to outlive one attempt (by a wide margin:
        # it exists to end a dead dispatcher's hold).
        self.lease_seconds = settings.webhook_timeout_seconds * 2 + 30
        # No redirects (a 3xx is a failure: a redirect could lead past the address guard), no proxies from the
        # environment (they would bypass it too), no cookies kept between endpoints.
        self.client = httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False,
                                   headers={"user-agent": USER_AGENT}, transport=transport)

    def close(self) -> None:
        self.client.close()

    def run_once(self) -> int:
        """Send the messages due now (up to ``batch_size``), each leased right before its send; returns how many
        attempts were made."""
        due = webhook_rows.due_messages(self.db, now=self.clock(), limit=self.batch_size)
        if self.concurrency <= 1 or len(due) <= 1:
            return sum(self._attempt(message_id) for message_id in due)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(due)), thread_name_prefix="webhook-send") as pool:
            return sum(pool.map(self._attempt, due))

    def _attempt(self, message_id: str) -> bool:
        """Claim, send and record one message; False when another dispatcher had it first."""
        message = webhook_rows.claim(self.db, message_id, self.owner, now=self.clock(), lease_seconds=self.lease_seconds)
        if message is None:
            return False
        result = self.send(message)
        now = self.clock()
        next_attempt_at = None
        if not result.delivered:
            candidate = now + timedelta(seconds=self.backoff.delay(message.attempt))
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
        try:
            request = pinned_request(self.client, target, body, headers)
            response = self.client.send(request, stream=True)  # the status line is the answer: the body is not read
            response.close()
        # A URL httpx cannot use (InvalidURL, a host IDNA refuses: ValueError) fails like an unreachable one.
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as error:
            latency = (time.perf_counter() - started) * 1000
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
    dispatcher = dispatcher or Dispatcher(db, settings)
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
                stop.wait(settings.webhook_dispatch_interval_seconds)
    finally:
        dispatcher.close()


class DispatcherThread:
    """The dispatcher as a daemon thread of the API process; ``stop()`` ends it after the current pass."""

    def __init__(self, db: Database, settings: Settings, dispatcher: Dispatcher | None = None) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=run_forever, args=(db, settings, self._stop, dispatcher),
                                        name="webhook-dispatcher", daemon=True)

    def start(self) -> DispatcherThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("webhook dispatcher: still sending after %.0f s; left to finish in the background", timeout)
