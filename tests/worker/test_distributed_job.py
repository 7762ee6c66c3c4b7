"""A multi-GPU job end to end on the CPU: worker.launch runs the whole recipe on 2 gloo ranks (real processes under
torch.distributed.run) and the job process sees one job.

What would break a real deployment: the ranks reporting twice (or not at all), a 2-rank job that trains something
else than the 1-process job with the same global batch, a sharded frozen pass that gathers its rows out of order, a
cancel that leaves a rank in a collective, a stopped 2-rank job that cannot resume on 1 GPU, and a dead rank that
hangs the job instead of ending its attempt.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctpd_core.checkpoint_layout import stored_checkpoints
from ctpd_core.vocab import Stage
from tests.worker.test_recipe import RecordingObserver, context, tiny_spec
from worker.launch import RankFailure, RanksLost, run_job_spec
from worker.recipe import materialize_checkpoint
from worker.tasks import child_pids

ALL_STAGES = ["prepare", "reference", "contrastive", "weights", "distill", "evaluate", "export"]


@pytest.fixture
def folders(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    return tiny_student_folder, tiny_teacher_folder, tiny_dataset_path


def two_rank_spec(folders, **training):
    student, teacher, dataset = folders
    return tiny_spec(student, teacher, dataset, training={"devices": 2, **training},
                     contrastive={"max_steps": 2, "learning_rate": 1e-3})


def one_process_spec(folders, **training):
    student, teacher, dataset = folders
    return tiny_spec(student, teacher, dataset, training=training, contrastive={"max_steps": 2, "learning_rate": 1e-3})


def distill_losses(observer):
    return {step: row["loss"] for stage, step, row in observer.metric_rows if stage == Stage.DISTILL}


def exported_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    """The reference: the same job (same global batch) in one process."""
    folders = (tiny_student_folder, tiny_teacher_folder, tiny_dataset_path)
    tmp_path = tmp_path_factory.mktemp("one-process")
    observer = RecordingObserver()
    result = run_job_spec(one_process_spec(folders), context(tmp_path, "single", observer))
    assert result.status == "succeeded"
    return observer, result


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_job_reports_once_and_trains_like_one_process(folders, tmp_path, one_process_run, strategy):
    single_observer, single = one_process_run
    observer = RecordingObserver()
    result = run_job_spec(two_rank_spec(folders, strategy=strategy), context(tmp_path, strategy, observer))

    assert result.status == "succeeded"
    assert result.export_dir is not None and (result.export_dir / "config.json").is_file()
    # Rank 0 alone reports: every stage once, in order, and every training step once.
    assert [stage for stage, _ in observer.started] == ALL_STAGES
    steps = [step for stage, step, _ in observer.metric_rows if stage == Stage.DISTILL]
    assert steps == [1, 2, 3, 4]
    # Same global batch, same data order: the same trajectory within float tolerance (the gradient is averaged
    # over the ranks instead of accumulated in one process).
    losses, expected = distill_losses(observer), distill_losses(single_observer)
    for step, loss in expected.items():
        assert math.isclose(losses[step], loss, rel_tol=1e-4, abs_tol=1e-6), (step, losses[step], loss)
    for name, value in single.metrics.items():
        assert math.isclose(result.metrics[name], value, rel_tol=1e-3, abs_tol=1e-5), name
    trained, reference = exported_weights(result.export_dir), exported_weights(single.export_dir)
    assert trained.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name].float(), tensor.float(), rtol=1e-3, atol=1e-5, msg=name)

    # The kept checkpoints are the ranks' DCP shards; the API can still make the last one into a model, and it
    # holds the exported weights.
    run_dir = tmp_path / "runs" / strategy
    kept = stored_checkpoints(run_dir, Stage.DISTILL)
    assert kept and kept[-1].step == 4
    model_folder = materialize_checkpoint(two_rank_spec(folders, strategy=strategy), kept[-1],
                                          model_cache=tmp_path / "catalog")
    for name, tensor in exported_weights(model_folder).items():
        torch.testing.assert_close(tensor.float(), trained[name].float(), msg=name)


class StopAfter:
    """The job's stop signal: fires once distill has reported ``step`` (a cancel mid-training)."""

    def __init__(self, observer: RecordingObserver, step: int) -> None:
        self.observer, self.step = observer, step

    def should_stop(self) -> bool:
        return any(stage == Stage.DISTILL and done >= self.step for stage, done, _ in self.observer.metric_rows)


def test_a_stopped_two_rank_job_checkpoints_and_resumes_on_one_process(folders, tmp_path, one_process_run):
    single_observer, _ = one_process_run
    observer = RecordingObserver()
    run_context = context(tmp_path, "resumed", observer, stop_signal=StopAfter(observer, 2))
    result = run_job_spec(two_rank_spec(folders), run_context)
    assert result.status == "stopped"
    assert "evaluate" not in [stage for stage, _ in observer.started]
    checkpoints = sorted(path.name for path in (run_context.run_dir / Stage.DISTILL).glob("step-*"))
    assert checkpoints[-1] == "step-00000002"

    # The same job on one GPU (a lost machine, a smaller worker) resumes from the 2-rank checkpoint.
    resumed_observer = RecordingObserver()
    resumed = run_job_spec(one_process_spec(folders), context(tmp_path, "resumed", resumed_observer))
    assert resumed.status == "succeeded"
    losses, expected = distill_losses(resumed_observer), distill_losses(single_observer)
    assert sorted(losses) == [3, 4]
    for step in (3, 4):
        assert math.isclose(losses[step], expected[step], rel_tol=1e-4, abs_tol=1e-6), (step, losses, expected)


