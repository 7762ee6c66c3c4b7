"""Each job as one MLflow run (worker/tracking.py), against a real MLflow tracking store: SQLite in tmp.

A job through the worker's task body becomes one run holding the resolved spec as params, every metric point
the job has in SQL (same keys, steps and values), the model folder as ``model/``, its tags and FINISHED; the
``mlflow`` CLI lists and describes it. A retried job (attempt 1 stopped mid-distill, its newest checkpoint gone
as if it had died right after that step; attempt 2 resumes from the one before) stays one run with each step
once. A store that cannot be opened costs the job a warning event, not its success. And the policy: a tenant
of a multi-tenant deployment may name only an http(s) server on a public address, which (loopback servers here)
gets none of the worker's MLflow credentials, cannot redirect it or rebind its name to an internal address, and
does not have its answers echoed in the job's events.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from app.db import auth as key_rows
from app.db import events as job_log
from app.db import jobs as job_rows
from app.main import create_app
from app.policy import Caller, reference_problems
from app.settings import Settings
from ctpd_core.observe import FanOut
from ctpd_core.spec import JobSpec
from tests.app.conftest import RecordingQueue
from tests.worker.test_recipe import RecordingObserver, StopAfter, context, tiny_spec
from tests.worker.test_tasks import new_job
from worker.policy import enforce_job_policy
from worker.recipe import run_spec
from worker.tasks import execute_job
from worker.tracking import (
    LOCAL_ARTIFACT_FOLDER,
    MlflowObserver,
    RunIdentity,
    flatten_params,
    start_job_tracking,
    tracking_target,
)

TRAINING_KEYS = ("loss", "reward_accuracy", "reward_margin", "learning_rate")


@pytest.fixture
def store(tmp_path) -> str:
    (tmp_path / "mlflow").mkdir()
    return f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", lease_seconds=30, allow_server_paths=True)  # the embedded shape


def only_run(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [run.info.run_id for run in runs]
    return client, found, runs[0]


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [metric.step for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_a_job_is_one_mlflow_run_with_its_spec_metrics_model_and_tags(
    db, settings, store, tmp_path, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # where MLflow would put ./mlruns if the experiment had no artifact location
    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, name="tiny ctpd",
                     tracking={"mlflow": {"uri": store, "experiment": "tiny"}})
    job, _ = job_rows.create_job(db, tenant="acme", spec=spec.model_dump(mode="json"), name=spec.name, metadata={},
                                 idempotency_key=None, request_hash="h", max_attempts=3)
    assert execute_job(db, settings, job.id, "w1", device="cpu").status == "succeeded"

    client, experiment, run = only_run(store, "tiny")
    assert experiment.artifact_location == (tmp_path / "mlflow" / LOCAL_ARTIFACT_FOLDER).as_uri()
    assert not (tmp_path / "mlruns").exists()
    assert run.info.status == "FINISHED"
    assert run.info.user_id == "acme"  # MLflow's "User" column: the tenant
    assert run.data.tags["ctpd.job_id"] == job.id
    assert {key: run.data.tags[key] for key in ("ctpd.tenant", "ctpd.attempt", "ctpd.method", "ctpd.status",
                                                "mlflow.runName")} == {
        "ctpd.tenant": "acme", "ctpd.attempt": "1", "ctpd.method": "ctpd", "ctpd.status": "succeeded",
        "mlflow.runName": "tiny ctpd"}

    # The params: the resolved spec, every leaf.
    assert run.data.params == flatten_params(spec.model_dump(mode="json"))
    assert run.data.params["training.learning_rate"] == "0.001"
    assert run.data.params["student.model"] == str(tiny_student_folder)
    assert run.data.params["weights.source"] == "teacher_contrastive"  # resolved, not as submitted (unset)

    # The metrics: exactly what the job has in SQL, under the API's keys.
    in_sql: dict[str, dict[int, float]] = {}
    for name, points in job_log.metric_series(db, job.id).items():
        for stage, step, value in points:
            in_sql.setdefault(f"{stage}/{name}", {})[step] = value
    in_mlflow = {key: {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, key)}
                 for key in run.data.metrics}
    assert in_mlflow == in_sql
    for name in TRAINING_KEYS:
        assert steps_of(client, run.info.run_id, f"distill/{name}") == [1, 2, 3, 4], name
    assert steps_of(client, run.info.run_id, "contrastive:positive/loss") == [1, 2, 3]
    assert steps_of(client, run.info.run_id, "contrastive:negative/loss") == [1, 2, 3]
    evaluation = {key: value for key, value in run.data.metrics.items() if key.startswith("evaluate/")}
    assert "evaluate/preference_accuracy" in evaluation and "evaluate/kl_from_initial_per_token" in evaluation
    assert {steps_of(client, run.info.run_id, key)[0] for key in evaluation} == {4}  # at the last distill step

    # The model: the exported folder, file for file.
    export_dir = Path(job_rows.get_job(db, job.id).export_dir)
    listed = {Path(info.path).name for info in client.list_artifacts(run.info.run_id, "model")}
    assert listed == {path.name for path in export_dir.iterdir()}
    assert {"config.json", "model.safetensors"} <= listed

    # The mlflow CLI (mlflow-skinny's) sees the same run.
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    env = {"MLFLOW_TRACKING_URI": store, "PATH": str(Path(sys.executable).parent)}
    listing = subprocess.run([mlflow_cli, "runs", "list", "--experiment-id", experiment.experiment_id],
                             capture_output=True, text=True, env=env, timeout=120, check=True)
    assert run.info.run_id in listing.stdout and "tiny ctpd" in listing.stdout
    described = subprocess.run([mlflow_cli, "runs", "describe", "--run-id", run.info.run_id],
                               capture_output=True, text=True, env=env, timeout=120, check=True)
    description = json.loads(described.stdout)
    assert description["data"]["tags"]["ctpd.job_id"] == job.id
    assert description["info"]["status"] == "FINISHED"


def test_a_retried_job_resumes_its_run_and_logs_each_step_once(
    store, tmp_path, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path
):
    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, weights={"source": "uniform"},
                     training={"max_steps": 6, "checkpoint_every": 2}, tracking={"mlflow": {"uri": store}})
    target = tracking_target(spec, default_uri="", default_experiment="ctpd")
    assert target is not None
    warnings: list[str] = []

    # Attempt 1 stops after distill step 3 (checkpointing there), as a hand-back does: the run stays RUNNING.
    seen = RecordingObserver()
    first = MlflowObserver(target, RunIdentity("job_retry", "acme", 1, None, "ctpd"), spec,
                           warn=warnings.append).start()
    assert run_spec(spec, context(tmp_path, "job", FanOut(seen, first), StopAfter(seen, 3))).status == "stopped"
    first.finish(None)
    client, _, run = only_run(store, "ctpd")
    assert run.info.status == "RUNNING"
    assert steps_of(client, run.info.run_id, "distill/loss") == [1, 2, 3]
    attempt_1 = {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, "distill/loss")}

    # As if attempt 1 had died right after step 3's metrics went out: its newest checkpoint is gone, so attempt 2
    # resumes from step 2, replays steps 1-2 from that checkpoint and runs step 3 again.
    distill = tmp_path / "runs" / "job" / "distill"
    shutil.rmtree(distill / "step-00000003")
    again = RecordingObserver()
    second = MlflowObserver(target, RunIdentity("job_retry", "acme", 2, None, "ctpd"), spec,
                            warn=warnings.append).start()
    result = run_spec(spec, context(tmp_path, "job", FanOut(again, second)))
    assert result.status == "succeeded"
    assert [step for stage, step, _ in again.metric_rows if stage == "distill"] == [3, 4, 5, 6]  # step 3 ran again
    second.finish("succeeded", export_dir=result.export_dir)

    client, _, run = only_run(store, "ctpd")  # still one run
    assert second.run_id == first.run_id == run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["ctpd.attempt"] == "2"
    for name in TRAINING_KEYS:
        assert steps_of(client, run.info.run_id, f"distill/{name}") == [1, 2, 3, 4, 5, 6], name
    resumed = {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, "distill/loss")}
    assert {step: resumed[step] for step in attempt_1} == attempt_1  # the first value of a step is the one kept
    rerun_step_3 = next(row["loss"] for stage, step, row in again.metric_rows if stage == "distill" and step == 3)
    assert rerun_step_3 == pytest.approx(attempt_1[3], abs=1e-6)  # ... and the re-run is the same trajectory
    assert run.data.params == flatten_params(spec.model_dump(mode="json"))
    assert client.list_artifacts(run.info.run_id, "model")
    assert warnings == []



def test_a_handed_back_job_leaves_its_run_running_and_the_next_attempt_finishes_it(
    db, settings, store, tmp_path, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path
):
    """Through the worker's task body in two processes: a real SIGTERM hands attempt 1 back mid-distill (its
    run stays RUNNING), its newest checkpoint is then lost (as if it had died before writing it), and attempt
    2, in this process, resumes the same run: each step once, FINISHED, attempt 2."""
    import os
    import signal

    from tests.worker.test_handback import RUNNER, _wait

    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, weights={"source": "uniform"},
                     training={"max_steps": 8, "checkpoint_every": 2})
    job_id = new_job(db, spec.model_dump(mode="json"))
    log_path = tmp_path / "job.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CTPD_FAILPOINTS": "step:distill:3=sleep:3@1", "CTPD_MLFLOW_TRACKING_URI": store}  # the deployment's
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", RUNNER, str(settings.home), settings.database_url, job_id],
                                   cwd=Path(__file__).resolve().parents[2], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        _wait(lambda: "failpoint step:distill:3 reached" in log_path.read_text(), 120, "distill step 3",
              log_path.read_text)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "OUTCOME handed_back" in log_path.read_text(), log_path.read_text()
    client, _, run = only_run(store, "ctpd")
    assert (run.info.status, run.data.tags["ctpd.attempt"]) == ("RUNNING", "1")
    assert steps_of(client, run.info.run_id, "distill/loss") == [1, 2, 3]

    shutil.rmtree(settings.artifact_root / "jobs" / job_id / "distill" / "step-00000003")
    tracked_settings = settings.model_copy(update={"mlflow_tracking_uri": store})
    assert execute_job(db, tracked_settings, job_id, "w-next:2", device="cpu").status == "succeeded"
    client, _, again = only_run(store, "ctpd")
    assert again.info.run_id == run.info.run_id
    assert (again.info.status, again.data.tags["ctpd.attempt"], again.data.tags["ctpd.status"]) == (
        "FINISHED", "2", "succeeded")
    for name in TRAINING_KEYS:
        assert steps_of(client, run.info.run_id, f"distill/{name}") == list(range(1, 9)), name
    in_sql = sorted(step for stage, step, _ in job_log.metric_series(db, job_id)["loss"] if stage == "distill")
    assert sorted(set(in_sql)) == list(range(1, 9))  # the run mirrors the steps SQL has
    assert client.list_artifacts(run.info.run_id, "model")


def test_replayed_steps_the_run_lacks_are_logged_and_those_it_has_are_not(store):
    """An attempt that died before it sent its last steps: its successor's replay (the checkpoint's history)
    fills them in; what the run already has is not sent again, whatever the replay says."""
    spec = JobSpec.model_validate({"student": {"model": "s"}, "teacher": {"model": "t"}, "dataset": {"id": "d"},
                                   "tracking": {"mlflow": {"uri": store}}})
    target = tracking_target(spec, default_uri="", default_experiment="ctpd")
    assert target is not None
    first = MlflowObserver(target, RunIdentity("job_gap", "acme", 1, None, "ctpd"), spec).start()
    first.metrics("distill", 1, {"loss": 0.7})
    first.finish(None)
    second = MlflowObserver(target, RunIdentity("job_gap", "acme", 2, None, "ctpd"), spec).start()
    second.replay_metrics("distill", [(1, {"loss": 99.0}), (2, {"loss": 0.6}), (3, {"loss": 0.5})])
    second.metrics("distill", 4, {"loss": 0.4, "grad_norm": float("nan")})
    second.finish("cancelled")
    client, _, run = only_run(store, "ctpd")
    history = {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, "distill/loss")}
    assert history == {1: 0.7, 2: 0.6, 3: 0.5, 4: 0.4}
    assert "distill/grad_norm" not in run.data.metrics  # non-finite: skipped, as in SQL
    assert run.info.status == "KILLED"



def test_a_tenants_own_server_gets_the_model_only_through_its_proxied_store(store, tmp_path, job_process):
    """The server names where artifacts go; for a tenant's server (multi-tenant, no admin) a file: location,
    the worker's own disk, is refused with a warning, and the rest of the run is logged."""
    spec = JobSpec.model_validate({"student": {"model": "s"}, "teacher": {"model": "t"}, "dataset": {"id": "d"},
                                   "tracking": {"mlflow": {"uri": store}}})
    target = tracking_target(spec, default_uri="", default_experiment="ctpd")
    assert target is not None and target.from_spec
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "config.json").write_text("{}")
    warnings: list[str] = []
    tracker = MlflowObserver(target, RunIdentity("job_tenant", "acme", 1, None, "ctpd"), spec,
                             warn=warnings.append, trusted_store=False).start()
    tracker.metrics("distill", 1, {"loss": 0.7})
    tracker.finish("succeeded", export_dir=export_dir)
    client, experiment, run = only_run(store, "ctpd")
    assert experiment.artifact_location.startswith("file:")
    assert client.list_artifacts(run.info.run_id) == []
    assert len(warnings) == 1 and "the model was not logged" in warnings[0] and "mlflow-artifacts" in warnings[0]
    assert run.info.status == "FINISHED" and "distill/loss" in run.data.metrics



