"""Faults of the production shape, on the suite's own PostgreSQL and Redis (tests/faults/conftest.py).

One stack serves the module: a private PostgreSQL and Redis, ``ctpd serve``, and a reaper worker
(``ctpd worker --queues default --beat``: the deployment's one beat). Each test starts the training workers
(``ctpd worker --queues train``) it needs with its own settings and ``CTPD_FAILPOINTS``, and signals them:

* SIGTERM to the worker, or to its job process, while a job distils: the job checkpoints, hands itself back
  (``queued``, lease released, the attempt not counted), and a later process resumes from that checkpoint.
* SIGSTOP of the job process past its lease, SIGCONT once another worker owns the job: the resumed process
  writes nothing that counts and replaces none of its successor's checkpoints.
* The database stopped for ~16 s mid-job: the API answers 503 with Retry-After, the worker keeps its writes
  and flushes them when the database returns; nothing is lost.
* The broker stopped and restarted mid-job: the running job ends once, and a job submitted meanwhile runs.

Every assertion reads the SQL history (tests/faults/history.py); every wait has a deadline and prints the
logs' tails when it runs out.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.conftest import PrivatePostgres, PrivateRedis
from tests.faults.history import (
    STAGES,
    History,
    assert_every_distill_step,
    assert_metrics_carry,
    assert_nothing_from,
    assert_one_outcome,
    assert_run_events_carry,
    event_index,
    temporary_leftovers,
    transitions,
)
from tests.live_service import (
    JOB_TIMEOUT,
    TERMINAL,
    Proc,
    api_process,
    api_ready,
    create_key,
    exited,
    failpoint_pid,
    free_port,
    job_process_pid,
    process_state,
    run_cli,
    service_env,
    submit,
    tiny_job,
    upload_dataset,
    wait_until,
    worker_process,
    worker_ready,
)

pytestmark = pytest.mark.faults

LEASE_SECONDS = 5  # the settings' minimum: a lost attempt is requeued within seconds
GRACE_SECONDS = 20.0
SETTINGS = {
    "lease_seconds": str(LEASE_SECONDS),
    "reaper_interval_seconds": "1",
    # Small, so a job whose doorbell was lost (broker down) is enqueued again within seconds.
    "requeue_after_seconds": "4",
    "shutdown_grace_seconds": str(GRACE_SECONDS),
    "max_attempts": "3",
    "allow_server_paths": "true",  # the tiny models are folders on this machine
}


@dataclass
class ProductionStack:
    home: Path
    postgres: PrivatePostgres
    redis: PrivateRedis
    port: int
    client: httpx.Client
    history: History
    api: Proc | None = None
    reaper: Proc | None = None
    dataset_id: str = ""
    workers: list[Proc] = field(default_factory=list)

    @property
    def artifact_root(self) -> Path:
        return self.home / "artifacts"

    def env(self, **settings: str) -> dict[str, str]:
        return service_env(self.home, single_thread=True, database_url=self.postgres.url, broker_url=self.redis.url,
                           **{**SETTINGS, **settings})

    def logs(self) -> str:
        parts = [proc.tail(lines) for proc, lines in ((self.api, 30), (self.reaper, 30)) if proc is not None]
        parts += [worker.tail(80) for worker in self.workers[-2:]]
        return "\n".join([*parts, self.postgres.tail(15), self.redis.tail(10)])

    def start_worker(self, name: str, **settings: str) -> Proc:
        worker = worker_process(name, self.env(**settings), self.home / f"worker-{name}.log", queues="train")
        self.workers.append(worker)
        wait_until(lambda: worker_ready(worker), 90, f"worker {name} to be ready", self.logs)
        assert worker.alive(), self.logs()
        return worker

    def job_logs(self, job_id: str):
        return lambda: f"{self.history.describe(job_id)}\n{self.logs()}"

    def cancel_unfinished(self, job_ids: list[str]) -> None:
        """A failed test's jobs must not run on in a later test's workers."""
        for job_id in job_ids:
            try:
                if self.history.job(job_id)["status"] not in TERMINAL:
                    self.client.post(f"/v1/jobs/{job_id}/cancel")
            except Exception:  # teardown of a test that already failed: never hide its error
                pass


@pytest.fixture(scope="module")
def production(private_postgres, private_redis, tmp_path_factory, tiny_dataset_path) -> Iterator[ProductionStack]:
    home = tmp_path_factory.mktemp("faults-production")
    port = free_port()
    history = History(private_postgres.url)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    stack = ProductionStack(home, private_postgres, private_redis, port, client, history)
    try:
        env = stack.env()
        run_cli(["db", "upgrade"], env)
        client.headers["Authorization"] = f"Bearer {create_key(env, 'faults')}"
        stack.api = api_process(env, port, home / "api.log")
        stack.reaper = worker_process("reaper", env, home / "reaper.log", queues="default", beat=True)
        wait_until(lambda: api_ready(client) or not stack.api.alive(), 60, "the API's /readyz", stack.logs)
        wait_until(lambda: worker_ready(stack.reaper), 60, "the reaper worker to be ready", stack.logs)
        assert stack.api.alive() and stack.reaper.alive(), stack.logs()
        stack.dataset_id = upload_dataset(client, tiny_dataset_path)
        yield stack
    finally:
        client.close()
        for worker in stack.workers:
            worker.kill()
        for proc in (stack.reaper, stack.api):
            if proc is not None:
                proc.stop()
        history.dispose()


# The stages of a job with uniform weights: no contrastive models to train.
UNIFORM_STAGES = [stage for stage in STAGES if stage != "contrastive"]


def _job(production: ProductionStack, student: Path, teacher: Path, **training: Any) -> dict[str, Any]:
    # Uniform weights: no contrastive training, so the time goes where the faults are (distill).
    return tiny_job(student, teacher, production.dataset_id, weights={"source": "uniform"}, training=training)


def _distilling(history: History, job_id: str, min_step: int) -> dict[str, Any] | None:
    row = history.job(job_id)
    if row["status"] == "running" and row["stage"] == "distill" and (row["progress_step"] or 0) >= min_step:
        return row
    return None


def _finished(history: History, job_id: str) -> bool:
    return history.job(job_id)["status"] in TERMINAL


def _assert_no_leftovers(production: ProductionStack, logs) -> None:
    leftovers: list[str] = []

    def none_left() -> bool:
        leftovers[:] = temporary_leftovers(production.artifact_root)
        return not leftovers

    wait_until(none_left, 15, "no temporary files in the artifact root",
               lambda: f"left in {production.artifact_root}: {leftovers}\n{logs()}")


# ------------------------------------------------------------------------------------- SIGTERM: hand-back

HANDBACK_STEPS = 400


@pytest.mark.parametrize("target", ["worker", "job process"])
def test_sigterm_hands_the_job_back_without_using_up_an_attempt(production, target, tiny_student_folder,
                                                                tiny_teacher_folder):
    client, history = production.client, production.history
    tag = target.replace(" ", "-")
    first = production.start_worker(f"term-{tag}-1")
    second: Proc | None = None
    job_id = submit(client, _job(production, tiny_student_folder, tiny_teacher_folder, max_steps=HANDBACK_STEPS,
                                 checkpoint_every=100_000))  # no periodic checkpoint: any is the hand-back's
    logs = production.job_logs(job_id)
    try:
        row = wait_until(lambda: _distilling(history, job_id, 5), 120, "the job to distil past step 5", logs)
        pid = job_process_pid(row["worker_id"])
        assert pid is not None and (process_state(pid) or ("gone", None))[1] == first.pid, (
            f"{row['worker_id']} is not a pool child of {first.name}")
        signalled = time.monotonic()
        os.kill(first.pid if target == "worker" else pid, signal.SIGTERM)

        wait_until(lambda: any(e["type"] == "job_handed_back" for e in history.events(job_id)), GRACE_SECONDS,
                   f"the job to be handed back within the {GRACE_SECONDS:g} s grace after SIGTERM to the {target}", logs)
        wait_until(lambda: exited(pid), GRACE_SECONDS, f"the job process {pid} to exit", logs)
        if target == "worker":
            wait_until(lambda: not first.alive(), GRACE_SECONDS, "the worker to exit after the hand-back", logs)
            took = time.monotonic() - signalled
            # The checkpoint of a tiny model takes milliseconds: a worker that waits out the grace did not hand back.
            assert took < GRACE_SECONDS / 2, f"the worker took {took:.1f} s to exit (grace {GRACE_SECONDS:g} s)\n{logs()}"
            # No train worker is left, so the row stays as the hand-back left it.
            row = history.job(job_id)
            assert row["status"] == "queued", logs()
            assert (row["lease_expires_at"], row["worker_id"]) == (None, None), f"the lease was not released\n{logs()}"
            assert (row["attempt"], row["handoffs"]) == (1, 1), f"the hand-back must not use up the attempt\n{logs()}"
        else:
            assert first.alive(), f"a SIGTERM to its job process took the worker down\n{logs()}"

        events = history.events(job_id)
        handed = event_index(events, "job_handed_back")
        assert events[handed]["data"]["status"] == "queued" and events[handed]["attempt"] == 1, logs()
        assert not [e for e in events if e["type"] == "job_restarted"], f"handed back, not reaped\n{logs()}"
        (checkpoint,) = [e for e in events[:handed] if e["type"] == "checkpoint_saved" and e["stage"] == "distill"]
        handback_step = checkpoint["data"]["step"]
        assert 5 <= handback_step < HANDBACK_STEPS, logs()
        metrics_at_handback = history.max_metric_id()

        if target == "worker":  # the next worker of a deploy
            second = production.start_worker(f"term-{tag}-2")
        wait_until(lambda: _finished(history, job_id), JOB_TIMEOUT, "the resumed job to finish", logs)
        job, events, points = history.job(job_id), history.events(job_id), history.metric_points(job_id)
        assert job["status"] == "succeeded", logs()
        assert (job["attempt"], job["handoffs"]) == (2, 1), logs()
        assert transitions(events) == ["queued", "running", "queued", "running", "succeeded"], logs()
        assert_one_outcome(events, "succeeded")
        started_2 = event_index(events, "job_started", attempt=2)
        (distill,) = [e for e in events[started_2:] if e["type"] == "stage_finished" and e["stage"] == "distill"]
        assert distill["data"]["summary"]["resumed_from"] == handback_step, logs()
        assert_every_distill_step(points, HANDBACK_STEPS)
        _assert_no_leftovers(production, logs)
        assert_nothing_from(history, job_id, 1, after_event_id=events[handed]["id"], after_metric_id=metrics_at_handback)
        assert_run_events_carry(events, 2, after_event_id=events[started_2]["id"])
        assert_metrics_carry(points, 2, after_metric_id=metrics_at_handback)
    finally:
        production.cancel_unfinished([job_id])
        for worker in (first, second):
            if worker is not None:
                worker.kill()


# ------------------------------------------------------------------------ SIGSTOP past the lease, SIGCONT

FROZEN_AT, TAKEOVER_HOLD_SECONDS, PAUSE_STEPS = 3, 10.0, 12


def _checkpoint_attempts(folder: Path) -> dict[int, Any]:
    """step -> the ``attempt`` its ``step-XXXXXXXX/state.json`` records (ctpd_core/train.py)."""
    found = {}
    for state in folder.glob("step-*/state.json"):
        step = int(state.parent.name.removeprefix("step-"))
        try:
            found[step] = json.loads(state.read_text()).get("attempt", "(none)")
        except (OSError, ValueError) as error:  # being replaced this very moment: that is a finding too
            found[step] = f"unreadable: {error}"
    return found


def test_a_paused_job_process_resumed_after_a_takeover_writes_nothing_that_counts(production, tiny_student_folder,
                                                                                  tiny_teacher_folder):
    client, history = production.client, production.history
    # Attempt 1 pauses briefly after step 3 (its checkpoint written): long enough to be frozen right there,
    # at a step boundary, holding no transaction.
    stale = production.start_worker("pause-a", failpoints=f"step:distill:{FROZEN_AT}=sleep:4@1")
    successor: Proc | None = None
    frozen: int | None = None
    job_id = submit(client, _job(production, tiny_student_folder, tiny_teacher_folder, max_steps=PAUSE_STEPS,
                                 checkpoint_every=1))
    logs = production.job_logs(job_id)
    checkpoints = production.artifact_root / "jobs" / job_id / "distill"
    try:
        pid = wait_until(lambda: failpoint_pid(stale, f"step:distill:{FROZEN_AT}", 1), 120,
                         f"attempt 1 to reach distill step {FROZEN_AT}", logs)
        assert job_process_pid(history.job(job_id)["worker_id"]) == pid, logs()
        assert (process_state(pid) or ("gone", None))[1] == stale.pid, f"{pid} is not a pool child of {stale.name}"
        os.kill(pid, signal.SIGSTOP)
        frozen = pid
        wait_until(lambda: (process_state(pid) or ("gone",))[0] == "T", 5, f"process {pid} to be stopped", logs)
        metrics_when_frozen = history.max_metric_id()  # a frozen attempt 1 cannot add to them

        # Another worker: it takes over once the reaper requeued the expired lease, and holds right after
        # its own checkpoint of step FROZEN_AT + 1, the step the stale process would write next.
        successor = production.start_worker("pause-b", failpoints=f"step:distill:{FROZEN_AT + 1}=sleep:"
                                                                  f"{TAKEOVER_HOLD_SECONDS:g}@2")
        wait_until(lambda: failpoint_pid(successor, f"step:distill:{FROZEN_AT + 1}", 2), 120,
                   "attempt 2 to take over and checkpoint the next step", logs)
        held_since = time.monotonic()
        events = history.events(job_id)
        started_2 = events[event_index(events, "job_started", attempt=2)]["id"]
        assert _checkpoint_attempts(checkpoints).get(FROZEN_AT + 1) == 2, (
            f"attempt 2's checkpoint of step {FROZEN_AT + 1} does not record attempt 2: "
            f"{_checkpoint_attempts(checkpoints)}\n{logs()}")

        os.kill(pid, signal.SIGCONT)
        frozen = None
        wait_until(lambda: exited(pid), TAKEOVER_HOLD_SECONDS - 3, "the resumed stale process to give up", logs)
        assert time.monotonic() - held_since < TAKEOVER_HOLD_SECONDS, (
            "attempt 2 stopped holding before the stale process gave up; the checkpoint check would race it")
        on_disk = _checkpoint_attempts(checkpoints)
        assert on_disk.get(FROZEN_AT + 1) == 2, f"the stale process replaced attempt 2's checkpoint: {on_disk}"
        newer = {step: attempt for step, attempt in on_disk.items() if step > FROZEN_AT and attempt != 2}
        assert not newer, f"checkpoints after the takeover not written by attempt 2: {newer}"
        row = history.job(job_id)
        assert (row["status"], row["attempt"]) == ("running", 2), logs()
        assert row["worker_id"].startswith("pause-b@"), f"the stale heartbeat took the lease back: {row['worker_id']}"

        wait_until(lambda: _finished(history, job_id), JOB_TIMEOUT, "attempt 2 to finish", logs)
        job, events, points = history.job(job_id), history.events(job_id), history.metric_points(job_id)
        assert (job["status"], job["attempt"]) == ("succeeded", 2), logs()
        assert transitions(events) == ["queued", "running", "queued", "running", "succeeded"], logs()
        assert_one_outcome(events, "succeeded")
        assert_every_distill_step(points, PAUSE_STEPS)
        _assert_no_leftovers(production, logs)
        assert_nothing_from(history, job_id, 1, after_event_id=started_2, after_metric_id=metrics_when_frozen)
        assert_run_events_carry(events, 2, after_event_id=started_2)
        assert_metrics_carry(points, 2, after_metric_id=metrics_when_frozen)
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)  # never leave a stopped process behind
        production.cancel_unfinished([job_id])
        for worker in (stale, successor):
            if worker is not None:
                worker.kill()


# ------------------------------------------------------------------------------------ the database away

OUTAGE_SECONDS = 16.0
OUTAGE_STEPS, OUTAGE_CHECKPOINT_EVERY = 120, 10


def _probe_every_endpoint(client: httpx.Client, paths: dict[str, Any], job_id: str, dataset_id: str,
                          spec: dict[str, Any]) -> dict[str, tuple[int, str | None, str]]:
    """One request to every operation of the OpenAPI document: ``"METHOD path" -> (status, Retry-After, body)``."""
    answers = {}
    for path, operations in paths.items():
        for method in operations:
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            url = path.replace("{job_id}", job_id).replace("{dataset_id}", dataset_id)
            kwargs: dict[str, Any] = {}
            if method == "post" and path == "/v1/jobs":
                kwargs["json"] = spec
            elif method == "post" and path == "/v1/datasets":
                kwargs["files"] = {"file": ("pairs.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n')}
            elif method == "post":  # cancel: another id, so an API that wrongly went ahead cannot touch the job
                url = path.replace("{job_id}", "job_" + "0" * 32)
            try:
                response = client.request(method.upper(), url, timeout=20, **kwargs)
                answers[f"{method.upper()} {path}"] = (response.status_code, response.headers.get("retry-after"),
                                                       response.text[:200])
            except httpx.HTTPError as error:
                answers[f"{method.upper()} {path}"] = (0, None, repr(error))
    return answers


def test_a_database_outage_mid_job_loses_no_metric_point_or_event(production, tiny_student_folder,
                                                                  tiny_teacher_folder):
    client, history, postgres = production.client, production.history, production.postgres
    # The lease outlasts the outage: one that ran out while the database was away is the reaper's to take
    # the moment it returns (and then the stale attempt's buffered writes are rightly refused): another test.
    worker = production.start_worker("db-outage", lease_seconds="40", failpoints="step:distill:3=sleep:1@1")
    spec = _job(production, tiny_student_folder, tiny_teacher_folder, max_steps=OUTAGE_STEPS,
                checkpoint_every=OUTAGE_CHECKPOINT_EVERY)
    paths = client.get("/openapi.json").json()["paths"]
    job_id = submit(client, spec)
    logs = production.job_logs(job_id)
    try:
        wait_until(lambda: failpoint_pid(worker, "step:distill:3", 1), 120, "the job to distil", logs)
        postgres.stop()
        stopped_at = time.monotonic()
        answers: dict[str, list[tuple[int, str | None, str]]] = {}
        health: list[int] = []
        try:
            # Probe the whole API for as long as the outage lasts (each round takes a moment).
            while time.monotonic() - stopped_at < OUTAGE_SECONDS:
                for name, answer in _probe_every_endpoint(client, {k: v for k, v in paths.items() if k != "/healthz"},
                                                          job_id, production.dataset_id, spec).items():
                    answers.setdefault(name, []).append(answer)
                health.append(client.get("/healthz").status_code)
                assert worker.alive(), f"the worker died while the database was away\n{logs()}"
        finally:
            postgres.start()
        wait_until(lambda: api_ready(client), 60, "the API to be ready again", logs)

        wait_until(lambda: _finished(history, job_id), JOB_TIMEOUT, "the job to finish after the outage", logs)
        job, events, points = history.job(job_id), history.events(job_id), history.metric_points(job_id)
        assert (job["status"], job["attempt"]) == ("succeeded", 1), logs()
        assert transitions(events) == ["queued", "running", "succeeded"], logs()
        assert_one_outcome(events, "succeeded")
        assert [e["stage"] for e in events if e["type"] == "stage_started"] == UNIFORM_STAGES, logs()
        assert [e["stage"] for e in events if e["type"] == "stage_finished"] == UNIFORM_STAGES, logs()
        saved = [e["data"]["step"] for e in events if e["type"] == "checkpoint_saved" and e["stage"] == "distill"]
        expected = list(range(OUTAGE_CHECKPOINT_EVERY, OUTAGE_STEPS + 1, OUTAGE_CHECKPOINT_EVERY))
        assert saved == expected, f"distill checkpoint_saved events {saved}, expected {expected}"
        assert_every_distill_step(points, OUTAGE_STEPS)
        assert any(p["stage"] == "evaluate" for p in points), "the evaluation metrics were lost"
        _assert_no_leftovers(production, logs)
        assert_run_events_carry(events, 1, after_event_id=0)
        assert_metrics_carry(points, 1, after_metric_id=0)
        # Last, what the API answered while the database was down (the job's history is checked either way).
        assert set(health) == {200}, f"/healthz answered {sorted(set(health))} while the database was down"
        wrong = {name: sorted({(status, retry, body) for status, retry, body in got
                               if status != 503 or not (retry or "").isdigit() or int(retry) <= 0})
                 for name, got in answers.items()}
        wrong = {name: got for name, got in wrong.items() if got}
        assert answers and not wrong, f"while the database was down, not a 503 with Retry-After: {wrong}"
    finally:
        if not postgres.running():
            postgres.start()
        production.cancel_unfinished([job_id])
        worker.kill()


# -------------------------------------------------------------------------------------- the broker away


def test_a_broker_outage_mid_job_ends_it_once_and_runs_a_job_submitted_meanwhile(production, tiny_student_folder,
                                                                                   tiny_teacher_folder):
    client, history, redis = production.client, production.history, production.redis
    worker = production.start_worker("broker-outage", failpoints="step:distill:3=sleep:1@1")
    running = submit(client, _job(production, tiny_student_folder, tiny_teacher_folder, max_steps=200,
                                  checkpoint_every=50))
    submitted: str | None = None
    logs = production.job_logs(running)
    try:
        wait_until(lambda: failpoint_pid(worker, "step:distill:3", 1), 120, "the job to distil", logs)
        redis.stop()
        try:
            step_at_outage = history.job(running)["progress_step"] or 0
            # The row is committed before the doorbell rings: the API answers although the broker is away.
            submitted = submit(client, _job(production, tiny_student_folder, tiny_teacher_folder, max_steps=2))
            queued = [e for e in history.events(submitted) if e["type"] == "job_queued"]
            assert [e["data"].get("enqueued") for e in queued] == [False], f"{queued}\n{logs()}"
            # Training needs only the database: the running job goes on while the broker is away.
            wait_until(lambda: (history.job(running)["progress_step"] or 0) >= step_at_outage + 20
                       or _finished(history, running), 60, "the running job to go on without the broker", logs)
        finally:
            broker_back_at = datetime.now(UTC)  # taken before the start, so a doorbell rung at once is after it
            redis.start()

        for job_id in (running, submitted):
            wait_until(lambda job_id=job_id: _finished(history, job_id), JOB_TIMEOUT,
                       f"job {job_id} to finish after the broker returned", production.job_logs(job_id))
        job, events = history.job(running), history.events(running)
        assert job["status"] == "succeeded", logs()
        assert_one_outcome(events, "succeeded")
        assert_every_distill_step(history.metric_points(running), 200)

        job, events = history.job(submitted), history.events(submitted)
        assert (job["status"], job["attempt"]) == ("succeeded", 1), production.job_logs(submitted)()
        assert_one_outcome(events, "succeeded")
        # Its doorbell was lost with the broker; one rung after the broker returned started it: the reaper's
        # (a requeue event) or the running job's end (a worker and a slot came free), whichever came first.
        started_at = events[event_index(events, "job_started")]["created_at"]
        assert started_at > broker_back_at, production.job_logs(submitted)()
        running_ended_at = history.events(running)[-1]["created_at"]
        reaper_rang = any(e["type"] == "job_queued" and e["data"].get("requeue") for e in events)
        assert reaper_rang or started_at >= running_ended_at, production.job_logs(submitted)()
        assert_every_distill_step(history.metric_points(submitted), 2)
        _assert_no_leftovers(production, logs)
    finally:
        if not redis.running():
            redis.start()
        production.cancel_unfinished([job_id for job_id in (running, submitted) if job_id])
        worker.kill()
