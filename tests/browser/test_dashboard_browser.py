"""The dashboard in a real headless browser against a real service and worker (tests/browser/conftest.py).

A long tiny-model job is submitted through the API; its page, signed in with the tenant's key, draws the loss
and gains points while the job trains, and its cancel button takes the job to cancelling, then cancelled. Two
short jobs then finish: their pages show the alignment statistics, the evaluation against the initial student
and downloadable artefacts, the list filters them, and the compare page lays their curves on shared axes.

With ``CTPD_DASHBOARD_SCREENSHOTS=<folder>`` the second test also saves the screenshots docs/ shows
(``scripts/dashboard-screenshots``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import DashboardStack, browser_console
from tests.live_service import TERMINAL, submit, tiny_job, wait_for_job

UI_TIMEOUT = 60.0


def _wait(driver: Any, condition: Any, what: str, stack: DashboardStack, timeout: float = UI_TIMEOUT) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out after {timeout:g} s waiting for {what} at {driver.current_url}\n"
                    f"--- browser console ---\n{browser_console(driver)}\n{stack.logs()}")


def _sign_in(driver: Any, stack: DashboardStack, path: str, key: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    driver.get(stack.base_url + path)
    _wait(driver, lambda d: d.find_element(By.ID, "sign-in").is_displayed(), "the sign-in form", stack)
    assert not driver.find_element(By.ID, "main").is_displayed()
    field = driver.find_element(By.ID, "api-key")
    field.send_keys("ctpd_not_a_key")
    driver.find_element(By.ID, "sign-in-button").click()
    _wait(driver, lambda d: "refused" in d.find_element(By.ID, "sign-in-error").text, "a refused key's message", stack)
    field.clear()
    field.send_keys(key or stack.key)
    driver.find_element(By.ID, "sign-in-button").click()
    _wait(driver, lambda d: d.find_element(By.ID, "main").is_displayed(), "the page after signing in", stack)


def _assert_key_only_in_session_storage(driver: Any, key: str) -> None:
    assert key not in driver.current_url
    assert key not in driver.page_source
    requested = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert requested and not [url for url in requested if key in url], requested
    assert driver.execute_script("return sessionStorage.getItem('ctpd.apiKey')") == key
    assert driver.execute_script("return localStorage.length") == 0
    assert driver.get_cookies() == []


def _chart_points(driver: Any, title: str) -> int:
    return int(driver.execute_script(
        "const c = document.querySelector(`#training-charts .chart[data-metric=\"${arguments[0]}\"]`);"
        "return c ? c.dataset.points : 0", title) or 0)


# True once the chart's canvas has pixels drawn beyond the blank background (uPlot draws lines on a canvas).
_CANVAS_DRAWN = """
const canvas = document.querySelector(`#training-charts .chart[data-metric="${arguments[0]}"] canvas`);
if (!canvas || !canvas.width || !canvas.height) return false;
const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) return true;
return false;
"""


# The pages redraw what they poll (a job's head, the list's rows), so an element found a moment ago may be gone:
# these read the page in one script call instead of holding element references across a redraw.
def _status(driver: Any) -> str:
    return driver.execute_script("const s = document.querySelector('#job-title .status'); return s ? s.dataset.status : ''")


def _text(driver: Any, selector: str) -> str:
    return driver.execute_script("const n = document.querySelector(arguments[0]); return n ? n.innerText : ''", selector)


def _listed_jobs(driver: Any) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#jobs-body tr')].map(r => r.dataset.jobId)")


def test_a_training_jobs_page_plots_it_live_and_cancels_it(dashboard_stack: DashboardStack, browser,
                                                          tiny_student_folder, tiny_teacher_folder):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    stack = dashboard_stack
    # Long enough to be watched (thousands of small steps); cancelled long before the end.
    spec = tiny_job(tiny_student_folder, tiny_teacher_folder, stack.dataset_id, name="long run",
                    training={"max_steps": 5000, "checkpoint_every": 10000}, metadata={"suite": "dashboard"})
    job_id = submit(stack.client, spec)

    _sign_in(browser, stack, f"/jobs/{job_id}")
    _assert_key_only_in_session_storage(browser, stack.key)

    # The plot renders and gains points while the job trains.
    first = _wait(browser, lambda d: _chart_points(d, "Loss") >= 5 and _chart_points(d, "Loss"),
                  "the loss plot's first distill points", stack)
    assert browser.execute_script(_CANVAS_DRAWN, "Loss"), "the loss chart's canvas is blank"
    _wait(browser, lambda d: _chart_points(d, "Loss") > first, "the loss plot to gain points", stack)
    assert stack.client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # it grew while training
    assert _chart_points(browser, "Learning rate") > 0
    event_types = browser.execute_script("return [...document.querySelectorAll('#events-body tr')].map(r => r.dataset.type)")
    assert "stage_started" in event_types and "job_started" in event_types, event_types
    _wait(browser, lambda d: d.find_element(By.ID, "span-histogram"), "the prepare stage's span histogram", stack)
    share = _text(browser, "#prepare-table")
    assert "1:1 spans" in share and "%" in share and "truncated responses" in share

    # Cancel: a confirmation, then cancelling, then cancelled (the worker checkpoints and stops).
    cancel = browser.find_element(By.ID, "cancel-job")
    assert cancel.is_displayed() and cancel.is_enabled()
    cancel.click()
    _wait(browser, expected_conditions.alert_is_present(), "the cancel confirmation", stack).accept()
    _wait(browser, lambda d: _status(d) in ("cancelling", "cancelled"), "the status to become cancelling", stack)
    _wait(browser, lambda d: _status(d) == "cancelled", "the status to become cancelled", stack)
    assert not browser.find_element(By.ID, "cancel-job").is_displayed()
    job = stack.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and "cancelling" in [t["status"] for t in job["transitions"]]
    assert job["progress"]["step"] < 5000

    # Signing out forgets the key and hides the data.
    browser.find_element(By.ID, "sign-out").click()
    _wait(browser, lambda d: d.find_element(By.ID, "sign-in").is_displayed(), "the sign-in form after signing out", stack)
    assert browser.execute_script("return sessionStorage.getItem('ctpd.apiKey')") is None
    assert browser.find_elements(By.CSS_SELECTOR, "#events-body tr") == []


def _finished_jobs(stack: DashboardStack, student: Path, teacher: Path) -> list[dict[str, Any]]:
    ids = []
    for run, learning_rate in (("a", 1e-3), ("b", 3e-4)):
        spec = tiny_job(student, teacher, stack.dataset_id, name=f"ctpd lr {learning_rate:g}",
                        contrastive={"max_steps": 12},
                        training={"max_steps": 30, "checkpoint_every": 30, "learning_rate": learning_rate},
                        metadata={"suite": "dashboard", "run": run})
        ids.append(submit(stack.client, spec))
    return [wait_for_job(stack.client, job_id, lambda job: job["status"] in TERMINAL, "finished", stack.logs)
            for job_id in ids]


def test_finished_jobs_their_pages_the_list_and_the_comparison(dashboard_stack: DashboardStack, browser,
                                                               tiny_student_folder, tiny_teacher_folder):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    stack = dashboard_stack
    jobs = _finished_jobs(stack, tiny_student_folder, tiny_teacher_folder)
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], stack.logs()
    first, second = jobs
    shots = os.environ.get("CTPD_DASHBOARD_SCREENSHOTS")
    shots_dir = Path(shots) if shots else None

    # The job list: every job of the tenant; the filters narrow it.
    _sign_in(browser, stack, "/")
    rows = _listed_jobs
    _wait(browser, lambda d: {first["id"], second["id"]} <= set(rows(d)), "both jobs in the list", stack)
    listed = _text(browser, f'#jobs-body tr[data-job-id="{first["id"]}"]')
    assert "succeeded" in listed and "export" in listed and "done" in listed and "run=a" in listed, listed
    if shots_dir:
        browser.save_screenshot(str(shots_dir / "dashboard-jobs.png"))
    browser.find_element(By.ID, "filter-metadata").send_keys("run=b")
    browser.find_element(By.CSS_SELECTOR, "#job-filters button[type=submit]").click()
    _wait(browser, lambda d: rows(d) == [second["id"]], "the metadata filter to leave job b alone", stack)
    browser.find_element(By.ID, "filter-metadata").clear()
    Select(browser.find_element(By.ID, "filter-status")).select_by_value("succeeded")
    browser.find_element(By.CSS_SELECTOR, "#job-filters button[type=submit]").click()
    _wait(browser, lambda d: set(rows(d)) == {first["id"], second["id"]}, "the status filter", stack)
    _assert_key_only_in_session_storage(browser, stack.key)

    # A finished job's page: curves of π+, π− and distill, alignment, evaluation, artefacts.
    browser.get(f"{stack.base_url}/jobs/{first['id']}")
    _wait(browser, lambda d: d.find_elements(By.ID, "evaluation-table"), "the evaluation table", stack)
    metrics = stack.client.get(f"/v1/jobs/{first['id']}/metrics").json()["data"]
    expected_points = sum(len(metrics.get(f"{stage}/loss", []))
                          for stage in ("contrastive:positive", "contrastive:negative", "distill"))
    assert expected_points == 12 + 12 + 30
    _wait(browser, lambda d: _chart_points(d, "Loss") == expected_points, "every loss point", stack)
    evaluation = _text(browser, "#evaluation-table").lower()  # the header is upper-cased by the style sheet
    accuracy = metrics["evaluate/preference_accuracy"][-1]["value"]
    initial = metrics["evaluate/initial_preference_accuracy"][-1]["value"]
    assert "preference accuracy" in evaluation and "initial student" in evaluation
    assert f"{initial:.4f}".rstrip("0").rstrip(".") in evaluation and f"{accuracy:.4f}".rstrip("0").rstrip(".") in evaluation
    histogram_rows = browser.find_elements(By.CSS_SELECTOR, "#span-histogram .hist-row")
    assert len(histogram_rows) == 8
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#artifacts-table button[data-download]"),
          "the artefact list", stack)
    if shots_dir:
        browser.set_window_size(1400, 2300)
        time.sleep(0.5)
        browser.save_screenshot(str(shots_dir / "dashboard-job.png"))
        browser.set_window_size(1400, 1000)
    # A download: fetched with the Bearer header, saved from a blob URL, the same bytes as the API's.
    config = browser.find_element(By.CSS_SELECTOR, '#artifacts-table button[data-download$="/config.json"]')
    browser.execute_script("arguments[0].scrollIntoView()", config)
    config.click()
    saved = browser.download_dir / "config.json"
    _wait(browser, lambda d: saved.is_file() and saved.stat().st_size > 0, "config.json to be downloaded", stack)
    assert saved.read_bytes() == stack.client.get(f"/v1/jobs/{first['id']}/model/files/config.json").content

    # The comparison: both jobs' metrics, and their curves on one chart per metric.
    browser.get(f"{stack.base_url}/compare?jobs={first['id']},{second['id']}")
    _wait(browser, lambda d: d.find_element(By.ID, "compare-results").is_displayed(), "the comparison", stack)
    table = _text(browser, "#compare-table")
    assert first["name"] in table and second["name"] in table
    assert "preference accuracy (initial → distilled)" in table and "\npairs 8 8" in table.replace("\t", " ")
    assert "\ndistill steps 30 30" in table.replace("\t", " "), table
    charts = browser.find_elements(By.CSS_SELECTOR, "#compare-charts .chart")
    assert [chart.get_attribute("data-metric") for chart in charts] == ["Loss", "Reward accuracy", "Reward margin",
                                                                        "Learning rate"]
    assert all(int(chart.get_attribute("data-points")) == 60 for chart in charts)  # 30 distill steps of each job
    if shots_dir:
        browser.set_window_size(1400, 1750)
        time.sleep(0.5)
        browser.save_screenshot(str(shots_dir / "dashboard-compare.png"))

    # The datasets page: the upload, and its statistics or a note that it has none.
    browser.get(f"{stack.base_url}/datasets/{stack.dataset_id}")
    _wait(browser, lambda d: d.find_element(By.ID, "dataset-detail").is_displayed(), "the dataset's page", stack)
    assert stack.dataset_id in browser.find_element(By.ID, "datasets-body").text
    if shots_dir:
        browser.save_screenshot(str(shots_dir / "dashboard-datasets.png"))
    stats = stack.client.get(f"/v1/datasets/{stack.dataset_id}").json().get("stats")
    shown = browser.find_element(By.ID, "dataset-stats")
    if stats:
        assert shown.find_elements(By.CSS_SELECTOR, "table.kv")
    else:
        assert shown.find_element(By.ID, "no-dataset-stats").is_displayed()

    # Another tenant's key sees none of it: the same pages, and the API's answers for that key.
    browser.find_element(By.ID, "sign-out").click()
    _sign_in(browser, stack, f"/jobs/{first['id']}", key=stack.other_key)
    _wait(browser, lambda d: "No job" in _text(d, "#job-error"), "another tenant's job to be not found", stack)
    assert _chart_points(browser, "Loss") == 0 and first["name"] not in browser.page_source
    browser.get(f"{stack.base_url}/")
    _wait(browser, lambda d: d.find_element(By.ID, "jobs-empty").is_displayed(), "an empty list for the other tenant", stack)
    assert _listed_jobs(browser) == []
