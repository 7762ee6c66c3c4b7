"""``POST /v1/jobs?dry_run=true`` and ``GET /v1/preflights/{id}`` on the real app and database (SQLite and
PostgreSQL): nothing of a job is stored or queued, the API's checks are report errors with their fixes, the worker's
part (the real task function, worker/preflight.py) completes the report, and the duration comes from the stages
finished jobs measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from app import preflight
from app.db import events as job_log
from app.db import jobs as job_rows
from app.db.models import Job, utcnow
from app.main import create_app
from ctpd_core.spec import JobSpec
from ctpd_core.vocab import EventType, JobStatus
from tests.app.conftest import SPEC, RecordingQueue, _client_for
from tests.conftest import catalog_cache

EIGHT_B = {"method": "dpo", "student": {"model": "meta-llama/Llama-3.1-8B"}, "dataset": {"path": "/data/pairs.jsonl"}}


def _jobs(db) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(Job))


def _tiny(student: Path, teacher: Path, dataset: Path) -> dict:
    return {"method": "ctpd", "student": {"model": str(student)}, "teacher": {"model": str(teacher)},
            "dataset": {"path": str(dataset), "validation_fraction": 0.1},
            "sequence": {"max_prompt_tokens": 32, "max_response_tokens": 32},
            "training": {"batch_size": 4, "micro_batch_size": 2}}


def test_a_dry_run_stores_no_job_queues_nothing_and_is_pending_until_a_worker_answers(alice, bob, db, queue):
    response = alice.post("/v1/jobs?dry_run=true", json=SPEC)
    assert response.status_code == 202, response.text
    report = response.json()
    assert report["object"] == "preflight" and report["status"] == "pending" and report["ok"] is None
    assert report["poll"] == f"/v1/preflights/{report['id']}"
    assert report["spec"]["sequence"]["max_response_tokens"] == JobSpec.model_validate(SPEC).sequence.max_response_tokens
    assert report["memory"]["stages"] and "verdict: fits" in report["memory"]["text"]
    assert report["tokenizers"] is None and report["steps"] is None
    assert report["duration"]["status"] == "unknown" and "pending" in report["duration"]["reason"]
    assert queue.jobs == [] and queue.preflights == [report["id"]]  # only the preflight's doorbell
    assert _jobs(db) == 0 and alice.get("/v1/jobs").json()["data"] == []

    polled = alice.get(report["poll"])
    assert polled.status_code == 200 and polled.json()["status"] == "pending"
    assert bob.get(report["poll"]).status_code == 404  # another tenant's report is none


def test_the_worker_part_completes_the_report(settings, db, queue, tiny_student_folder, tiny_teacher_folder,
                                             tiny_dataset_path):
    """The real task body, run inline when the API rings (a worker that answers at once): a 200 with everything."""
    from worker.preflight import run_preflight

    worker_settings = settings.model_copy(update={"model_cache": catalog_cache()})

    class AnsweringQueue(RecordingQueue):
        def enqueue_preflight(self, preflight_id: str) -> None:
            super().enqueue_preflight(preflight_id)
            run_preflight(db, worker_settings, preflight_id)

    app = create_app(settings.model_copy(update={"preflight_wait_seconds": 30}), queue=AnsweringQueue())
    try:
        client = _client_for(app, db, "acme")
        response = client.post("/v1/jobs?dry_run=true", json=_tiny(tiny_student_folder, tiny_teacher_folder,
                                                                    tiny_dataset_path))
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["status"] == "done" and report["ok"] is True and report["errors"] == []
        assert report["poll"] is None and report["finished_at"] is not None
        assert report["tokenizers"]["student"]["offsets"] and report["dataset"]["train_pairs"] == 36
        assert report["steps"]["distill"]["total_steps"] == 9
        assert report["sample"]["alignment"]["spans"] > 0
        # No finished job measured anything here: unknown, and why, per stage.
        assert report["duration"]["status"] == "unknown" and report["duration"]["seconds"] is None
        assert "no succeeded job" in report["duration"]["stages"]["distill"]["reason"]
        assert client.get(f"/v1/preflights/{report['id']}").json()["sample"] == report["sample"]
        assert _jobs(db) == 0
    finally:
        app.state.db.dispose()


def test_a_reference_the_caller_may_not_use_is_an_error_and_no_worker_opens_it(alice, db, queue):
    response = alice.post("/v1/jobs?dry_run=true", json={**SPEC, "dataset": {"id": "ds_nope"}})
    assert response.status_code == 200, response.text  # complete: nothing is asked of a worker
    report = response.json()
    assert report["ok"] is False and report["status"] == "done"
    (error,) = report["errors"]
    assert error["code"] == "invalid_reference" and error["param"] == "dataset.id"
    assert "upload the file with POST /v1/datasets" in error["message"] and error["fix"]
    assert queue.preflights == [] and report["memory"] is None  # the plan would open what the spec names: not run


def test_a_job_that_does_not_fit_its_gpu_is_an_error_with_the_planners_fix(alice, queue):
    report = alice.post("/v1/jobs?dry_run=true", json=EIGHT_B).json()
    (error,) = [entry for entry in report["errors"] if entry["code"] == "does_not_fit"]
    assert error["param"] == "training.devices" and "128.5 GB" in error["message"]
    assert "training.devices 2 with training.strategy fsdp" in error["fix"]
    assert queue.preflights == [report["id"]]  # the data part is still worth having: the whole report at once


def test_a_broker_that_takes_no_message_is_an_error_entry_not_a_500(alice, queue):
    queue.fail_with = RuntimeError("broker down")
    response = alice.post("/v1/jobs?dry_run=true", json=SPEC)
    assert response.status_code == 200, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "preflight_unavailable" and "broker down" in error["message"]


def test_an_invalid_spec_is_still_a_422_naming_the_field(alice, queue):
    response = alice.post("/v1/jobs?dry_run=true", json={**SPEC, "training": {"batch_size": 0}})
    assert response.status_code == 422 and queue.preflights == []


def _measured_job(db, spec: dict, *, prepare_pairs: tuple[int, int], seconds: dict[str, float],
                  distill_steps: int, contrastive_steps: int) -> str:
    """A succeeded job as a worker leaves it: stage_finished events, contrastive metric points, the outcome."""
    job, _ = job_rows.create_job(db, tenant="acme", spec=JobSpec.model_validate(spec).model_dump(mode="json"),
                                 name=None, metadata={}, idempotency_key=None, request_hash="x", max_attempts=1)
    summaries = {"prepare": {"train_pairs": prepare_pairs[0], "validation_pairs": prepare_pairs[1]},
                 "distill": {"steps": distill_steps}, "contrastive": {"positive": "p", "negative": "n"}}
    for stage, took in seconds.items():
        job_log.add_event(db, job.id, EventType.STAGE_FINISHED, f"{stage} finished", stage=stage,
                          data={"seconds": took, "cached": False, "summary": summaries.get(stage, {})})
    for direction in ("positive", "negative"):
        for step in range(1, contrastive_steps + 1):
            job_log.add_metrics(db, job.id, f"contrastive:{direction}", step, {"loss": 0.5})
    with db.write() as session:
        session.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.SUCCEEDED, finished_at=utcnow()))
    return job.id


def test_the_duration_scales_what_finished_jobs_measured_per_pair_token(db, settings):
    spec = {"method": "ctpd", "teacher": {"model": "gemma-3-270m"}, "student": {"model": "smollm2-135m-instruct"},
            "dataset": {"path": "/data/pairs.jsonl"}, "sequence": {"max_prompt_tokens": 30, "max_response_tokens": 10},
            "training": {"batch_size": 4, "micro_batch_size": 2}}
    seconds = {"prepare": 4.0, "reference": 8.0, "contrastive": 20.0, "weights": 6.0, "distill": 10.0,
               "evaluate": 2.0, "export": 3.0}
    _measured_job(db, spec, prepare_pairs=(36, 4), seconds=seconds, distill_steps=5, contrastive_steps=5)
    # A cached stage measured nothing: it must not count.
    _measured_job(db, spec, prepare_pairs=(36, 4), seconds={"distill": 0.1}, distill_steps=5, contrastive_steps=5)
    with db.write() as session:  # make the second one's distill cached
        from app.db.models import JobEvent

        events = session.scalars(select(JobEvent).where(JobEvent.type == EventType.STAGE_FINISHED,
                                                        JobEvent.stage == "distill")).all()
        for event in events:
            if event.data["seconds"] == 0.1:
                event.data = {**event.data, "cached": True}

    # Twice the pairs and steps, the same sequence budget: every stage but export takes twice as long.
    counts = {"train_pairs": 72, "validation_pairs": 8, "distill_steps": 10, "contrastive_steps": 20}
    estimate = preflight.estimate_duration(db, JobSpec.model_validate(spec), counts)
    assert estimate["status"] == "estimated"
    stages = {stage: value["seconds"] for stage, value in estimate["stages"].items()}
    assert stages == {"prepare": 8.0, "reference": 16.0, "contrastive": 40.0, "weights": 12.0, "distill": 20.0,
                      "evaluate": 4.0, "export": 3.0}
    assert estimate["seconds"] == sum(stages.values())

    # Another student was never measured: its stages are unknown and say why; the rest is still estimated.
    other = {**spec, "student": {"model": "meta-llama/Llama-3.2-1B"}}
    partial = preflight.estimate_duration(db, JobSpec.model_validate(other), counts)
    assert partial["status"] == "partial" and partial["seconds"] is None
    assert partial["stages"]["reference"]["seconds"] == 16.0  # the teacher's stage
    assert "meta-llama/Llama-3.2-1B" in partial["stages"]["distill"]["reason"]


@pytest.mark.parametrize("dry_run", ["false", None])
def test_without_dry_run_the_job_is_created_as_before(alice, queue, dry_run):
    url = "/v1/jobs" if dry_run is None else f"/v1/jobs?dry_run={dry_run}"
    response = alice.post(url, json=SPEC)
    assert response.status_code == 201 and queue.jobs == [response.json()["id"]] and queue.preflights == []


def test_the_report_is_json_the_openapi_document_declares(app):
    document = app.openapi()
    create = document["paths"]["/v1/jobs"]["post"]
    assert "dry_run" in json.dumps(create["parameters"])
    assert "202" in create["responses"] and "/v1/preflights/{preflight_id}" in document["paths"]