def test_an_unreachable_server_costs_the_end_of_a_job_seconds_not_minutes(monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after MLflow's backoff
    spec = JobSpec.model_validate({"student": {"model": "s"}, "teacher": {"model": "t"}, "dataset": {"id": "d"},
                                   "tracking": {"mlflow": {"uri": "http://127.0.0.1:9"}}})  # the discard port
    target = tracking_target(spec, default_uri="", default_experiment="ctpd")
    assert target is not None
    warnings: list[str] = []
    tracker = MlflowObserver(target, RunIdentity("job_away", "acme", 1, None, "ctpd"), spec,
                             warn=warnings.append).start()
    for step in range(1, 50):
        tracker.metrics("distill", step, {"loss": 1.0 / step})
    started = time.monotonic()
    tracker.finish("succeeded")
    assert time.monotonic() - started < 20
    assert warnings and all("MLflow tracking (http://127.0.0.1:9)" in warning for warning in warnings)
    assert any("lacks 49 metric points" in warning for warning in warnings), warnings


def test_a_broken_tracking_store_is_a_warning_and_the_job_succeeds(
    db, tmp_path, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path
):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    settings = Settings(home=tmp_path / "home", lease_seconds=30, allow_server_paths=True,
                        mlflow_tracking_uri=f"sqlite:///{blocker}/mlflow.db")  # the deployment's own store
    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, weights={"source": "uniform"},
                     training={"max_steps": 2})
    job_id = new_job(db, spec.model_dump(mode="json"))
    assert execute_job(db, settings, job_id, "w1", device="cpu").status == "succeeded"
    events, _ = job_log.list_events(db, job_id, limit=1000)
    warnings = [event for event in events if event.type == "tracking_warning"]
    assert warnings and {event.level for event in warnings} == {"warning"}
    assert "MLflow tracking" in warnings[0].message
    assert str(blocker) not in " ".join(event.message for event in warnings)  # the deployment's store is not named
    assert events[-1].type == "job_succeeded"  # the warnings came before the outcome, not after it
    assert job_rows.get_job(db, job_id).export_dir



