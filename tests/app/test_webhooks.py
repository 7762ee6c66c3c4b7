"""Webhooks on both backends: the API, the outbox written with every transition, and delivery to a real
receiver on loopback that verifies every signature with the Standard Webhooks library.

The dispatcher runs in the test (``run_once``) with a clock the test moves, so retries a day apart take no
time; the receiver is a real HTTP server and every request it gets is checked by ``standardwebhooks``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import standardwebhooks
from fastapi.testclient import TestClient
from sqlalchemy import update

from app import main as app_main
from app.db import events as job_log
from app.db import jobs as job_rows
from app.db import webhooks as webhook_rows
from app.db.engine import Database
from app.db.events import EventWrite, StaleAttempt
from app.db.models import WebhookDeliveryTotal, utcnow
from app.main import create_app
from app.settings import Settings
from app.webhooks import signing
from app.webhooks.dispatcher import Backoff, Dispatcher
from app.webhooks.targets import TargetRefused, check_url, pinned_request
from tests.app.conftest import REPO_ROOT, SPEC, _client_for
from tests.live_service import serving, wait_until
from tests.webhook_receiver import TricklingReceiver, WebhookReceiver

ALL_TYPES = ["job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled", "job.checkpoint",
             "job.evaluated"]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The conftest's, with local receivers allowed and no dispatcher thread (the tests run passes themselves)."""
    return settings.model_copy(update={"webhook_allow_private_targets": True, "webhook_dispatcher": False,
                                       "webhook_disable_after_failures": 50})


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


class Clock:
    """The dispatcher's clock: the real time plus what the test moved it on by (the signature's timestamp stays the
    real time, which the receiver's verifier checks)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)

    def jump_to(self, moment: datetime) -> None:
        self.offset = max(self.offset, moment - utcnow())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def dispatcher(db: Database, settings: Settings, clock: Clock) -> Iterator[Dispatcher]:
    sender = Dispatcher(db, settings, clock=clock, backoff=Backoff(base_seconds=10, cap_seconds=3600), concurrency=1)
    yield sender
    sender.close()


def subscribe(client, receiver: WebhookReceiver, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/webhooks", json={"url": receiver.url, **body})
    assert response.status_code == 201, response.text
    created = response.json()
    receiver.secret = created["secret"]
    return created


def new_job(db: Database, tenant: str = "acme", name: str | None = None) -> str:
    job, _ = job_rows.create_job(db, tenant=tenant, spec={"student": {"model": "s"}}, name=name,
                                 metadata={"team": "nlp"}, idempotency_key=None, request_hash="h", max_attempts=2)
    return job.id


def announced(db: Database, webhook_id: str, job_id: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(type, data) of the endpoint's messages, in the order they were written."""
    return [(message.event_type, json.loads(message.body)["data"]) for message in webhook_rows.list_messages(db, webhook_id)
            if job_id is None or message.job_id == job_id]


def drain(dispatcher: Dispatcher, clock: Clock, *, rounds: int = 40, step: float = 3600) -> None:
    """Passes until nothing is due, moving the clock past every retry."""
    for _ in range(rounds):
        dispatcher.run_once()
        clock.advance(step)


# ------------------------------------------------------------------------------------------------ signing


def test_signatures_verify_with_the_reference_library():
    secret = signing.new_secret()
    assert secret.startswith("whsec_") and len(signing._key(secret)) >= 24
    body = b'{"type":"job.queued","data":{"job_id":"job_1"}}'
    import time

    timestamp = int(time.time())
    headers = signing.signed_headers(secret, "msg_1", timestamp, body)
    assert headers["webhook-signature"].startswith("v1,")
    assert standardwebhooks.Webhook(secret).verify(body, headers)["type"] == "job.queued"
    # ... and the library refuses what it should: another body, another id, another secret.
    for tampered_body, tampered in ((body + b" ", headers), (body, {**headers, "webhook-id": "msg_2"})):
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(secret).verify(tampered_body, tampered)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(signing.new_secret()).verify(body, headers)


def test_a_body_is_strict_json():
    """JSON has no NaN or Infinity (receivers' parsers refuse the bare words): a non-finite number is null."""
    body = {"type": "job.evaluated", "data": {"metrics": {"margin": float("nan"), "loss": [float("inf"), 1.0]}}}
    assert json.loads(webhook_rows.encode_body(webhook_rows.finite_values(body)))["data"]["metrics"] == {
        "margin": None, "loss": [None, 1.0]}
    with pytest.raises(ValueError):
        webhook_rows.encode_body(body)


# ----------------------------------------------------------------------------------------------------- API


