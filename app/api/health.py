"""/healthz (the process answers) and /readyz (the database and the broker answer). No auth."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import DbDep, SettingsDep
from app.api.errors import RETRY_AFTER_SECONDS
from app.api.schemas import Check, Health, NotReady, Readiness

router = APIRouter(tags=["health"])

TIMEOUT_SECONDS = 2.0
_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671, "pyamqp": 5672, "redis": 6379, "rediss": 6379}


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()[:500]


def check_database(db) -> Check:
    try:
        db.ping()
    except Exception as error:  # any driver error means "not reachable"
        return Check(ok=False, error=_describe(error))
    return Check(ok=True)


def check_broker(url: str, timeout: float = TIMEOUT_SECONDS) -> Check:
    """Redis: PING; ``sqla+<url>``: connect and ``SELECT 1``; memory://: nothing to reach; else a TCP connect."""
    scheme = urlsplit(url).scheme.lower()
    try:
        if scheme in ("redis", "rediss"):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
            try:
                client.ping()
            finally:
                client.close()
        elif scheme.startswith("sqla+"):
            from sqlalchemy import create_engine, text
            from sqlalchemy.pool import NullPool

            target = url[len("sqla+"):]
            connect_args = {"timeout": timeout} if target.startswith("sqlite") else {"connect_timeout": int(timeout) or 1}
            engine = create_engine(target, poolclass=NullPool, connect_args=connect_args)
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
            finally:
                engine.dispose()
        elif scheme != "memory":
            parts = urlsplit(url)
            port = parts.port or _DEFAULT_PORTS.get(scheme)
            if not parts.hostname or not port:
                return Check(ok=False, error=f"cannot check a {scheme or 'schemeless'} broker URL")
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except Exception as error:  # any client error means "not reachable"
        return Check(ok=False, error=_describe(error))
    return Check(ok=True)


@router.get("/healthz", operation_id="healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=Readiness,
    summary="Readiness: the database and the broker are reachable",
    description="503 names the failing check in `checks` (and in `error.message`).",
    responses={503: {
        "model": NotReady,
        "description": "A dependency is unreachable: `checks` says which, and `error` (`not_ready`) says why.",
        "headers": {"Retry-After": {"description": "Seconds to wait before asking again.", "schema": {"type": "integer"},
                                    "required": True}},
    }},
)
def readyz(db: DbDep, settings: SettingsDep) -> JSONResponse:
    checks = {"database": check_database(db), "broker": check_broker(settings.broker_url)}
    failed = [name for name, check in checks.items() if not check.ok]
    body = Readiness(status="unavailable" if failed else "ready", checks=checks).model_dump(mode="json")
    if failed:
        body["error"] = {
            "code": "not_ready",
            "message": "; ".join(f"{name} unreachable ({checks[name].error})" for name in failed),
            "param": None,
        }
    # Retry-After like every other 503 of the API, so a load balancer or client backs off the same way.
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if failed else None
    return JSONResponse(body, status_code=503 if failed else 200, headers=headers)
