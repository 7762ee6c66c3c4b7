"""POST /v1/datasets as a stream: the limit holds while the body arrives, rows are validated as they arrive.

These tests drive the ASGI app directly with a ``receive`` that hands the body over one piece at a time
(TestClient reads a request body whole before the app sees it), and look at the disk before every piece, so
they see what a chunked upload without a Content-Length really leaves on disk, and when.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.main import create_app
from app.upload_stream import CHUNK, MULTIPART_OVERHEAD

BOUNDARY = "test-boundary-1b2c"
PIECE = 64 * 1024  # what an HTTP server typically hands over per receive()
ROW = {"prompt": "The cat", "chosen": " sat on the mat.", "rejected": " flew to the moon."}


def _head(filename: str, field: str = "file") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def _pieces(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), PIECE):
        yield data[start:start + PIECE]


def _jsonl_rows(count: int, row: dict = ROW) -> bytes:
    return (json.dumps(row) + "\n").encode() * count


class StreamedUpload:
    """One request through the ASGI app; records the bytes under datasets/ each time the app asks for more."""

    def __init__(self, app, api_key: str, settings, pieces: Iterator[bytes], *, disconnect_after: int | None = None):
        self.app, self.api_key, self.pieces = app, api_key, pieces
        self.datasets = Path(settings.artifact_root) / "datasets"
        self.disconnect_after = disconnect_after
        self.body_sent = 0
        self.most_on_disk = 0
        self.messages: list[dict] = []

    def on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.datasets.rglob("*") if path.is_file()) if self.datasets.exists() else 0

    async def _receive(self) -> dict:
        self.most_on_disk = max(self.most_on_disk, self.on_disk())
        if self.disconnect_after is not None and self.body_sent >= self.disconnect_after:
            return {"type": "http.disconnect"}
        piece = next(self.pieces, None)
        if piece is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        self.body_sent += len(piece)
        return {"type": "http.request", "body": piece, "more_body": True}

    async def _send(self, message: dict) -> None:
        self.messages.append(message)

    def run(self) -> tuple[int, dict]:
        headers = [(b"authorization", f"Bearer {self.api_key}".encode()),
                   (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
                   (b"transfer-encoding", b"chunked")]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/datasets", "raw_path": b"/v1/datasets", "query_string": b"",
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
        asyncio.run(self.app(scope, self._receive, self._send))
        status = next(m["status"] for m in self.messages if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")
        return status, json.loads(body)


def _leftovers(settings) -> list[Path]:
    root = Path(settings.artifact_root) / "datasets"
    return sorted(root.rglob("*")) if root.exists() else []


@pytest.fixture
def roomy(settings, queue):
    """The app with a limit of a few coalesced chunks, so that part of the file reaches the disk first."""
    roomy_settings = settings.model_copy(update={"max_upload_bytes": 4 * CHUNK + 12345})
    application = create_app(roomy_settings, queue=queue)
    yield application, roomy_settings
    application.state.db.dispose()


def test_a_chunked_body_over_the_limit_is_cut_off_at_the_limit_and_leaves_nothing(roomy, alice):
    app, settings = roomy
    limit = settings.max_upload_bytes

    def endless() -> Iterator[bytes]:  # far more than the limit: only the server can end this upload
        yield _head("huge.jsonl")
        for _ in range(50 * limit // PIECE):
            yield _jsonl_rows(PIECE // 80)

    upload = StreamedUpload(app, alice.api_key, settings, endless())
    status, body = upload.run()
    assert status == 413 and body["error"]["code"] == "file_too_large" and body["error"]["param"] == "file"
    assert "CTPD_MAX_UPLOAD_BYTES" in body["error"]["message"]
    # the disk never held more than the limit, the server stopped reading within a piece or two of it ...
    assert 0 < upload.most_on_disk <= limit
    assert upload.body_sent <= limit + MULTIPART_OVERHEAD + CHUNK + PIECE
    # ... and nothing stays behind
    assert _leftovers(settings) == []


def test_a_chunked_upload_under_the_limit_is_stored(app, alice, settings):
    data = _jsonl_rows(3000)
    assert len(data) < settings.max_upload_bytes
    upload = StreamedUpload(app, alice.api_key, settings, iter([_head("pairs.jsonl"), *_pieces(data), TAIL]))
    status, body = upload.run()
    assert status == 201, body
    assert body["num_rows"] == 3000 and body["size_bytes"] == len(data)
    assert [path.name for path in _leftovers(settings) if path.is_file()] == ["pairs.jsonl"]


def test_rows_are_validated_while_streaming_all_or_nothing(app, alice, settings):
    surrogate = b'{"prompt": "p", "chosen": " bad \\ud800 here", "rejected": " r"}\n'
    data = _jsonl_rows(500) + b"{broken\n" + _jsonl_rows(500) + surrogate + _jsonl_rows(10)
    upload = StreamedUpload(app, alice.api_key, settings, iter([_head("pairs.jsonl"), *_pieces(data), TAIL]))
    status, body = upload.run()
    assert status == 422 and body["error"]["code"] == "invalid_dataset"
    assert [error["row"] for error in body["error"]["errors"]] == [501, 1002]
    assert "lone UTF-16 surrogate" in body["error"]["errors"][1]["message"]
    assert body["error"]["total_errors"] == 2
    assert _leftovers(settings) == []


def test_a_broken_json_document_is_refused_before_the_rest_arrives(roomy, alice):
    app, settings = roomy
    rows = json.dumps([ROW] * 40000).encode()
    data = b'[{"prompt": "x" "chosen": 1},' + rows[1:]  # a syntax error in the first row
    assert 2 * CHUNK < len(data) < settings.max_upload_bytes
    upload = StreamedUpload(app, alice.api_key, settings, iter([_head("pairs.json"), *_pieces(data), TAIL]))
    status, body = upload.run()
    assert status == 422 and "invalid JSON at line 1 column 17" in body["error"]["message"]  # as json.loads says
    assert upload.body_sent < len(data)  # refused mid-stream
    assert _leftovers(settings) == []


def test_incomplete_and_malformed_bodies_leave_nothing(app, alice, settings):
    data = _jsonl_rows(3000)
    cut = StreamedUpload(app, alice.api_key, settings, iter([_head("pairs.jsonl"), *_pieces(data)]))  # no tail
    status, body = cut.run()
    assert status == 400 and "closing boundary" in body["error"]["message"]

    gone = StreamedUpload(app, alice.api_key, settings, iter([_head("pairs.jsonl"), *_pieces(data), TAIL]),
                          disconnect_after=PIECE * 2)
    status, body = gone.run()
    assert status == 400 and "disconnected" in body["error"]["message"]

    two = _head("a.jsonl") + _jsonl_rows(2) + f"\r\n--{BOUNDARY}\r\n".encode() + _head("b.jsonl")[len(f"--{BOUNDARY}\r\n"):]
    twice = StreamedUpload(app, alice.api_key, settings, iter([two, _jsonl_rows(2), TAIL]))
    status, body = twice.run()
    assert status == 422 and "more than once" in body["error"]["message"]

    other_field = StreamedUpload(app, alice.api_key, settings, iter([_head("x.jsonl", field="data"), b"x", TAIL]))
    status, body = other_field.run()
    assert status == 422 and body["error"]["param"] == "file" and "required" in body["error"]["message"]
    assert _leftovers(settings) == []
