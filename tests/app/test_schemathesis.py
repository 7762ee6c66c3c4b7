"""Schemathesis against the app's own OpenAPI document, in-process, on SQLite and on PostgreSQL.

Every operation gets schema-generated requests (valid ones and, for the negative checks, invalid ones) from an
authenticated tenant; the API must never answer 5xx, and every response must match what the document declares
(status code, content type, headers, body schema). Deterministic (derandomized, a fixed seed, no example
database) and bounded: a few hundred cases per backend. No network: requests go straight to the ASGI app.

``positive_data_acceptance`` is left out on purpose: a schema-valid JobSpec may still be refused with a 422
for rules JSON Schema cannot state (weights.lower < weights.upper, batch_size a multiple of micro_batch_size)
or that depend on state (a dataset.id must exist, a path must not be another tenant's).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.db import auth as key_rows
from app.main import create_app
from app.settings import Settings
from tests.app.conftest import RecordingQueue

MAX_EXAMPLES = 25  # per operation and phase; the whole file stays well under 90 s on 2 cores

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]

CONFIG = schemathesis.Config.from_dict({
    "seed": 20260901,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
})


def _openapi_document() -> dict:
    """The document the service serves. Collection needs it before any fixture exists; building the app connects
    to nothing (the tests below call the fixture's app, on a real database)."""
    settings = Settings(database_url="sqlite://", broker_url="memory://")
    return create_app(settings, queue=RecordingQueue()).openapi()


schema = schemathesis.openapi.from_dict(_openapi_document(), config=CONFIG)


@pytest.fixture
def api_key(db) -> str:
    return key_rows.create_api_key(db, "acme", "schemathesis")


@schema.parametrize()
# One migrated database per operation and backend, shared by its cases (as a running service's is): the
# function-scoped fixtures are meant not to reset between generated inputs.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_api_matches_its_openapi_document(case, app, api_key):
    case.call_and_validate(app=app, headers={"Authorization": f"Bearer {api_key}"}, checks=CHECKS)
