"""The follow display on a recorded sequence of job states: a bar per stage with the sub-stage named (π+ / π−,
chosen / rejected), the loss, and the job's ETA computed as ctpd_cli/follow.py documents it."""

from __future__ import annotations

import io
from typing import Any

import pytest

from ctpd_cli.follow import (
    BarDisplay,
    JobTracker,
    LineDisplay,
    format_seconds,
    plan_stages,
    replay,
    substage_label,
)

# A resolved ctpd spec (the service returns every default filled in), with small sizes.
SPEC: dict[str, Any] = {
    "method": "ctpd",
    "teacher": {"model": "t"},
    "student": {"model": "s"},
    "weights": {"source": "teacher_contrastive"},
    "contrastive": {"max_steps": 2, "epochs": 1.0, "positive": None, "negative": None},
    "training": {"max_steps": 4, "epochs": 1.0, "batch_size": 4},
}
N, V = 8, 2  # prepare's pair counts


def job(stage: str | None, detail: str | None = None, step: int | None = None, total: int | None = None,
        eta: float | None = None, status: str = "running") -> dict[str, Any]:
    return {"status": status, "stage": stage,
            "progress": {"step": step, "total": total, "eta_seconds": eta, "detail": detail}}


def started(stage: str) -> dict[str, Any]:
    return {"type": "stage_started", "stage": stage, "message": f"{stage} started", "data": {"cached": False}}


def finished(stage: str, seconds: float, **summary: Any) -> dict[str, Any]:
    return {"type": "stage_finished", "stage": stage, "message": f"{stage} finished in {seconds:.1f} s",
            "data": {"seconds": seconds, "cached": False, "summary": summary}}


# One poll per row: (new events, the job as GET /v1/jobs/{id} answers it).
RECORDED: list[tuple[list[dict[str, Any]], dict[str, Any]]] = [
    ([{"type": "job_started", "stage": None, "message": "attempt 1 started", "data": {}}, started("prepare")],
     job("prepare", None, 5, 10, 5.0)),
    ([finished("prepare", 10.0, train_pairs=N, validation_pairs=V), started("reference")],
     job("reference", "chosen", 4, 8, 4.0)),  # 1 s per response
    ([], job("reference", "rejected", 8, 8, 0.0)),
    ([], job("reference", "chosen", 1, 2, 1.0)),
    ([finished("reference", 20.0), started("contrastive")], job("contrastive", "positive", 1, 2, 10.0)),  # 10 s/step
    ([], job("contrastive", "negative", 1, 2, 10.0)),
    ([finished("contrastive", 40.0), started("weights")], job("weights", "positive:chosen", 4, 8, 4.0)),
    ([finished("weights", 32.0), started("distill")], job("distill", None, 2, 4, 20.0)),
    ([finished("distill", 40.0), started("evaluate"), finished("evaluate", 8.0), started("export"),
      finished("export", 1.0)], job("export", None, None, None, None, status="succeeded")),
]


def test_plan_follows_the_recipe_stages_for_each_method():
    assert [p.stage for p in plan_stages(SPEC, N, V)] == [
        "prepare", "reference", "contrastive", "weights", "distill", "evaluate", "export"]
    dpo = {**SPEC, "method": "dpo", "weights": {"source": "uniform"}}
    assert [p.stage for p in plan_stages(dpo, N, V)] == ["prepare", "reference", "distill", "evaluate", "export"]
    contrastive = next(p for p in plan_stages(SPEC, N, V) if p.stage == "contrastive")
    assert [(p.detail, p.steps) for p in contrastive.passes] == [("positive", 2), ("negative", 2)]
    # tisdpo: π± start from the student while the job's reference is... the student too: no extra log-prob pass.
    tisdpo = {**SPEC, "method": "tisdpo", "weights": {"source": "student_contrastive"},
              "contrastive": {"max_steps": None, "epochs": 2.0}}
    contrastive = next(p for p in plan_stages(tisdpo, N, V) if p.stage == "contrastive")
    assert [(p.detail, p.steps) for p in contrastive.passes] == [("positive", 4), ("negative", 4)]  # 2 × 8 // 4
    for method in ("sft", "uld", "dskd"):  # the chosen-response baselines: no π±, no weights, as run_spec
        kd = {**SPEC, "method": method, "weights": {"source": "uniform"}}
        assert [p.stage for p in plan_stages(kd, N, V)] == ["prepare", "reference", "distill", "evaluate", "export"]


