"""A preflight end to end through the embedded service (``ctpd up``: the API, the job worker and the light worker
that consumes ``default``): ``ctpd submit --dry-run --upload`` is answered by a real worker, while a training job
holds the job worker, and nothing is queued for the dry run."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from tests.live_service import (
    CTPD,
    REPO,
    Proc,
    free_port,
    service_env,
    submit,
    tiny_job,
    up_logs,
    upload_dataset,
    wait_until,
)


def test_ctpd_up_answers_a_dry_run_beside_a_training_job(tmp_path, tiny_student_folder, tiny_teacher_folder,
                                                          tiny_dataset_path):
    home = tmp_path / "home"
    port = free_port()
    env = service_env(home)
    up = Proc("ctpd up", [sys.executable, "-m", "ctpd_cli.main", "up", "--port", str(port), "--stop-timeout", "15"],
              env, tmp_path / "up.log")

    def logs() -> str:
        return up_logs(home, up, lines=60)

    try:
        wait_until(lambda: "ctpd is up" in up.log() or not up.alive(), 120, "`ctpd up` to be ready", logs)
        key = (home / "api-key").read_text().strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as client:
            dataset_id = upload_dataset(client, tiny_dataset_path)
            # A longer job, so that it still holds the job worker while the dry run is answered.
            job_id = submit(client, tiny_job(tiny_student_folder, tiny_teacher_folder, dataset_id,
                                             training={"max_steps": 40}))
            spec = tiny_job(tiny_student_folder, tiny_teacher_folder, dataset_id)
            spec["dataset"] = {"path": str(tiny_dataset_path), "validation_fraction": 0.2}
            spec_file = tmp_path / "spec.json"
            spec_file.write_text(json.dumps(spec))
            result = subprocess.run([*CTPD, "submit", str(spec_file), "--dry-run", "--json", "--upload",
                                     str(tiny_dataset_path)], cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=180)
            assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs()}"
            report = json.loads(result.stdout)
            assert report["status"] == "done" and report["ok"] is True, report["errors"]
            assert report["tokenizers"]["teacher"]["offsets"] and report["steps"]["distill"]["total_steps"] == 2
            jobs = client.get("/v1/jobs").json()["data"]
            assert [job["id"] for job in jobs] == [job_id]  # the dry run queued no job
            client.post(f"/v1/jobs/{job_id}/cancel")
        assert "ctpd.preflight" in (home / "logs" / "worker.log").read_text()
    finally:
        up.stop()
