"""A small HTTP client of the ctpd service (the stdlib and the shared vocabulary only): upload a dataset, submit
a job, follow it live.

Used by ``ctpd submit`` and by the README's main command. The key comes from ``--key``, ``$CTPD_API_KEY`` or
the file ``$CTPD_HOME/api-key`` that ``ctpd up`` writes on first start.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctpd_core.vocab import TERMINAL_STATUSES, JobStatus


class ServiceError(RuntimeError):
    """The service answered with an error (or did not answer); the message is the service's own."""


class Client:
    def __init__(self, url: str, key: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        request.add_header("Authorization", f"Bearer {self.key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["error"]["message"]
            raise ServiceError(f"{method} {path}: HTTP {error.code}: {detail}") from error
        except urllib.error.URLError as error:
            raise ServiceError(f"cannot reach the service at {self.url}: {error.reason}") from error

    def upload_dataset(self, path: Path) -> dict[str, Any]:
        boundary = uuid.uuid4().hex
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        return self.request("POST", "/v1/datasets", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def create_job(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self.request("POST", "/v1/jobs", json.dumps(spec).encode(), headers)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, after: int | None) -> dict[str, Any]:
        query = f"?after={after}&limit=100" if after is not None else "?limit=100"
        return self.request("GET", f"/v1/jobs/{job_id}/events{query}")

    def metrics(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/metrics")


TERMINAL = frozenset(TERMINAL_STATUSES)


def follow(client: Client, job_id: str, echo: Callable[[str], None] = print, poll_seconds: float = 2.0) -> dict[str, Any]:
    """Print the job's events and progress as they happen; return the final job object."""
    after: int | None = None
    last_progress = None
    started = time.monotonic()
    while True:
        page = client.events(job_id, after)
        for event in page["data"]:
            after = event["id"]
            echo(f"{time.monotonic() - started:7.1f}s  {event['type']:<17} {event.get('message', '')}")
        job = client.job(job_id)
        progress = job.get("progress") or {}
        key = (job.get("stage"), progress.get("step"), progress.get("total"))
        if job["status"] == JobStatus.RUNNING and progress.get("total") and key != last_progress:
            eta = progress.get("eta_seconds")
            echo(
                f"{time.monotonic() - started:7.1f}s  progress          {job.get('stage')}: "
                f"{progress.get('step')}/{progress.get('total')}" + (f", ETA {eta:.0f}s" if eta is not None else "")
            )
            last_progress = key
        if job["status"] in TERMINAL and not page.get("has_more"):
            return job
        time.sleep(poll_seconds)


def evaluation_table(metrics: dict[str, Any]) -> str:
    """The final evaluation metrics of a job (the last point of each ``evaluate/*`` series)."""
    rows = []
    for name, points in sorted(metrics.get("data", {}).items()):
        if name.startswith("evaluate/") and points:
            rows.append(f"  {name.removeprefix('evaluate/'):<34}{points[-1]['value']:>10.4f}")
    return "\n".join(rows)
