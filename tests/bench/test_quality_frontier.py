"""bench.quality.frontier end to end on tiny models: every method of the grid trains as a job at its points,
each trained student is measured on both held-out sources and stored as small JSON, the report and its plot are
written, a rerun resumes from the store, changed settings never reuse it, and --publish keeps the rest of
results.md."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench.quality.config import FRONTIER_LABELS, FrontierPoint, FrontierScale, Scale
from bench.quality.frontier import FrontierBench, FrontierStore, frontier_job_spec, main, point_row
from bench.quality.frontier_report import BEGIN, END, frontier_section, splice_section
from tests.conftest import catalog_cache

METHODS = tuple(FRONTIER_LABELS)


@pytest.fixture(scope="module")
def tiny_frontier(tiny_student_folder, tiny_teacher_folder) -> FrontierScale:
    base = Scale(
        name="test", train_pairs=16, eval_prompts=3, seeds=(0,), samples_per_prompt=2, max_new_tokens=4,
        validation_pairs=4, batch_size=8, micro_batch_size=8, learning_rate=1e-3, contrastive_learning_rate=1e-3,
        max_response_tokens=16, inference_batch_size=8, sampling_batch_size=3,
        teacher=str(tiny_teacher_folder), student=str(tiny_student_folder),
    )
    return FrontierScale(name="test", base=base, betas=(0.1, 1.0), lr_factors=(0.5, 2.0), methods=METHODS)


@pytest.fixture(scope="module", autouse=True)
def fewer_resamples():
    """The report's bootstrap is checked in test_quality_frontier_stats; here 200 draws keep the runs fast."""
    from bench.quality import frontier_report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frontier_report, "RESAMPLES", 200)
        yield


