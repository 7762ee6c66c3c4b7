"""docker-compose.yml and the Dockerfiles: validated by `docker-compose config` (Debian's `docker-compose`
package needs no Docker engine), plus the production rules that config does not check."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.skipif(
    shutil.which("docker-compose") is None and not os.environ.get("CI"),
    reason="docker-compose is not installed (apt-get install -y --no-install-recommends docker-compose); "
    "in CI (.ci/run installs it) a missing binary fails instead",
)
def test_docker_compose_config_validates():
    assert shutil.which("docker-compose"), "docker-compose is missing: .ci/run installs it with apt-get"
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_services_and_health_checks(compose):
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "scheduler"} <= set(services)
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "curl" in services["api"]["healthcheck"]["test"]
    assert services["migrate"]["command"] == ["ctpd", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker", "scheduler"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy"


def test_production_urls_and_shared_artifacts(compose):
    services = compose["services"]
    for name in ("migrate", "api", "worker", "scheduler"):
        env = services[name]["environment"]
        assert env["CTPD_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["CTPD_BROKER_URL"].startswith("redis://")
    for name in ("api", "worker", "scheduler"):
        assert "artifacts:/data" in services[name]["volumes"]


def test_worker_reserves_one_gpu_and_only_one_beat_runs(compose):
    services = compose["services"]
    (device,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["worker"]["command"][:4] == ["ctpd", "worker", "--queues", "train"]
    beats = [name for name, service in services.items() if "--beat" in (service.get("command") or [])]
    assert beats == ["scheduler"]


def _requirement_names(lines) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[<>=!\[ ;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_api_image_has_no_torch_and_covers_the_api_extra():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    api_extra = _requirement_names(pyproject["project"]["optional-dependencies"]["api"])
    image = _requirement_names((REPO / "docker" / "requirements-api.txt").read_text().splitlines())
    assert api_extra <= image, f"docker/requirements-api.txt lacks {api_extra - image}"
    assert not image & {"torch", "transformers", "tokenizers", "accelerate", "numpy"}
    dockerfile = (REPO / "docker" / "api.Dockerfile").read_text()
    assert "pip install --no-deps ." in dockerfile
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and not any("torch" in line for line in installs)