def test_create_list_get_patch_delete_and_tenant_scoping(alice, bob, receiver):
    created = subscribe(alice, receiver, description="ci notifier")
    webhook_id = created["id"]
    assert webhook_id.startswith("wh_") and created["object"] == "webhook"
    assert created["event_types"] == ALL_TYPES and created["enabled"] is True
    assert created["consecutive_failures"] == 0 and created["disabled_reason"] is None and created["disabled_at"] is None
    assert created["description"] == "ci notifier" and created["url"] == receiver.url

    shown = alice.get(f"/v1/webhooks/{webhook_id}").json()
    assert "secret" not in shown and shown == {key: value for key, value in created.items() if key != "secret"}
    listing = alice.get("/v1/webhooks").json()
    assert listing["object"] == "list" and listing["has_more"] is False
    assert [item["id"] for item in listing["data"]] == [webhook_id]
    assert all("secret" not in item for item in listing["data"])

    # Another tenant sees nothing of it.
    assert bob.get("/v1/webhooks").json()["data"] == []
    for response in (bob.get(f"/v1/webhooks/{webhook_id}"), bob.patch(f"/v1/webhooks/{webhook_id}", json={"enabled": False}),
                     bob.delete(f"/v1/webhooks/{webhook_id}"), bob.get(f"/v1/webhooks/{webhook_id}/deliveries"),
                     bob.post(f"/v1/webhooks/{webhook_id}/deliveries/msg_x/redeliver")):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"

    patched = alice.patch(f"/v1/webhooks/{webhook_id}", json={"event_types": ["job.succeeded", "job.failed"],
                                                              "description": None})
    assert patched.status_code == 200, patched.text
    assert patched.json()["event_types"] == ["job.succeeded", "job.failed"] and patched.json()["description"] is None
    disabled = alice.patch(f"/v1/webhooks/{webhook_id}", json={"enabled": False}).json()
    assert disabled["enabled"] is False and disabled["disabled_reason"] and disabled["disabled_at"]
    assert disabled["event_types"] == ["job.succeeded", "job.failed"]  # what was not given did not change
    enabled = alice.patch(f"/v1/webhooks/{webhook_id}", json={"enabled": True}).json()
    assert enabled["enabled"] is True and enabled["disabled_reason"] is None and enabled["disabled_at"] is None

    assert alice.delete(f"/v1/webhooks/{webhook_id}").status_code == 204
    assert alice.get(f"/v1/webhooks/{webhook_id}").status_code == 404
    assert alice.delete(f"/v1/webhooks/{webhook_id}").status_code == 404


