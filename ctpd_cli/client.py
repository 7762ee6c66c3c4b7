"""The Python client of the ctpd service, on ``httpx``: what every remote ``ctpd`` command (and a script) uses.

* **Where and who:** :func:`resolve_connection` is the one place that finds the service URL and the API key,
  for every command: the flags (``--url``, ``--key``), then ``$CTPD_URL`` / ``$CTPD_API_KEY``, then the files
  ``ctpd up`` writes under ``$CTPD_HOME`` (``url`` and ``api-key``), then ``http://127.0.0.1:8000``.
* **Retries:** a request is sent again, after an exponential backoff with full jitter (or the server's
  ``Retry-After``), when the connection could not be made (nothing reached the server, so any request is safe),
  or, for idempotent requests only, when the connection broke or the service answered 429, 502, 503 or 504.
  Idempotent: GET, HEAD, DELETE, the calls the API documents as repeatable (cancel, enabling a webhook), and
  ``POST /v1/jobs``, which always carries an ``Idempotency-Key`` (one is made up when the caller gives none),
  so a submit whose answer was lost and is retried returns the job the first attempt created, never a second.
* **Uploads** stream the file from its handle (a multi-GB dataset is never read into memory); **downloads**
  stream to ``<target>.part`` and resume it with ``Range: bytes=N-`` (``If-Range`` with the validator the
  first answer carried), starting over when the service answers 200 instead of 206; the finished file is
  renamed into place, so a target never holds half a file.
* **Errors** are :class:`ServiceError`, carrying the service's ``error.code``, ``message`` and ``param``.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "PUT"})
DOWNLOAD_CHUNK = 1 << 20
MAX_RETRY_AFTER = 60.0  # a server asking for longer than this is waited out in steps the attempts bound


class ServiceError(RuntimeError):
    """The service answered with an error, or could not be reached.

    ``status`` is the HTTP status (None: no answer), ``code`` / ``param`` the service's ``error.code`` and
    ``error.param``, ``errors`` its list of problems (a 422), ``detail`` the whole ``error`` object, ``headers``
    the answer's headers (lower-case names)."""

    def __init__(self, message: str, *, method: str, path: str, status: int | None = None, code: str | None = None,
                 param: str | None = None, detail: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.method, self.path = message, method, path
        self.status, self.code, self.param = status, code, param
        self.detail: dict[str, Any] = dict(detail or {})
        self.headers: dict[str, str] = {name.lower(): value for name, value in (headers or {}).items()}

    @property
    def errors(self) -> list[dict[str, Any]]:
        return list(self.detail.get("errors") or [])

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        where = f" ({self.param})" if self.param and self.param not in self.message else ""
        return f"{self.method} {self.path}: HTTP {self.status} {self.code or 'error'}: {self.message}{where}"


# --------------------------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class Connection:
    """Where the service is and the key to use, with where each came from (shown when the key is refused)."""

    url: str
    key: str
    url_source: str
    key_source: str


def ctpd_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$CTPD_HOME`` (default ``./.ctpd``)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("CTPD_HOME", ".ctpd")).expanduser()


