"""A checkpoint made into a model through the real service: ``ctpd up`` (its API and its Celery worker, SQLite and
the SQLAlchemy broker, all its own) runs a tiny job, then builds a checkpoint's model folder when asked over HTTP
(``ctpd.materialize_checkpoint`` sent by name to the ``default`` queue); the folder is downloaded over a real
socket, cut mid-way and resumed with Range, and loaded with transformers: it holds the checkpoint's weights, in the
job's export dtype. The final export is written in that dtype too."""

from __future__ import annotations

import io
import signal
import sys
import tarfile

import httpx
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.live_service import (
    TERMINAL,
    Proc,
    free_port,
    service_env,
    tiny_job,
    up_logs,
    upload_dataset,
    wait_for_job,
    wait_until,
)


def test_a_checkpoint_is_built_by_the_worker_and_downloaded(tmp_path, tiny_student_folder, tiny_teacher_folder,
                                                            tiny_dataset_path):
    home = tmp_path / "home"
    port = free_port()
    up = Proc("ctpd up", [sys.executable, "-m", "ctpd_cli.main", "up", "--port", str(port), "--stop-timeout", "15"],
              service_env(home, single_thread=True), tmp_path / "up.log")

    def logs() -> str:
        return up_logs(home, up, lines=60)

    try:
        wait_until(lambda: "ctpd is up" in up.log() or not up.alive(), 120, "`ctpd up` to be ready", logs)
        assert up.alive(), logs()
        key = (home / "api-key").read_text().strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as client:
            dataset_id = upload_dataset(client, tiny_dataset_path)
            spec = tiny_job(tiny_student_folder, tiny_teacher_folder, dataset_id, weights={"source": "uniform"},
                            training={"max_steps": 3}, export={"dtype": "bf16"})
            response = client.post("/v1/jobs", json=spec)
            assert response.status_code == 201, response.text
            job = wait_for_job(client, response.json()["id"], lambda job: job["status"] in TERMINAL, "finished", logs)
            assert job["status"] == "succeeded", logs()
            job_id = job["id"]
            config = client.get(f"/v1/jobs/{job_id}/model/files/config.json").json()
            assert config["dtype"] == "bfloat16"

            listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
            assert [c["id"] for c in listed] == ["distill-00000002", "distill-00000003"]
            wanted = listed[0]["id"]
            asked = client.post(f"/v1/jobs/{job_id}/checkpoints/{wanted}/model")
            assert asked.status_code == 202, asked.text

            def built() -> dict | None:
                model = client.get(f"/v1/jobs/{job_id}/checkpoints/{wanted}").json()["model"]
                return model if model["status"] in ("ready", "failed") else None

            model = wait_until(built, 180, f"the worker to build {wanted}", logs)
            assert model["status"] == "ready", (model, logs())

            # A download over a real socket, dropped mid-way and resumed with Range + If-Range.
            url = model["archive_url"]
            received = b""
            with client.stream("GET", url) as whole:
                assert whole.status_code == 200
                size, etag = int(whole.headers["content-length"]), whole.headers["etag"]
                for chunk in whole.iter_bytes(4096):
                    received += chunk
                    if len(received) >= size // 2:
                        break
            rest = client.get(url, headers={"Range": f"bytes={len(received)}-", "If-Range": etag})
            assert rest.status_code == 206, rest.text
            archive_bytes = received + rest.content
            assert len(archive_bytes) == size and archive_bytes == client.get(url).content

        with tarfile.open(fileobj=io.BytesIO(archive_bytes)) as archive:
            archive.extractall(tmp_path / "out", filter="data")
        model_dir = tmp_path / "out" / f"{job_id}-{wanted}"
        loaded = AutoModelForCausalLM.from_pretrained(str(model_dir))
        assert loaded.dtype == torch.bfloat16
        parameters = dict(loaded.named_parameters())
        trained = load_file(str(home / "artifacts" / "jobs" / job_id / "checkpoints" / wanted / "trainable.safetensors"))
        assert all(torch.equal(parameters[name], tensor.to(torch.bfloat16)) for name, tensor in trained.items())
        assert "step 2" in (model_dir / "README.md").read_text()
        assert "ctpd.materialize_checkpoint" in (home / "logs" / "worker.log").read_text()

        up.popen.send_signal(signal.SIGTERM)
        assert up.popen.wait(timeout=45) == 0, logs()
    finally:
        up.stop()
