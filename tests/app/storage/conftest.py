"""The two storage backends for the storage tests: a local folder and a REAL S3-compatible server (moto's server
mode, over HTTP on a free port of 127.0.0.1, started once per session), each test with a fresh bucket of its own."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

KEY, SECRET = "test-key-id", "test-secret-never-logged"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the kernel picks one
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "key": KEY, "secret": SECRET, "client_kwargs": {"region_name": "us-east-1"}}


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"ctpd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                 region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["file", "s3"])
def storage_url(request, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """(CTPD_STORAGE_URL, CTPD_STORAGE_OPTIONS) of an empty storage of each backend."""
    if request.param == "file":
        folder = tmp_path / "shared-storage"
        return f"file://{folder}", {}
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{new_bucket(endpoint)}/ctpd", s3_options(endpoint)
