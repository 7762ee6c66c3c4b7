"""GET /v1/jobs/{id}/checkpoints after a real (tiny) training run that reported to the database, a checkpoint made
into a model by the worker's task body and downloaded (archive with a resumed Range, one file), loaded with
transformers: its weights are the checkpoint's. Pruned checkpoints answer 410, unknown ones 404, another tenant
gets 404 everywhere, and a build that cannot work is shown failed with its reason."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import UTC, datetime, timedelta

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import update
from transformers import AutoModelForCausalLM

from app.db import events as job_log
from app.db import jobs as job_rows
from app.db.models import JobEvent
from app.services import checkpoints as checkpoint_service
from ctpd_core.checkpoint_layout import TRAINABLE_FILE, run_folder
from ctpd_core.observe import NullObserver
from ctpd_core.vocab import EventType
from tests.worker.test_recipe import tiny_spec
from worker import checkpoint_models
from worker.checkpoint_models import build_checkpoint_model
from worker.recipe import RunContext, run_spec
from worker.sinks import DbObserver


@pytest.fixture
def trained_job(db, settings, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    """A succeeded job of tenant acme, trained for 4 steps with a checkpoint after each (fit keeps the last 2)."""
    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, weights={"source": "uniform"},
                     training={"checkpoint_every": 1}, export={"dtype": "bf16"})
    job, _ = job_rows.create_job(db, tenant="acme", spec=spec.model_dump(mode="json"), name="ckpt", metadata={},
                                 idempotency_key=None, request_hash="h", max_attempts=3)
    assert job_rows.claim_job(db, job.id, "test-worker:1", lease_seconds=60) is not None
    observer = DbObserver(db, job.id, attempt=1)
    context = RunContext(artifact_root=settings.artifact_root, run_dir=run_folder(settings.artifact_root, job.id),
                         model_cache=settings.model_cache, device=torch.device("cpu"), observer=observer,
                         inference_batch_size=4, generation=1)
    result = run_spec(spec, context)
    assert result.status == "succeeded" and observer.close(deadline_seconds=10)
    assert job_rows.finish_job(db, job.id, "test-worker:1", "succeeded", export_dir=result.export_dir,
                               attempt=1) == "succeeded"
    return job.id


def test_checkpoints_are_listed_made_into_models_and_downloaded(alice, bob, db, settings, queue, trained_job,
                                                               tmp_path):
    job_id = trained_job
    listing = alice.get(f"/v1/jobs/{job_id}/checkpoints")
    assert listing.status_code == 200, listing.text
    checkpoints = listing.json()["data"]
    assert [(c["id"], c["step"], c["stage"]) for c in checkpoints] == [
        ("distill-00000003", 3, "distill"), ("distill-00000004", 4, "distill")]
    losses = {step: value for stage, step, value in job_log.metric_series(db, job_id)["loss"] if stage == "distill"}
    run_dir = run_folder(settings.artifact_root, job_id)
    for checkpoint in checkpoints:
        assert checkpoint["metrics"]["loss"] == pytest.approx(losses[checkpoint["step"]])
        folder = run_dir / "checkpoints" / checkpoint["id"]
        assert checkpoint["size_bytes"] == sum(path.stat().st_size for path in folder.iterdir())
        assert checkpoint["created_at"] and checkpoint["model"] == {
            "status": "absent", "error": None, "size_bytes": None, "archive_url": None, "files": []}
        assert checkpoint["model_url"] == f"/v1/jobs/{job_id}/checkpoints/{checkpoint['id']}/model"

    # Saved but pruned by keep_checkpoints: 410; never saved, or not an id: 404.
    for pruned in ("distill-00000001", "distill-00000002"):
        gone = alice.get(f"/v1/jobs/{job_id}/checkpoints/{pruned}")
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "checkpoint_pruned"
        assert alice.post(f"/v1/jobs/{job_id}/checkpoints/{pruned}/model").status_code == 410
    for unknown in ("distill-00000009", "contrastive-00000001", "step-00000003", "%2e%2e", "distill-3"):
        assert alice.get(f"/v1/jobs/{job_id}/checkpoints/{unknown}").status_code == 404, unknown

    # Another tenant sees nothing of it.
    wanted = "distill-00000003"
    for method, url in (("GET", f"/v1/jobs/{job_id}/checkpoints"), ("GET", f"/v1/jobs/{job_id}/checkpoints/{wanted}"),
                        ("POST", f"/v1/jobs/{job_id}/checkpoints/{wanted}/model"),
                        ("GET", f"/v1/jobs/{job_id}/checkpoints/{wanted}/model.tar")):
        response = bob.request(method, url)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", url
    assert queue.checkpoint_models == []

    # Not built yet: nothing to download.
    not_ready = alice.get(f"/v1/jobs/{job_id}/checkpoints/{wanted}/model.tar")
    assert not_ready.status_code == 409 and not_ready.json()["error"]["code"] == "checkpoint_model_not_ready"

    # Asked for: 202 pending and one task on the queue; the worker builds it; then it is ready (200, nothing queued).
    asked = alice.post(f"/v1/jobs/{job_id}/checkpoints/{wanted}/model")
    assert asked.status_code == 202 and asked.json()["model"]["status"] == "pending"
    assert queue.checkpoint_models == [(job_id, wanted)]
    assert alice.get(f"/v1/jobs/{job_id}/checkpoints/{wanted}").json()["model"]["status"] == "pending"
    impatient = alice.post(f"/v1/jobs/{job_id}/checkpoints/{wanted}/model")  # pending: nothing more is queued
    assert impatient.status_code == 202 and impatient.json()["model"]["status"] == "pending"
    assert queue.checkpoint_models == [(job_id, wanted)]
    assert build_checkpoint_model(db, settings, job_id, wanted) == "ready"
    assert build_checkpoint_model(db, settings, job_id, wanted) == "ready"  # the second delivery finds it built
    ready = alice.get(f"/v1/jobs/{job_id}/checkpoints/{wanted}").json()["model"]
    assert ready["status"] == "ready" and ready["size_bytes"] > 0
    files = {item["path"]: item for item in ready["files"]}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    again = alice.post(f"/v1/jobs/{job_id}/checkpoints/{wanted}/model")
    assert again.status_code == 200 and queue.checkpoint_models == [(job_id, wanted)]
    types = [event["type"] for event in alice.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]]
    assert types.count("checkpoint_model_requested") == 1 and types.count("checkpoint_model_ready") == 1

    # The archive, cut mid-way and resumed, then loaded with transformers: the checkpoint's weights, in bf16.
    url = ready["archive_url"]
    whole = alice.get(url)
    assert whole.status_code == 200
    cut = len(whole.content) // 2
    rest = alice.get(url, headers={"Range": f"bytes={cut}-", "If-Range": whole.headers["etag"]})
    assert rest.status_code == 206 and whole.content[:cut] + rest.content == whole.content
    with tarfile.open(fileobj=io.BytesIO(whole.content)) as archive:
        archive.extractall(tmp_path, filter="data")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / f"{job_id}-{wanted}"))
    assert model.dtype == torch.bfloat16
    parameters = dict(model.named_parameters())
    trained = load_file(str(run_dir / "checkpoints" / wanted / TRAINABLE_FILE))
    assert all(torch.equal(parameters[name], tensor.to(torch.bfloat16)) for name, tensor in trained.items())

    one = alice.get(files["model.safetensors"]["download_url"], headers={"Range": "bytes=0-7"})
    on_disk = (run_dir / "checkpoints" / wanted / "model" / "model.safetensors").read_bytes()
    assert one.status_code == 206 and one.content == on_disk[:8]
    assert bob.get(files["config.json"]["download_url"]).status_code == 404


def test_a_build_that_cannot_work_is_shown_failed_with_its_reason(alice, db, settings, queue, trained_job):
    job_id, broken = trained_job, "distill-00000004"
    tensors = run_folder(settings.artifact_root, job_id) / "checkpoints" / broken / TRAINABLE_FILE
    save_file({"model.not_a_parameter": torch.zeros(2)}, str(tensors))
    assert alice.post(f"/v1/jobs/{job_id}/checkpoints/{broken}/model").status_code == 202
    assert build_checkpoint_model(db, settings, job_id, broken) == "failed"
    model = alice.get(f"/v1/jobs/{job_id}/checkpoints/{broken}").json()["model"]
    assert model["status"] == "failed" and "model.not_a_parameter" in model["error"]
    # Asking again queues it again (the listing goes back to pending until the worker answers).
    assert alice.post(f"/v1/jobs/{job_id}/checkpoints/{broken}/model").json()["model"]["status"] == "pending"
    assert queue.checkpoint_models == [(job_id, broken), (job_id, broken)]


def test_a_queue_outage_is_a_503_and_recorded(alice, queue, trained_job):
    queue.fail_with = ConnectionError("broker down")
    response = alice.post(f"/v1/jobs/{trained_job}/checkpoints/distill-00000003/model")
    assert response.status_code == 503 and response.headers["retry-after"]
    model = alice.get(f"/v1/jobs/{trained_job}/checkpoints/distill-00000003").json()["model"]
    assert model["status"] == "failed" and "ask again" in model["error"]


def test_a_stopped_jobs_resume_point_is_listed_and_made_a_model_without_losing_its_resume_state(
        alice, db, settings, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    """A job cancelled mid-distill keeps its live checkpoints (resume points, optimizer state included): listed,
    made into a model inside the checkpoint folder, and still resumable afterwards."""
    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, weights={"source": "uniform"},
                     training={"max_steps": 50, "checkpoint_every": 1})
    job, _ = job_rows.create_job(db, tenant="acme", spec=spec.model_dump(mode="json"), name="stopped", metadata={},
                                 idempotency_key=None, request_hash="h", max_attempts=3)
    assert job_rows.claim_job(db, job.id, "test-worker:1", lease_seconds=60) is not None
    run_dir = run_folder(settings.artifact_root, job.id)

    class StopAfterStepTwo:
        def should_stop(self) -> bool:
            return (run_dir / "distill" / "step-00000002").is_dir()

    observer = DbObserver(db, job.id, attempt=1)
    context = RunContext(artifact_root=settings.artifact_root, run_dir=run_dir, model_cache=settings.model_cache,
                         device=torch.device("cpu"), observer=observer, stop_signal=StopAfterStepTwo(),
                         inference_batch_size=4, generation=1)
    assert run_spec(spec, context).status == "stopped" and observer.close(deadline_seconds=10)
    assert job_rows.finish_job(db, job.id, "test-worker:1", "cancelled", attempt=1) == "cancelled"

    listed = alice.get(f"/v1/jobs/{job.id}/checkpoints").json()["data"]
    assert [c["id"] for c in listed] == ["distill-00000001", "distill-00000002"]
    live = run_dir / "distill" / "step-00000002"
    assert listed[1]["size_bytes"] == sum(path.stat().st_size for path in live.iterdir())  # optimizer state too
    assert alice.post(f"/v1/jobs/{job.id}/checkpoints/distill-00000002/model").status_code == 202
    assert build_checkpoint_model(db, settings, job.id, "distill-00000002") == "ready"
    model = alice.get(f"/v1/jobs/{job.id}/checkpoints/distill-00000002").json()["model"]
    assert model["status"] == "ready" and (live / "model" / "config.json").is_file()
    assert listed[1]["size_bytes"] == alice.get(f"/v1/jobs/{job.id}/checkpoints/distill-00000002").json()["size_bytes"]
    trained = load_file(str(live / TRAINABLE_FILE))
    loaded = dict(AutoModelForCausalLM.from_pretrained(str(live / "model"), dtype=torch.float32).named_parameters())
    assert all(torch.equal(loaded[name], tensor) for name, tensor in trained.items())  # export auto: fp32 base

    # The checkpoint still resumes: a rerun of the job continues after step 2 (fit replays steps 1-2's metrics),
    # the model folder beside its files.
    class Replays(NullObserver):
        def __init__(self) -> None:
            self.replayed: list[tuple[str, list[int]]] = []

        def replay_metrics(self, stage, history) -> None:
            self.replayed.append((stage, [step for step, _ in history]))

    class StopAfterStepThree:
        def should_stop(self) -> bool:
            return (run_dir / "distill" / "step-00000003").is_dir()

    replays = Replays()
    resumed = RunContext(artifact_root=settings.artifact_root, run_dir=run_dir, model_cache=settings.model_cache,
                         device=torch.device("cpu"), observer=replays, stop_signal=StopAfterStepThree(),
                         inference_batch_size=4)
    assert run_spec(spec, resumed).status == "stopped"
    assert replays.replayed == [("distill", [1, 2])]


def test_asking_again_while_pending_queues_nothing_until_the_request_is_stale(alice, db, queue, trained_job):
    """Each build loads the student's whole base on the CPU, on the queue the reaper shares: a loop of POSTs while
    a build is pending queues one task; a request pending past the resend timeout (its message lost) is sent again."""
    job_id, wanted = trained_job, "distill-00000003"
    url = f"/v1/jobs/{job_id}/checkpoints/{wanted}/model"
    for _ in range(20):
        response = alice.post(url)
        assert response.status_code == 202 and response.json()["model"]["status"] == "pending"
    assert queue.checkpoint_models == [(job_id, wanted)]

    # The request's message was lost: once the pending request is older than the timeout, asking sends it again
    # (recorded, so the timeout starts over), and the next ask is quiet again.
    stale = datetime.now(UTC) - timedelta(seconds=checkpoint_service.MODEL_REQUEST_RESEND_SECONDS + 60)
    with db.write() as session:
        session.execute(update(JobEvent).where(JobEvent.job_id == job_id,
                                               JobEvent.type == EventType.CHECKPOINT_MODEL_REQUESTED)
                        .values(created_at=stale))
    assert alice.post(url).status_code == 202
    assert queue.checkpoint_models == [(job_id, wanted)] * 2
    assert alice.post(url).status_code == 202
    assert queue.checkpoint_models == [(job_id, wanted)] * 2
    types = [event["type"] for event in alice.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]]
    assert types.count("checkpoint_model_requested") == 2


def test_two_deliveries_never_build_one_checkpoint_at_once(db, settings, trained_job, monkeypatch):
    """A delivery that finds the checkpoint's build lock held leaves the build to its holder (no second base model
    loaded); once the lock is free, a delivery builds it."""
    job_id, wanted = trained_job, "distill-00000003"
    folder = run_folder(settings.artifact_root, job_id) / "checkpoints" / wanted
    with checkpoint_models.build_lock(folder) as held:  # another task is building it
        assert held
        monkeypatch.setattr("worker.recipe.materialize_checkpoint",
                            lambda *args, **kwargs: pytest.fail("built while another build held the lock"))
        assert build_checkpoint_model(db, settings, job_id, wanted) == "busy"
        monkeypatch.undo()
    assert not (folder / "model").exists()
    assert build_checkpoint_model(db, settings, job_id, wanted) == "ready"
    assert (folder / "model" / "config.json").is_file()


def test_the_cli_lists_the_checkpoints_and_downloads_one_as_a_model(app, alice, db, settings, queue, trained_job,
                                                                     tmp_path, capsys):
    """`ctpd jobs checkpoints` over HTTP, then `ctpd jobs download --checkpoint`: it asks for the model, waits while
    the default queue's worker (its task body, here in a thread) builds it, and downloads the tar."""
    import threading
    import time

    from ctpd_cli.main import main
    from tests.live_service import serving

    job_id, wanted = trained_job, "distill-00000003"
    stop = threading.Event()

    def default_queue_worker() -> None:
        built: set[tuple[str, str]] = set()
        while not stop.is_set():
            for request in list(queue.checkpoint_models):
                if request not in built:
                    built.add(request)
                    build_checkpoint_model(db, settings, *request)
            time.sleep(0.05)

    with serving(app) as url:
        flags = ["--url", url, "--key", alice.api_key]  # type: ignore[attr-defined]
        assert main(["jobs", "checkpoints", job_id, *flags]) == 0
        listing = capsys.readouterr().out
        assert "distill-00000003" in listing and "distill-00000004" in listing and "absent" in listing
        worker = threading.Thread(target=default_queue_worker, daemon=True)
        worker.start()
        try:
            target = tmp_path / "checkpoint.tar"
            assert main(["jobs", "download", job_id, "--checkpoint", wanted, "-o", str(target), *flags]) == 0
        finally:
            stop.set()
            worker.join(timeout=30)
        assert "downloaded" in capsys.readouterr().out
        assert main(["jobs", "checkpoints", job_id, "--json", *flags]) == 0
        statuses = {c["id"]: c["model"]["status"] for c in json.loads(capsys.readouterr().out)["data"]}
    assert statuses == {"distill-00000003": "ready", "distill-00000004": "absent"}
    assert queue.checkpoint_models == [(job_id, wanted)]  # asked once, though the CLI polled
    with tarfile.open(target) as archive:
        names = archive.getnames()
    assert f"{job_id}-{wanted}/config.json" in names and f"{job_id}-{wanted}/model.safetensors" in names