class KillRankAt(RecordingObserver):
    """SIGKILLs rank 1 (as the OOM killer would) when rank 0 reports distill step ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.killed = step, threading.Event()

    def metrics(self, stage, step, metrics):
        super().metrics(stage, step, metrics)
        if stage == Stage.DISTILL and step == self.step and not self.killed.is_set():
            for launcher in child_pids(os.getpid()):
                for rank_pid in child_pids(launcher):
                    environ = Path(f"/proc/{rank_pid}/environ").read_bytes().split(b"\0")
                    if b"RANK=1" in environ:
                        os.kill(rank_pid, signal.SIGKILL)
                        self.killed.set()


def test_a_killed_rank_ends_the_attempt_promptly(folders, tmp_path):
    observer = KillRankAt(step=2)
    started = time.monotonic()
    with pytest.raises(RanksLost, match="died"):
        run_job_spec(two_rank_spec(folders, max_steps=40), context(tmp_path, "killed", observer))
    assert observer.killed.is_set()
    # No rank left waiting in a collective: the launcher tore the survivor down (its gloo timeout is far longer).
    assert time.monotonic() - started < 120
    assert not [pid for launcher in child_pids(os.getpid()) for pid in child_pids(launcher)]


def test_a_rank_error_fails_the_job_with_that_error(folders, tmp_path):
    student, teacher, _ = folders
    missing = tmp_path / "missing.jsonl"
    spec = tiny_spec(student, teacher, missing, training={"devices": 2})
    with pytest.raises(RankFailure) as raised:
        run_job_spec(spec, context(tmp_path, "bad-data", RecordingObserver()))
    assert raised.value.kind == "user"
    assert "missing.jsonl" in str(raised.value)


# ------------------------------------------------------------------------------ through the worker's task body


@pytest.fixture
def settings(tmp_path):
    from app.settings import Settings

    return Settings(home=tmp_path / "home", lease_seconds=30, allow_server_paths=True)


def rank_pids(rank: int) -> list[int]:
    """This test process's grandchildren (the job's ranks, under torch.distributed.run) of the given RANK."""
    found = []
    for launcher in child_pids(os.getpid()):
        for pid in child_pids(launcher):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                found.append(pid)
    return found


def test_a_job_whose_rank_dies_is_retried_from_its_checkpoint(folders, tmp_path, settings, db):
    from datetime import timedelta

    from app.db import events as job_log
    from app.db import jobs as job_rows
    from app.db.models import utcnow
    from worker.capacity import Capacity
    from worker.tasks import JobOutcome, execute_job

    spec = two_rank_spec(folders, max_steps=30, checkpoint_every=2)
    job, _ = job_rows.create_job(db, tenant="acme", spec=spec.model_dump(mode="json"), name=None, metadata={},
                                 idempotency_key=None, request_hash="h", max_attempts=3,
                                 gpus_required=spec.gpus_required)
    two_gpus = Capacity(gpus=2, gpu_memory_mb=None, source="test")  # two gloo ranks on this CPU
    outcomes: list[JobOutcome] = []
    attempt = threading.Thread(target=lambda: outcomes.append(
        execute_job(db, settings, job.id, "w1", device="cpu", capacity=two_gpus)))
    attempt.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and attempt.is_alive():
        row = job_rows.get_job(db, job.id)
        if row.stage == Stage.DISTILL and (row.progress_step or 0) >= 5 and rank_pids(1):
            for pid in rank_pids(1):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    attempt.join(timeout=120)
    assert not attempt.is_alive(), "the attempt hung after its rank died"
    assert outcomes == [JobOutcome(job.id, "abandoned")]
    row = job_rows.get_job(db, job.id)
    assert row.status == "running" and row.attempt == 1  # nothing recorded: left to its lease

    # The lease runs out (no heartbeat any more); the reaper puts the job back and the next attempt resumes.
    assert job_rows.reap_stale_jobs(db, expired_before=utcnow() + timedelta(seconds=settings.lease_seconds + 1)) \
        == [job.id]
    retried = execute_job(db, settings, job.id, "w2", device="cpu", capacity=two_gpus)
    assert retried.status == "succeeded"
    rows, _ = job_log.list_events(db, job.id, limit=1000)
    distill_ends = [event.data["summary"] for event in rows
                    if event.type == "stage_finished" and event.stage == Stage.DISTILL]
    assert len(distill_ends) == 1 and distill_ends[0]["steps"] == 30
    assert distill_ends[0]["resumed_from"] >= 2  # from the first attempt's checkpoint, not from scratch
    assert [event.type for event in rows].count("job_restarted") == 1
