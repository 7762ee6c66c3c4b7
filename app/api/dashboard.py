"""The dashboard: static pages served by the API at ``/``, whose scripts call the ``/v1`` API.

No route here reads data or takes a key. Every page is the same static file for everyone; the browser script
keeps the API key the person signs in with in ``sessionStorage`` and sends it as ``Authorization: Bearer`` on
each ``/v1`` call, so the dashboard sees exactly what that key's tenant may see through the API and nothing
more. A key never travels in a URL: no form submits (``form-action 'none'``), and the pages build no URL from it.

Pages (``app/dashboard/pages``): ``/`` the job list, ``/jobs/{id}`` a job, ``/compare?jobs=a,b`` finished jobs
side by side, ``/datasets`` and ``/datasets/{id}``. Their scripts, styles and the vendored chart library
(uPlot, ``app/dashboard/static/vendor/uplot/README.md``) are under ``/dashboard/static/``, served from a fixed
list so each file has its content type and nothing else of the package can be reached.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from app.api.errors import ApiError

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "dashboard"
PAGES_DIR = DASHBOARD_DIR / "pages"
STATIC_DIR = DASHBOARD_DIR / "static"

# Every file the pages load, with its content type: a name not listed is a 404, whatever lies in the folder.
STATIC_FILES: dict[str, str] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "vendor/uplot/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uplot/uPlot.min.css": "text/css; charset=utf-8",
    "vendor/uplot/LICENSE": "text/plain; charset=utf-8",
}

# The pages run only their own scripts and talk only to this origin; 'unsafe-inline' styles because uPlot
# positions its legend and cursor with style attributes. form-action 'none': no form can submit the key anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)  # pages for people, not part of the API's document


@cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


# Each page: its title and the name its script dispatches on (body data-page). The frame they share (head,
# navigation, sign-in) is layout.html once; pages/<name>.html holds only what goes in its <main>.
_PAGES = {"jobs": "Jobs", "job": "Job", "compare": "Compare", "datasets": "Datasets"}


@cache
def _page_html(name: str) -> bytes:
    layout = _read(DASHBOARD_DIR / "layout.html").decode("utf-8")
    main = _read(PAGES_DIR / f"{name}.html").decode("utf-8")
    return (layout.replace("{{title}}", _PAGES[name]).replace("{{page}}", name)
            .replace("{{main}}", main)).encode("utf-8")


def _page(name: str) -> Response:
    return Response(_page_html(name.removesuffix(".html")), media_type="text/html; charset=utf-8",
                    headers=_PAGE_HEADERS)


@router.get("/")
def jobs_page() -> Response:
    return _page("jobs.html")


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> Response:  # the script reads the id from the address; the page is the same for all
    return _page("job.html")


@router.get("/compare")
def compare_page() -> Response:
    return _page("compare.html")


@router.get("/datasets")
def datasets_page() -> Response:
    return _page("datasets.html")


@router.get("/datasets/{dataset_id}")
def dataset_page(dataset_id: str) -> Response:
    return _page("datasets.html")


@router.get("/dashboard/static/{path:path}")
def static_file(path: str) -> Response:
    media_type = STATIC_FILES.get(path)
    if media_type is None:
        raise ApiError(404, "not_found", f"no dashboard file {path!r}; the dashboard serves {', '.join(STATIC_FILES)}",
                       "path")
    return Response(_read(STATIC_DIR / path), media_type=media_type,
                    headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
