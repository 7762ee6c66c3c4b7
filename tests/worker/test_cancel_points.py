"""A stop (cancel, or a SIGTERM hand-back) is honoured at the first, a middle and the last step of every stage
(issue 9, item 5): the run returns ``stopped``, no later stage starts, and nothing is exported. Before this,
the check was skipped on the last step of training and the last batch of inference, so a cancel there let
the job run on and "succeed".

The stop signal fires once the observer has seen the chosen progress point; the points come from one
uninterrupted run of the same spec. Each case runs in a stage cache of its own: a stop seen at a stage's
boundary may still let that stage's (complete) output be published, which would hide the stage from the
next case."""

from __future__ import annotations

import pytest

from ctpd_core.observe import NullObserver
from tests.worker.test_recipe import context, tiny_spec
from worker.recipe import run_spec

STAGES = ("prepare", "reference", "contrastive", "weights", "distill", "evaluate", "export")


class Watch(NullObserver):
    """Records stages and progress, and fires its own stop signal at ``target``: (pipeline stage, index of the
    progress point within that stage) or, for a stage without progress (export), (stage, None): its start."""

    def __init__(self, target: tuple[str, int | None] | None = None) -> None:
        self.target, self.fired = target, False
        self.started: list[str] = []
        self.points: list[tuple[str, int]] = []  # (pipeline stage, step) of every progress report

    def stage_started(self, stage, cached):
        self.started.append(stage)
        if self.target == (stage, None):
            self.fired = True

    def progress(self, progress):
        stage = progress.stage.split(":", 1)[0]  # contrastive:positive -> contrastive
        if progress.step == 0:
            return  # fit's "starting" report: not a step
        index = sum(1 for seen, _ in self.points if seen == stage)
        self.points.append((stage, progress.step))
        if self.target == (stage, index):
            self.fired = True

    def should_stop(self) -> bool:  # the StopSignal protocol
        return self.fired


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    root = tmp_path_factory.mktemp("cancel-points")
    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path,
                     contrastive={"max_steps": 3}, training={"max_steps": 3, "checkpoint_every": 1},
                     dataset={"validation_fraction": 0.3}, evaluation={"batch_size": 3})  # 3 evaluate batches
    watch = Watch()
    # An uncached reference run in a root of its own: every stage reports all its progress points.
    assert run_spec(spec, context(root / "reference-run", "all", watch)).status == "succeeded"
    return spec, root, watch.points


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_stop_is_honoured_anywhere_in_every_stage(shared, stage, position):
    spec, root, points = shared
    if stage == "export":
        if position != "first":
            pytest.skip("export reports no progress: its start is its one point")
        target: tuple[str, int | None] = ("export", None)
    else:
        count = sum(1 for seen, _ in points if seen == stage)
        assert count, f"{stage} reported no progress in the reference run: {points}"
        index = {"first": 0, "middle": count // 2, "last": count - 1}[position]
        if position != "first" and index in ({0} if position == "middle" else {0, count // 2}):
            pytest.skip(f"{stage} has {count} progress point(s): no distinct {position} one")
        target = (stage, index)
    watch = Watch(target)
    run_context = context(root / f"{stage}-{position}", "run", watch, stop_signal=watch)
    result = run_spec(spec, run_context)
    assert watch.fired, f"the run never reached {target}"
    assert result.status == "stopped", f"stop at {target} was ignored: the run {result.status}"
    assert watch.started[-1] == stage, f"after a stop in {stage}, {watch.started[-1]} started"
    assert result.export_dir is None and not (run_context.run_dir / "export").exists()


def test_an_attempt_that_lost_the_job_during_export_publishes_nothing(shared, tmp_path):
    """The export is staged and renamed into place only while the run still owns the job (the guard is asked
    right before the rename): a paused attempt that wakes up after its successor published never replaces it."""
    spec, _, _ = shared
    run_context = context(tmp_path, "lost-in-export")

    def guard() -> bool:  # the takeover happens while the export is being written
        return not any(run_context.run_dir.glob(".export-*"))

    run_context.publish_guard, run_context.generation = guard, 1
    successor = run_context.run_dir / "export"
    successor.mkdir(parents=True)
    (successor / "marker").write_text("attempt 2's export")
    assert run_spec(spec, run_context).status == "stopped"
    assert (successor / "marker").read_text() == "attempt 2's export"
    assert not list(run_context.run_dir.glob(".export-*"))  # its staging copy is gone too
