"""API-key management: /v1/api-keys (admin keys only) and `ctpd keys list|create|revoke` on the database.
A key's plaintext is shown once, at its creation, and never again; a revoked key is refused at once."""

from __future__ import annotations

import pytest

from app.db import auth as key_rows
from app.settings import get_settings
from ctpd_cli.main import main


def _ids(response) -> list[str]:
    return [key["id"] for key in response.json()["data"]]


def test_an_admin_creates_lists_and_revokes_keys(admin, alice, client, db):
    created = admin.post("/v1/api-keys", json={"tenant": "initech", "name": "ci"})
    assert created.status_code == 201, created.text
    body = created.json()
    plaintext = body["key"]
    assert plaintext.startswith("ctpd_") and body["prefix"] == plaintext[:8]
    assert (body["object"], body["tenant"], body["name"], body["is_admin"], body["revoked_at"]) == (
        "api_key", "initech", "ci", False, None)
    worker = client.get("/v1/jobs", headers={"Authorization": f"Bearer {plaintext}"})
    assert worker.status_code == 200 and worker.json()["data"] == []  # a working key of its own tenant

    listed = admin.get("/v1/api-keys")
    assert listed.status_code == 200
    assert body["id"] in _ids(listed) and len(listed.json()["data"]) == 3  # alice's, the admin's, the new one
    for secret in (plaintext, alice.api_key, admin.api_key):  # never a key, never a hash
        assert secret not in listed.text and key_rows.hash_api_key(secret) not in listed.text
    assert all("key" not in key and "key_hash" not in key for key in listed.json()["data"])
    assert _ids(admin.get("/v1/api-keys", params={"tenant": "initech"})) == [body["id"]]

    revoked = admin.delete(f"/v1/api-keys/{body['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert plaintext not in revoked.text
    refused = client.get("/v1/jobs", headers={"Authorization": f"Bearer {plaintext}"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    again = admin.delete(f"/v1/api-keys/{body['id']}")  # revoking a revoked key changes nothing
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]


def test_a_key_that_is_not_an_admins_gets_403(alice, db):
    (own,) = key_rows.list_api_keys(db, "acme")
    for response in (alice.get("/v1/api-keys"), alice.post("/v1/api-keys", json={"tenant": "acme"}),
                     alice.delete(f"/v1/api-keys/{own.id}")):
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "admin_required"
    assert key_rows.authenticate(db, alice.api_key) is not None  # the refused revoke changed nothing
    assert len(key_rows.list_api_keys(db)) == 1


def test_no_key_is_401_an_unknown_id_is_404_a_blank_tenant_is_422(admin, client):
    assert client.get("/v1/api-keys").status_code == 401
    missing = admin.delete("/v1/api-keys/key_nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "key_id"
    blank = admin.post("/v1/api-keys", json={"tenant": "   "})
    assert blank.status_code == 422 and blank.json()["error"]["param"] == "tenant"
    unknown = admin.post("/v1/api-keys", json={"tenant": "acme", "admin": True})  # the field is is_admin
    assert unknown.status_code == 422


@pytest.fixture
def service_env(settings, monkeypatch):
    """`ctpd keys` reads the service settings from the environment: point it at this test's database."""
    monkeypatch.setenv("CTPD_HOME", str(settings.home))
    monkeypatch.setenv("CTPD_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_ctpd_keys_create_list_revoke(service_env, db, capsys):
    assert main(["keys", "create", "--tenant", "initech", "--name", "ci"]) == 0
    plaintext = capsys.readouterr().out.strip()
    principal = key_rows.authenticate(db, plaintext)
    assert principal is not None and principal.tenant == "initech" and not principal.is_admin

    assert main(["keys", "list"]) == 0
    table = capsys.readouterr().out
    assert principal.key_id in table and plaintext[:8] in table and plaintext not in table
    assert main(["keys", "list", "--tenant", "nobody"]) == 0
    assert principal.key_id not in capsys.readouterr().out

    assert main(["keys", "revoke", principal.key_id]) == 0
    assert "revoked" in capsys.readouterr().out
    assert key_rows.authenticate(db, plaintext) is None
    assert main(["keys", "revoke", principal.key_id]) == 0  # already revoked: said, not an error
    assert "already revoked" in capsys.readouterr().out
    assert main(["keys", "revoke", "key_nope"]) == 2
    assert "no API key 'key_nope'" in capsys.readouterr().err
