"""The dashboard's pages and files as the API serves them (app/api/dashboard.py); the browser drives them in
tests/browser/. What is feared: a page or file missing from the package, served with a type the browser
refuses, a route that leaks data without a key, and a key that ends up in a URL."""

from __future__ import annotations

import fnmatch
import re
import shutil
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.dashboard import DASHBOARD_DIR, PAGES_DIR, STATIC_DIR, STATIC_FILES
from app.main import create_app
from app.settings import Settings
from tests.app.conftest import RecordingQueue

REPO = Path(__file__).resolve().parents[2]
PAGES = {"/": "jobs", "/jobs/job_0123456789abcdef": "job", "/compare": "compare", "/compare?jobs=a,b": "compare",
         "/datasets": "datasets", "/datasets/ds_0123": "datasets"}


@pytest.fixture
def database_url(tmp_path: Path, migrated_sqlite_template: Path) -> str:
    """SQLite alone: the pages read no database, so running them on both backends would test nothing more."""
    path = tmp_path / "ctpd.db"
    shutil.copyfile(migrated_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def client(settings: Settings):
    app = create_app(settings, queue=RecordingQueue())
    with TestClient(app) as test_client:
        yield test_client
    app.state.db.dispose()


class _Page(HTMLParser):
    """The assets a page loads and its forms."""

    def __init__(self) -> None:
        super().__init__()
        self.assets: list[str] = []
        self.forms: list[dict[str, str | None]] = []
        self.inputs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "script" and attributes.get("src"):
            self.assets.append(str(attributes["src"]))
        if tag == "link" and attributes.get("rel") == "stylesheet":
            self.assets.append(str(attributes["href"]))
        if tag == "form":
            self.forms.append(attributes)
        if tag == "input":
            self.inputs.append(attributes)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


@pytest.mark.parametrize("path", list(PAGES))
def test_every_page_is_html_without_a_key_and_loads_only_served_files(client, path):
    response = client.get(path)  # no Authorization: the pages hold no data
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert f'data-page="{PAGES[path]}"' in response.text
    policy = response.headers["content-security-policy"]
    assert "form-action 'none'" in policy and "script-src 'self'" in policy
    assert response.headers["referrer-policy"] == "no-referrer"
    page = _parse(response.text)
    assert {"/dashboard/static/dashboard.js", "/dashboard/static/vendor/uplot/uPlot.iife.min.js",
            "/dashboard/static/vendor/uplot/uPlot.min.css"} <= set(page.assets)
    for asset in page.assets:
        served = client.get(asset)
        assert served.status_code == 200, asset
        expected = "text/javascript" if asset.endswith(".js") else "text/css"
        assert served.headers["content-type"] == f"{expected}; charset=utf-8", asset
        assert served.headers["x-content-type-options"] == "nosniff"


def test_a_job_page_is_the_same_file_whatever_the_id(client):
    """The id is read by the script from the address; nothing about a job (anyone's) is in the page itself."""
    pages = {client.get(f"/jobs/{job_id}").text for job_id in ("job_a", "job_b", "<img src=x onerror=alert(1)>")}
    assert len(pages) == 1 and "alert(1)" not in pages.pop()


def test_the_vendored_chart_library_is_served_as_shipped(client):
    vendor = STATIC_DIR / "vendor" / "uplot"
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "LICENSE"):
        response = client.get(f"/dashboard/static/vendor/uplot/{name}")
        assert response.status_code == 200
        assert response.content == (vendor / name).read_bytes()
    assert "uPlot" in (vendor / "uPlot.iife.min.js").read_text()
    assert "MIT License" in (vendor / "LICENSE").read_text()
    readme = (vendor / "README.md").read_text()
    assert "npm pack uplot@1.6.32" in readme  # the version and the command that fetched it


@pytest.mark.parametrize("path", ["README.md", "vendor/uplot/README.md", "../pages/jobs.html", "../../main.py",
                                  "%2e%2e/%2e%2e/main.py", "dashboard.js/../../../settings.py"])
def test_only_the_listed_files_are_served(client, path):
    response = client.get(f"/dashboard/static/{path}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_the_pages_are_not_in_the_api_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if not path.startswith("/v1/") and path not in ("/healthz", "/readyz", "/metrics")]


def test_the_data_the_pages_show_still_needs_a_key(client):
    for path in ("/v1/jobs", "/v1/datasets", "/v1/jobs/job_0123/metrics"):
        assert client.get(path).status_code == 401


def test_no_page_can_put_the_key_in_a_url():
    """A form that submitted (GET) would put the key in the address bar, the history and the access log; each
    form posts nowhere (form-action 'none') and the script cancels it. The script sends the key only as a Bearer
    header and keeps it only in sessionStorage."""
    for html in PAGES_DIR.glob("*.html"):
        page = _parse(html.read_text())
        assert all((form.get("method") or "get").lower() == "post" and "action" not in form for form in page.forms), html
        for field in page.inputs:
            if "key" in (field.get("id") or "") + (field.get("name") or ""):
                assert field.get("type") == "password" and field.get("autocomplete") == "off", (html, field)
    script = (STATIC_DIR / "dashboard.js").read_text()
    # Every read of the stored key, and the typed one, goes into an Authorization header or the tab's storage.
    key_uses = [line.strip() for line in script.splitlines() if re.search(r"apiKey\(\)|typedKey", line)
                and not line.strip().startswith(("//", "function apiKey"))]
    assert key_uses, "the key's uses were not found: the check below would pass vacuously"
    for line in key_uses:
        assert "Authorization: `Bearer ${" in line or "sessionStorage.setItem(KEY_STORAGE, typedKey)" in line \
            or line.startswith(("if (apiKey())", "const typedKey = input.value", "if (!typedKey)")), line
    assert "localStorage" not in script and "document.cookie" not in script
    assert not re.search(r"[?&](api_?key|key|token)=", script)
    assert 'event.preventDefault(); // never submitted' in script


def test_the_package_ships_every_dashboard_file():
    """A non-editable install (the API image's ``pip install --no-deps .``) carries only what package-data names."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    needed = ["layout.html", *(f"pages/{page.name}" for page in PAGES_DIR.glob("*.html")),
              *(f"static/{name}" for name in STATIC_FILES)]
    for relative in needed:
        assert (DASHBOARD_DIR / relative).is_file(), relative
        assert any(fnmatch.fnmatch(f"dashboard/{relative}", pattern) for pattern in patterns), relative


@pytest.mark.parametrize("path", list(PAGES))
def test_each_page_is_its_body_in_the_shared_frame(client, path):
    """layout.html holds the head, navigation and sign-in once; a page is its own <main> content put in it."""
    html = client.get(path).text
    assert "{{" not in html and "}}" not in html, "a layout placeholder was left unfilled"
    assert html.count("<main id=\"main\" hidden>") == 1 and html.count("</main>") == 1
    assert html.count('id="sign-in"') == 1 and html.count("<nav>") == 1
    assert html.count("<h1") == 2  # the sign-in's and the page's own: the body is in the frame exactly once
    assert html.rstrip().endswith("</html>")
    assert re.search(r"<title>(Jobs|Job|Compare|Datasets) · ctpd</title>", html)
