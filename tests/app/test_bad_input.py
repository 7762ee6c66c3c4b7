"""Bad input (issue 9) on SQLite and PostgreSQL: non-finite and unbounded numbers, bodies the JSON parser gives
up on, and requests the OpenAPI schema allows that the server refuses (the schema now says so)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from app.db.models import Job
from tests.app.conftest import SPEC


def _post_raw(client, text: str | bytes):
    return client.post("/v1/jobs", content=text, headers={"Content-Type": "application/json"})


def _spec_with(extra: str) -> str:
    """SPEC as JSON text with ``extra`` (raw JSON members, so NaN literals survive) added."""
    return json.dumps(SPEC)[:-1] + ", " + extra + "}"


def _job_count(db) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(Job))


@pytest.mark.parametrize("members, param", [
    ('"beta": NaN', "beta"),
    ('"beta": Infinity', "beta"),  # was stored on SQLite and a 500 on PostgreSQL (JSON has no Infinity)
    ('"training": {"learning_rate": -Infinity}', "training.learning_rate"),
    ('"weights": {"lower": NaN}', "weights.lower"),  # NaN < upper is False, so the order check let it through
    ('"training": {"max_steps": NaN}', "training.max_steps"),
    ('"lora": {"r": 1e400}', "lora.r"),  # 1e400 parses as Infinity
])
def test_nan_and_infinity_literals_are_a_422_naming_the_field(alice, db, members, param):
    response = _post_raw(alice, _spec_with(members))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == param, error
    assert error["message"].startswith(f"{param}: ") and "not a finite number" in error["message"]
    assert "use " in error["message"]  # the fix: the allowed range
    assert _job_count(db) == 0


@pytest.mark.parametrize("training, param, message", [
    ({"max_steps": 1e30}, "training.max_steps", "1e+30 is too large; use an integer from 1 to 10000000"),
    ({"max_steps": 2**31}, "training.max_steps", "2147483648 is out of range; use an integer from 1 to 10000000"),
    ({"max_steps": 2.5}, "training.max_steps", "2.5 is not a whole number; use an integer from 1 to 10000000"),
    ({"seed": 2**32}, "training.seed", "4294967296 is out of range; use an integer from 0 to 4294967295"),
    ({"seed": -1}, "training.seed", "-1 is out of range; use an integer from 0 to 4294967295"),
    ({"learning_rate": 3.0}, "training.learning_rate", "3.0 is out of range; use a number above 0 and at most 1.0"),
    ({"batch_size": 2**20}, "training.batch_size", "1048576 is out of range; use an integer from 1 to 65536"),
])
def test_out_of_range_numbers_are_a_422_with_the_range(alice, db, training, param, message):
    response = alice.post("/v1/jobs", json={**SPEC, "training": training})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] == f"{param}: {message}", error
    assert _job_count(db) == 0


def test_the_largest_allowed_numbers_are_stored(alice, settings):
    # A CPU-only deployment (no GPU budget): the memory plan checks nothing, so only the spec's bounds speak here;
    # on GPUs, 2 Mi tokens per sequence at micro-batch 65,536 is refused by the plan (tests/app/test_preflight.py).
    settings.gpu_memory_gb = 0.0
    spec = {**SPEC, "beta": 1000.0, "training": {"max_steps": 10_000_000, "seed": 2**32 - 1, "batch_size": 65_536,
                                                 "micro_batch_size": 65_536, "checkpoint_every": 10_000_000},
            "sequence": {"max_prompt_tokens": 1_048_576, "max_response_tokens": 1_048_576},
            "weights": {"lower": -50.0, "upper": 50.0}}
    response = alice.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["training"]["seed"] == 2**32 - 1


@pytest.mark.parametrize("body", ['{"a":' * 5000 + "1" + "}" * 5000, "[" * 5000 + "]" * 5000,
                                  _spec_with('"name": ' + "[" * 5000 + "]" * 5000)])
def test_deeply_nested_json_gets_the_standard_error_body(alice, db, body):
    response = _post_raw(alice, body)
    assert response.status_code == 422, response.text  # as a JSON syntax error is; was a bare 400
    error = response.json()["error"]
    assert set(error) == {"code", "message", "param", "errors"} and error["code"] == "invalid_request"
    assert error["param"] is None and "nested too deeply" in error["message"] and "send it as" in error["message"]
    assert _job_count(db) == 0


def test_a_body_that_is_not_utf8_gets_the_standard_error_body(alice):
    response = _post_raw(alice, b'{"name": "\xff"}')
    assert response.status_code == 422 and "not UTF-8" in response.json()["error"]["message"]


def test_an_empty_after_is_refused_and_the_schema_says_so(alice, client):
    response = alice.get("/v1/jobs", params={"after": ""})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "after" and "leave after out" in response.json()["error"]["message"]
    parameters = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["get"]["parameters"]
    after = next(p for p in parameters if p["name"] == "after")
    assert {"type": "string", "minLength": 1} in after["schema"]["anyOf"]


def test_the_schema_says_what_create_job_and_upload_refuse(client):
    openapi = client.get("/openapi.json").json()
    schemas = openapi["components"]["schemas"]
    # As `not` (neither both nor none), never `oneOf`: a generator reads a oneOf as a union of its branches and
    # drops the model's own fields (tests/app/test_openapi_client.py).
    assert schemas["DatasetRef"]["not"] == {"anyOf": [
        {"required": ["path", "id"], "properties": {"path": {"type": "string"}, "id": {"type": "string"}}},
        {"properties": {"path": {"type": "null"}, "id": {"type": "null"}}},
    ]}
    assert len(schemas["ContrastiveSpec"]["not"]["anyOf"]) == 2
    assert "oneOf" not in schemas["DatasetRef"] and "oneOf" not in schemas["ContrastiveSpec"]
    max_steps = schemas["TrainingSpec"]["properties"]["max_steps"]["anyOf"][0]
    assert max_steps["maximum"] == 10_000_000 and max_steps["minimum"] == 1
    upload = openapi["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]
    description = upload["schema"]["properties"]["file"]["description"]
    assert "filename must end in `.jsonl`, `.json` or `.parquet`" in description


@pytest.mark.parametrize("change, param", [
    ({"teacher": None}, "teacher"),
    ({"method": "dpo", "weights": {"source": "random"}}, "weights.source"),
    ({"method": "tisdpo", "weights": {"source": "teacher_contrastive"}}, "weights.source"),
    ({"weights": {"source": "uniform", "average": True}}, "weights.average"),
    ({"training": {"batch_size": 6, "micro_batch_size": 4}}, "training.batch_size"),
    ({"weights": {"lower": 2.0}}, "weights.lower"),
    ({"weights": {"random_low": 2.0}}, "weights.random_low"),
    ({"dataset": {"path": "/a.jsonl", "id": "ds_b"}}, "dataset.path"),
    ({"dataset": {"path": "/a.jsonl", "validation_path": "/b.jsonl", "validation_id": "ds_c"}}, "dataset.validation_path"),
    # The field to fix is the one left out (was contrastive.positive either way: the first name in the message).
    ({"contrastive": {"positive": {"model": "gemma-3-270m"}}}, "contrastive.negative"),
    ({"contrastive": {"negative": {"model": "gemma-3-270m"}}}, "contrastive.positive"),
])
def test_a_rule_across_fields_is_a_422_naming_the_field_to_fix(alice, db, change, param):
    response = alice.post("/v1/jobs", json={**SPEC, **change})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["errors"] == [{"param": param, "message": error["message"]}], error
    assert param in error["message"] and not error["message"].startswith(f"{param}: ")  # the rule's own words
    assert _job_count(db) == 0


def test_every_rule_across_fields_is_listed_with_its_own_field(alice):
    response = alice.post("/v1/jobs", json={**SPEC, "dataset": {"path": "/a.jsonl", "id": "ds_b"},
                                            "weights": {"lower": 2.0}, "training": {"batch_size": 6, "micro_batch_size": 4}})
    assert response.status_code == 422
    assert response.json()["error"] == {
        "code": "invalid_request", "param": "dataset.path",
        "message": "give exactly one of dataset.path (a file) or dataset.id (an uploaded dataset); weights.lower (2.0) "
                   "must be below weights.upper (1.5); training.batch_size (6) must be a multiple of "
                   "training.micro_batch_size (4)",
        "errors": [
            {"param": "dataset.path",
             "message": "give exactly one of dataset.path (a file) or dataset.id (an uploaded dataset)"},
            {"param": "weights.lower", "message": "weights.lower (2.0) must be below weights.upper (1.5)"},
            {"param": "training.batch_size",
             "message": "training.batch_size (6) must be a multiple of training.micro_batch_size (4)"},
        ],
    }


# ------------------------------------------------------------- found by schemathesis (tests/app/test_schemathesis.py)


@pytest.mark.parametrize("url, param", [
    ("/v1/jobs/job_%00", "job_id"),  # PostgreSQL text cannot hold NUL: these were 500s there
    ("/v1/jobs/job_%00/events", "job_id"),
    ("/v1/datasets/ds_%00", "dataset_id"),
    ("/v1/jobs?after=job_%00", "after"),
    ("/v1/jobs?metadata[team]=%00", "metadata[team]"),
    ("/v1/jobs?metadata[te%00am]=nlp", "metadata[te%00am]"),
])
def test_a_nul_in_a_path_or_query_parameter_is_a_422_naming_it(alice, url, param):
    response = alice.get(url)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and "NUL character" in error["message"] and "remove it" in error["message"]


@pytest.mark.parametrize("change, param", [
    ({"name": "run\x00"}, "name"),  # a VARCHAR column: a 500 on PostgreSQL
    ({"metadata": {"team": "nlp\x00"}}, "metadata.team"),
    ({"dataset": {"path": "/data/pairs\x00.jsonl"}}, "dataset.path"),  # "embedded null byte" in the path checks
    ({"student": {"model": "./folder\x00"}}, "student.model"),
])
def test_a_nul_in_a_spec_string_is_a_422_naming_the_field(alice, db, change, param):
    response = alice.post("/v1/jobs", json={**SPEC, **change})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and "NUL character" in error["message"], error
    assert _job_count(db) == 0


@pytest.mark.parametrize("query", ["metadata[team][x]=nlp", "metadata=nlp"])
def test_a_metadata_filter_that_is_not_one_level_is_refused(alice, query):
    # Was ignored (a nested key never matched, or the filter was dropped), listing jobs it should not have.
    _post_raw(alice, json.dumps({**SPEC, "metadata": {"team": "nlp"}}))
    response = alice.get(f"/v1/jobs?{query}")
    assert response.status_code == 422, response.text
    assert "metadata[key]=value" in response.json()["error"]["message"]
    assert len(alice.get("/v1/jobs?metadata[team]=nlp").json()["data"]) == 1


@pytest.mark.parametrize("after", [2**63, 10**20])
def test_an_event_cursor_beyond_64_bits_is_a_422(alice, after):
    job = alice.post("/v1/jobs", json=SPEC).json()
    response = alice.get(f"/v1/jobs/{job['id']}/events", params={"after": after})  # overflowed the driver: a 500
    assert response.status_code == 422, response.text
    assert response.json()["error"] == {
        "code": "invalid_request", "param": "after",
        "message": f"after: '{after}' is out of range; use a value at most 9223372036854775807",
        "errors": [{"param": "after", "message": f"after: '{after}' is out of range; use a value at most "
                    "9223372036854775807"}],
    }
    assert alice.get(f"/v1/jobs/{job['id']}/events", params={"after": 2**63 - 1}).json()["data"] == []


@pytest.mark.parametrize("query, param", [("staus=failed", "staus"), ("=true", None)])
def test_an_unknown_list_parameter_is_refused_not_ignored(alice, query, param):
    # Was ignored, so a misspelt filter (or schemathesis' nameless one) listed every job.
    response = alice.get(f"/v1/jobs?{query}")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and "unknown query parameter; use limit, after, status" in error["message"]


def test_the_upload_documents_its_400_for_a_malformed_multipart_body(client):
    responses = client.get("/openapi.json").json()["paths"]["/v1/datasets"]["post"]["responses"]
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert {"201", "401", "413", "422"} <= set(responses)  # merged, not replaced
