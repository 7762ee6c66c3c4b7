"""A real service (``ctpd serve`` + a real Celery worker on PostgreSQL and Redis) and Debian's headless chromium
driven by Selenium through Debian's chromedriver, for the dashboard tests.

Nothing is downloaded: the browser and its driver are the ``chromium`` and ``chromium-driver`` packages
(``.ci/run`` installs them), named by path so Selenium Manager never looks for others. Elsewhere a missing
browser skips these tests; under ``CI=true`` it fails them, so CI cannot pass without having run them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_service import (
    Proc,
    api_process,
    api_ready,
    create_key,
    free_port,
    reachable,
    run_cli,
    scratch_database,
    service_env,
    upload_dataset,
    wait_until,
    worker_process,
    worker_ready,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "install Debian's browser and its driver: `apt-get install -y chromium chromium-driver` (.ci/run does)"
REDIS_URL = "redis://127.0.0.1:6379/9"  # a database of its own on the shared Redis (flushed here)
WINDOW = (1400, 1000)


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}; {INSTALL_HINT}. Under CI=true the dashboard's browser tests must run, not skip.")
    pytest.skip(f"{what}; {INSTALL_HINT}")


def chromium(download_dir: Path, window: tuple[int, int] = WINDOW) -> Any:
    """A headless chromium (Debian's) driven through Debian's chromedriver; downloads land in ``download_dir``."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            _missing(f"{path} is missing")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (the dev extra pins it: `.venv/bin/pip install -e '.[dev]'`)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start; /dev/shm is small in containers.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={window[0]},{window[1]}", "--lang=en-GB", "--no-first-run"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(download_dir), "download.prompt_for_download": False,
    })
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    return driver


def browser_console(driver: Any) -> str:
    try:
        return "\n".join(f"{entry['level']}: {entry['message']}" for entry in driver.get_log("browser"))
    except Exception as error:  # a driver that died: say so rather than hide the original failure
        return f"(browser console unreadable: {error})"


@dataclass
class DashboardStack:
    base_url: str
    key: str
    other_key: str  # another tenant's
    client: httpx.Client
    api: Proc
    worker: Proc
    home: Path
    dataset_id: str

    def logs(self) -> str:
        return f"{self.api.tail(30)}\n{self.worker.tail(60)}"


@pytest.fixture(scope="module")
def dashboard_postgres() -> Iterator[str]:
    with scratch_database("ctpd_dashboard") as url:
        yield url


@pytest.fixture(scope="module")
def dashboard_stack(tmp_path_factory, dashboard_postgres, tiny_dataset_path) -> Iterator[DashboardStack]:
    if not reachable(6379):
        pytest.skip("Redis is not running on 127.0.0.1:6379 (.ci/run starts it)")
    import redis

    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    broker.close()
    home = tmp_path_factory.mktemp("dashboard")
    # The tiny models are folders on this machine: a deployment that lets its tenants name server paths.
    env = service_env(home, single_thread=True, database_url=dashboard_postgres, broker_url=REDIS_URL,
                      lease_seconds="20", allow_server_paths="true")
    run_cli(["db", "upgrade"], env)
    key = create_key(env, "dashboard")
    other_key = create_key(env, "another-tenant")
    port = free_port()
    api = api_process(env, port, home / "api.log")
    worker = worker_process("dashboard", env, home / "worker.log", queues="train,default")
    base_url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    try:
        wait_until(lambda: api_ready(client) or not api.alive(), 60, "the API's /readyz",
                   lambda: api.tail(40))
        assert api.alive(), api.tail(60)
        wait_until(lambda: worker_ready(worker), 90, "the worker to consume", lambda: worker.tail(60))
        assert worker.alive(), worker.tail(80)
        yield DashboardStack(base_url, key, other_key, client, api, worker, home, upload_dataset(client, tiny_dataset_path))
    finally:
        client.close()
        worker.kill()
        api.stop()


@pytest.fixture
def browser(tmp_path) -> Iterator[Any]:
    driver = chromium(tmp_path / "downloads")
    driver.download_dir = tmp_path / "downloads"
    try:
        yield driver
    finally:
        driver.quit()