@pytest.fixture(scope="module")
def finished(tiny_frontier, tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    store = FrontierStore(out / "measurements")
    report = FrontierBench(tiny_frontier, out, "cpu", catalog_cache(), store).run()
    return out, store, report


def test_points_share_every_setting_but_their_method_and_knob(tiny_frontier, tmp_path):
    points = {p.key: p for p in tiny_frontier.points()}
    assert len(points) == 2 * len(METHODS)
    specs = {key: frontier_job_spec(tiny_frontier, p, 0, tmp_path / "t.jsonl") for key, p in points.items()}
    varying = ("method", "weights", "teacher", "kd", "beta", "name", "metadata")

    def shared(spec):
        out = {k: v for k, v in spec.items() if k not in varying}
        out["training"] = {k: v for k, v in spec["training"].items() if k != "learning_rate"}
        return out

    assert all(shared(s) == shared(specs["dpo-beta0.1"]) for s in specs.values())
    assert specs["dpo-beta1"]["beta"] == 1.0 and specs["dpo-beta1"]["training"]["learning_rate"] == 1e-3
    assert specs["sft-lr2x"]["training"]["learning_rate"] == pytest.approx(2e-3)
    assert specs["sft-lr0.5x"]["beta"] == tiny_frontier.base.beta  # unswept: the scale's
    assert specs["uld-lr2x"]["kd"] == {"kappa": 0.5, "uld_alignment": "span"}
    assert specs["dskd-lr2x"]["kd"] == {"kappa": 0.5, "temperature": 2.0}
    assert {k for k, s in specs.items() if "teacher" in s} == {
        f"{m}-{knob}" for m in ("ctpd", "ctpd_uniform") for knob in ("beta0.1", "beta1")
    } | {f"{m}-{knob}" for m in ("uld", "dskd") for knob in ("lr0.5x", "lr2x")}


def test_a_scale_may_use_a_subset_of_the_fixed_grid_only(tiny_frontier):
    with pytest.raises(ValueError, match="grid is fixed"):
        FrontierScale(name="x", base=tiny_frontier.base, betas=(0.2,))
    with pytest.raises(ValueError, match="unknown frontier methods"):
        FrontierScale(name="x", base=tiny_frontier.base, methods=("orpo",))


def test_the_sweep_measures_every_point_on_both_sources_as_small_json(finished, tiny_frontier):
    out, store, report = finished
    for source in ("botchan", "jargon"):
        for family in ("student", "teacher"):
            assert store.path(source, family).exists()
        for point in tiny_frontier.points():
            record = json.loads(store.path(source, point_row(point, 0)).read_text())
            assert len(record["rewards"]) == 3 and all(len(r) == 2 for r in record["rewards"])
            assert len(record["kls"]) == 3 and all(k >= 0 for row in record["kls"] for k in row)
            assert record["kl"] == pytest.approx(sum(sum(r) for r in record["kls"]) / 6, abs=1e-4)
            assert record["kl"] > 0  # trained away from the initial student
            assert "samples" not in record and record["stage_seconds"]["distill"] > 0
            assert record["source"] == source and record["method"] == point.method
            assert (record["preference_accuracy"] is None) == (source == "jargon")
    # One stage cache for the sweep: the second β of ctpd reuses the first one's π±, weights and reference.
    ctpd = json.loads(store.path("botchan", "ctpd-beta1-seed0").read_text())
    assert {"contrastive", "weights", "reference"} <= set(ctpd["cached_stages"])
    # The trained exports are deleted once measured: only the store is kept.
    assert not any((out / "runs").glob("*/export"))
    text = (out / "frontier.md").read_text()
    assert text.startswith(BEGIN) and text.rstrip().endswith(END)
    assert "### Does CTPD win at matched KL?" in text and "uld_alignment: span" in text
    (run,) = store.runs()  # each invocation's wall time is kept beside the measurements, and reported
    assert run["seeds"] == [0] and run["wall_seconds"] > 0 and f"{run['wall_seconds'] / 60:.1f} min wall" in text
    for label in FRONTIER_LABELS.values():
        assert f"| {label} |" in text
    assert (out / "results-frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    analysis = report["analysis"]["jargon"]
    assert set(analysis["points"]) == set(METHODS)
    assert len(analysis["comparisons"]) == len(METHODS) * (len(METHODS) - 1) // 2
    json.loads((out / "frontier.json").read_text())  # strict JSON


def test_a_rerun_resumes_from_the_store_and_changed_settings_measure_again(finished, tiny_frontier, monkeypatch):
    out, store, report = finished

    def no_training(*args, **kwargs):
        raise AssertionError("everything is stored: nothing may train again")

    monkeypatch.setattr(FrontierBench, "train", no_training)
    again = FrontierBench(tiny_frontier, out, "cpu", catalog_cache(), store).run()
    assert json.dumps(again["analysis"]) == json.dumps(report["analysis"])
    # A lost measurement of one source retrains only that point, and measures only that source.
    point = FrontierPoint("sft", "lr", 2.0)
    jargon_file = store.path("jargon", point_row(point, 0))
    botchan_before = store.path("botchan", point_row(point, 0)).read_text()
    jargon_file.unlink()
    trained = []
    monkeypatch.undo()
    original = FrontierBench.train

    def counting(self, p, seed, train_file):
        trained.append(p.key)
        return original(self, p, seed, train_file)

    monkeypatch.setattr(FrontierBench, "train", counting)
    FrontierBench(tiny_frontier, out, "cpu", catalog_cache(), store).run()
    assert trained == ["sft-lr2x"] and jargon_file.exists()
    assert store.path("botchan", point_row(point, 0)).read_text() == botchan_before
    # Other settings, device or source prompts: other fingerprints, so nothing stored is found.
    fields = point.spec_fields(tiny_frontier.base)
    ids = {"jargon": "jargon:abc"}
    stored = tiny_frontier.fingerprint("cpu", fields, ids["jargon"])
    other_lr = FrontierScale(name="test", base=Scale(**{**tiny_frontier.base.__dict__, "learning_rate": 2e-3}),
                             betas=(0.1, 1.0), lr_factors=(0.5, 2.0))
    assert len({stored, other_lr.fingerprint("cpu", fields, ids["jargon"]), tiny_frontier.fingerprint(
        "cuda", fields, ids["jargon"]), tiny_frontier.fingerprint("cpu", fields, "jargon:def"),
        tiny_frontier.fingerprint("cpu", FrontierPoint("sft", "lr", 0.5).spec_fields(tiny_frontier.base),
                                  ids["jargon"])}) == 5
    assert store.get("jargon", point_row(point, 0), "another-fingerprint") is None


def test_publish_replaces_only_the_frontier_section(finished, tiny_frontier, tmp_path, monkeypatch):
    from bench.quality import frontier

    out, store, _ = finished
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Quality benchmark\n\nThe table.\n", encoding="utf-8")
    monkeypatch.setattr(frontier, "FRONTIER_SCALES", {"test": tiny_frontier})
    monkeypatch.setattr(frontier, "REPO", tmp_path)
    monkeypatch.setattr(FrontierBench, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no models")))
    args = ["--scale", "test", "--out", str(out), "--store", str(store.folder), "--device", "cpu"]
    assert main([*args, "--report-only", "--publish"]) == 0
    first = (docs / "results.md").read_text()
    assert first.startswith("# Quality benchmark\n\nThe table.\n\n" + BEGIN) and first.rstrip().endswith(END)
    assert "python -m bench.quality.frontier --scale test" in first and "--report-only" not in first
    assert (docs / "results-frontier.png").exists()
    # Publishing again replaces the section in place, whatever follows it.
    (docs / "results.md").write_text(first + "\n## Later\n\nKept.\n", encoding="utf-8")
    assert main([*args, "--report-only", "--publish"]) == 0
    second = (docs / "results.md").read_text()
    assert second.count(BEGIN.split(" (")[0]) == 1 and second.endswith("## Later\n\nKept.\n")
    assert frontier_section(second) == frontier_section(first)


def test_splice_section_appends_once_and_refuses_an_unclosed_section():
    section = f"{BEGIN}\nnew\n{END}"
    assert splice_section("# Doc\n", section) == f"# Doc\n\n{section}\n"
    assert splice_section(f"# Doc\n\n{BEGIN}\nold\n{END}\ntail\n", section) == f"# Doc\n\n{section}\ntail\n"
    with pytest.raises(ValueError, match="never closes"):
        splice_section(f"# Doc\n{BEGIN}\nold\n", section)


def test_a_run_takes_the_next_seeds_not_yet_stored_and_the_report_covers_every_stored_seed(finished, tiny_frontier):
    import dataclasses

    from bench.quality.frontier_report import collect

    out, store, _ = finished
    planned = dataclasses.replace(tiny_frontier, base=dataclasses.replace(tiny_frontier.base, seeds=(0, 1, 2)))
    one_per_run = dataclasses.replace(planned, seeds_per_run=1)
    assert FrontierBench(one_per_run, out, "cpu", catalog_cache(), store).seeds_to_run() == [1]
    assert FrontierBench(planned, out, "cpu", catalog_cache(), store).seeds_to_run() == [0, 1, 2]
    # Seed 0 is stored; a scale that plans only seed 5 still reports it (seeds accumulate across runs).
    elsewhere = dataclasses.replace(tiny_frontier, base=dataclasses.replace(tiny_frontier.base, seeds=(5,)))
    measured = collect(elsewhere, store, device_type="cpu")
    assert set(measured["botchan"]["points"]["dpo-beta0.1"]) == {0}


def test_a_scale_can_sweep_the_learning_rate_for_the_beta_methods_too(tiny_frontier):
    # BETA_BARELY_MOVES_KL: the cpu and gpu scales trace every method's curve with the learning rate, at β 0.1.
    import dataclasses

    from bench.quality.config import FRONTIER_SCALES

    by_lr = dataclasses.replace(tiny_frontier, beta_methods_sweep="lr")
    assert {p.knob for p in by_lr.points()} == {"lr"}
    assert {p.key for p in by_lr.points() if p.method == "ctpd"} == {"ctpd-lr0.5x", "ctpd-lr2x"}
    ctpd = next(p for p in by_lr.points() if p.method == "ctpd")
    fields = ctpd.spec_fields(by_lr.base)
    assert "beta" not in fields and fields["training"]["learning_rate"] == 0.5 * by_lr.base.learning_rate
    assert {p.knob for p in tiny_frontier.points() if p.method == "dpo"} == {"beta"}  # the default is unchanged
    assert all(FRONTIER_SCALES[name].beta_methods_sweep == "lr" for name in ("cpu", "gpu"))
    with pytest.raises(ValueError, match="beta_methods_sweep"):
        dataclasses.replace(tiny_frontier, beta_methods_sweep="kappa")


def test_the_report_says_when_one_seed_and_two_point_chords_limit_verdicts() -> None:
    from bench.quality.frontier_report import _trust_caveats

    def curve(*kls: float) -> list[dict[str, Any]]:
        return [{"seeds": [0], "kl": {"mean": kl, "values": [kl]}} for kl in kls]

    thin = _trust_caveats({"seeds": [0], "points": {"ctpd": curve(0.1, 4.0), "dpo": curve(0.02, 1.4)}})
    text = " ".join(thin)
    assert "One seed" in text and "more than 2 points" in text
    assert "DPO at KL 1.40" in text and "CTPD at 4.00" in text
    # A seed only one method has (not in the verdicts' seeds) does not move its chord's end.
    partial = curve(0.1, 4.0)
    partial[1] = {"seeds": [0, 1], "kl": {"mean": 3.0, "values": [4.0, 2.0]}}
    assert "CTPD at 4.00" in " ".join(_trust_caveats({"seeds": [0], "points": {"ctpd": partial}}))
    # Two seeds and three points per curve: nothing to add beyond the noise floor.
    assert _trust_caveats({"seeds": [0, 1], "points": {"ctpd": curve(0.1, 1, 4), "dpo": curve(0.02, 0.5, 1.4)}}) == []
