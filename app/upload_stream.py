"""Receiving a dataset upload as a stream: the size limit and the row validation apply while the body arrives.

Starlette's ``request.form()`` writes the whole file to a spooled temporary file before a handler sees it,
so a chunked body of any size reached the disk before a size check could run. Here the handler reads
``request.stream()`` itself (:func:`receive_dataset`) and feeds python-multipart's ``MultipartParser``; the
``file`` part goes straight to a held ``datasets/.incoming-*`` file (``app.storage_gc``) while it is counted,
hashed and, for JSONL and JSON, validated row by row (``ctpd_core.data.streaming_validator``), which also
counts the dataset's statistics (``ReceivedDataset.stats``, stored as ``datasets.stats``). So:

* the first byte past ``max_upload_bytes`` in the file (or past it plus ``MULTIPART_OVERHEAD`` in the whole
  body) ends the request with a 413: at most the limit reaches the disk, and nothing stays there;
* memory per upload is one coalesced chunk (``CHUNK``) plus the longest row, whatever the file's size;
* Parquet needs random access, so it is validated from the received file, in record batches
  (``ctpd_core.data.validate_file``: a batch of rows and a page per column in memory).

The parsing, writing and validating run in a worker thread, one chunk at a time, so a big upload never blocks
the event loop. The caller publishes the file with :meth:`ReceivedDataset.publish` and always calls
:meth:`ReceivedDataset.discard`, which removes it unless it was published.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from app.api.errors import ApiError
from app.settings import Settings
from app.storage_gc import datasets_dir, new_incoming_file
from ctpd_core.data import DatasetError, StreamingValidator, streaming_validator, validate_file

try:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart before 0.0.13 names its module `multipart`
    from multipart.exceptions import FormParserError  # type: ignore[no-redef]
    from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
MULTIPART_OVERHEAD = 64 * 1024  # headers, boundaries and small fields around the file in a multipart body
CHUNK = 1 << 20  # the body is handed to the worker thread in pieces of about this size
MAX_PARTS = 16
FILE_FIELD = b"file"
_HOW = "send the dataset as the multipart/form-data field 'file' (curl -F file=@pairs.jsonl)"


def too_large(settings: Settings) -> ApiError:
    return ApiError(413, "file_too_large", f"file: larger than the upload limit of {settings.max_upload_bytes} bytes "
                    "(CTPD_MAX_UPLOAD_BYTES); split the dataset or ask the operator to raise the limit", "file")


def invalid_dataset(error: DatasetError) -> ApiError:
    return ApiError(
        422, "invalid_dataset", f"file: {error}", "file",
        errors=[{"row": row.row, "message": row.message} for row in error.errors],
        total_errors=error.total_errors,
    )


def _malformed(detail: str) -> ApiError:
    return ApiError(400, "invalid_request", f"file: the multipart body is malformed ({detail}); {_HOW}", "file")


def _decode(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")  # what browsers send for a legacy charset; only a display name


@dataclass
class ReceivedDataset:
    """The uploaded file, received and validated, still in its held temporary file."""

    filename: str
    suffix: str
    size_bytes: int
    sha256: str
    num_rows: int
    path: Path
    handle: BinaryIO = field(repr=False)
    published: bool = False
    # What the validator counted (ctpd_core.data.DatasetStats): stored as datasets.stats.
    stats: dict[str, Any] = field(default_factory=dict)

    def publish(self, final: Path) -> None:
        """Rename into place; the hold is released only afterwards, so no cleaner ever sees it unheld."""
        self.path.replace(final)
        self.published = True

    def discard(self) -> None:
        if not self.published:
            self.path.unlink(missing_ok=True)
        self.handle.close()


class _Receiver:
    """python-multipart callbacks: the ``file`` part to a held file (counted, hashed, validated); other parts
    are counted and dropped. Runs in a worker thread; the caller feeds it one chunk at a time."""

    def __init__(self, boundary: bytes, settings: Settings) -> None:
        self._settings = settings
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished, "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end, "on_end": self._on_end,
        })
        self._parts = 0
        self._header_name, self._header_value = b"", b""
        self._disposition = b""
        self._in_file = False
        self._file_complete = False
        self._ended = False
        self.filename = ""
        self.suffix = ""
        self.path: Path | None = None
        self.handle: BinaryIO | None = None
        self._validator: StreamingValidator | None = None
        self._digest = hashlib.sha256()
        self.size = 0

    # -- fed by the caller

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError as error:
            raise _malformed(str(error)) from None
        except DatasetError as error:
            raise invalid_dataset(error) from None

    def finish(self) -> ReceivedDataset:
        self._parser.finalize()
        if self.handle is None and self._ended:
            raise ApiError(422, "invalid_request", f"file: required; {_HOW}", "file")
        if not self._ended or not self._file_complete or self.handle is None or self.path is None:
            raise _malformed("the body ended before its closing boundary")
        self.handle.flush()
        try:
            if self._validator is not None:
                validated = self._validator.finish()
            else:  # Parquet: from the file on disk, in record batches
                validated = validate_file(self.path, self.suffix, keep_pairs=False)
        except DatasetError as error:
            raise invalid_dataset(error) from None
        return ReceivedDataset(self.filename, self.suffix, self.size, self._digest.hexdigest(), validated.num_rows,
                               self.path, self.handle, stats=validated.stats or {})

    def close(self) -> None:
        """After a failure: remove the partial file and release it."""
        if self.handle is not None:
            if self.path is not None:
                self.path.unlink(missing_ok=True)
            self.handle.close()

    # -- python-multipart callbacks

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ApiError(422, "invalid_request", f"file: the form has more than {MAX_PARTS} parts; {_HOW}", "file")
        self._disposition = b""

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._in_file = options.get(b"name") == FILE_FIELD and b"filename" in options
        if not self._in_file:
            return  # another field (or 'file' sent as text): its data is dropped
        if self.handle is not None:
            raise ApiError(422, "invalid_request", "file: sent more than once; upload one file per request", "file")
        self.filename = _decode(options[b"filename"])
        self.suffix = Path(self.filename).suffix.lower()
        if self.suffix not in FORMATS:
            shown = self.suffix or "no extension"
            raise ApiError(422, "invalid_request", f"file: unsupported file type ({shown}, from the filename "
                           f"{self.filename!r}); name the file *.jsonl, *.json or *.parquet", "file")
        if self.suffix != ".parquet":
            self._validator = streaming_validator(self.suffix, keep_pairs=False)
        self.path, self.handle = new_incoming_file(datasets_dir(self._settings))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_file:
            return
        piece = memoryview(data)[start:end]
        if self.size + len(piece) > self._settings.max_upload_bytes:
            logger.info("upload of %r refused at %d bytes: over the limit of %d", self.filename,
                        self.size + len(piece), self._settings.max_upload_bytes)
            raise too_large(self._settings)
        self.size += len(piece)
        self.handle.write(piece)  # type: ignore[union-attr]
        self._digest.update(piece)
        if self._validator is not None:
            self._validator.feed(bytes(piece))

    def _on_part_end(self) -> None:
        if self._in_file:
            self._file_complete = True
        self._in_file = False

    def _on_end(self) -> None:
        self._ended = True


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise ApiError(422, "invalid_request", f"file: required; {_HOW}", "file")
    boundary = options.get(b"boundary")
    if not boundary:
        raise _malformed("no boundary in its Content-Type")
    return boundary


async def _coalesced(stream: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """The body in pieces of at least ``size`` bytes (the last may be shorter): one thread hop per piece."""
    pending = bytearray()
    async for chunk in stream:
        pending += chunk
        if len(pending) >= size:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


async def receive_dataset(request: Request, settings: Settings) -> ReceivedDataset:
    """Read the request's body, enforcing the limit as it arrives; a 4xx ApiError leaves no file behind."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + MULTIPART_OVERHEAD:
        raise too_large(settings)  # refused before one byte is read
    receiver = _Receiver(_boundary(request), settings)
    body = _counted(request, settings.max_upload_bytes + MULTIPART_OVERHEAD, settings)
    try:
        async for piece in _coalesced(body, CHUNK):
            await run_in_threadpool(receiver.write, piece)
        return await run_in_threadpool(receiver.finish)
    except BaseException as error:
        # Synchronously (an unlink and a close): an await here could itself be cancelled. No thread is still
        # writing: run_in_threadpool defers a cancellation until its thread returns.
        receiver.close()
        if isinstance(error, ClientDisconnect):
            raise ApiError(400, "invalid_request", "file: the client disconnected before the upload ended; send "
                           "it again", "file") from None
        raise


async def _counted(request: Request, limit: int, settings: Settings) -> AsyncIterator[bytes]:
    """``request.stream()``, refusing the body as soon as it passes ``limit`` (a chunked body declares no length)."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large(settings)
        yield chunk

