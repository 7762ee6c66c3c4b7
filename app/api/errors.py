"""One error shape for every failure: ``{"error": {"code", "message", "param", ...}}``.

``param`` names the offending field as a dotted path into the request (``training.batch_size``,
``lora.target_modules[0]``), a query parameter (``limit``), a header (``Idempotency-Key``) or the upload
field (``file``); null when no single field is at fault. A 422 carries ``errors``: one
``{"param", "message"}`` per problem, and ``message`` joins them, so one response lists every fix.

:func:`error_responses` declares these bodies in the OpenAPI document, route by route, so a generated client
parses every error a route can return as the typed ``ErrorResponse``.
"""

from __future__ import annotations

import json
import logging
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.schemas import ErrorResponse
from app.db.engine import is_unavailable
from ctpd_core.spec import NO_NUL_PATTERN, JobSpec, SpecError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised by handlers and dependencies; rendered as the error shape with ``status``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers, self.extra = headers, extra


def error_body(code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param, **extra}}


def invalid_request(problems: Sequence[tuple[str | None, str]]) -> ApiError:
    """A 422 listing ``(param, message)`` problems; the first one's param is the error's ``param``."""
    return ApiError(
        422, "invalid_request", "; ".join(message for _, message in problems), problems[0][0],
        errors=[{"param": param, "message": message} for param, message in problems],
    )


RETRY_AFTER_SECONDS = 5

