"""``ctpd webhooks ...`` against the served API and a real receiver on loopback that verifies every signature
(tests/webhook_receiver.py); the outbox is sent by the service's own dispatcher, one pass at a time."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

from app.webhooks.dispatcher import Dispatcher
from ctpd_cli.main import main
from tests.app.conftest import SPEC
from tests.live_service import serving
from tests.webhook_receiver import WebhookReceiver


@pytest.fixture
def database_url(tmp_path, migrated_sqlite_template) -> str:
    """SQLite only: these tests are about the CLI (the webhook tests cover both databases)."""
    path = tmp_path / "ctpd.db"
    shutil.copyfile(migrated_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def settings(settings):
    # A receiver on loopback, and no dispatcher thread in the served app: the test runs the passes itself.
    settings.webhook_allow_private_targets = True
    settings.webhook_dispatcher = False
    return settings


@pytest.fixture
def server(app) -> Iterator[str]:
    with serving(app) as url:
        yield url


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


def ctpd(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_webhooks_create_list_deliveries_redeliver_disable_enable_delete(server, alice, db, settings, receiver,
                                                                        capsys, monkeypatch):
    monkeypatch.delenv("CTPD_URL", raising=False)
    flags = ("--url", server, "--key", alice.api_key)
    code, out, _ = ctpd(capsys, "webhooks", "create", receiver.url, "--event", "job.queued", "--event",
                        "job.cancelled", "--description", "ci", *flags)
    assert code == 0 and "signing secret (shown once" in out
    secret = out.split("signing secret", 1)[1].split()[-1]
    assert secret.startswith("whsec_")
    receiver.secret = secret
    code, out, _ = ctpd(capsys, "webhooks", "list", "--json", *flags)
    (hook,) = json.loads(out)["data"]
    assert hook["event_types"] == ["job.queued", "job.cancelled"] and "secret" not in hook
    code, out, _ = ctpd(capsys, "webhooks", "list", *flags)
    assert hook["id"] in out and "job.queued,job.cancelled" in out

    alice.post("/v1/jobs", json=SPEC)
    dispatcher = Dispatcher(db, settings)
    try:
        assert dispatcher.run_once() == 1
        (delivered,) = receiver.delivered()
        assert delivered.type == "job.queued" and not receiver.unverified()

        code, out, _ = ctpd(capsys, "webhooks", "deliveries", hook["id"], *flags)
        assert code == 0 and delivered.message_id in out and "job.queued" in out and "delivered" in out
        code, out, _ = ctpd(capsys, "webhooks", "redeliver", hook["id"], delivered.message_id, *flags)
        assert code == 0 and "queued for delivery again" in out
        assert dispatcher.run_once() == 1
        assert [r.message_id for r in receiver.delivered()] == [delivered.message_id] * 2  # same webhook-id
    finally:
        dispatcher.close()

    code, out, _ = ctpd(capsys, "webhooks", "disable", hook["id"], *flags)
    assert code == 0 and out.strip() == f"webhook {hook['id']}: disabled"
    code, _, err = ctpd(capsys, "webhooks", "redeliver", hook["id"], delivered.message_id, *flags)
    assert code == 1 and "webhook_disabled" in err
    code, out, _ = ctpd(capsys, "webhooks", "enable", hook["id"], "--json", *flags)
    assert code == 0 and json.loads(out)["enabled"] is True
    code, out, _ = ctpd(capsys, "webhooks", "delete", hook["id"], *flags)
    assert code == 0 and "deleted" in out
    code, _, err = ctpd(capsys, "webhooks", "get", hook["id"], *flags)
    assert code == 1 and "not_found" in err


def test_a_bad_event_type_is_the_service_422(server, alice, receiver, capsys):
    code, _, err = ctpd(capsys, "webhooks", "create", receiver.url, "--event", "job.exploded", "--url", server,
                        "--key", alice.api_key)
    assert code == 1 and "HTTP 422 invalid_request" in err and "job.exploded" in err