@pytest.mark.parametrize("body, param", [
    ({"url": "ftp://example.com/hook"}, "url"),
    ({"url": "http:///nohost"}, "url"),
    ({"url": "https://example.com/", "event_types": []}, "event_types"),
    ({"url": "https://example.com/", "event_types": ["job.exploded"]}, "event_types[0]"),
    ({"url": "https://example.com/", "secret": "mine"}, "secret"),
    ({"url": "https://exa\u0000mple.com/"}, "url"),
])
def test_invalid_bodies_are_422s_naming_the_field(alice, body, param):
    response = alice.post("/v1/webhooks", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param, response.text
    assert alice.get("/v1/webhooks").json()["data"] == []  # nothing stored


REFUSED = ["http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.0.0.1/hook", "http://192.168.1.1/",
           "http://169.254.169.254/latest/meta-data", "http://[::1]:9000/", "http://[::ffff:127.0.0.1]/",
           "http://[fe80::1]/", "http://[fd12:3456::1]/", "http://0.0.0.0/", "http://2130706433/"]


@pytest.fixture
def guarded(settings: Settings, queue, db: Database):
    """An app of a deployment that does not allow private targets (the default)."""
    application = create_app(settings.model_copy(update={"webhook_allow_private_targets": False}), queue=queue)
    yield _client_for(application, db, "acme")
    application.state.db.dispose()


@pytest.mark.parametrize("url", REFUSED)
def test_the_address_guard_refuses_internal_targets(guarded, url):
    response = guarded.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "url"
    assert "CTPD_WEBHOOK_ALLOW_PRIVATE_TARGETS" in error["message"] and "not a public address" in error["message"]
    assert guarded.get("/v1/webhooks").json()["data"] == []


def test_the_address_guard_checks_a_patched_url_and_allows_private_targets_when_the_deployment_does(
        guarded, alice, receiver):
    # A public literal address passes the guard (nothing is sent at creation).
    public = guarded.post("/v1/webhooks", json={"url": "https://8.8.8.8/hook"})
    assert public.status_code == 201, public.text
    refused = guarded.patch(f"/v1/webhooks/{public.json()['id']}", json={"url": "http://169.254.169.254/"})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "url"
    assert guarded.get(f"/v1/webhooks/{public.json()['id']}").json()["url"] == "https://8.8.8.8/hook"
    # The same tenant on a deployment that allows private targets (the fixture's settings).
    for url in REFUSED[:7]:
        assert alice.post("/v1/webhooks", json={"url": url}).status_code == 201, url


def test_the_guard_in_detail():
    def resolver(addresses):
        return lambda host, port: addresses

    # A name is refused when any of its addresses is internal (a public and a private A record alike).
    with pytest.raises(TargetRefused, match="private"):
        check_url("https://hooks.example.com/", allow_private=False, resolver=resolver(["8.8.8.8", "10.1.2.3"]))
    with pytest.raises(TargetRefused, match="does not resolve"):
        check_url("https://nowhere.invalid/", allow_private=False)
    target = check_url("https://hooks.example.com:8443/in?x=1", allow_private=False, resolver=resolver(["8.8.4.4"]))
    assert target.addresses == ("8.8.4.4",) and target.port == 8443
    # The delivery connects to the address that passed, naming the host as written (Host, TLS SNI).
    with httpx.Client() as client:
        request = pinned_request(client, target, b"{}", {"webhook-id": "msg_1"})
    assert request.url.host == "8.8.4.4" and request.url.port == 8443 and request.url.query == b"x=1"
    assert request.headers["host"] == "hooks.example.com:8443" and request.extensions["sni_hostname"] == "hooks.example.com"


# --------------------------------------------------------------------------------------------- the outbox


def test_every_transition_path_writes_its_message_in_the_same_transaction(db: Database, alice, bob, receiver, queue):
    """API create and cancel, claim, finish succeeded / failed / cancelled, hand-back, reaper requeue and
    worker_lost, a lost cancelling worker; checkpoints and evaluation; a stale attempt's refused write."""
    webhook_id = subscribe(alice, receiver)["id"]
    only_done = subscribe(alice, receiver, event_types=["job.succeeded"])["id"]
    other_tenant = subscribe(bob, receiver)["id"]

    # API: create (job.queued), then cancel while queued (job.cancelled).
    created = alice.post("/v1/jobs", json=SPEC).json()
    assert alice.post(f"/v1/jobs/{created['id']}/cancel").json()["status"] == "cancelled"
    assert [(kind, data["status"], data.get("reason")) for kind, data in announced(db, webhook_id, created["id"])] == [
        ("job.queued", "queued", "created"), ("job.cancelled", "cancelled", None)]

    # A run: claim, checkpoints, evaluation, success.
    job_id = new_job(db, name="the run")
    job_rows.claim_job(db, job_id, "w1", lease_seconds=60)
    job_log.record_attempt_writes(db, job_id, 1, [
        EventWrite("stage_started", "distill started", stage="distill"),  # not announced
        EventWrite("checkpoint_saved", "ckpt", stage="contrastive",
                   data={"stage": "contrastive:positive", "step": 2, "path": "/x"}),
        EventWrite("stage_finished", "evaluate finished", stage="evaluate",
                   data={"seconds": 1.0, "cached": False, "summary": {"pair_accuracy": 0.75, "margin": 1.5}}),
        EventWrite("stage_finished", "distill finished", stage="distill", data={"summary": {"loss": 0.1}}),  # not announced
    ])
    assert job_rows.finish_job(db, job_id, "w1", "succeeded", attempt=1) == "succeeded"
    run = announced(db, webhook_id, job_id)
    assert [kind for kind, _ in run] == ["job.queued", "job.running", "job.checkpoint", "job.evaluated", "job.succeeded"]
    assert all(data["job_id"] == job_id and data["name"] == "the run" and data["metadata"] == {"team": "nlp"}
               for _, data in run)
    assert [data["attempt"] for _, data in run] == [0, 1, 1, 1, 1]
    assert run[2][1]["stage"] == "contrastive:positive" and run[2][1]["step"] == 2 and "path" not in run[2][1]
    assert run[3][1]["metrics"] == {"pair_accuracy": 0.75, "margin": 1.5}
    assert run[4][1]["status"] == "succeeded"
    assert [kind for kind, _ in announced(db, only_done, job_id)] == ["job.succeeded"]

    # Failure with its error; a cancel that the attempt finished before it saw.
    failed = new_job(db)
    job_rows.claim_job(db, failed, "w1", lease_seconds=60)
    job_rows.finish_job(db, failed, "w1", "failed", error_code="invalid_dataset", error_message="row 3: no prompt",
                        error_kind="user", attempt=1)
    assert announced(db, webhook_id, failed)[-1] == ("job.failed", {
        "job_id": failed, "status": "failed", "attempt": 1, "name": None, "metadata": {"team": "nlp"},
        "error": {"code": "invalid_dataset", "message": "row 3: no prompt", "kind": "user"}})
    raced = new_job(db)
    job_rows.claim_job(db, raced, "w1", lease_seconds=60)
    job_rows.request_cancel(db, raced, "acme")  # cancelling: announced by nothing
    job_rows.finish_job(db, raced, "w1", "succeeded", attempt=1)
    assert [(kind, data.get("reported")) for kind, data in announced(db, webhook_id, raced)] == [
        ("job.queued", None), ("job.running", None), ("job.cancelled", "succeeded")]

    # Hand-back on SIGTERM, then the reaper: requeue, then worker_lost (max_attempts=2).
    lost = new_job(db)
    job_rows.claim_job(db, lost, "w1", lease_seconds=60)
    assert job_rows.release_job(db, lost, "w1", 1, "SIGTERM") == "queued"
    job_rows.claim_job(db, lost, "w2", lease_seconds=1)
    later = utcnow() + timedelta(hours=1)
    assert job_rows.reap_stale_jobs(db, now=later) == [lost]
    job_rows.claim_job(db, lost, "w3", lease_seconds=1)
    assert job_rows.reap_stale_jobs(db, now=later + timedelta(hours=1)) == []
    assert [(kind, data["attempt"], data.get("reason")) for kind, data in announced(db, webhook_id, lost)] == [
        ("job.queued", 0, "created"), ("job.running", 1, None), ("job.queued", 1, "handed_back"),
        ("job.running", 2, None), ("job.queued", 2, "requeued"), ("job.running", 3, None), ("job.failed", 3, None)]
    assert announced(db, webhook_id, lost)[-1][1]["error"]["code"] == "worker_lost"

    # A cancelling job whose worker is lost, and one handed back while cancelling: both end cancelled.
    for end in ("reap", "release"):
        cancelled = new_job(db)
        job_rows.claim_job(db, cancelled, "w1", lease_seconds=1)
        job_rows.request_cancel(db, cancelled, "acme")
        if end == "reap":
            job_rows.reap_stale_jobs(db, now=utcnow() + timedelta(hours=1))
        else:
            assert job_rows.release_job(db, cancelled, "w1", 1, "SIGTERM") == "cancelled"
        assert [kind for kind, _ in announced(db, webhook_id, cancelled)][-1] == "job.cancelled"

    # A write refused by the fence announces nothing: the message is in the transaction that was refused.
    stale = new_job(db)
    job_rows.claim_job(db, stale, "w1", lease_seconds=60)
    before = announced(db, webhook_id, stale)
    with pytest.raises(StaleAttempt):
        job_log.record_attempt_writes(db, stale, 7, [EventWrite("checkpoint_saved", "late", data={"step": 1})])
    assert announced(db, webhook_id, stale) == before

    # Every event announced once per endpoint: no (endpoint, event) pair twice; the other tenant got nothing.
    messages = webhook_rows.list_messages(db, webhook_id)
    assert len({message.event_id for message in messages}) == len(messages)
    assert len({message.id for message in messages}) == len(messages)
    assert webhook_rows.list_messages(db, other_tenant) == []


def test_no_code_writes_events_past_the_outbox_listener():
    """The listener sees ORM inserts of JobEvent (every event comes from app.db.events.new_event); a Core bulk insert
    into job_events would write a transition that no webhook announces."""
    from pathlib import Path

    offenders = [f"{path}: {line.strip()}" for package in ("app", "worker", "ctpd_cli")
                 for path in sorted((Path(REPO_ROOT) / package).rglob("*.py"))
                 for line in path.read_text().splitlines()
                 if "insert(JobEvent" in line or "JobEvent.__table__" in line or "insert(job_events" in line.lower()]
    assert offenders == []


def test_a_disabled_or_unsubscribed_endpoint_gets_no_messages(db: Database, alice, receiver):
    webhook_id = subscribe(alice, receiver, event_types=["job.running"])["id"]
    job_id = new_job(db)
    assert announced(db, webhook_id) == []  # job.queued is not subscribed
    alice.patch(f"/v1/webhooks/{webhook_id}", json={"enabled": False})
    job_rows.claim_job(db, job_id, "w1", lease_seconds=60)
    assert announced(db, webhook_id) == []


# --------------------------------------------------------------------------------------------- delivery


def test_a_failing_receiver_still_gets_each_event_exactly_once_in_effect(db: Database, alice, dispatcher, clock):
    with WebhookReceiver(fail_first=5) as receiver:
        webhook_id = subscribe(alice, receiver)["id"]
        job_id = new_job(db)
        job_rows.claim_job(db, job_id, "w1", lease_seconds=60)
        job_rows.finish_job(db, job_id, "w1", "succeeded", attempt=1)

        drain(dispatcher, clock)
        assert receiver.unverified() == []
        delivered = receiver.delivered()
        # Each event once (retries are jittered, so not necessarily in order: receivers order by the timestamp).
        assert sorted(request.type for request in delivered) == ["job.queued", "job.running", "job.succeeded"]
        assert len({request.message_id for request in delivered}) == 3  # distinct transitions: distinct ids
        requests = receiver.received()
        assert len(requests) == 8  # 5 refused + 3 delivered
        messages = {message.id: message for message in webhook_rows.list_messages(db, webhook_id)}
        for request in requests:  # every retry carries its message's id and the byte-identical frozen body
            assert request.body == messages[request.message_id].body.encode()
        assert {message.status for message in messages.values()} == {"delivered"}

        log = alice.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": 100}).json()["data"]
        assert len(log) == 8 and [entry["id"] for entry in log] == sorted((entry["id"] for entry in log), reverse=True)
        by_message: dict[str, list[dict]] = {}
        for entry in reversed(log):
            by_message.setdefault(entry["message_id"], []).append(entry)
        for entries in by_message.values():
            assert [entry["attempt"] for entry in entries] == list(range(1, len(entries) + 1))
            assert [entry["outcome"] for entry in entries] == ["failed"] * (len(entries) - 1) + ["delivered"]
            assert all(entry["status_code"] == 503 and entry["next_attempt_at"] for entry in entries[:-1])
            assert entries[-1]["status_code"] == 204 and entries[-1]["next_attempt_at"] is None
            assert all(entry["latency_ms"] is not None and entry["latency_ms"] >= 0 for entry in entries)
            assert entries[-1]["event_type"] == json.loads(messages[entries[-1]["message_id"]].body)["type"]
            assert entries[-1]["job_id"] == job_id
        assert alice.get(f"/v1/webhooks/{webhook_id}").json()["consecutive_failures"] == 0  # the run ended
        assert webhook_rows.delivery_outcome_counts(db) == {"delivered": 3, "failed": 5, "gave_up": 0,
                                                            "endpoint_disabled": 0}


def test_retries_back_off_with_jitter_then_give_up_after_the_window(db: Database, alice, settings: Settings, clock):
    window = 24 * 3600.0
    sender = Dispatcher(db, settings.model_copy(update={"webhook_retry_window_seconds": window}), clock=clock,
                        backoff=Backoff(base_seconds=30, cap_seconds=4 * 3600), concurrency=1)
    with WebhookReceiver(fail_all=True) as receiver:
        webhook_id = subscribe(alice, receiver, event_types=["job.queued"])["id"]
        new_job(db)
        written = webhook_rows.list_messages(db, webhook_id)[0].created_at
        gaps = []
        for _ in range(200):
            if not sender.run_once():
                (message,) = webhook_rows.list_messages(db, webhook_id)
                if message.next_attempt_at is None:
                    break
                gaps.append((message.next_attempt_at - clock()).total_seconds())
                clock.jump_to(message.next_attempt_at)
        sender.close()
        (message,) = webhook_rows.list_messages(db, webhook_id)
        assert message.status == "gave_up"
        log = alice.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": 100}).json()["data"]
        assert log[0]["outcome"] == "gave_up" and log[0]["next_attempt_at"] is None
        assert {entry["outcome"] for entry in log[1:]} == {"failed"}
        # Retried for the whole window (the last attempt at its end), growing delays, and jittered.
        last = datetime.fromisoformat(log[0]["attempted_at"].replace("Z", "+00:00"))
        assert window - 60 <= (last - written).total_seconds() <= window + 60
        assert 10 <= len(log) <= 40 and gaps[0] <= 30 and max(gaps) <= 4 * 3600
        assert gaps[5] > gaps[0] * 4
        assert len({round(gap, 3) for gap in gaps}) == len(gaps)
        assert len(receiver.received()) == len(log) and receiver.unverified() == []


def test_a_dispatcher_that_dies_after_the_commit_loses_nothing(db: Database, alice, settings: Settings, receiver, clock):
    webhook_id = subscribe(alice, receiver, event_types=["job.queued"])["id"]
    new_job(db)  # committed: the message is in the outbox
    # A dispatcher leases it and dies before sending (or while sending): nothing is recorded.
    (doomed,) = webhook_rows.claim_due(db, "doomed", now=clock(), lease_seconds=60, limit=10)
    assert doomed.attempt == 1
    # Another dispatcher does not take a leased message ...
    rescuer = Dispatcher(db, settings, clock=clock, concurrency=1)
    assert rescuer.run_once() == 0 and receiver.received() == []
    # ... until the lease runs out.
    clock.advance(61)
    assert rescuer.run_once() == 1
    rescuer.close()
    (request,) = receiver.delivered()
    assert request.message_id == doomed.message_id and request.verified
    (entry,) = alice.get(f"/v1/webhooks/{webhook_id}/deliveries").json()["data"]
    assert entry["attempt"] == 2 and entry["outcome"] == "delivered"  # the dead attempt counts
    # The dead dispatcher, had it come back, records nothing over the one that holds the message now.
    late = webhook_rows.record_attempt(db, doomed, "doomed", webhook_rows.AttemptResult(False, None, None, "late"),
                                       now=clock(), next_attempt_at=clock(), disable_after=50)
    assert late is None and webhook_rows.list_messages(db, webhook_id)[0].status == "delivered"


DISPATCH_ONCE = """
import sys
from app.db.engine import Database
from app.settings import Settings
from app.webhooks.dispatcher import Dispatcher

settings = Settings(database_url=sys.argv[1], broker_url="memory://", webhook_allow_private_targets=True,
                    webhook_timeout_seconds=60)
Dispatcher(Database(sys.argv[1]), settings, concurrency=1).run_once()
"""


def test_a_dispatcher_process_killed_mid_send_loses_nothing(db: Database, alice, settings: Settings, clock, tmp_path):
    """A real dispatcher process leases the committed message and is SIGKILLed while the receiver holds its
    request; a new dispatcher sends the same message (same webhook-id, same body) once the lease runs out."""
    with WebhookReceiver(stall_first=1) as receiver:
        webhook_id = subscribe(alice, receiver, event_types=["job.queued"])["id"]
        new_job(db)
        doomed = subprocess.Popen([sys.executable, "-c", DISPATCH_ONCE, settings.database_url], cwd=REPO_ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: receiver.received() or doomed.poll() is not None, 60, "the doomed dispatcher's request")
            assert doomed.poll() is None, doomed.stderr.read().decode() if doomed.stderr else ""
        finally:
            doomed.kill()
            doomed.wait(30)
        rescuer = Dispatcher(db, settings, clock=clock, concurrency=1)
        assert rescuer.run_once() == 0  # still leased by the dead process
        clock.advance(60 * 2 + 30 + 1)  # its lease: twice its timeout plus 30 s
        assert rescuer.run_once() == 1
        rescuer.close()
        stalled, delivered = receiver.received()
        assert stalled.answered is None and delivered.answered == 204
        assert stalled.message_id == delivered.message_id and stalled.body == delivered.body
        assert stalled.verified and delivered.verified
        (entry,) = alice.get(f"/v1/webhooks/{webhook_id}/deliveries").json()["data"]
        assert entry["attempt"] == 2 and entry["outcome"] == "delivered"


def test_concurrent_dispatchers_never_send_one_message_twice(db: Database, alice, settings: Settings, receiver):
    subscribe(alice, receiver, event_types=["job.queued"])
    for _ in range(12):
        new_job(db)
    barrier = threading.Barrier(3)
    senders = [Dispatcher(db, settings, concurrency=2) for _ in range(3)]

    def run(sender: Dispatcher) -> None:  # passes until nothing is due (each hands its sends to its pool)
        barrier.wait()
        for _ in range(20):
            sender.run_once()
            sender.wait_idle(30)

    threads = [threading.Thread(target=run, args=(sender,)) for sender in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for sender in senders:
        sender.close()
    ids = [request.message_id for request in receiver.received()]
    assert len(ids) == 12 and len(set(ids)) == 12 and receiver.unverified() == []


def test_an_endpoint_is_disabled_after_a_run_of_failures_and_enabling_it_resumes(db: Database, alice, settings,
                                                                                clock):
    sender = Dispatcher(db, settings.model_copy(update={"webhook_disable_after_failures": 3}), clock=clock,
                        backoff=Backoff(base_seconds=10, cap_seconds=60), concurrency=1)
    with WebhookReceiver(fail_all=True) as receiver:
        webhook_id = subscribe(alice, receiver, event_types=["job.queued", "job.running"])["id"]
        job_id = new_job(db)
        for _ in range(10):
            sender.run_once()
            clock.advance(120)
        shown = alice.get(f"/v1/webhooks/{webhook_id}").json()
        assert shown["enabled"] is False and shown["consecutive_failures"] == 3 and shown["disabled_at"]
        assert "3 consecutive failed" in shown["disabled_reason"] and "PATCH" in shown["disabled_reason"]
        assert len(receiver.received()) == 3  # nothing is sent to a disabled endpoint
        log = alice.get(f"/v1/webhooks/{webhook_id}/deliveries").json()["data"]
        assert log[0]["outcome"] == "endpoint_disabled" and "3 consecutive" in log[0]["error"]
        assert [entry["outcome"] for entry in log[1:]] == ["failed"] * 3
        # A disabled endpoint is told of nothing new, and cannot be redelivered to.
        job_rows.claim_job(db, job_id, "w1", lease_seconds=60)
        assert [kind for kind, _ in announced(db, webhook_id)] == ["job.queued"]
        conflict = alice.post(f"/v1/webhooks/{webhook_id}/deliveries/{log[0]['message_id']}/redeliver")
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "webhook_disabled"

        receiver.fail_all = False  # the tenant fixes the receiver and enables the endpoint
        enabled = alice.patch(f"/v1/webhooks/{webhook_id}", json={"enabled": True}).json()
        assert enabled["enabled"] and enabled["consecutive_failures"] == 0 and enabled["disabled_reason"] is None
        drain(sender, clock, step=120)
        sender.close()
        assert [request.type for request in receiver.delivered()] == ["job.queued"]  # the pending one went out
        assert webhook_rows.delivery_outcome_counts(db)["endpoint_disabled"] == 1


def test_redelivery_sends_the_same_message_again(db: Database, alice, dispatcher, clock, receiver):
    webhook_id = subscribe(alice, receiver, event_types=["job.queued"])["id"]
    new_job(db)
    dispatcher.run_once()
    (first,) = receiver.delivered()
    response = alice.post(f"/v1/webhooks/{webhook_id}/deliveries/{first.message_id}/redeliver")
    assert response.status_code == 202, response.text
    assert response.json() == {"object": "webhook.redelivery", "webhook_id": webhook_id, "message_id": first.message_id}
    dispatcher.run_once()
    again = receiver.delivered()[1]
    assert again.message_id == first.message_id and again.body == first.body and again.verified
    log = alice.get(f"/v1/webhooks/{webhook_id}/deliveries").json()["data"]
    assert [(entry["attempt"], entry["outcome"]) for entry in log] == [(2, "delivered"), (1, "delivered")]
    missing = alice.post(f"/v1/webhooks/{webhook_id}/deliveries/msg_nope/redeliver")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "message_id"


def test_the_deliveries_log_pages_newest_first(db: Database, alice, dispatcher, receiver):
    webhook_id = subscribe(alice, receiver, event_types=["job.queued"])["id"]
    for _ in range(5):
        new_job(db)
    dispatcher.run_once()
    first = alice.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": 2}).json()
    assert first["has_more"] is True and len(first["data"]) == 2
    seen = [entry["id"] for entry in first["data"]]
    after = seen[-1]
    while True:
        page = alice.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": 2, "after": after}).json()
        seen += [entry["id"] for entry in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert len(seen) == 5 and seen == sorted(seen, reverse=True)
    assert alice.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": 0}).status_code == 422


def test_a_delivery_to_an_address_the_guard_now_refuses_is_a_failed_attempt(db: Database, alice, settings, clock,
                                                                           receiver):
    webhook_id = subscribe(alice, receiver, event_types=["job.queued"])["id"]  # allowed when it was created
    new_job(db)
    strict = Dispatcher(db, settings.model_copy(update={"webhook_allow_private_targets": False}), clock=clock)
    strict.run_once()
    assert strict.wait_idle(30)
    strict.close()
    assert receiver.received() == []
    (entry,) = alice.get(f"/v1/webhooks/{webhook_id}/deliveries").json()["data"]
    assert entry["outcome"] == "failed" and entry["status_code"] is None and entry["next_attempt_at"]
    assert entry["error"].startswith("refused:") and "loopback" in entry["error"]


def test_redirects_are_not_followed(db: Database, alice, dispatcher, receiver):
    receiver.fail_all, receiver.fail_status = True, 307
    webhook_id = subscribe(alice, receiver, event_types=["job.queued"])["id"]
    new_job(db)
    dispatcher.run_once()
    assert len(receiver.received()) == 1
    (entry,) = alice.get(f"/v1/webhooks/{webhook_id}/deliveries").json()["data"]
    assert entry["status_code"] == 307 and entry["outcome"] == "failed" and "redirects are not followed" in entry["error"]


def test_the_api_process_runs_the_dispatcher(settings: Settings, queue, db: Database, receiver):
    """create_app's lifespan starts the dispatcher thread (webhook_dispatcher on) and stops it with the app."""
    app = create_app(settings.model_copy(update={"webhook_dispatcher": True, "webhook_dispatch_interval_seconds": 0.1}),
                     queue=queue)
    key = _client_for(app, db, "acme").api_key  # type: ignore[attr-defined]
    with serving(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        created = client.post("/v1/webhooks", json={"url": receiver.url}).json()
        receiver.secret = created["secret"]
        job = client.post("/v1/jobs", json=SPEC).json()
        client.post(f"/v1/jobs/{job['id']}/cancel")
        wait_until(lambda: len(receiver.delivered()) == 2, 20, "the dispatcher thread's deliveries")
    assert [request.type for request in receiver.delivered()] == ["job.queued", "job.cancelled"]
    assert receiver.unverified() == []
    app.state.db.dispose()


# ------------------------------------------------------------------------- slow receivers, redelivery, counts


def _log(alice, webhook_id: str) -> list[dict[str, Any]]:
    return alice.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": 100}).json()["data"]


def test_a_trickling_receiver_is_cut_off_at_the_deadline_while_other_endpoints_are_delivered(
        db: Database, alice, settings: Settings, clock, receiver):
    """The receiver answers a byte every 0.2 s (every per-read timeout passes): the attempt still ends at the
    2 s deadline as a failure, the pass does not wait for it, and the other endpoint's messages go out meanwhile."""
    deadline = 2.0
    with TricklingReceiver(interval=0.2, for_seconds=20) as slow:
        slow_id = alice.post("/v1/webhooks", json={"url": slow.url, "event_types": ["job.queued"]}).json()["id"]
        fast_id = subscribe(alice, receiver, event_types=["job.queued"])["id"]
        sender = Dispatcher(db, settings.model_copy(update={"webhook_timeout_seconds": deadline}), clock=clock,
                            concurrency=4, per_endpoint=1)
        try:
            new_job(db)  # a message to each endpoint
            began = time.monotonic()
            assert sender.run_once() == 2
            assert time.monotonic() - began < 1.0  # the pass hands its sends over and returns
            receiver.wait_for(lambda r: len(r.delivered()) == 1, 1.5, "the fast endpoint's delivery")
            wait_until(lambda: slow.hang_ups, 5, "the slow endpoint's request")
            # The slow send is still trickling; a new job's messages: the slow endpoint is at its bound, so only
            # the fast endpoint's is handed over, and delivered while the slow one is still in flight.
            new_job(db)
            assert sender.run_once() == 1
            receiver.wait_for(lambda r: len(r.delivered()) == 2, 1.5, "the second delivery beside the slow send")
            assert slow.hang_ups == [None] and time.monotonic() - began < deadline
            assert sender.wait_idle(deadline + 3)
            elapsed = time.monotonic() - began
        finally:
            sender.close()
        assert elapsed < deadline + 3
        # The connection was closed at the deadline (the receiver notices at its next byte or the one after).
        wait_until(lambda: slow.hang_ups[0] is not None, 3, "the sender to hang up")
        assert slow.hang_ups[0] < deadline + 1
    (entry,) = _log(alice, slow_id)
    assert entry["outcome"] == "failed" and entry["status_code"] is None and entry["next_attempt_at"]
    assert entry["error"].startswith("deadline exceeded") and deadline * 1000 * 0.9 <= entry["latency_ms"] < 5000
    (message, _second) = webhook_rows.list_messages(db, slow_id)
    assert message.status == "pending" and message.lease_owner is None  # retried later, by any dispatcher
    assert [entry["outcome"] for entry in _log(alice, fast_id)] == ["delivered", "delivered"]


def test_an_inline_pass_ends_a_trickling_attempt_at_its_deadline(db: Database, alice, settings: Settings, clock):
    with TricklingReceiver(interval=0.2, for_seconds=20) as slow:
        slow_id = alice.post("/v1/webhooks", json={"url": slow.url, "event_types": ["job.queued"]}).json()["id"]
        sender = Dispatcher(db, settings.model_copy(update={"webhook_timeout_seconds": 1.5}), clock=clock,
                            concurrency=1)
        new_job(db)
        began = time.monotonic()
        assert sender.run_once() == 1
        assert time.monotonic() - began < 1.5 + 2
        sender.close()
    (entry,) = _log(alice, slow_id)
    assert entry["outcome"] == "failed" and entry["error"].startswith("deadline exceeded")


def test_a_redelivery_asked_for_during_an_attempt_goes_out_after_it(db: Database, alice, dispatcher, clock, receiver):
    """The attempt in flight fails and records a retry hours away; the redelivery asked for meanwhile is kept
    (pending, due now) and sent by the next pass. A delivered attempt does not swallow one either."""
    webhook_id = subscribe(alice, receiver, event_types=["job.queued"])["id"]
    new_job(db)
    (claimed,) = webhook_rows.claim_due(db, dispatcher.owner, now=clock(), lease_seconds=60, limit=10)
    response = alice.post(f"/v1/webhooks/{webhook_id}/deliveries/{claimed.message_id}/redeliver")
    assert response.status_code == 202, response.text
    failed = webhook_rows.AttemptResult(False, 503, 5.0, "HTTP 503")
    assert webhook_rows.record_attempt(db, claimed, dispatcher.owner, failed, now=clock(),
                                       next_attempt_at=clock() + timedelta(hours=4), disable_after=50) == "failed"
    (message,) = webhook_rows.list_messages(db, webhook_id)
    assert message.status == "pending" and message.lease_owner is None and message.next_attempt_at <= clock()
    assert dispatcher.run_once() == 1
    (delivered,) = receiver.delivered()
    assert delivered.message_id == claimed.message_id
    assert [(entry["attempt"], entry["outcome"]) for entry in _log(alice, webhook_id)] == [(2, "delivered"),
                                                                                          (1, "failed")]
    assert webhook_rows.redeliver(db, webhook_id, claimed.message_id)
    (claimed,) = webhook_rows.claim_due(db, dispatcher.owner, now=clock(), lease_seconds=60, limit=10)
    assert webhook_rows.redeliver(db, webhook_id, claimed.message_id)
    ok = webhook_rows.AttemptResult(True, 204, 5.0, None)
    assert webhook_rows.record_attempt(db, claimed, dispatcher.owner, ok, now=clock(), next_attempt_at=None,
                                       disable_after=50) == "delivered"
    (message,) = webhook_rows.list_messages(db, webhook_id)
    assert message.status == "pending" and message.next_attempt_at is not None and message.lease_owner is None


def test_after_a_redelivery_the_backoff_starts_again(db: Database, alice, settings: Settings, clock):
    sender = Dispatcher(db, settings, clock=clock, backoff=Backoff(base_seconds=30, cap_seconds=4 * 3600),
                        concurrency=1)
    with WebhookReceiver(fail_all=True) as receiver:
        webhook_id = subscribe(alice, receiver, event_types=["job.queued"])["id"]
        new_job(db)
        for _ in range(8):
            assert sender.run_once() == 1
            (message,) = webhook_rows.list_messages(db, webhook_id)
            clock.jump_to(message.next_attempt_at)
        assert (message.next_attempt_at - message.created_at).total_seconds() > 3600  # well into the backoff
        response = alice.post(f"/v1/webhooks/{webhook_id}/deliveries/{message.id}/redeliver")
        assert response.status_code == 202
        assert sender.run_once() == 1
        sender.close()
        (message,) = webhook_rows.list_messages(db, webhook_id)
        assert message.attempts == 9 and message.attempts_before_window == 8
        assert 15 - 1 <= (message.next_attempt_at - clock()).total_seconds() <= 30  # a new window's first retry


def test_job_evaluated_is_announced_once_per_job_and_endpoint(db: Database, alice, receiver):
    """A hand-back during export re-runs the evaluate stage (its result cached): its second stage_finished is not
    announced again."""
    webhook_id = subscribe(alice, receiver)["id"]
    evaluated_only = subscribe(alice, receiver, event_types=["job.evaluated"])["id"]
    job_id = new_job(db)
    evaluate = EventWrite("stage_finished", "evaluate finished", stage="evaluate",
                          data={"seconds": 1.0, "cached": False, "summary": {"pair_accuracy": 0.75}})
    job_rows.claim_job(db, job_id, "w1", lease_seconds=60)
    job_log.record_attempt_writes(db, job_id, 1, [evaluate])
    assert job_rows.release_job(db, job_id, "w1", 1, "SIGTERM") == "queued"
    job_rows.claim_job(db, job_id, "w2", lease_seconds=60)
    job_log.record_attempt_writes(db, job_id, 2, [EventWrite(
        "stage_finished", "evaluate finished", stage="evaluate",
        data={"seconds": 0.0, "cached": True, "summary": {"pair_accuracy": 0.75}})])
    kinds = [kind for kind, _ in announced(db, webhook_id, job_id)]
    assert kinds == ["job.queued", "job.running", "job.evaluated", "job.queued", "job.running"]
    assert [kind for kind, _ in announced(db, evaluated_only, job_id)] == ["job.evaluated"]
    other = new_job(db)  # another job's evaluation is its own news
    job_rows.claim_job(db, other, "w1", lease_seconds=60)
    job_log.record_attempt_writes(db, other, 1, [evaluate])
    assert [kind for kind, _ in announced(db, evaluated_only, other)] == ["job.evaluated"]


@pytest.fixture
def zeroed_totals(db: Database) -> Iterator[None]:
    """The deleted endpoints' counts back to 0 afterwards (the PostgreSQL test database is truncated per test,
    but not this table: other tests read the counter too)."""
    yield
    with db.write() as session:
        session.execute(update(WebhookDeliveryTotal).values(count=0))


@pytest.mark.usefixtures("zeroed_totals")
def test_the_delivery_counter_never_goes_down_when_a_webhook_is_deleted(db: Database, alice, dispatcher, clock):
    with WebhookReceiver(fail_first=2) as receiver, WebhookReceiver() as other:
        doomed = subscribe(alice, receiver, event_types=["job.queued"])["id"]
        kept = subscribe(alice, other, event_types=["job.queued"])["id"]
        new_job(db)
        drain(dispatcher, clock, rounds=5)
        before = webhook_rows.delivery_outcome_counts(db)
        assert before == {"delivered": 2, "failed": 2, "gave_up": 0, "endpoint_disabled": 0}  # the doomed one's 3
        assert alice.delete(f"/v1/webhooks/{doomed}").status_code == 204
        assert webhook_rows.list_deliveries(db, doomed)[0] == []  # its log went with it
        assert webhook_rows.delivery_outcome_counts(db) == before
        new_job(db)
        drain(dispatcher, clock, rounds=3)
        assert webhook_rows.delivery_outcome_counts(db) == {**before, "delivered": 3}
        assert alice.delete(f"/v1/webhooks/{kept}").status_code == 204
        assert webhook_rows.delivery_outcome_counts(db) == {**before, "delivered": 3}
    scraped = [line for line in alice.get("/metrics").text.splitlines()
               if line.startswith("ctpd_webhook_deliveries_total{") and 'outcome="delivered"' in line]
    assert [float(line.rsplit(" ", 1)[1]) for line in scraped] == [3.0]


def test_the_lifespan_stops_the_dispatcher_off_the_event_loop_and_keeps_the_pool_for_a_live_one(
        settings: Settings, queue, monkeypatch, caplog):
    seen: dict[str, bool] = {}

    class StuckDispatcher:
        """A dispatcher thread that outlives its join (a send still running)."""

        def __init__(self, *_args: Any) -> None:
            pass

        def start(self) -> StuckDispatcher:
            return self

        def stop(self) -> bool:
            try:
                asyncio.get_running_loop()
                seen["on_the_event_loop"] = True
            except RuntimeError:
                seen["on_the_event_loop"] = False
            return False

    monkeypatch.setattr(app_main, "DispatcherThread", StuckDispatcher)
    app = create_app(settings.model_copy(update={"webhook_dispatcher": True}), queue=queue)
    disposed: list[bool] = []
    monkeypatch.setattr(app.state.db, "dispose", lambda: disposed.append(True))
    with caplog.at_level(logging.WARNING, logger="app.main"), TestClient(app):
        pass
    assert seen == {"on_the_event_loop": False} and disposed == []
    assert "still running" in caplog.text