def test_ctpd_run_tracks_the_spec_and_a_rerun_resumes_the_same_run(
    store, tmp_path, monkeypatch, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path
):
    from ctpd_cli.main import main

    monkeypatch.setenv("CTPD_HOME", str(tmp_path / "home"))
    spec = {"method": "ctpd", "teacher": {"model": str(tiny_teacher_folder)},
            "student": {"model": str(tiny_student_folder)}, "dataset": {"path": str(tiny_dataset_path)},
            "weights": {"source": "uniform"}, "training": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2},
            "tracking": {"mlflow": {"uri": store, "experiment": "local"}}}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    command = ["run", str(spec_path), "--artifacts", str(tmp_path / "art"), "--device", "cpu"]
    assert main(command) == 0
    client, _, run = only_run(store, "local")
    run_folders = list((tmp_path / "art" / "runs").iterdir())
    assert [folder.name for folder in run_folders] == [run.data.tags["ctpd.job_id"].removeprefix("local-")]
    assert (run.info.status, run.data.tags["ctpd.attempt"], run.data.tags["ctpd.tenant"]) == ("FINISHED", "1", "local")
    assert steps_of(client, run.info.run_id, "distill/loss") == [1, 2]
    assert client.list_artifacts(run.info.run_id, "model")

    assert main(command) == 0  # the same spec again: the same run folder, so the same MLflow run
    client, _, again = only_run(store, "local")
    assert again.info.run_id == run.info.run_id
    assert (again.info.status, again.data.tags["ctpd.attempt"]) == ("FINISHED", "2")
    assert steps_of(client, run.info.run_id, "distill/loss") == [1, 2]


