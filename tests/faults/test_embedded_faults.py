"""Faults of the embedded shape (SQLite state, Celery's SQLAlchemy transport), with real processes and signals.

One API (``ctpd serve``) and one database serve the whole module; each test starts the worker it needs
(``ctpd worker --beat``: the reaper runs inside it, as in ``ctpd up``), with its own ``CTPD_FAILPOINTS``.

* SIGKILL of the job process in each stage: the reaper requeues the job once its lease runs out, and
  attempt 2 finishes it from what attempt 1 left (stage cache, checkpoints).
* SIGKILL of the API while an upload streams in: the restarted API removes the orphaned ``.incoming-*`` file,
  and no dataset was recorded.

Every assertion reads the SQL history (tests/faults/history.py); every wait has a deadline and prints the
logs' tails when it runs out.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_pairs
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

LEASE_SECONDS = 5  # the settings' minimum: a killed attempt is requeued within seconds
REAPER_INTERVAL_SECONDS = 1
SETTINGS = {
    "lease_seconds": str(LEASE_SECONDS),
    "reaper_interval_seconds": str(REAPER_INTERVAL_SECONDS),
    "requeue_after_seconds": "10",
    "max_attempts": "3",
    "allow_server_paths": "true",  # the tiny models are folders on this machine, as under `ctpd up`
}
MAX_STEPS, CHECKPOINT_EVERY = 4, 2


@dataclass(frozen=True)
class KillCase:
    """Where attempt 1 is held, then killed: a ``step:`` point is inside the stage's work, while its output
    is still being written (a staging folder for the cached stages), ``stage_started`` where a stage
    reports no progress."""

    point: str
    # prepare and reference depend on the data alone: a dataset of their own keeps them out of the cache.
    # The other stages use the module's dataset, so what comes before them is cached by the earlier cases.
    fresh_rows: int | None = None
    overrides: dict = field(default_factory=dict)
    resumed_from: int | None = None  # the distill checkpoint attempt 2 resumes from


KILL_CASES = {
    "prepare": KillCase("step:prepare:40", fresh_rows=40),  # its last progress report, before it is published
    # A log-prob pass reports its chosen and rejected halves as sub-stages: killed with the chosen half done and
    # half of the rejected one (16 of the training split's pairs).
    "reference": KillCase("step:reference:rejected:16", fresh_rows=41),
    "contrastive": KillCase("step:contrastive:negative:1"),  # pi+ published in the cache, pi- one step in
    # π+ scored, π− half-way through its chosen pass; its own weights (upper 1.25): not cached
    "weights": KillCase("step:weights:negative:chosen:16", overrides={"weights": {"upper": 1.25}}),
    # After step 3, with the last checkpoint at step 2: attempt 2 resumes from 2 and records step 3 again
    # (a repeated step keeps its last value).
    "distill": KillCase("step:distill:3", resumed_from=CHECKPOINT_EVERY),
    "evaluate": KillCase("step:evaluate:8", resumed_from=MAX_STEPS),
    "export": KillCase("stage_started:export", resumed_from=MAX_STEPS),
}


@dataclass
class EmbeddedStack:
    home: Path
    env: dict[str, str]
    port: int
    key: str
    client: httpx.Client
    history: History
    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)

    @property
    def artifact_root(self) -> Path:
        return self.home / "artifacts"

    def logs(self) -> str:
        api = [self.api.tail(30)] if self.api is not None else []
        return "\n".join([*api, *(worker.tail(80) for worker in self.workers[-2:])])

    def start_worker(self, name: str, **settings: str) -> Proc:
        env = service_env(self.home, single_thread=True, **{**SETTINGS, **settings})
        worker = worker_process(name, env, self.home / f"worker-{name}.log", beat=True)
        self.workers.append(worker)
        wait_until(lambda: worker_ready(worker), 90, f"worker {name} to be ready", self.logs)
        assert worker.alive(), self.logs()
        return worker

    def start_api(self) -> None:
        self.api = api_process(self.env, self.port, self.home / "api.log")
        api = self.api
        wait_until(lambda: api_ready(self.client) or not api.alive(), 60, "the API's /readyz", self.logs)
        assert api.alive(), self.logs()


def _declare_broker_queues(home: Path) -> None:
    """Create the SQLAlchemy transport's tables and queues once, before the API and the workers would race to
    create them (what ``ctpd up`` does before it starts its children)."""
    from app.settings import Settings
    from worker.celery_app import declare_queues

    declare_queues(Settings(home=home))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Iterator[EmbeddedStack]:
    home = tmp_path_factory.mktemp("faults-embedded")
    env = service_env(home, **SETTINGS)
    run_cli(["db", "upgrade"], env)
    key = create_key(env, "faults")
    _declare_broker_queues(home)
    port = free_port()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    history = History(f"sqlite:///{home / 'ctpd.db'}")
    stack = EmbeddedStack(home, env, port, key, client, history)
    try:
        stack.start_api()
        yield stack
    finally:
        client.close()
        for worker in stack.workers:
            worker.kill()
        if stack.api is not None:
            stack.api.stop()
        history.dispose()


# ------------------------------------------------------------------------------- SIGKILL in each stage


def _upload_pairs(client: httpx.Client, folder: Path, sentences: list[str], count: int) -> str:
    path = folder / f"pairs-{count}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in make_pairs(sentences, count)))
    return upload_dataset(client, path)


@pytest.fixture(scope="module")
def module_dataset_id(embedded, botchan_sentences, tmp_path_factory) -> str:
    """The dataset the later-stage cases share (44 pairs: no other case's data), so their earlier stages
    come from the cache the first of them filled."""
    return _upload_pairs(embedded.client, tmp_path_factory.mktemp("module-data"), botchan_sentences, 44)


@pytest.mark.parametrize("stage", list(KILL_CASES))
def test_sigkill_of_the_job_process_in_each_stage(embedded, module_dataset_id, stage, tmp_path, botchan_sentences,
                                                  tiny_student_folder, tiny_teacher_folder):
    client, history = embedded.client, embedded.history
    case = KILL_CASES[stage]
    dataset_id = (_upload_pairs(client, tmp_path, botchan_sentences, case.fresh_rows) if case.fresh_rows
                  else module_dataset_id)
    point = case.point
    worker = embedded.start_worker(f"kill-{stage}", failpoints=f"{point}=sleep:60@1")
    try:
        job_id = submit(client, tiny_job(tiny_student_folder, tiny_teacher_folder, dataset_id, **case.overrides,
                                         training={"max_steps": MAX_STEPS, "checkpoint_every": CHECKPOINT_EVERY}))

        def logs() -> str:
            return f"{history.describe(job_id)}\n{embedded.logs()}"

        pid = wait_until(lambda: failpoint_pid(worker, point, 1), 90, f"attempt 1 to reach {point}", logs)
        row = history.job(job_id)
        assert (row["status"], row["attempt"]) == ("running", 1), logs()
        assert job_process_pid(row["worker_id"]) == pid, f"the failpoint's pid {pid} does not hold the job\n{logs()}"
        assert (process_state(pid) or ("gone", None))[1] == worker.pid, f"{pid} is not our worker's pool child"
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: exited(pid), 10, f"the killed job process {pid} to be gone", logs)
        metrics_before_restart = history.max_metric_id()

        wait_until(lambda: history.job(job_id)["status"] in ("succeeded", "failed", "cancelled"), JOB_TIMEOUT,
                   f"job {job_id} to finish after the kill in {stage}", logs)
        job, events, points = history.job(job_id), history.events(job_id), history.metric_points(job_id)

        assert job["status"] == "succeeded", logs()
        assert job["attempt"] == 2, logs()
        assert transitions(events) == ["queued", "running", "queued", "running", "succeeded"], logs()
        assert_one_outcome(events, "succeeded")
        restarted = event_index(events, "job_restarted")
        started_2 = event_index(events, "job_started", attempt=2)
        assert restarted < started_2, logs()
        # Attempt 2 runs (or reuses) every stage, in order, and its distill resumed where attempt 1 left it.
        assert [e["stage"] for e in events[started_2:] if e["type"] == "stage_started"] == STAGES, logs()
        (distill,) = [e for e in events[started_2:] if e["type"] == "stage_finished" and e["stage"] == "distill"]
        assert distill["data"]["summary"]["resumed_from"] == case.resumed_from, logs()
        assert_every_distill_step(points, MAX_STEPS)
        leftovers = []

        def no_leftovers() -> bool:
            leftovers[:] = temporary_leftovers(embedded.artifact_root)
            return not leftovers

        wait_until(no_leftovers, 15, "the killed attempt's temporary files to be cleaned up",
                   lambda: f"left in {embedded.artifact_root}: {leftovers}\n{logs()}")
        # Last, the fencing columns (migration 0002): nothing recorded as attempt 1 after the requeue.
        assert_nothing_from(history, job_id, 1, after_event_id=events[restarted]["id"],
                            after_metric_id=metrics_before_restart)
        assert_run_events_carry(events, 2, after_event_id=events[started_2]["id"])
        assert_metrics_carry(points, 2, after_metric_id=metrics_before_restart)
    finally:
        worker.kill()


# ---------------------------------------------------------------------------- SIGKILL of the API mid-upload

UPLOAD_BYTES = 64 * 1024 * 1024
CHUNK = 1024 * 1024


def _big_jsonl(count_bytes: int) -> bytes:
    """Valid preference rows, each one different, about ``count_bytes`` in all."""
    row = '{{"prompt": "row {0} of a large upload: say something", "chosen": " a kind and careful answer {0}", ' \
          '"rejected": " a careless answer {0}"}}\n'
    lines, size, index = [], 0, 0
    while size < count_bytes:
        line = row.format(index)
        lines.append(line)
        size += len(line)
        index += 1
    return "".join(lines).encode()


def test_api_sigkill_mid_upload_leaves_no_incoming_file(embedded):
    history = embedded.history
    datasets_dir = embedded.artifact_root / "datasets"
    datasets_before = history.dataset_count()
    folders_before = {path.name for path in datasets_dir.iterdir()} if datasets_dir.exists() else set()

    boundary = "ctpd-faults-boundary"
    payload = _big_jsonl(UPLOAD_BYTES)
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    halfway, killed = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        # Chunked (no Content-Length), and paused halfway until the API is dead: the kill lands while the
        # upload is really in progress, whatever the API does with the part it already has.
        yield head
        for offset in range(0, len(payload), CHUNK):
            if offset >= len(payload) // 2 and not halfway.is_set():
                halfway.set()
                killed.wait(60)
            yield payload[offset : offset + CHUNK]
        yield tail

    outcome: dict[str, object] = {}

    def upload() -> None:
        try:
            response = httpx.post(
                f"http://127.0.0.1:{embedded.port}/v1/datasets", content=body(), timeout=120,
                headers={"Authorization": f"Bearer {embedded.key}",
                         "Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            outcome["response"] = (response.status_code, response.text[:500])
        except httpx.HTTPError as error:
            outcome["error"] = repr(error)

    client_thread = threading.Thread(target=upload, name="big-upload", daemon=True)
    client_thread.start()
    try:
        incoming = wait_until(
            lambda: halfway.is_set() and [p for p in datasets_dir.glob(".incoming-*") if p.stat().st_size > 0],
            60, "half the upload to be sent and its .incoming-* file to be written", embedded.logs)
        embedded.api.popen.send_signal(signal.SIGKILL)
        embedded.api.popen.wait(timeout=10)
    finally:
        killed.set()
        client_thread.join(timeout=60)
    assert "response" not in outcome, f"the upload finished although the API was killed: {outcome}"
    assert all(path.exists() for path in incoming), "a SIGKILL runs no cleanup; the orphan should still be there"

    killed_at = time.monotonic()
    embedded.api.stop()  # reaps the killed process and closes its log
    embedded.start_api()
    wait_until(lambda: not list(datasets_dir.glob(".incoming-*")), 30,
               "the restarted API to remove the orphaned .incoming-* file",
               lambda: f"still there {time.monotonic() - killed_at:.1f} s after the kill: "
                       f"{sorted(p.name for p in datasets_dir.glob('.incoming-*'))}\n{embedded.logs()}")
    assert history.dataset_count() == datasets_before, "a dataset row was recorded for the interrupted upload"
    folders_after = {path.name for path in datasets_dir.iterdir()}
    assert folders_after == folders_before, f"new entries in {datasets_dir}: {sorted(folders_after - folders_before)}"
