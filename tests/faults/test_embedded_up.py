"""``ctpd up`` under faults (issue 9, item 9): the API dying mid-job does not touch the worker's running job
(``ctpd up`` starts a new API beside it), and stopping ``ctpd up`` hands the job back instead of killing it,
so the next ``ctpd up`` resumes it from the hand-back checkpoint. Real processes, real signals; the history is
read over the API (it is the same SQL) and from the job's events."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from tests.live_service import (
    TERMINAL,
    Proc,
    free_port,
    job_events,
    service_env,
    tiny_job,
    up_logs,
    upload_dataset,
    wait_for_job,
    wait_until,
)
from worker.tasks import child_pids

pytestmark = pytest.mark.faults
STEPS = 300


def _api_pid(up: Proc) -> int | None:
    for child in child_pids(up.popen.pid):
        try:
            if b"serve" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                return child
        except OSError:
            continue
    return None


def _start(home: Path, port: int, log: Path) -> Proc:
    # Small lease and grace so a lost hand-back would show within the test's deadlines; one torch thread.
    env = service_env(home, single_thread=True, lease_seconds="10", shutdown_grace_seconds="20",
                      reaper_interval_seconds="2", requeue_after_seconds="5")
    return Proc("ctpd up", [sys.executable, "-m", "ctpd_cli.main", "up", "--port", str(port), "--stop-timeout", "40"],
                env, log)


def test_the_api_dying_leaves_the_job_alone_and_stopping_up_hands_it_back(
    tmp_path, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path
):
    home, port = tmp_path / "home", free_port()
    up = _start(home, port, tmp_path / "up-1.log")
    second: Proc | None = None

    def logs() -> str:
        return up_logs(home, up, second)

    try:
        wait_until(lambda: "ctpd is up" in up.log() or not up.alive(), 120, "`ctpd up` to be ready", logs)
        key = (home / "api-key").read_text().strip()
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                              timeout=30)
        dataset_id = upload_dataset(client, tiny_dataset_path)
        spec = tiny_job(tiny_student_folder, tiny_teacher_folder, dataset_id, weights={"source": "uniform"},
                        training={"max_steps": STEPS, "checkpoint_every": 100_000})
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        wait_for_job(client, job_id, lambda job: job["status"] in TERMINAL
                     or (job["stage"] == "distill" and (job["progress"]["step"] or 0) >= 2), "distilling", logs)

        # 1. SIGKILL the API: ctpd up starts another; the job runs on in the same attempt, untouched.
        api = _api_pid(up)
        assert api is not None, logs()
        os.kill(api, signal.SIGKILL)
        def answers() -> bool:
            try:
                return client.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(lambda: _api_pid(up) not in (None, api) and answers(), 60, "a new API", logs)
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert up.alive() and job["status"] == "running" and job["attempt"] == 1, logs()

        # 2. SIGTERM ctpd up: the job checkpoints and is handed back, not killed; ctpd up exits cleanly.
        up.popen.send_signal(signal.SIGTERM)
        assert up.popen.wait(timeout=60) == 0, logs()
        client.close()

        # 3. The next ctpd up resumes it from the hand-back checkpoint, and it succeeds once.
        second = _start(home, port, tmp_path / "up-2.log")
        wait_until(lambda: "ctpd is up" in second.log() or not second.alive(), 120, "`ctpd up` again", logs)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                              timeout=30)
        done = wait_for_job(client, job_id, lambda job: job["status"] in TERMINAL, "finished", logs, timeout=240)
        assert done["status"] == "succeeded", logs()
        assert [t["status"] for t in done["transitions"]] == ["queued", "running", "queued", "running", "succeeded"]
        events = job_events(client, job_id)
        types = [event["type"] for event in events]
        assert "job_handed_back" in types and "job_restarted" not in types, types  # handed back, never lost
        handed_back = [e for e in events if e["type"] == "checkpoint_saved"][0]["data"]["step"]
        distill = [e for e in events if e["type"] == "stage_finished" and e["stage"] == "distill"][-1]
        assert distill["data"]["summary"]["resumed_from"] == handed_back > 0
        steps = {point["step"] for point in client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]["distill/loss"]}
        assert steps == set(range(1, STEPS + 1))
        client.close()
    finally:
        up.stop()
        if second is not None:
            second.stop()