def locked(**overrides) -> Caller:
    values = {"tenant": "acme", "is_admin": False, "allow_server_paths": False, "allow_remote_code": False,
              "artifact_root": Path("/srv/ctpd/artifacts")}
    return Caller(**{**values, **overrides})


def tracked(uri: str | None = None, experiment: str | None = None) -> JobSpec:
    mlflow = {key: value for key, value in (("uri", uri), ("experiment", experiment)) if value is not None}
    return JobSpec.model_validate({"student": {"model": "gemma-3-270m"}, "teacher": {"model": "smollm2-135m-instruct"},
                                   "dataset": {"id": "ds_x"}, "tracking": {"mlflow": mlflow}})


def tracking_refusals(spec: JobSpec, caller: Caller) -> list[tuple[str, str]]:
    problems = reference_problems(spec, caller, owns_job=lambda _: False, owns_dataset=lambda _: True)
    return [problem for problem in problems if problem[0].startswith("tracking.")]


@pytest.mark.parametrize("uri", [
    "sqlite:////srv/ctpd/mlflow.db", "file:///srv/mlruns", "postgresql://db.internal/mlflow",
    "http://127.0.0.1:5000", "http://localhost:5000", "https://10.1.2.3", "http://[::1]:5000",
    "http://169.254.169.254/latest",
])
def test_a_tenant_may_not_name_the_servers_own_stores(uri):
    problems = tracking_refusals(tracked(uri), locked())
    assert len(problems) == 1 and problems[0][0] == "tracking.mlflow.uri", problems
    assert "http(s) MLflow tracking server on a public address" in problems[0][1]  # the fix
    assert tracking_refusals(tracked(uri), locked(is_admin=True)) == []
    assert tracking_refusals(tracked(uri), locked(allow_server_paths=True)) == []  # the embedded service