# What each status means wherever it is returned; a route states its own cases where they differ.
_STATUS_DESCRIPTIONS = {
    400: "The request body is malformed.",
    401: "Missing or invalid API key (`missing_api_key`, `invalid_api_key`).",
    403: "Not allowed for this API key.",
    404: "No such resource for this API key's tenant.",
    409: "The request conflicts with the resource's current state.",
    413: "The request body is larger than the service accepts.",
    422: "Invalid request: `error.param` names the field and `error.errors` lists every problem with its fix.",
    503: "The service's database is unavailable (`service_unavailable`); retry after `Retry-After` seconds.",
}
_STATUS_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`.", "schema": {"type": "string"}, "required": True}},
    503: {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"},
                          "required": True}},
}


def error_responses(statuses: Iterable[int], descriptions: Mapping[int, str] | None = None
                    ) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status's body is an ``ErrorResponse``, with its headers (401's
    WWW-Authenticate, 503's Retry-After) and the route's own description where given."""
    described = {**_STATUS_DESCRIPTIONS, **(descriptions or {})}
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorResponse, "description": described[status]}
        if status in _STATUS_HEADERS:
            responses[status]["headers"] = _STATUS_HEADERS[status]
    return responses


# ------------------------------------------------------------------------ pydantic errors -> our shape


def _param_of(loc: Sequence[Any]) -> tuple[str, str | None]:
    """``("body", "training", "batch_size")`` -> ``("body", "training.batch_size")``."""
    where = str(loc[0]) if loc else "body"
    path = ""
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and not re.search(r"[\[\](),'\"]", part):
            path += f".{part}" if path else part
        # else: a union member's tag such as "list[str]" or "literal['all-linear']": not a field
    return where, path or None


def _model_at(path: str | None) -> type[BaseModel] | None:
    """The spec model a dotted body path points into (for listing the allowed fields)."""
    model: type[BaseModel] | None = JobSpec
    for part in (path or "").split(".") if path else []:
        part = part.split("[", 1)[0]
        if model is None or part not in model.model_fields:
            return None
        model = _model_in(model.model_fields[part].annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _field_at(path: str) -> FieldInfo | None:
    parent, _, leaf = path.rpartition(".")
    model = _model_at(parent) if parent else JobSpec
    return model.model_fields.get(leaf) if model is not None else None


# Pydantic's error types for a number that is not finite, out of its bounds, or not a (whole) number.
_NUMBER_ERRORS = {
    "finite_number": "is not a finite number (NaN and Infinity are refused)",
    "greater_than": "is out of range", "greater_than_equal": "is out of range",
    "less_than": "is out of range", "less_than_equal": "is out of range",
    "int_parsing_size": "is too large", "int_from_float": "is not a whole number",
    "int_parsing": "is not an integer", "int_type": "is not an integer",
    "float_parsing": "is not a number", "float_type": "is not a number",
}
_BOUND_WORDS = {"gt": "above", "ge": "at least", "lt": "below", "le": "at most"}


def _allowed_numbers(field: FieldInfo) -> str | None:
    """``an integer from 1 to 10000000`` or ``a number above 0 and at most 1.0``: the field's bounds in words."""
    args = typing.get_args(field.annotation) or (field.annotation,)
    if int in args:
        kind = "an integer"
    elif float in args:
        kind = "a number"
    else:
        return None
    bounds = {name: getattr(item, name) for item in field.metadata for name in ("gt", "ge", "lt", "le")
              if getattr(item, name, None) is not None}
    if "ge" in bounds and "le" in bounds:
        return f"{kind} from {bounds['ge']} to {bounds['le']}"
    low = f"above {bounds['gt']}" if "gt" in bounds else f"at least {bounds['ge']}" if "ge" in bounds else None
    high = f"below {bounds['lt']}" if "lt" in bounds else f"at most {bounds['le']}" if "le" in bounds else None
    return " and ".join(filter(None, [f"{kind} {low}" if low else kind, high]))


def _shown(value: Any) -> str | None:
    """A short scalar as the client wrote it (floats as JSON: NaN, Infinity, 1e+30); None for anything else."""
    if not isinstance(value, str | int | float | bool):
        return None
    shown = json.dumps(value) if isinstance(value, float) else repr(value)
    return shown if len(shown) <= 80 else None


def _describe(error: dict[str, Any]) -> tuple[str | None, str]:
    where, param = _param_of(error.get("loc", ()))
    kind, msg = error.get("type", ""), str(error.get("msg", "invalid value"))
    if where == "header" and param:
        param = "-".join(word.capitalize() for word in param.split("-"))
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return None, f"the request body is not valid JSON ({detail}); send a JSON object".replace(" ()", "")
    if kind == "extra_forbidden" and where == "body":
        parent = param.rpartition(".")[0] if param and "." in param else None
        model = _model_at(parent)
        fields = f" (allowed here: {', '.join(model.model_fields)})" if model is not None else ""
        return param, f"{param}: unknown field; check the spelling{fields}"
    if kind == "missing":
        if param is None:
            return None, "the request body is missing; send a JSON object"
        return param, f"{param}: required"
    if kind in ("model_type", "model_attributes_type", "dict_type") and param is None and where == "body":
        return None, "the request body must be a JSON object (sent as Content-Type: application/json)"
    field = _field_at(param) if where == "body" and param else None
    allowed = _allowed_numbers(field) if field is not None and kind in _NUMBER_ERRORS else None
    if allowed is None and kind in _NUMBER_ERRORS and param:  # a query parameter: the error carries its bound
        ctx = error.get("ctx") or {}
        bound = next((f"a value {words} {ctx[name]}" for name, words in _BOUND_WORDS.items() if name in ctx), None)
        allowed = bound or ("a whole number in digits, e.g. 100" if kind.startswith("int") else "a number, e.g. 0.5")
    if allowed is not None:
        return param, f"{param}: {_shown(error.get('input')) or 'the value'} {_NUMBER_ERRORS[kind]}; use {allowed}"
    if kind == "string_pattern_mismatch" and (error.get("ctx") or {}).get("pattern") == NO_NUL_PATTERN:
        return param, f"{param}: contains a NUL character (\\u0000), which no name, path, id or label may hold; remove it"
    if kind == "string_too_short" and where in ("query", "header") and not error.get("input"):
        return param, f"{param}: empty; leave {param} out, or give it a value"
    if kind == "value_error":
        message = msg.removeprefix("Value error, ")
        # A rule across fields is checked by the model (loc = the model); its SpecError names the field to fix,
        # relative to that model.
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, SpecError):
            param = _param_of((*error.get("loc", ()), *cause.loc))[1]
        return param, message if param is None or param in message else f"{param}: {message}"
    shown = _shown(error.get("input"))
    got = f" (got {shown})" if shown is not None else ""
    return param, f"{param}: {msg}{got}" if param else f"{msg}{got}"


def from_validation_errors(errors: Iterable[dict[str, Any]]) -> ApiError:
    problems = [_describe(error) for error in errors]
    return invalid_request(problems or [(None, "invalid request")])


# ------------------------------------------------------------------------------------------- handlers


def _render(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(error.code, error.message, error.param, **error.extra), status_code=error.status,
        headers=error.headers,
    )


def _unparsable_body(cause: BaseException) -> ApiError:
    """FastAPI turns a body its JSON parser gives up on (beyond syntax errors) into a bare 400 "There was an
    error parsing the body"; say why, as the 422 that a syntax error gets, so both read alike."""
    if isinstance(cause, RecursionError):
        return invalid_request([(None, "the request body is nested too deeply to parse (hundreds of levels of "
                                       "[ or {); a job spec is a few levels deep: send it as a plain JSON object")])
    return invalid_request([(None, f"the request body is not UTF-8 text ({cause}); send JSON encoded as UTF-8")])


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "file_too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return _render(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        return _render(from_validation_errors(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400 and isinstance(error.__cause__, RecursionError | UnicodeDecodeError):
            return _render(_unparsable_body(error.__cause__))
        code = _HTTP_CODES.get(error.status_code, "http_error")
        message = str(error.detail)
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return JSONResponse(error_body(code, message), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(SQLAlchemyError)
    async def _storage_error(request: Request, error: SQLAlchemyError) -> JSONResponse:
        # The database is down or unreachable (a failover, a restart): a 503 the client can retry, not a 500.
        # Any other SQLAlchemy error is a bug and stays a 500. A write's transaction rolls back whole, but a
        # commit whose acknowledgement was lost may have landed: hence the Idempotency-Key advice.
        if not is_unavailable(error):
            return await _unexpected(request, error)
        logger.warning("database unavailable in %s %s: %s", request.method, request.url.path, type(error).__name__)
        return JSONResponse(
            error_body("service_unavailable", "the service's database is unavailable right now; retry in "
                       f"{RETRY_AFTER_SECONDS} s (a POST /v1/jobs retried with the same Idempotency-Key never "
                       "creates a second job)"),
            status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:  # the API's process boundary
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error; the service log has the details"),
                            status_code=500)
