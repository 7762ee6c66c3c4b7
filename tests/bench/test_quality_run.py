"""bench.quality end to end on tiny models: every method trains as a job, every row is measured, the report
and the plot are written, and a rerun resumes from the stored measurements instead of training again."""

from __future__ import annotations

import json

import pytest

from bench.quality.config import METHODS, Scale
from bench.quality.run import Bench, job_spec
from tests.conftest import catalog_cache


@pytest.fixture(scope="module")
def tiny_scale(tiny_student_folder, tiny_teacher_folder) -> Scale:
    return Scale(
        name="test", train_pairs=16, eval_prompts=3, seeds=(0, 1), samples_per_prompt=2, max_new_tokens=5,
        validation_pairs=4, batch_size=8, micro_batch_size=4, learning_rate=1e-3, contrastive_learning_rate=1e-3,
        max_response_tokens=24, inference_batch_size=8, sampling_batch_size=2,
        teacher=str(tiny_teacher_folder), student=str(tiny_student_folder),
    )


@pytest.fixture(scope="module")
def finished_run(tiny_scale, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-quality")
    report = Bench(tiny_scale, out, "cpu", catalog_cache()).run()
    return out, report


def test_every_method_shares_the_hyperparameters_and_differs_only_in_reference_and_weights(tiny_scale, tmp_path):
    specs = {key: job_spec(tiny_scale, key, 0, tmp_path / "train.jsonl") for key, _, _ in METHODS}
    shared = {k: v for k, v in specs["dpo"].items() if k not in ("method", "weights", "teacher", "name")}
    for spec in specs.values():
        assert {k: v for k, v in spec.items() if k not in ("method", "weights", "teacher", "name")} == shared
    assert specs["ctpd"]["teacher"] == specs["ctpd_uniform"]["teacher"] == {"model": tiny_scale.teacher}
    assert "teacher" not in specs["dpo"] and "teacher" not in specs["tisdpo"]
    assert specs["ctpd_uniform"]["weights"] == {"source": "uniform"}
    assert specs["ctpd_average"]["weights"] == {"source": "teacher_contrastive", "average": True}


def test_the_run_measures_every_row_and_writes_the_report(finished_run, tiny_scale):
    out, report = finished_run
    assert report["seeds"] == ["0", "1"]
    rows = report["rows"]
    assert set(rows) == {"student", "teacher", "teacher_pi_plus", *tiny_scale.methods}
    for row in (*tiny_scale.methods, "teacher_pi_plus"):
        assert set(rows[row]) == {"0", "1"}
        for m in rows[row].values():
            assert len(m["rewards"]) == 3 and all(len(r) == 2 for r in m["rewards"])
            assert all(-1.0 <= r <= 1.0 for prompt in m["rewards"] for r in prompt)
            assert m["kl"] > 0  # trained away from its initial model
            assert m["bits_per_byte"] > 0
    student = rows["student"]["-"]
    assert student["kl"] == 0 and student["preference_accuracy"] == 0.5 and student["win_rate"] == 0.5
    # The jobs were real runs of the recipe: the π± teacher stage ran for ctpd, the student's for tisdpo.
    assert "contrastive" not in rows["ctpd_uniform"]["0"]["cached_stages"]
    assert rows["ctpd"]["0"]["stage_seconds"]["contrastive"] > 0
    assert rows["tisdpo"]["0"]["stage_seconds"]["contrastive"] > 0
    assert {"contrastive", "weights"} <= set(rows["ctpd_average"]["0"]["cached_stages"])  # shares ctpd's π±
    text = (out / "results.md").read_text(encoding="utf-8")
    for _, label, _ in METHODS:
        assert f"| {label} |" in text
    assert "## Did CTPD beat the others here?" in text and "python -m bench.quality" in text
    assert (out / "results-reward-vs-kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((out / "results.json").read_text())
    assert set(stored["comparisons"]) == {"dpo", "tisdpo", "ctpd_uniform", "ctpd_average", "student"}
    assert stored["comparisons"]["dpo"]["reward"]["n"] == 2


def test_a_lost_ceiling_row_is_measured_again_from_the_stage_cache_without_training(
    finished_run, tiny_scale, monkeypatch
):
    out, report = finished_run
    (out / "measurements" / "teacher_pi_plus-seed1.json").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("the π+ model is in the stage cache: nothing needs training")

    monkeypatch.setattr(Bench, "train", no_training)
    again = Bench(tiny_scale, out, "cpu", catalog_cache()).run()
    assert json.dumps(again["rows"]["teacher_pi_plus"]["1"]["rewards"]) == json.dumps(
        report["rows"]["teacher_pi_plus"]["1"]["rewards"]
    )


def test_report_only_rewrites_the_report_from_the_store(finished_run, tiny_scale, monkeypatch):
    from bench.quality import run

    out, _ = finished_run
    (out / "results.md").unlink()
    monkeypatch.setattr(run, "SCALES", {"test": tiny_scale})
    monkeypatch.setattr(run.Bench, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no models")))
    assert run.main(["--scale", "test", "--out", str(out), "--device", "cpu", "--report-only"]) == 0
    text = (out / "results.md").read_text()
    assert "seeds measured: 0, 1" in text and "Compute:" in text
    json.loads((out / "results.json").read_text())  # strict JSON: no NaN


def test_a_rerun_resumes_from_the_stored_measurements(finished_run, tiny_scale, monkeypatch):
    out, report = finished_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(Bench, "train", no_training)
    again = Bench(tiny_scale, out, "cpu", catalog_cache()).run()
    assert json.dumps(again["summaries"]) == json.dumps(report["summaries"])  # (NaN != NaN in a dict compare)


def test_changed_settings_do_not_reuse_old_measurements(finished_run, tiny_scale):
    out, _ = finished_run
    other = Scale(**{**tiny_scale.__dict__, "learning_rate": 2e-3})
    bench = Bench.__new__(Bench)  # only the store is needed
    from bench.quality.run import MeasurementStore

    bench.store = MeasurementStore(out / "measurements", other.fingerprint("cpu"))
    assert bench.store.get("dpo", 0) is None
    # The same settings measured on another device or precision are other measurements too.
    assert MeasurementStore(out / "measurements", tiny_scale.fingerprint("cuda")).get("dpo", 0) is None
    assert MeasurementStore(out / "measurements", tiny_scale.fingerprint("cpu")).get("dpo", 0) is not None


def test_publishing_the_table_keeps_the_frontier_section_of_results_md(finished_run, tiny_scale, monkeypatch, tmp_path):
    from bench.quality import run
    from bench.quality.frontier_report import BEGIN, END

    out, _ = finished_run
    docs = tmp_path / "docs"
    docs.mkdir()
    section = f"{BEGIN}\n## Frontier: reward against KL\n\nthe sweep's numbers\n{END}"
    (docs / "results.md").write_text(f"# Old table\n\n{section}\n", encoding="utf-8")
    monkeypatch.setattr(run, "SCALES", {"test": tiny_scale})
    monkeypatch.setattr(run, "DOCS", docs)
    monkeypatch.setattr(run.Bench, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no models")))
    assert run.main(["--scale", "test", "--out", str(out), "--device", "cpu", "--report-only", "--publish"]) == 0
    published = (docs / "results.md").read_text(encoding="utf-8")
    assert published.startswith("# Quality benchmark") and "# Old table" not in published
    assert published.count(BEGIN) == 1 and section in published
