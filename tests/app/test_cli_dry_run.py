"""``ctpd submit SPEC --dry-run`` against the real API served over HTTP (uvicorn in a thread), its worker part
answered by the real task function: the text for a person (errors and warnings first, each with its fix), the
``--json`` object, the exit codes, and that nothing is queued."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.db import datasets as dataset_rows
from app.main import create_app
from ctpd_cli.main import main
from tests.app.conftest import SPEC, RecordingQueue, _client_for
from tests.conftest import catalog_cache
from tests.live_service import serving


class AnsweringQueue(RecordingQueue):
    """A worker that answers every preflight at once (the real task body, inline)."""

    def __init__(self, db, settings) -> None:
        super().__init__()
        self.db, self.settings = db, settings

    def enqueue_preflight(self, preflight_id: str) -> None:
        from worker.preflight import run_preflight

        super().enqueue_preflight(preflight_id)
        run_preflight(self.db, self.settings, preflight_id)


@pytest.fixture
def answering(settings, db) -> Iterator[tuple[str, str, AnsweringQueue]]:
    queue = AnsweringQueue(db, settings.model_copy(update={"model_cache": catalog_cache()}))
    app = create_app(settings.model_copy(update={"preflight_wait_seconds": 30}), queue=queue)
    try:
        key = _client_for(app, db, "acme").api_key  # type: ignore[attr-defined]
        with serving(app) as url:
            yield url, key, queue
    finally:
        app.state.db.dispose()


def _spec_file(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _tiny(student: Path, teacher: Path, dataset: Path, **sequence) -> dict:
    return {"method": "ctpd", "student": {"model": str(student)}, "teacher": {"model": str(teacher)},
            "dataset": {"path": str(dataset), "validation_fraction": 0.1},
            "sequence": {"max_prompt_tokens": 32, "max_response_tokens": 32, **sequence},
            "training": {"batch_size": 4, "micro_batch_size": 2}}


def test_a_clean_dry_run_prints_the_numbers_exits_0_and_queues_no_job(
        answering, tmp_path, capsys, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    url, key, queue = answering
    spec = _spec_file(tmp_path, _tiny(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path))
    assert main(["submit", spec, "--dry-run", "--url", url, "--key", key]) == 0
    out = capsys.readouterr().out
    # The one warning: no train worker runs in this test (the job would wait); the verdict sends the reader to it.
    assert out.startswith("preflight pf_") and "0 error(s), 1 warning(s): ok: it can run; read the warnings" in out
    assert "[no_live_worker]" in out
    for line in ("dataset: 36 training pairs, 4 validation pairs", "distill      9 steps, batch 4",
                 "contrastive  9 steps for each of pi+ and pi-", "span length (bytes):", "memory per device:",
                 "duration: unknown:"):
        assert line in out, out
    assert queue.jobs == [] and len(queue.preflights) == 1


def test_errors_come_first_with_their_fixes_and_exit_1(
        answering, tmp_path, capsys, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    url, key, _ = answering
    spec = _spec_file(tmp_path, _tiny(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path,
                                      prompt_format="chat_template"))
    assert main(["submit", spec, "--dry-run", "--url", url, "--key", key]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "1 error(s)" in lines[0] and "refused" in lines[0]
    assert lines[2] == "errors:" and lines[3].startswith("  x [encoding_refused] sequence: ")
    assert lines[4] == "      fix: set sequence.prompt_format: raw"


def test_json_prints_the_report_object_and_upload_notes_go_to_stderr(
        answering, tmp_path, capsys, db, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    url, key, _ = answering
    spec = _spec_file(tmp_path, _tiny(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path,
                                      max_response_tokens=4))
    assert main(["submit", spec, "--dry-run", "--json", "--upload", str(tiny_dataset_path), "--url", url,
                 "--key", key]) == 0  # warnings only
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["status"] == "done" and {w["code"] for w in report["warnings"]} == {"responses_truncated", "no_live_worker"}
    dataset_id = report["spec"]["dataset"]["id"]
    assert f"dataset {dataset_id}" in captured.err
    # The preflight measured the upload with both tokenizers and recorded it on the dataset.
    stats = dataset_rows.get_dataset(db, dataset_id).stats
    assert set(stats["token_lengths"]) == {str(tiny_student_folder), str(tiny_teacher_folder)}


def test_a_report_no_worker_answers_is_pending_exit_3(app, alice, tmp_path, capsys, queue):
    with serving(app) as url:  # the suite's recording queue: nobody answers
        assert main(["submit", _spec_file(tmp_path, SPEC), "--dry-run", "--wait", "0", "--url", url,
                     "--key", alice.api_key]) == 3
    out = capsys.readouterr().out
    assert "incomplete: a worker has not answered yet" in out and "poll: /v1/preflights/pf_" in out
    assert queue.jobs == []