def test_a_tenant_may_name_a_public_tracking_server():
    assert tracking_refusals(tracked("https://8.8.8.8:5000"), locked()) == []
    # A name that resolves to nothing here is left to the worker, which checks again where it connects.
    assert tracking_refusals(tracked("https://mlflow.example.com"), locked()) == []
    assert tracking_refusals(tracked(), locked()) == []  # no URI: the deployment's, trusted


def test_the_worker_refuses_a_local_store_for_a_tenant_too(db, tmp_path):
    settings = Settings(home=tmp_path / "home", lease_seconds=30)  # multi-tenant defaults
    spec = tracked(f"sqlite:///{tmp_path}/mlflow.db")
    row = job_rows.get_job(db, new_job(db, spec.model_dump(mode="json")))
    with pytest.raises(ValueError, match="tracking.mlflow.uri") as refused:
        enforce_job_policy(db, spec, row, settings)
    assert "the worker" in str(refused.value)
    job_id = new_job(db, spec.model_dump(mode="json"))
    assert execute_job(db, settings, job_id, "w1", device="cpu").error_code == "policy_violation"
    assert not (tmp_path / "mlflow.db").exists()


def test_the_api_answers_422_naming_the_field_and_the_fix(db, tmp_path):
    settings = Settings(home=tmp_path / "home", broker_url="memory://", lease_seconds=30)  # the db fixture's
    app = create_app(settings, queue=RecordingQueue())
    try:
        key = key_rows.create_api_key(db, "acme", "acme test key")
        client = TestClient(app, headers={"Authorization": f"Bearer {key}"})

        def refused(body: dict) -> dict[str, str]:
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 422, response.text
            return {problem["param"]: problem["message"] for problem in response.json()["error"]["errors"]}

        body = tracked("sqlite:////tmp/mlflow.db").model_dump(mode="json", exclude_defaults=True)
        problems = refused(body)  # beside dataset.id: ds_x is no upload of this tenant's
        assert "sqlite:" in problems["tracking.mlflow.uri"] and "http(s)" in problems["tracking.mlflow.uri"]

        # An experiment with nowhere to go: this deployment has no tracking URI.
        problems = refused(tracked(experiment="x").model_dump(mode="json", exclude_defaults=True))
        assert "CTPD_MLFLOW_TRACKING_URI" in problems["tracking.mlflow.experiment"]

        # A credential in the URI is refused for every key, by the spec itself.
        problems = refused({**body, "tracking": {"mlflow": {"uri": "https://u:p@mlflow.example.com"}}})
        assert "MLFLOW_TRACKING_TOKEN" in problems["tracking.mlflow.uri"]
        assert job_rows.list_jobs(db, "acme", limit=10)[0] == []  # nothing stored on error
    finally:
        app.state.db.dispose()


