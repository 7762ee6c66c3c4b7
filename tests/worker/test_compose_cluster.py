"""docker-compose.yml as a small cluster: two GPU workers on different GPUs, and the bucket every process shares
(MinIO and the one-shot that creates the bucket the storage URL names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _gpus(service: dict) -> list[str]:
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    return list(device["device_ids"])


def test_two_workers_on_different_gpus_with_distinct_names(services):
    assert set(_gpus(services["worker"])).isdisjoint(_gpus(services["worker-b"]))
    names = {services[name]["command"][-1] for name in ("worker", "worker-b")}
    assert len(names) == 2  # two Celery node names: two rows in the workers table
    for name in ("worker", "worker-b"):
        assert services[name]["command"][:4] == ["ctpd", "worker", "--queues", "train"]
        assert int(services[name]["shm_size"].rstrip("gb")) >= 1  # torch.distributed ranks share /dev/shm


def test_every_process_shares_the_bucket_it_creates(services):
    bucket_command = " ".join(services["bucket"]["command"])
    for name in ("migrate", "api", "scheduler", "worker", "worker-b"):
        env = services[name]["environment"]
        url = env["CTPD_STORAGE_URL"]
        assert url.startswith("s3://")
        bucket = url.removeprefix("s3://").split("/")[0]
        assert f"mb --ignore-existing ctpd/{bucket}" in bucket_command
        options = json.loads(env["CTPD_STORAGE_OPTIONS"])
        assert options["endpoint_url"] == "http://minio:9000" and options["key"] and options["secret"]
    for name in ("api", "scheduler", "worker", "worker-b"):
        assert services[name]["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    assert services["bucket"]["restart"] == "no"
    assert services["bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
