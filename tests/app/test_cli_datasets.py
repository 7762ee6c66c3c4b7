"""``ctpd datasets list|delete`` and the routes behind them (GET /v1/datasets, DELETE /v1/datasets/{id}), on
SQLite and PostgreSQL: newest first with a cursor, a tenant sees only its own, a dataset an active job names is
kept (409), a deleted one is gone with its file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.db import datasets as dataset_rows
from ctpd_cli.main import main
from tests.app.conftest import SPEC
from tests.live_service import serving

ROW = {"prompt": "p", "chosen": "yes", "rejected": "no"}


@pytest.fixture
def server(app) -> Iterator[str]:
    with serving(app) as url:
        yield url


def _upload(client, name: str, rows: int = 2) -> dict:
    body = "".join(json.dumps(ROW) + "\n" for _ in range(rows)).encode()
    response = client.post("/v1/datasets", files={"file": (name, body, "application/jsonl")})
    assert response.status_code == 201, response.text
    return response.json()


def test_list_pages_newest_first_and_only_the_tenants_own(alice, bob):
    uploaded = [_upload(alice, f"d{i}.jsonl") for i in range(3)]
    _upload(bob, "other.jsonl")
    first = alice.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in first["data"]] == [uploaded[2]["id"], uploaded[1]["id"]] and first["has_more"]
    rest = alice.get("/v1/datasets", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert [d["id"] for d in rest["data"]] == [uploaded[0]["id"]] and not rest["has_more"]
    bad = alice.get("/v1/datasets", params={"after": "ds_nope"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "after"


def test_delete_removes_the_row_and_the_file_unless_an_active_job_uses_it(alice, bob, db):
    dataset = _upload(alice, "pairs.jsonl")
    path = Path(dataset_rows.get_dataset(db, dataset["id"], "acme").path)
    assert path.exists()
    job = alice.post("/v1/jobs", json={**SPEC, "dataset": {"id": dataset["id"]}}).json()

    refused = alice.delete(f"/v1/datasets/{dataset['id']}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "dataset_in_use"
    assert job["id"] in refused.json()["error"]["message"] and path.exists()
    assert bob.delete(f"/v1/datasets/{dataset['id']}").status_code == 404  # another tenant's: not theirs to see

    assert alice.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    deleted = alice.delete(f"/v1/datasets/{dataset['id']}")
    assert deleted.status_code == 204 and not path.exists() and not path.parent.exists()
    assert alice.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert alice.delete(f"/v1/datasets/{dataset['id']}").status_code == 404


def test_ctpd_datasets_list_and_delete(server, alice, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("CTPD_URL", raising=False)
    monkeypatch.setenv("CTPD_HOME", str(tmp_path / "client-home"))
    flags = ("--url", server, "--key", alice.api_key)
    kept, dropped = _upload(alice, "kept.jsonl", rows=3), _upload(alice, "dropped.jsonl")
    assert main(["datasets", "list", *flags]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["id", "filename", "format", "rows", "bytes"]
    assert [row.split()[:4] for row in rows] == [[dropped["id"], "dropped.jsonl", "jsonl", "2"],
                                                 [kept["id"], "kept.jsonl", "jsonl", "3"]]
    assert main(["datasets", "delete", dropped["id"], *flags]) == 0
    assert capsys.readouterr().out.strip() == f"deleted dataset {dropped['id']}"
    assert main(["datasets", "list", "--json", *flags]) == 0
    assert [d["id"] for d in json.loads(capsys.readouterr().out)["data"]] == [kept["id"]]
    assert main(["datasets", "delete", dropped["id"], *flags]) == 1
    assert "HTTP 404 not_found" in capsys.readouterr().err