def _read_file(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return value or None


def configured_url(url: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(url, source)`` from the flag, ``$CTPD_URL`` or ``$CTPD_HOME/url``; None when none of them names one."""
    environ = os.environ if environ is None else environ
    if url:
        return url, "--url"
    if environ.get("CTPD_URL"):
        return environ["CTPD_URL"], "CTPD_URL"
    url_file = ctpd_home(environ) / "url"
    stored = _read_file(url_file)
    return (stored, str(url_file)) if stored else None


def resolve_connection(url: str | None = None, key: str | None = None,
                       environ: Mapping[str, str] | None = None) -> Connection:
    """The service URL and API key, each from the first of: the flag, the environment variable
    (``CTPD_URL``, ``CTPD_API_KEY``), the file under ``$CTPD_HOME`` that ``ctpd up`` writes (``url``,
    ``api-key``); the URL defaults to ``http://127.0.0.1:8000``. No key anywhere is a ``ValueError`` that says
    where to put one."""
    environ = os.environ if environ is None else environ
    found_url = configured_url(url, environ) or (DEFAULT_URL, "the default")
    if not found_url[0].startswith(("http://", "https://")):
        raise ValueError(f"service URL {found_url[0]!r} (from {found_url[1]}) must start with http:// or https://, "
                         "e.g. http://127.0.0.1:8000")
    key_file = ctpd_home(environ) / "api-key"
    if key:
        found_key = (key, "--key")
    elif environ.get("CTPD_API_KEY"):
        found_key = (environ["CTPD_API_KEY"], "CTPD_API_KEY")
    elif (stored := _read_file(key_file)) is not None:
        found_key = (stored, str(key_file))
    else:
        raise ValueError(f"no API key: pass --key, set CTPD_API_KEY, or start `ctpd up` (it writes {key_file}); "
                         "an operator creates one with `ctpd keys create --tenant NAME`")
    return Connection(url=found_url[0].rstrip("/"), key=found_key[0], url_source=found_url[1],
                      key_source=found_key[1])


def _user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("ctpd")
    except PackageNotFoundError:
        own = "dev"
    return f"ctpd-cli/{own} httpx/{httpx.__version__}"


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_from(response: httpx.Response, method: str, path: str) -> ServiceError:
    """The service's error body (``{"error": {"code", "message", "param"}}``) as a ServiceError; any other body
    (a proxy's HTML page) becomes the message, shortened."""
    detail: dict[str, Any] = {}
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            detail = body["error"]
    except (ValueError, UnicodeDecodeError):
        pass
    message = str(detail.get("message") or response.text[:300].strip() or response.reason_phrase)
    return ServiceError(message, method=method, path=path, status=response.status_code, code=detail.get("code"),
                        param=detail.get("param"), detail=detail, headers=response.headers)


# ------------------------------------------------------------------------------------------------ client


class Client:
    """A client of one service with one API key. ``retries``: attempts after the first; ``backoff``: the first
    delay in seconds (doubled each time, at most ``max_backoff``, with full jitter)."""

    def __init__(self, url: str, key: str, *, timeout: float = 60.0, retries: int = 4, backoff: float = 0.5,
                 max_backoff: float = 30.0, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._sleep = sleep
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": _user_agent(), "Accept": "application/json"},
            # connect: a service that is not there fails fast and is retried; read: a slow answer (a large
            # listing, the database waking up) is waited for.
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False, transport=transport,
        )

    @classmethod
    def from_connection(cls, connection: Connection, **options: Any) -> Client:
        return cls(connection.url, connection.key, **options)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- the transport

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Before retry number ``attempt`` (1-based): the server's Retry-After when it gave one, else a random
        delay in [0, backoff * 2^(attempt-1)] (full jitter: many clients retrying after one outage spread out)."""
        asked = _retry_after(response) if response is not None else None
        if asked is not None:
            return min(asked, MAX_RETRY_AFTER)
        return random.uniform(0.0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))

    def send(self, method: str, path: str, *, idempotent: bool | None = None, stream: bool = False,
             rewind: IO[bytes] | None = None, **kwargs: Any) -> httpx.Response:
        """One request, with the retries the module docstring describes; returns a 2xx response (streamed,
        still open, when ``stream``), raises :class:`ServiceError` otherwise. ``rewind``: a file the body
        reads from, sought back to its start before each attempt."""
        method = method.upper()
        safe = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        attempt = 0
        while True:
            response: httpx.Response | None = None
            retryable = False
            if rewind is not None:
                rewind.seek(0)
            try:
                request = self.http.build_request(method, path, **kwargs)
                response = self.http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                # Nothing reached the service: retrying is safe whatever the request does.
                failure: ServiceError = ServiceError(
                    f"cannot reach the service at {self.url} ({type(error).__name__}: {error}); is it running? "
                    "(`ctpd up` starts one; --url or CTPD_URL names another)", method=method, path=path)
                retryable = True
            except httpx.TransportError as error:
                # The request may have been received (the connection broke, the answer timed out): only an
                # idempotent request may be sent again.
                failure = ServiceError(f"{method} {path}: the connection to {self.url} failed "
                                       f"({type(error).__name__}: {error})", method=method, path=path)
                retryable = safe
            else:
                if response.is_success:
                    return response
                if stream:
                    response.read()
                failure = _error_from(response, method, path)
                retryable = safe and response.status_code in RETRY_STATUSES
                response.close()
            if not retryable or attempt >= self.retries:
                raise failure
            attempt += 1
            delay = self._delay(attempt, response)
            logger.info("%s %s: %s; retry %d of %d in %.1f s", method, path, failure, attempt, self.retries, delay)
            self._sleep(delay)

    def request(self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any) -> Any:
        """:meth:`send`, returning the decoded JSON body (None for an empty one, a 204)."""
        response = self.send(method, path, idempotent=idempotent, **kwargs)
        return response.json() if response.content else None

    def pages(self, path: str, params: Mapping[str, Any] | None = None, *, cursor: str = "id") -> Iterator[dict[str, Any]]:
        """Every item of a list endpoint, page after page (``after`` = the last item's ``cursor`` field)."""
        query = dict(params or {})
        while True:
            page = self.request("GET", path, params=query)
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            query["after"] = page["data"][-1][cursor]

    # ------------------------------------------------------------------------------------------- jobs

    def create_job(self, spec: Mapping[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job. Always with an Idempotency-Key (a fresh one unless given), so the retries never make
        two jobs; the same key with another spec is a 409 ``idempotency_conflict``."""
        key = idempotency_key or f"ctpd-cli-{uuid.uuid4()}"
        return self.request("POST", "/v1/jobs", json=dict(spec), headers={"Idempotency-Key": key}, idempotent=True)

    def preflight(self, spec: Mapping[str, Any], *, wait_seconds: float = 90.0) -> dict[str, Any]:
        """A dry run of ``spec`` (``POST /v1/jobs?dry_run=true``): the report, complete or ``status: pending``. Safe to
        retry (it stores a report, never a job); the service may hold the answer ``wait_seconds`` (its
        CTPD_PREFLIGHT_WAIT_SECONDS) for a worker, so the read timeout covers that."""
        return self.request("POST", "/v1/jobs", params={"dry_run": "true"}, json=dict(spec), idempotent=True,
                            timeout=httpx.Timeout(self.http.timeout.connect, read=wait_seconds + 30.0))

    def get_preflight(self, preflight_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/preflights/{preflight_id}")

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, *, status: str | None = None, limit: int = 20, after: str | None = None,
                  metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
        """One page, newest first."""
        return self.request("GET", "/v1/jobs", params=self._job_query(status, limit, after, metadata))

    def iter_jobs(self, *, status: str | None = None, metadata: Mapping[str, str] | None = None,
                  page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every job, newest first, page after page."""
        return self.pages("/v1/jobs", self._job_query(status, page_size, None, metadata))

    @staticmethod
    def _job_query(status: str | None, limit: int, after: str | None,
                   metadata: Mapping[str, str] | None) -> dict[str, Any]:
        query: dict[str, Any] = {"limit": limit}
        if status:
            query["status"] = status
        if after:
            query["after"] = after
        for name, value in (metadata or {}).items():
            query[f"metadata[{name}]"] = value
        return query

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        # Repeatable by contract: cancelling a cancelling or cancelled job returns it unchanged.
        return self.request("POST", f"/v1/jobs/{job_id}/cancel", idempotent=True)

    def events(self, job_id: str, after: int | None = None, limit: int = 100) -> dict[str, Any]:
        query: dict[str, Any] = {"limit": limit}
        if after is not None:
            query["after"] = after
        return self.request("GET", f"/v1/jobs/{job_id}/events", params=query)

    def metrics(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/metrics")

    def artifacts(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/artifacts")

    def checkpoints(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/checkpoints")

    def checkpoint(self, job_id: str, checkpoint_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/checkpoints/{checkpoint_id}")

    def build_checkpoint_model(self, job_id: str, checkpoint_id: str) -> dict[str, Any]:
        # Repeatable: asking again while a build is pending enqueues nothing (app/services/checkpoints.py).
        return self.request("POST", f"/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/model", idempotent=True)

    # --------------------------------------------------------------------------------------- datasets

    def upload_dataset(self, path: Path, filename: str | None = None) -> dict[str, Any]:
        """Upload a dataset file, streamed from its handle in 64 KiB chunks (httpx's multipart encoder), so
        memory stays flat whatever the file's size. Not retried once sent: a retry could store it twice; a
        connection that never opened is retried (the file is read again from its start)."""
        path = Path(path)
        try:
            handle = path.open("rb")
        except OSError as error:
            raise ValueError(f"cannot read dataset file {str(path)!r}: {error.strerror}") from error
        with handle:
            return self.request("POST", "/v1/datasets", files={"file": (filename or path.name, handle,
                                                                        "application/octet-stream")},
                                rewind=handle, idempotent=False)

    def list_datasets(self, limit: int = 100, after: str | None = None) -> dict[str, Any]:
        query: dict[str, Any] = {"limit": limit}
        if after:
            query["after"] = after
        return self.request("GET", "/v1/datasets", params=query)

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: str) -> Any:
        return self.request("DELETE", f"/v1/datasets/{dataset_id}")

    # --------------------------------------------------------------------------------------- API keys

    def list_api_keys(self, tenant: str | None = None) -> dict[str, Any]:
        return self.request("GET", "/v1/api-keys", params={"tenant": tenant} if tenant else None)

    def create_api_key(self, tenant: str, name: str = "api", is_admin: bool = False) -> dict[str, Any]:
        # Not retried: a retry after a lost answer would make a second key (the first one's plaintext lost).
        return self.request("POST", "/v1/api-keys", json={"tenant": tenant, "name": name, "is_admin": is_admin})

    def revoke_api_key(self, key_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/api-keys/{key_id}")

    # --------------------------------------------------------------------------------------- webhooks

    def create_webhook(self, url: str, event_types: list[str] | None = None,
                       description: str | None = None) -> dict[str, Any]:
        """The webhook, with its signing ``secret``: the only answer that carries it."""
        body: dict[str, Any] = {"url": url}
        if event_types:
            body["event_types"] = event_types
        if description is not None:
            body["description"] = description
        return self.request("POST", "/v1/webhooks", json=body)

    def list_webhooks(self) -> dict[str, Any]:
        return self.request("GET", "/v1/webhooks")

    def webhook(self, webhook_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/webhooks/{webhook_id}")

    def update_webhook(self, webhook_id: str, **changes: Any) -> dict[str, Any]:
        # Setting fields to values is repeatable: a retry changes nothing more.
        return self.request("PATCH", f"/v1/webhooks/{webhook_id}", json=changes, idempotent=True)

    def delete_webhook(self, webhook_id: str) -> None:
        self.request("DELETE", f"/v1/webhooks/{webhook_id}")

    def webhook_deliveries(self, webhook_id: str, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        query: dict[str, Any] = {"limit": limit}
        if after:
            query["after"] = after
        return self.request("GET", f"/v1/webhooks/{webhook_id}/deliveries", params=query)

    def redeliver(self, webhook_id: str, message_id: str) -> Any:
        return self.request("POST", f"/v1/webhooks/{webhook_id}/deliveries/{message_id}/redeliver")

    # -------------------------------------------------------------------------------------- downloads

    def download(self, path: str, target: Path, *,
                 progress: Callable[[int, int | None], None] | None = None) -> Path:
        """Stream ``path`` to ``target``, resumably: the bytes go to ``<target>.part``; a part file already
        there (an interrupted download) is continued with ``Range: bytes=<its size>-`` and ``If-Range`` (the
        ETag or Last-Modified of the answer that started it, kept in ``<target>.part.json``). A 206 appends;
        a 200 (no Range support, or the file changed) starts over; a broken connection resumes from what
        arrived, up to ``retries`` times. ``progress(done, total)`` is called as bytes arrive. Returns
        ``target``."""
        target = Path(target)
        part = target.with_name(target.name + ".part")
        validator_file = target.with_name(target.name + ".part.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        attempt = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            headers: dict[str, str] = {"Accept": "*/*"}
            validator = _read_file(validator_file) if have else None
            if have:
                headers["Range"] = f"bytes={have}-"
                if validator:
                    headers["If-Range"] = json.loads(validator).get("validator", "")
                    if not headers["If-Range"]:
                        del headers["If-Range"]
            try:
                response = self.send("GET", path, headers=headers, stream=True)
            except ServiceError as error:
                if error.status == 416 and have:
                    # The part file already holds every byte (or more: a different file): check the size.
                    total = _range_total(error.headers.get("content-range"))
                    if total is not None and total == have:
                        break
                    part.unlink()
                    validator_file.unlink(missing_ok=True)
                    continue
                raise
            try:
                if response.status_code == 206:
                    start, total = _content_range(response.headers.get("Content-Range"))
                    if start != have:
                        raise ServiceError(f"asked for bytes from {have}, the service sent them from {start}; "
                                           f"delete {part} and download again", method="GET", path=path,
                                           status=206)
                    mode = "ab"
                else:  # 200: the whole file, from its first byte
                    have, mode = 0, "wb"
                    length = response.headers.get("Content-Length")
                    total = have + int(length) if length and length.isdigit() else None
                    tag = response.headers.get("ETag") or response.headers.get("Last-Modified")
                    if tag and not tag.startswith("W/"):  # a weak ETag cannot validate a byte range
                        validator_file.write_text(json.dumps({"validator": tag, "path": path}))
                    else:
                        validator_file.unlink(missing_ok=True)
                done = have
                with part.open(mode) as out:
                    try:
                        for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                            out.write(chunk)
                            done += len(chunk)
                            if progress is not None:
                                progress(done, total)
                    except httpx.TransportError as error:
                        out.flush()
                        if attempt >= self.retries:
                            raise ServiceError(f"GET {path}: the download broke after {done} bytes ({error}); "
                                               f"run the command again to resume from {part}",
                                               method="GET", path=path) from error
                        attempt += 1
                        logger.info("download of %s broke at %d bytes; resuming (retry %d of %d)", path, done,
                                    attempt, self.retries)
                        self._sleep(self._delay(attempt, None))
                        continue
            finally:
                response.close()
            if total is not None and done != total:
                raise ServiceError(f"GET {path}: got {done} of {total} bytes; run the command again to resume "
                                   f"from {part}", method="GET", path=path)
            break
        os.replace(part, target)
        validator_file.unlink(missing_ok=True)
        return target


def _content_range(value: str | None) -> tuple[int, int | None]:
    """``bytes 100-199/1000`` -> ``(100, 1000)``; ``bytes 100-199/*`` -> ``(100, None)``."""
    try:
        unit, _, rest = (value or "").partition(" ")
        span, _, total = rest.partition("/")
        if unit != "bytes":
            raise ValueError(value)
        return int(span.split("-", 1)[0]), (None if total == "*" else int(total))
    except ValueError:
        raise ServiceError(f"a 206 answer with an unreadable Content-Range {value!r}", method="GET", path="",
                           status=206) from None


def _range_total(value: Any) -> int | None:
    if not isinstance(value, str) or "/" not in value:
        return None
    tail = value.rsplit("/", 1)[1]
    return int(tail) if tail.isdigit() else None


def evaluation_table(metrics: Mapping[str, Any]) -> str:
    """The final evaluation metrics of a job (the last point of each ``evaluate/*`` series)."""
    rows = []
    for name, points in sorted(metrics.get("data", {}).items()):
        if name.startswith("evaluate/") and points:
            rows.append(f"  {name.removeprefix('evaluate/'):<34}{points[-1]['value']:>10.4f}")
    return "\n".join(rows)
