"""A conversational dataset's page in the dashboard, in Debian's headless chromium: the upload's counts (shapes,
system and multi-turn rows) and the token lengths a preflight recorded, under each tokenizer's reference exactly
as written (a folder path or hub id keeps its underscores). The app is served in this process on SQLite; the
lengths are recorded with the function the preflight task calls (app.db.datasets.record_token_lengths)."""

from __future__ import annotations

from pathlib import Path

import httpx

from app.db import auth as key_rows
from app.db import datasets as dataset_rows
from app.db.engine import Database
from app.main import create_app
from app.settings import Settings
from tests.browser.conftest import browser_console
from tests.live_service import serving

FORMATS = Path(__file__).resolve().parents[2] / "examples" / "data" / "formats"
STUDENT = "/models/my_student_v2"  # underscores: data, not a field name


def test_a_conversational_datasets_page_shows_its_counts_and_token_lengths(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'ctpd.db'}",
                        broker_url="memory://", preflight_wait_seconds=0)
    db = Database(settings.database_url)
    db.upgrade()
    app = create_app(settings)
    key = key_rows.create_api_key(db, "acme", "browser")
    with serving(app) as url:
        path = FORMATS / "conversational_explicit.jsonl"
        uploaded = httpx.post(f"{url}/v1/datasets", headers={"Authorization": f"Bearer {key}"},
                              files={"file": (path.name, path.read_bytes())})
        assert uploaded.status_code == 201, uploaded.text
        dataset_id = uploaded.json()["id"]
        browser.get(f"{url}/datasets/{dataset_id}")
        wait = WebDriverWait(browser, 20, poll_frequency=0.2)
        wait.until(lambda d: d.find_element(By.ID, "sign-in").is_displayed())
        browser.find_element(By.ID, "api-key").send_keys(key)
        browser.find_element(By.ID, "sign-in-button").click()
        wait.until(lambda d: d.find_element(By.ID, "dataset-detail").is_displayed())
        assert "None measured yet" in browser.find_element(By.ID, "no-token-lengths").text

        dataset_rows.record_token_lengths(db, dataset_id, STUDENT, {
            "prompt": {"count": 3, "mean": 54.0, "p50": 54, "p95": 81, "max": 81}, "sampled_pairs": 3})

        browser.refresh()  # signed in: the key is in this tab's sessionStorage
        try:
            wait.until(lambda d: d.find_elements(By.ID, "dataset-token-lengths"))
        finally:
            print(browser_console(browser))
        shown = browser.find_element(By.ID, "dataset-stats").text.replace("\t", " ")
    db.dispose()
    assert "conversational explicit 3" in shown
    assert "system turn rows 2" in shown and "multi turn rows 1" in shown
    assert STUDENT in shown  # the reference as written
    assert "sampled pairs 3" in shown and "p95 81" in shown
    assert "dataset id" not in shown and "missing" not in shown and "counted" not in shown  # said, not listed
