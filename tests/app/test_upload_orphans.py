"""Unfinished uploads: a SIGKILL leaves one behind and start-up removes it; a live one is never removed.

The API runs for real in a subprocess (``bench.upload_memory.ApiProcess``: uvicorn, SQLite, a temporary
CTPD_HOME) and the uploads are real chunked HTTP requests that the test keeps open.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from app.storage_gc import HELD_SUFFIX, INCOMING_PREFIX, remove_orphaned_uploads
from bench.upload_memory import (
    MULTIPART_TAIL,
    ApiProcess,
    multipart_head,
    open_upload,
    read_response,
    send_body,
)
from tests.app.conftest import RecordingQueue

MiB = 1024 * 1024
ROWS = b'{"prompt": "The cat", "chosen": " sat on the mat.", "rejected": " flew to the moon."}\n' * 4096


def _incoming(api: ApiProcess) -> list[Path]:
    return sorted(api.datasets_dir.glob(f"{INCOMING_PREFIX}*")) if api.datasets_dir.exists() else []


def _start_upload(api: ApiProcess, megabytes: int):
    """An upload left open after ``megabytes`` of rows, once the API has written them to its held file."""
    sock = open_upload(api.port, api.api_key)
    sent, answered = send_body(sock, [multipart_head("pairs.jsonl"), *[ROWS] * (megabytes * MiB // len(ROWS))],
                               chunked=True, last=False)
    assert not answered
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        files = _incoming(api)
        if files and files[0].stat().st_size >= sent - 2 * MiB:  # all but the API's last coalesced piece
            return sock, files[0]
        time.sleep(0.05)
    raise AssertionError(f"no .incoming file reached {sent - 2 * MiB} bytes: {_incoming(api)}")


def _start_up(settings) -> None:
    """What an API start-up does (the lifespan), in this process."""
    with TestClient(create_app(settings, queue=RecordingQueue())):
        pass


def test_a_live_upload_is_never_removed_and_a_sigkilled_one_is_removed_at_start_up(tmp_path):
    api = ApiProcess(tmp_path / "home", max_upload_bytes=64 * MiB)
    try:
        # A live upload: the sweep and another API's start-up see that its writer holds it.
        sock, live = _start_upload(api, 4)
        assert live.name.endswith(HELD_SUFFIX)
        assert remove_orphaned_uploads(api.settings) == []
        _start_up(api.settings)
        assert live.exists()
        send_body(sock, [ROWS, MULTIPART_TAIL], chunked=True)
        status, body = read_response(sock)
        assert status == 201, body
        assert not live.exists() and (api.datasets_dir / body["id"] / "pairs.jsonl").is_file()

        # SIGKILL mid-upload: no cleanup runs, so the file stays ...
        sock, orphan = _start_upload(api, 4)
        os.kill(api.process.pid, signal.SIGKILL)
        api.process.wait(timeout=30)
        sock.close()
        assert orphan.exists() and orphan.stat().st_size >= 2 * MiB
        # ... until the next start-up, which removes it (and only it)
        _start_up(api.settings)
        assert not orphan.exists() and _incoming(api) == []
        assert (api.datasets_dir / body["id"] / "pairs.jsonl").is_file()
    finally:
        api.stop()


def test_an_unheld_incoming_file_is_removed_only_after_the_grace_period(tmp_path):
    """Files from a version that took no lock: only their age can tell."""
    from app.settings import Settings

    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'x.db'}", broker_url="memory://",
                        upload_orphan_grace_seconds=3600)
    folder = Path(settings.artifact_root) / "datasets"
    folder.mkdir(parents=True)
    fresh, stale = folder / f"{INCOMING_PREFIX}aaaa", folder / f"{INCOMING_PREFIX}bbbb"
    unrelated = folder / "notes.txt"
    for path in (fresh, stale, unrelated):
        path.write_bytes(b"x" * 100)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    os.utime(unrelated, (two_hours_ago, two_hours_ago))
    assert remove_orphaned_uploads(settings) == [stale]
    assert fresh.exists() and unrelated.exists()
