"""``ctpd submit --upload --follow`` on a real job: the served API, and the worker's own task body
(worker.tasks.execute_job: claim, recipe on the tiny models, DbObserver, outcome) started by the enqueue. Failpoints
(worker/failpoints.py) hold the job for a moment at known places, so the follower sees those states however fast
the tiny stages are; the rest is what the real pipeline reports."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator

import pytest

from ctpd_cli.main import main
from tests.live_service import serving, tiny_job
from worker.tasks import execute_job

# The observer writes a sub-stage's progress at most once a second (worker/sinks.py): a pause of a second before
# step 1's report lets it through at once, and a pause before step 2's keeps "1 of 2" on screen for a moment.
FAILPOINTS = ",".join(f"{point}=sleep:{seconds}" for point, seconds in (
    ("stage_started:contrastive", 0.8),  # the reference stage's last pass stays on screen: rejected responses
    ("step:contrastive:positive:1", 1.05), ("step:contrastive:positive:2", 0.8),  # π+ at step 1 of 2
    ("step:contrastive:negative:1", 1.05), ("step:contrastive:negative:2", 0.8),  # π− at step 1 of 2
    ("step:distill:1", 1.05), ("step:distill:2", 0.8),  # distill at step 1 of 2, with its loss
))


@pytest.fixture
def database_url(tmp_path, migrated_sqlite_template) -> str:
    path = tmp_path / "ctpd.db"
    shutil.copyfile(migrated_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def server(app) -> Iterator[str]:
    with serving(app) as url:
        yield url


def test_submit_follow_shows_a_real_job_stage_by_stage(server, app, queue, db, settings, alice, capsys, monkeypatch,
                                                       tmp_path, tiny_student_folder, tiny_teacher_folder,
                                                       tiny_dataset_path):
    monkeypatch.setenv("CTPD_FAILPOINTS", FAILPOINTS)
    monkeypatch.setenv("CTPD_HOME", str(tmp_path / "client-home"))
    monkeypatch.delenv("CTPD_URL", raising=False)
    workers: list[threading.Thread] = []

    def run(job_id: str) -> None:  # the doorbell: a worker takes the job, as Celery would deliver it
        worker = threading.Thread(target=execute_job, args=(db, settings, job_id, "w1"), kwargs={"device": "cpu"})
        workers.append(worker)
        worker.start()

    queue.on_enqueue = run
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(tiny_job(tiny_student_folder, tiny_teacher_folder, "replaced-by-the-upload")))
    try:
        code = main(["submit", str(spec_path), "--upload", str(tiny_dataset_path), "--follow", "--poll", "0.1",
                     "--url", server, "--key", alice.api_key])
    finally:
        for worker in workers:
            worker.join(timeout=120)
    out = capsys.readouterr().out
    assert code == 0, out
    job_id = out.split("submitted job ", 1)[1].split()[0]
    progress = [line.split("progress", 1)[1].strip() for line in out.splitlines() if "  progress  " in line]
    labels = [line.split(":", 1)[0] for line in progress]
    for label in ("reference rejected", "contrastive π+", "contrastive π−", "distill"):
        assert label in labels, progress
    assert labels.index("contrastive π+") < labels.index("contrastive π−") < labels.index("distill")
    for label in ("contrastive π+", "contrastive π−", "distill"):
        assert any(line.startswith(f"{label}: 1/2  loss ") for line in progress), (label, progress)
    assert any("job ETA" in line for line in progress)
    for stage in ("prepare", "reference", "contrastive", "weights", "distill", "evaluate", "export"):
        assert f"stage_finished    {stage} finished" in out, stage
    assert f"job {job_id}: succeeded" in out and "preference_accuracy" in out
    assert f"download: ctpd jobs download {job_id}" in out
