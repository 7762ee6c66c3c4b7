"""The remote ``ctpd`` commands against the real API served over HTTP (uvicorn in a thread): where the URL and the
key come from, each command's output and exit code, ``jobs follow`` to the end of a job that the worker's own
observer (worker.sinks.DbObserver) drives through SQL, and Ctrl-C while following (a real SIGINT to a subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.db import auth as key_rows
from app.db import jobs as job_rows
from app.settings import get_settings
from ctpd_cli.client import DEFAULT_URL, resolve_connection
from ctpd_cli.main import main
from tests.app.conftest import SPEC
from tests.live_service import CTPD, REPO, serving


@pytest.fixture
def database_url(tmp_path, migrated_sqlite_template) -> str:
    """SQLite only: these tests are about the CLI, not the database (the API tests cover both)."""
    path = tmp_path / "ctpd.db"
    shutil.copyfile(migrated_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path) -> None:
    """No CTPD_URL / CTPD_API_KEY of the caller's, and an empty CTPD_HOME: each test says where things come from."""
    for name in ("CTPD_URL", "CTPD_API_KEY", "CTPD_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CTPD_HOME", str(tmp_path / "client-home"))


class Requests:
    """An ASGI wrapper that counts the requests to each path (to know that a follower has seen a state) and keeps
    their Range headers."""

    def __init__(self, app: Any) -> None:
        self.app, self.counts, self.lock = app, {}, threading.Lock()
        self.ranges: list[tuple[str, str | None]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            with self.lock:
                self.counts[scope["path"]] = self.counts.get(scope["path"], 0) + 1
                headers = dict(scope["headers"])
                self.ranges.append((scope["path"], (headers.get(b"range") or b"").decode() or None))
        await self.app(scope, receive, send)

    def count(self, path: str) -> int:
        with self.lock:
            return self.counts.get(path, 0)


@pytest.fixture
def requests(app) -> Requests:
    return Requests(app)


@pytest.fixture
def server(requests) -> Iterator[str]:
    with serving(requests) as url:
        yield url


def ctpd(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -------------------------------------------------------------------------------------------- configuration


def test_the_url_and_key_come_from_flags_then_the_environment_then_ctpd_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    environ = {"CTPD_HOME": str(home)}
    with pytest.raises(ValueError, match="pass --key, set CTPD_API_KEY, or start `ctpd up`"):
        resolve_connection(environ=environ)
    (home / "api-key").write_text("ctpd_from_file\n")
    (home / "url").write_text("http://127.0.0.1:9/\n")
    found = resolve_connection(environ=environ)
    assert (found.url, found.key) == ("http://127.0.0.1:9", "ctpd_from_file")
    assert found.key_source == str(home / "api-key") and found.url_source == str(home / "url")

    environ.update(CTPD_URL="http://env:1", CTPD_API_KEY="ctpd_from_env")
    found = resolve_connection(environ=environ)
    assert (found.url, found.key, found.key_source) == ("http://env:1", "ctpd_from_env", "CTPD_API_KEY")

    found = resolve_connection("https://flag:2", "ctpd_from_flag", environ=environ)
    assert (found.url, found.key, found.url_source) == ("https://flag:2", "ctpd_from_flag", "--url")

    (home / "url").unlink()
    assert resolve_connection(environ={"CTPD_HOME": str(home)}).url == DEFAULT_URL
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        resolve_connection("127.0.0.1:8000", "k", environ=environ)


def test_a_home_written_by_ctpd_up_is_enough(server, alice, tmp_path, monkeypatch, capsys):
    home = tmp_path / "up-home"
    home.mkdir()
    (home / "url").write_text(server + "\n")
    (home / "api-key").write_text(alice.api_key + "\n")
    monkeypatch.setenv("CTPD_HOME", str(home))
    job_id = alice.post("/v1/jobs", json=SPEC).json()["id"]
    code, out, _ = ctpd(capsys, "jobs", "list")
    assert code == 0 and job_id in out


def test_errors_name_the_cause_and_exit_non_zero(server, alice, capsys):
    code, _, err = ctpd(capsys, "jobs", "get", "job_nope", "--url", server, "--key", alice.api_key)
    assert code == 1 and "HTTP 404 not_found" in err and "job_nope" in err
    code, _, err = ctpd(capsys, "jobs", "list", "--url", server, "--key", "ctpd_wrong")
    assert code == 1 and "invalid_api_key" in err and "the key came from --key" in err
    code, _, err = ctpd(capsys, "jobs", "list", "--url", server)
    assert code == 2 and "no API key" in err
    code, _, err = ctpd(capsys, "jobs", "list", "--url", "http://127.0.0.1:9", "--key", "k")
    assert code == 1 and "cannot reach the service at http://127.0.0.1:9" in err


# ------------------------------------------------------------------------------------------------------ jobs


def test_jobs_list_get_cancel_events(server, alice, bob, capsys):
    flags = ("--url", server, "--key", alice.api_key)
    first = alice.post("/v1/jobs", json={**SPEC, "name": "first", "metadata": {"team": "nlp"}}).json()["id"]
    second = alice.post("/v1/jobs", json={**SPEC, "name": "second"}).json()["id"]
    other = bob.post("/v1/jobs", json=SPEC).json()["id"]

    code, out, _ = ctpd(capsys, "jobs", "list", *flags)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["id", "status", "stage", "name", "created", "(UTC)", "finished", "(UTC)"]
    assert [row.split()[0] for row in rows] == [second, first] and other not in out  # newest first, own only
    code, out, err = ctpd(capsys, "jobs", "list", "--limit", "1", *flags)
    assert [row.split()[0] for row in out.splitlines()[1:]] == [second] and "--all" in err
    code, out, _ = ctpd(capsys, "jobs", "list", "--metadata", "team=nlp", "--json", *flags)
    assert [job["id"] for job in json.loads(out)["data"]] == [first]

    code, out, _ = ctpd(capsys, "jobs", "get", first, *flags)
    assert code == 0 and f"id        {first}" in out and "status    queued" in out and "team=nlp" in out
    code, out, _ = ctpd(capsys, "jobs", "get", first, "--json", *flags)
    assert json.loads(out)["spec"]["student"]["model"] == SPEC["student"]["model"]

    code, out, _ = ctpd(capsys, "jobs", "cancel", first, *flags)
    assert code == 0 and out.strip() == f"job {first}: cancelled"
    code, out, _ = ctpd(capsys, "jobs", "list", "--status", "cancelled", "--all", "--json", *flags)
    assert [job["id"] for job in json.loads(out)["data"]] == [first]

    code, out, _ = ctpd(capsys, "jobs", "events", first, *flags)
    assert code == 0 and [line.split()[2] for line in out.splitlines()] == ["job_created", "job_queued",
                                                                            "cancel_requested", "job_cancelled"]
    # --follow on an ended job prints what there is and returns; --json prints one event per line.
    code, out, _ = ctpd(capsys, "jobs", "events", first, "--follow", "--json", *flags)
    assert code == 0 and [json.loads(line)["type"] for line in out.splitlines()][-1] == "job_cancelled"


def test_jobs_download_writes_the_archive_resumably(server, requests, alice, db, tmp_path, capsys):
    job_id = alice.post("/v1/jobs", json=SPEC).json()["id"]
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    (export / "config.json").write_text('{"model_type": "llama"}')
    (export / "sub" / "weights.bin").write_bytes(os.urandom(300_000))
    assert job_rows.claim_job(db, job_id, "w1", 60) is not None
    assert job_rows.finish_job(db, job_id, "w1", "succeeded", export_dir=export, attempt=1) == "succeeded"

    out_dir = tmp_path / "downloads"
    out_dir.mkdir()
    code, out, _ = ctpd(capsys, "jobs", "download", job_id, "-o", str(out_dir), "--url", server, "--key",
                        alice.api_key)
    archive = out_dir / f"{job_id}-model.tar"  # the Job's model.archive_url: a plain tar, resumable
    assert code == 0 and f"downloaded {archive}" in out
    with tarfile.open(archive) as tar:
        assert {f"{job_id}/config.json", f"{job_id}/sub/weights.bin"} <= set(tar.getnames())
        member = tar.extractfile(f"{job_id}/sub/weights.bin")
        assert member is not None and member.read() == (export / "sub" / "weights.bin").read_bytes()

    # An interrupted earlier download left a part file: continued from its end with a Range request.
    again = tmp_path / "again.tar"
    Path(f"{again}.part").write_bytes(archive.read_bytes()[:1000])
    code, _, _ = ctpd(capsys, "jobs", "download", job_id, "-o", str(again), "--url", server, "--key", alice.api_key)
    assert code == 0 and again.read_bytes() == archive.read_bytes() and not Path(f"{again}.part").exists()
    assert requests.ranges[-1] == (f"/v1/jobs/{job_id}/model.tar", "bytes=1000-")

    # One file of the export, by its path in the folder.
    code, out, _ = ctpd(capsys, "jobs", "download", job_id, "--file", "sub/weights.bin", "-o", str(out_dir) + "/",
                        "--url", server, "--key", alice.api_key)
    assert code == 0 and (out_dir / "weights.bin").read_bytes() == (export / "sub" / "weights.bin").read_bytes()
    code, _, err = ctpd(capsys, "jobs", "download", job_id, "--file", "nope.bin", "-o", str(out_dir),
                        "--url", server, "--key", alice.api_key)
    assert code == 1 and "not_found" in err and not (out_dir / "nope.bin").exists()

    queued = alice.post("/v1/jobs", json=SPEC).json()["id"]
    code, _, err = ctpd(capsys, "jobs", "download", queued, "--url", server, "--key", alice.api_key)
    assert code == 2 and "once it has succeeded" in err


# -------------------------------------------------------------------------------------------------- datasets


def test_datasets_upload_and_get(server, alice, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                            for i in range(3)))
    flags = ("--url", server, "--key", alice.api_key)
    code, out, _ = ctpd(capsys, "datasets", "upload", str(data), "--json", *flags)
    dataset = json.loads(out)
    assert code == 0 and dataset["num_rows"] == 3 and dataset["filename"] == "pairs.jsonl"
    code, out, _ = ctpd(capsys, "datasets", "get", dataset["id"], *flags)
    assert code == 0 and dataset["id"] in out and dataset["sha256"] in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c"}\n')
    code, _, err = ctpd(capsys, "datasets", "upload", str(bad), *flags)
    assert code == 1 and "invalid_dataset" in err


# ------------------------------------------------------------------------------------------------------ keys


@pytest.fixture
def service_db_env(settings, monkeypatch):
    """`ctpd keys --database` reads the service settings from the environment: this test's database."""
    monkeypatch.setenv("CTPD_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_keys_through_the_api_with_an_admin_key_and_in_the_database(server, admin, alice, db, service_db_env,
                                                                     monkeypatch, capsys):
    remote = ("--url", server, "--key", admin.api_key)
    code, out, err = ctpd(capsys, "keys", "create", "--tenant", "initech", "--name", "ci", *remote)
    plaintext = out.strip()
    principal = key_rows.authenticate(db, plaintext)
    assert code == 0 and principal is not None and principal.tenant == "initech" and "shown once" in err

    code, out, _ = ctpd(capsys, "keys", "list", "--tenant", "initech", *remote)
    assert code == 0 and principal.key_id in out and plaintext[:8] in out and plaintext not in out
    code, out, _ = ctpd(capsys, "keys", "revoke", principal.key_id, *remote)
    assert code == 0 and "revoked" in out and key_rows.authenticate(db, plaintext) is None
    code, out, _ = ctpd(capsys, "keys", "revoke", principal.key_id, *remote)
    assert code == 0 and "already revoked" in out

    code, _, err = ctpd(capsys, "keys", "list", "--url", server, "--key", alice.api_key)
    assert code == 1 and "admin_required" in err and "needs an admin key" in err

    # CTPD_URL names a service, yet --database works in the database: the operator's bootstrap.
    monkeypatch.setenv("CTPD_URL", server)
    code, out, _ = ctpd(capsys, "keys", "list", "--database", "--json")
    assert code == 0 and principal.key_id in {key["id"] for key in json.loads(out)["data"]}
    code, _, err = ctpd(capsys, "keys", "list", "--database", "--url", server)
    assert code == 2 and "leave out --url" in err


# ---------------------------------------------------------------------------------------------------- follow


def _drive(db, job_id: str, seen: Any) -> None:
    """Play a worker's attempt through the worker's own observer, one state per poll of the follower."""
    from ctpd_core.observe import Progress
    from worker.sinks import DbObserver

    claimed = job_rows.claim_job(db, job_id, "w1", 60)
    assert claimed is not None
    observer = DbObserver(db, job_id, attempt=claimed.attempt, progress_interval=0.0)

    def show() -> None:
        observer.writer.flush()
        seen()

    observer.stage_started("prepare", False)
    observer.progress(Progress("prepare", 10, 10, 0.0))
    observer.stage_finished("prepare", 1.0, False, {"train_pairs": 8, "validation_pairs": 2})
    show()
    observer.stage_started("reference", True)
    observer.stage_finished("reference", 0.0, True, {})
    observer.stage_started("contrastive", False)
    for direction in ("positive", "negative"):
        observer.progress(Progress(f"contrastive:{direction}", 1, 2, 3.0))
        observer.metrics(f"contrastive:{direction}", 1, {"loss": 0.69})
        show()
    observer.stage_finished("contrastive", 6.0, False, {})
    for stage in ("weights", "distill", "evaluate", "export"):
        observer.stage_started(stage, False)
        if stage == "distill":
            observer.progress(Progress("distill", 2, 4, 2.0))
            observer.metrics("distill", 2, {"loss": 0.5})
            show()
        if stage == "evaluate":
            observer.metrics("evaluate", 4, {"preference_accuracy": 0.75})
        observer.stage_finished(stage, 0.5, False, {})
    assert observer.close(5.0)
    assert job_rows.finish_job(db, job_id, "w1", "succeeded", attempt=claimed.attempt) == "succeeded"


def test_follow_shows_each_sub_stage_the_loss_and_the_outcome(server, requests, alice, db, capsys):
    job_id = alice.post("/v1/jobs", json=SPEC).json()["id"]
    path = f"/v1/jobs/{job_id}"

    def seen() -> None:  # wait until the follower has read the job twice since this state was written
        target = requests.count(path) + 2
        deadline = time.monotonic() + 30
        while requests.count(path) < target and time.monotonic() < deadline:
            time.sleep(0.01)

    driver = threading.Thread(target=_drive, args=(db, job_id, seen))
    driver.start()
    try:
        code, out, _ = ctpd(capsys, "jobs", "follow", job_id, "--poll", "0.05", "--url", server, "--key",
                            alice.api_key)
    finally:
        driver.join(timeout=60)
    assert code == 0, out
    assert "progress          contrastive π+: 1/2" in out and "progress          contrastive π−: 1/2" in out
    assert "progress          distill: 2/4  loss 0.5," in out and "job ETA" in out  # distill's loss, not π−'s
    assert f"job {job_id}: succeeded" in out and "preference_accuracy" in out
    assert out.index("contrastive π+") < out.index("contrastive π−") < out.index("distill: 2/4")


def test_ctrl_c_while_following_leaves_the_job_running_and_says_how_to_cancel(server, alice, tmp_path):
    job_id = alice.post("/v1/jobs", json=SPEC).json()["id"]  # queued, and stays so: no worker here
    env = {key: value for key, value in os.environ.items() if not key.startswith("CTPD_")}
    env.update(CTPD_HOME=str(tmp_path / "sub-home"), PYTHONUNBUFFERED="1")
    follower = subprocess.Popen([*CTPD, "jobs", "follow", job_id, "--poll", "0.2", "--url", server, "--key",
                                 alice.api_key], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        assert follower.stdout is not None
        first = follower.stdout.readline()  # the first event: it is following now
        assert "job_created" in first, first
        time.sleep(0.5)
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"stopped following job {job_id}: it keeps running on the service" in err
    assert f"ctpd jobs cancel {job_id} --url {server}" in err
    assert alice.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