def test_job_eta_is_the_stage_eta_plus_the_stages_to_come_at_the_rates_seen():
    tracker = JobTracker(SPEC)
    for events, state in RECORDED[:1]:
        for event in events:
            tracker.event(event)
        at_prepare = tracker.view(state)
    # Before prepare counted the pairs nothing later can be sized: a lower bound, prepare's own ETA.
    assert at_prepare.job_eta == 5.0 and at_prepare.job_eta_is_lower_bound

    views = []
    for events, state in RECORDED[1:5]:
        for event in events:
            tracker.event(event)
        views.append(tracker.view(state))
    reference_chosen, contrastive_positive = views[0], views[3]
    # reference chosen over N, 4 of 8 done, ETA 4 s: 1 s per response. Still to come in this stage: rejected over
    # N, chosen and rejected over V (12 responses); no training step timed yet, so a lower bound.
    assert reference_chosen.job_eta_is_lower_bound
    assert reference_chosen.job_eta == pytest.approx(4.0 + 12 * 1.0 + 4 * 8 * 1.0 + V * 4 * 1.0)
    # π+ step 1 of 2, ETA 10 s: 10 s per step. To come: π− (2 steps), weights (4 passes over N = 32 responses at
    # 1 s), distill (4 steps), evaluate (V pairs × 4 responses at 1 s); export is not estimated.
    assert not contrastive_positive.job_eta_is_lower_bound
    assert contrastive_positive.job_eta == pytest.approx(10.0 + 2 * 10 + 32 * 1.0 + 4 * 10 + V * 4 * 1.0)
    assert contrastive_positive.label == "contrastive π+"


def test_bars_one_per_stage_name_the_sub_stage_and_stay_when_done():
    out = io.StringIO()
    views = replay(RECORDED, BarDisplay(out), SPEC)
    text = out.getvalue()
    for label in ("prepare", "reference chosen", "reference rejected", "contrastive π+", "contrastive π−",
                  "weights π+ chosen", "distill"):
        assert f"{label}:" in text, label
    assert "job ETA" in text and "stage ETA" in text
    # Every finished stage's bar is left on screen with its wall time (tqdm ends a closed bar with a newline).
    final_lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()]
    assert any(line.startswith("contrastive:") and "done in 40s" in line for line in final_lines), final_lines
    assert any(line.startswith("distill:") and "done in 40s" in line for line in final_lines), final_lines
    # Stages without progress (evaluate here, export) are said in a line.
    assert "[export] done in 1s" in text
    assert views[-1].job_eta is None  # the job ended


def test_lines_for_logs_show_each_sub_stage_and_the_loss():
    lines: list[str] = []
    tracker_views = replay(RECORDED, LineDisplay(lines.append, interval=1e9), SPEC)
    assert tracker_views
    progress = [line for line in lines if "progress" in line]
    assert any("contrastive π−: 1/2" in line for line in progress), progress
    assert any("reference rejected: 8/8" in line for line in progress), progress
    assert any("job ETA" in line for line in progress)
    assert any("stage_finished" in line and "prepare finished" in line for line in lines)


def test_the_loss_comes_from_the_running_sub_stage_series():
    tracker = JobTracker(SPEC)
    metrics = {"data": {"contrastive:positive/loss": [{"step": 1, "value": 0.7}, {"step": 2, "value": 0.61}],
                        "distill/loss": [{"step": 1, "value": 0.5}]}}
    tracker.metrics(metrics, "contrastive", "positive")
    assert tracker.loss == pytest.approx(0.61)
    assert "loss 0.61" in tracker.view(job("contrastive", "positive", 2, 2, 0.0)).summary()
    tracker.metrics(metrics, "distill", None)
    assert tracker.loss == pytest.approx(0.5)


def test_labels_and_durations():
    assert substage_label("contrastive", "negative") == "contrastive π−"
    assert substage_label("weights", "negative:rejected") == "weights π− rejected"
    assert substage_label("distill", None) == "distill"
    assert [format_seconds(s) for s in (4.4, 184, 7500)] == ["4s", "3m04s", "2h05m"]


def test_lines_come_at_each_tenth_not_at_every_poll():
    lines: list[str] = []
    display = LineDisplay(lines.append, interval=1e9)
    tracker = JobTracker(SPEC)
    for step in (0, 5, 10, 11, 12, 25, 100, 100):
        display.update(tracker.view(job("distill", None, step, 100, 1.0)), 0.0)
    assert [line.split("distill: ", 1)[1].split()[0] for line in lines] == ["0/100", "10/100", "25/100", "100/100"]
