"""The control plane's FastAPI app.

``create_app(settings, queue=None)`` builds an app from explicit settings; nothing connects at import or
at creation (the engine connects on first use). Logging is configured only by the entry points
(:func:`serve`, or whoever calls :func:`configure_logging`). For uvicorn directly:
``uvicorn --factory app.main:app_from_env``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import Depends, FastAPI

from app.api import api_keys, checkpoints, dashboard, datasets, health, jobs, models, tenants, webhooks
from app.api.deps import refuse_nul_characters
from app.api.errors import install_error_handlers
from app.api.preflights import router as preflights_router
from app.db.engine import Database
from app.metrics import install_metrics, process_exiting
from app.queue import CeleryTaskQueue, TaskQueue
from app.settings import Settings, get_settings
from app.storage import configured_storage
from app.storage_gc import remove_orphaned_uploads
from app.webhooks.dispatcher import DispatcherThread
from ctpd_core import logs

logger = logging.getLogger(__name__)

API_VERSION = "0.1.0"

DESCRIPTION = """\
Preference distillation jobs (CTPD): submit a JobSpec, follow its status, events and metrics, download the
distilled student.

* **Auth:** `Authorization: Bearer <key>` (`ctpd keys create --tenant NAME`). A tenant sees only its own jobs
  and datasets; another tenant's id is a 404.
* **Errors:** `{"error": {"code", "message", "param"}}`; `param` names the offending field as a dotted path
  (`training.batch_size`). A 422 also lists every problem in `error.errors`.
* **Pagination:** lists return `{"object": "list", "data": [...], "has_more": bool}`; pass the last item's id as
  `after`.
* **Idempotency:** `POST /v1/jobs` with `Idempotency-Key`: 201 the first time, 200 (same job,
  `Idempotent-Replayed: true`) on a replay with the same body, 409 with a different body.
"""


def create_app(settings: Settings, queue: TaskQueue | None = None) -> FastAPI:
    storage = configured_storage(settings)  # probed now: a bad CTPD_STORAGE_URL stops the start-up, named
    database = Database(settings.database_url)
    task_queue: TaskQueue = queue if queue is not None else CeleryTaskQueue(settings.broker_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Uploads a killed API process left half-written (a SIGKILL runs no cleanup); live ones are held.
        remove_orphaned_uploads(settings)
        # The webhook outbox's sender (several API processes share the work through row leases).
        dispatcher = DispatcherThread(database, settings).start() if settings.webhook_dispatcher else None
        yield
        # The dispatcher's join blocks (up to its timeout): off the event loop, which still serves the others.
        stopped = dispatcher is None or await anyio.to_thread.run_sync(dispatcher.stop)
        close = getattr(task_queue, "close", None)
        if callable(close):
            close()
        if stopped:
            database.dispose()
        else:  # its sends still use the pool; the process exit ends both
            logger.warning("webhook dispatcher still running at shutdown: the database pool is left open for it")
        process_exiting()  # multiprocess metrics: this process's in-flight gauge leaves the sum

    # One schema per model for requests and responses: the JobSpec a client sends is the type it reads back in
    # Job.spec, so the document has one JobSpec component, never JobSpec-Input / JobSpec-Output.
    app = FastAPI(title="ctpd", version=API_VERSION, description=DESCRIPTION, lifespan=lifespan,
                  separate_input_output_schemas=False)
    app.state.settings = settings
    app.state.db = database
    app.state.queue = task_queue
    app.state.storage = storage  # None: the artifact root alone
    install_error_handlers(app)
    install_metrics(app, database, settings)  # request ids, access lines, request metrics; GET /metrics
    # The routers that take ids, cursors and filters.
    for router in (jobs.router, checkpoints.router, datasets.router, api_keys.router, webhooks.router,
                   tenants.router):
        app.include_router(router, dependencies=[Depends(refuse_nul_characters)])
    app.include_router(preflights_router, dependencies=[Depends(refuse_nul_characters)])  # GET /v1/preflights/{id}
    for router in (models.router, health.router):
        app.include_router(router)
    app.include_router(dashboard.router)  # the pages at / (app/dashboard); their data comes from /v1
    return app


def app_from_env() -> FastAPI:
    """An app from the environment's settings (``uvicorn --factory app.main:app_from_env``)."""
    return create_app(get_settings())


def configure_logging(level: str | int = "INFO", log_format: str = "auto") -> None:
    """Handlers for a process entry point (``ctpd_core.logs``: JSON lines or text, with the request id on every
    line of a request); library modules only ever call ``logging.getLogger(__name__)``."""
    logs.configure_logging(log_format, level)


def serve(settings: Settings | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "INFO") -> None:
    """Run the API with uvicorn (the entry point behind ``ctpd serve``; ``ctpd up`` runs a worker beside it).
    Logging is ours (``log_config=None``), and so is the access line (the request middleware writes one per
    request with its id, route template and duration), so uvicorn's own access log is off."""
    import uvicorn

    settings = settings or get_settings()
    configure_logging(log_level, settings.log_format)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, log_level=log_level.lower(),
                access_log=False)