# ------------------------------------------------------------------- a tenant's own server is not trusted
#
# Real loopback HTTP servers stand for a tenant's MLflow server; app.policy.TRACKING_ALLOWED_NETWORKS (the policy's
# switch) lets the worker's connect-time check call 127.0.0.0/8 for these tests, and only where a test says so.

TOKEN = "worker-token-8f3a"  # the operator's: for the deployment's store only
SECRET = "internal-secret-5c1e"  # what an internal service would answer


class FakeServer:
    """A loopback HTTP server that records each request (method, path, Authorization) and answers with
    ``respond(method, path) -> (status, headers, body)``."""

    def __init__(self, respond) -> None:
        import http.server
        import threading

        self.requests: list[tuple[str, str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                server.requests.append((self.command, self.path, self.headers.get("Authorization")))
                status, headers, body = respond(self.command, self.path)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def mlflow_answers(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """Just enough of MLflow's REST API for one run: no experiment yet, no run with the job's tag."""
    run = {"info": {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "user_id": "acme", "status": "RUNNING",
                    "start_time": 1, "artifact_uri": "mlflow-artifacts:/1/r1/artifacts", "lifecycle_stage": "active"},
           "data": {}}
    endpoint = path.split("?", 1)[0].removeprefix("/api/2.0/mlflow/")
    if method == "PUT" and path.startswith("/api/2.0/mlflow-artifacts/artifacts/"):  # an artifact upload
        return 200, {"Content-Type": "application/json"}, b"{}"
    answers: dict[str, object] = {"experiments/create": {"experiment_id": "1"}, "runs/search": {"runs": []},
                                  "runs/create": {"run": run}, "runs/get": {"run": run}, "runs/log-batch": {},
                                  "runs/set-tag": {}, "runs/update": {"run_info": run["info"]}}
    if endpoint not in answers:
        return 404, {"Content-Type": "application/json"}, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"}'
    return 200, {"Content-Type": "application/json"}, json.dumps(answers[endpoint]).encode()


@pytest.fixture
def job_process(monkeypatch):
    """What isolating a tenant's client changes in a process (environment, MLflow's credentials file, urllib3's
    connect), put back after the test: a worker's job process exits instead."""
    import ipaddress

    import urllib3.util.connection
    from mlflow.utils import credentials

    import app.policy
    import worker.tracking

    saved = dict(os.environ)
    monkeypatch.setattr(credentials, "_get_credentials_path", credentials._get_credentials_path)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", urllib3.util.connection.create_connection)
    monkeypatch.setattr(worker.tracking, "_guarded_hosts", set())
    monkeypatch.setattr(worker.tracking, "_guard_installed", False)
    monkeypatch.setattr(app.policy, "TRACKING_ALLOWED_NETWORKS", (ipaddress.ip_network("127.0.0.0/8"),))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refusal at once, not after MLflow's backoff
    monkeypatch.delenv("MLFLOW_ALLOW_HTTP_REDIRECTS", raising=False)  # MLflow's default: follow them
    yield
    os.environ.clear()
    os.environ.update(saved)


def tenant_spec(uri: str | None) -> JobSpec:
    mlflow = {"uri": uri} if uri else {}
    return JobSpec.model_validate({"student": {"model": "s"}, "teacher": {"model": "t"}, "dataset": {"id": "d"},
                                   "tracking": {"mlflow": mlflow}})


def track_one_job(spec: JobSpec, settings: Settings, job_id: str, export_dir: Path | None = None) -> list[str]:
    """A job's tracking as the worker starts it (its trust decided by start_job_tracking); its warnings (the
    job's ``tracking_warning`` events)."""
    warnings: list[str] = []
    tracker = start_job_tracking(spec, settings, RunIdentity(job_id, "acme", 1, None, "ctpd"), warn=warnings.append)
    assert tracker is not None
    tracker.metrics("distill", 1, {"loss": 0.7})
    tracker.finish("succeeded", export_dir=export_dir)
    return warnings


def test_a_tenants_server_never_gets_the_workers_mlflow_credentials(job_process, tmp_path, monkeypatch):
    """MLflow sends the process's credentials to any host: the token, ~/.mlflow/credentials (and requests a
    ~/.netrc default entry). A tenant's server sees none of them; the deployment's store gets the token."""
    home = tmp_path / "user-home"
    (home / ".mlflow").mkdir(parents=True)
    (home / ".mlflow" / "credentials").write_text("[mlflow]\nmlflow_tracking_username = operator\n"
                                                  "mlflow_tracking_password = hunter2\n")
    (home / ".netrc").write_text("default login operator password hunter2\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "config.json").write_text("{}")
    tenants, deployments = FakeServer(mlflow_answers), FakeServer(mlflow_answers)
    try:
        multi_tenant = Settings(home=tmp_path / "home", lease_seconds=30, mlflow_tracking_uri=deployments.url)
        assert track_one_job(tenant_spec(tenants.url), multi_tenant, "job_tenant", export_dir) == []
        assert {path.split("?")[0] for _, path, _ in tenants.requests} >= {
            "/api/2.0/mlflow/experiments/get-by-name", "/api/2.0/mlflow/runs/create", "/api/2.0/mlflow/runs/log-batch",
            "/api/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/model/config.json",
            "/api/2.0/mlflow/runs/update"}  # the whole run went there, the model through the proxied store...
        assert [auth for _, _, auth in tenants.requests if auth is not None] == []  # ... with no credential

        # The deployment's own store, in a job process of its own (one job per process), is sent them.
        os.environ["MLFLOW_TRACKING_TOKEN"] = TOKEN
        (home / ".mlflow" / "credentials").unlink()
        assert track_one_job(tenant_spec(None), multi_tenant, "job_deployment") == []
        assert deployments.requests and {auth for _, _, auth in deployments.requests} == {f"Bearer {TOKEN}"}
    finally:
        tenants.close()
        deployments.close()


def test_a_tenants_server_cannot_redirect_the_worker(job_process, tmp_path):
    """A 302 to another address (an internal service) is not followed: the second server is never hit, and the
    tenant's warning says what happened in the error's type and status only."""
    internal = FakeServer(lambda method, path: (200, {"Content-Type": "application/json"}, b"{}"))
    redirecting = FakeServer(lambda method, path: (302, {"Location": f"{internal.url}{path}"}, b""))
    try:
        settings = Settings(home=tmp_path / "home", lease_seconds=30)  # multi-tenant defaults
        warnings = track_one_job(tenant_spec(redirecting.url), settings, "job_redirect")
        assert redirecting.requests and internal.requests == []
        assert warnings and any("MlflowException (HTTP 302)" in warning for warning in warnings), warnings
    finally:
        internal.close()
        redirecting.close()


@pytest.mark.parametrize("status", [200, 403])
def test_a_tenants_servers_answers_are_not_echoed_in_the_jobs_events(job_process, tmp_path, status):
    """MLflow puts a non-JSON answer's body in its error (``Response body: '...'``): an internal page reached
    through a tenant's URI must not come back to the tenant in a tracking_warning."""
    body = f"<html>{SECRET}</html>".encode()
    server = FakeServer(lambda method, path: (status, {"Content-Type": "text/html"}, body))
    try:
        settings = Settings(home=tmp_path / "home", lease_seconds=30)
        warnings = track_one_job(tenant_spec(server.url), settings, "job_echo")
        assert server.requests and warnings
        assert all(SECRET not in warning for warning in warnings), warnings
        assert any(warning.startswith(f"MLflow tracking ({server.url}): MlflowException") for warning in warnings)
    finally:
        server.close()


def test_the_worker_checks_the_tenants_host_again_when_it_connects(job_process, tmp_path, monkeypatch):
    """DNS rebinding: the name resolves to a public address for the policy and to 127.0.0.1 when MLflow
    connects; the connection is refused there and the server (an internal service) is never called."""
    import socket

    import app.policy

    server = FakeServer(mlflow_answers)
    port = int(server.url.rsplit(":", 1)[1])
    real_getaddrinfo = socket.getaddrinfo
    answers = iter(["8.8.8.8"])  # the policy's lookup; every later one: loopback

    def getaddrinfo(host, *args, **kwargs):
        if host != "mlflow.rebind.test":
            return real_getaddrinfo(host, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers, "127.0.0.1"), port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(app.policy, "TRACKING_ALLOWED_NETWORKS", ())  # loopback is loopback again
    try:
        spec = tenant_spec(f"http://mlflow.rebind.test:{port}")
        assert tracking_refusals(spec, locked()) == []  # public, for the policy
        warnings = track_one_job(spec, Settings(home=tmp_path / "home", lease_seconds=30), "job_rebind")
        assert server.requests == []
        assert warnings and "'mlflow.rebind.test' resolves to a non-public address (loopback)" in warnings[0], warnings
    finally:
        server.close()


def test_the_worker_refuses_a_tracking_host_it_cannot_resolve(db, tmp_path, monkeypatch):
    """The API lets a name it cannot resolve pass (its network is not the workers'); the worker, which would
    connect, refuses it: the job fails with policy_violation before anything runs."""
    import socket

    def getaddrinfo(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    spec = tracked("https://mlflow.nowhere.test")
    assert tracking_refusals(spec, locked()) == []  # the API's check
    settings = Settings(home=tmp_path / "home", lease_seconds=30)
    row = job_rows.get_job(db, new_job(db, spec.model_dump(mode="json")))
    with pytest.raises(ValueError, match="resolves to no address on the worker"):
        enforce_job_policy(db, spec, row, settings)
