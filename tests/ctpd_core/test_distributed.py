"""fit() on 2 real ranks (torchrun, gloo, CPU) against the single-process run of the same global batch.

One torchrun launch runs every 2-rank scenario of :mod:`tests.ctpd_core.distributed_ranks` (starting ranks
costs seconds of imports each time); the tests below read what it left. A second launch kills a rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ctpd_core.checkpoint import read_trainable_tensors
from ctpd_core.checkpoint_layout import (
    DCP_OPTIMIZER_DIR,
    DCP_TRAINABLE_DIR,
    keep_checkpoints,
    stored_checkpoints,
)
from ctpd_core.distributed import DistContext, gather_shards, init_from_env, shard_bounds, shard_range
from ctpd_core.train import fit, plan_steps
from tests.ctpd_core.distributed_ranks import (
    NUM_ITEMS,
    STOP_AT_STEP,
    build_lora_model,
    head_nll_loss,
    run_config,
)
from tests.ctpd_core.test_train import RecordingSink, build_model, config, make_items

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 240  # seconds: a safety net against a hang only (the suite takes ~20 s on 2 idle cores)
KILL_TIMEOUT = 120
TOTAL_STEPS = 4
COMPARED = ("loss", "nll", "grad_norm", "learning_rate", "tokens")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)


def launch(scenario: str, out: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """2 ranks under torchrun (``--standalone``: a rendezvous on a free local port)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.ctpd_core.distributed_ranks", scenario, str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def launch_failure(finished: subprocess.CompletedProcess[str], out: Path) -> str:
    """What a failed launch left behind: its exit code, the scenarios whose results were written (a rank that
    died after its last result failed at exit, not in a scenario) and the end of its output."""
    written = sorted(path.stem for path in out.glob("*.json"))
    return (f"torchrun exited {finished.returncode}; results written: {written}\n"
            f"stdout: {finished.stdout[-2000:]}\nstderr: {finished.stderr[-6000:]}")


def single_process_run(checkpoint_dir: Path, model: torch.nn.Module | None = None) -> tuple[RecordingSink, Path]:
    sink = RecordingSink()
    result = fit(model or build_model(), make_items(NUM_ITEMS), head_nll_loss, run_config(), checkpoint_dir,
                 stage="distill", observer=sink)
    assert result.checkpoint is not None
    return sink, result.checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ranks")
    reference, reference_checkpoint = single_process_run(out / "single")
    lora_reference, lora_reference_checkpoint = single_process_run(out / "single_lora", build_lora_model())
    # A single-process (one-file) checkpoint of step 2 for the 2 ranks to resume.
    shutil.copytree(out / "single" / "step-00000002", out / "resumed_from_single" / "step-00000002")
    finished = launch("suite", out, LAUNCH_TIMEOUT)
    assert finished.returncode == 0, launch_failure(finished, out)
    loaded = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in out.glob("*.json")}
    return {"out": out, "reference": reference, "reference_checkpoint": reference_checkpoint,
            "lora_reference": lora_reference, "lora_reference_checkpoint": lora_reference_checkpoint, **loaded}


def metrics_by_step(run: dict[str, Any]) -> dict[int, dict[str, float]]:
    return {int(step): metrics for step, metrics in run["metrics"].items()}


def assert_same_steps(ours: dict[int, dict[str, float]], reference: RecordingSink, steps: list[int]) -> None:
    assert sorted(ours) == steps
    for step in steps:
        for name in COMPARED:
            assert ours[step][name] == pytest.approx(reference.seen[step][name], rel=1e-5, abs=1e-7), (step, name)


def assert_same_weights(checkpoint: Path, reference_checkpoint: Path) -> None:
    ours, theirs = read_trainable_tensors(checkpoint), load_file(str(reference_checkpoint / "trainable.safetensors"))
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("run_name", ["ddp", "fsdp", "fsdp_checkpointed"])
def test_two_ranks_follow_the_single_process_trajectory(runs: dict[str, Any], run_name: str) -> None:
    run = runs[run_name]
    assert run["ended"] == "finished" and run["rank_steps"] == [TOTAL_STEPS, TOTAL_STEPS]
    reference: RecordingSink = runs["reference"]
    assert_same_steps(metrics_by_step(run), reference, list(range(1, TOTAL_STEPS + 1)))
    # The loss moved (the comparison is not of two runs that did nothing).
    assert reference.seen[TOTAL_STEPS]["loss"] < reference.seen[1]["loss"]
    assert_same_weights(Path(run["checkpoint"]), runs["reference_checkpoint"])
    # The model fit left behind (sharded in place under FSDP2) gathers whole under the plain model's names.
    gathered = load_file(str(runs["out"] / f"{run_name}.full.safetensors"))
    expected = build_model().state_dict()
    assert set(gathered) == set(expected)
    reference = load_file(str(runs["reference_checkpoint"] / "trainable.safetensors"))
    for name, tensor in reference.items():
        torch.testing.assert_close(gathered[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_adapters_train_alike_under_fsdp2_with_activation_checkpointing(runs: dict[str, Any]) -> None:
    run = runs["lora_fsdp_checkpointed"]
    assert run["ended"] == "finished"
    assert_same_steps(metrics_by_step(run), runs["lora_reference"], list(range(1, TOTAL_STEPS + 1)))
    adapters = read_trainable_tensors(Path(run["checkpoint"]))
    assert adapters and all("lora_" in name for name in adapters)  # the frozen base is not checkpointed
    assert_same_weights(Path(run["checkpoint"]), runs["lora_reference_checkpoint"])


def test_a_two_rank_checkpoint_is_dcp_and_reads_by_the_unwrapped_names(runs: dict[str, Any]) -> None:
    folder = Path(runs["fsdp"]["checkpoint"])
    names = sorted(path.name for path in folder.iterdir())
    assert names == sorted([DCP_TRAINABLE_DIR, DCP_OPTIMIZER_DIR, "metrics.json", "rng.pt", "scheduler.pt",
                            "state.json"])
    assert json.loads((folder / "state.json").read_text(encoding="utf-8"))["world_size"] == 2
    # FSDP2 sharded every tensor: each rank wrote its own file.
    assert len(list((folder / DCP_TRAINABLE_DIR).glob("*.distcp"))) == 2
    plain = dict(build_model().named_parameters())
    tensors = read_trainable_tensors(folder)
    assert {name: tuple(tensor.shape) for name, tensor in tensors.items()} == {
        name: tuple(parameter.shape) for name, parameter in plain.items()
    }
    # The API lists it like a single-process one (its weights are a folder, not a file).
    assert [checkpoint.step for checkpoint in stored_checkpoints(runs["out"], "fsdp")] == [2, 4]


def test_a_kept_two_rank_checkpoint_drops_its_optimizer_shards_and_still_reads(runs: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    shutil.copytree(runs["out"] / "fsdp", tmp_path / "distill")  # as a job's distill stage folder
    kept = keep_checkpoints(tmp_path, "distill")
    assert [path.name for path in kept] == ["distill-00000002", "distill-00000004"]
    assert sorted(path.name for path in kept[-1].iterdir()) == sorted([DCP_TRAINABLE_DIR, "metrics.json",
                                                                         "state.json"])
    assert [checkpoint.id for checkpoint in stored_checkpoints(tmp_path, "distill")] == [path.name for path in kept]
    assert_same_weights(kept[-1], runs["reference_checkpoint"])


# ------------------------------------------------------------------------------------------------ stop, resume


def test_a_stop_on_one_rank_stops_both_at_the_same_step_with_a_checkpoint(runs: dict[str, Any]) -> None:
    run = runs["stopped"]
    assert run["ended"] == "stopped"
    assert run["rank_steps"] == [STOP_AT_STEP, STOP_AT_STEP]
    assert sorted(metrics_by_step(run)) == list(range(1, STOP_AT_STEP + 1))  # reported by rank 0 only, once
    assert run["checkpoints"] == [2, STOP_AT_STEP]  # the periodic one and the stop's
    assert Path(run["checkpoint"]).name == f"step-{STOP_AT_STEP:08d}"


def test_a_refused_checkpoint_stops_both_ranks_with_nothing_published(runs: dict[str, Any]) -> None:
    run = runs["refused"]
    assert run["ended"] == "stopped" and run["rank_steps"] == [2, 2]  # the first checkpoint step
    assert run["checkpoint"] == "None" and run["checkpoints"] == []
    assert not list((runs["out"] / "refused").iterdir())  # no checkpoint, no staging folder left


def test_a_two_rank_checkpoint_resumes_on_two_ranks(runs: dict[str, Any]) -> None:
    run = runs["resumed_2_ranks"]
    assert run["ended"] == "finished" and run["resumed_from"] == STOP_AT_STEP
    assert_same_steps(metrics_by_step(run), runs["reference"], list(range(STOP_AT_STEP + 1, TOTAL_STEPS + 1)))
    assert_same_weights(Path(run["checkpoint"]), runs["reference_checkpoint"])


def test_a_two_rank_checkpoint_resumes_in_one_process(runs: dict[str, Any]) -> None:
    sink = RecordingSink()
    result = fit(build_model(), make_items(NUM_ITEMS), head_nll_loss, run_config(), runs["out"] / "resume_on_1",
                 stage="distill", observer=sink)
    assert result.resumed_from == STOP_AT_STEP
    assert_same_steps(sink.seen, runs["reference"], list(range(STOP_AT_STEP + 1, TOTAL_STEPS + 1)))
    assert result.checkpoint is not None and (result.checkpoint / "trainable.safetensors").is_file()  # one file again
    assert_same_weights(result.checkpoint, runs["reference_checkpoint"])


def test_a_single_process_checkpoint_resumes_on_two_ranks(runs: dict[str, Any]) -> None:
    run = runs["resumed_from_single"]
    assert run["ended"] == "finished" and run["resumed_from"] == 2
    assert_same_steps(metrics_by_step(run), runs["reference"], [3, 4])
    assert_same_weights(Path(run["checkpoint"]), runs["reference_checkpoint"])


# ------------------------------------------------------------------------------------------------ failure


def test_a_rank_killed_mid_step_fails_the_launch(tmp_path: Path) -> None:
    finished = launch("kill", tmp_path, KILL_TIMEOUT)  # a hang raises TimeoutExpired: the test fails
    assert finished.returncode != 0
    assert not (tmp_path / "finished").exists()
    assert "SIGKILL" in finished.stderr or "Signal 9" in finished.stderr, finished.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("num_items", [0, 1, 5, 8, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_contiguous_cover_everything_and_differ_by_at_most_one(num_items: int, world_size: int) -> None:
    shards = [shard_bounds(num_items, rank, world_size) for rank in range(world_size)]
    assert [index for shard in shards for index in shard] == list(range(num_items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_without_a_context_a_pass_takes_every_item() -> None:
    assert shard_range(5, None) == range(5)
    single = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert gather_shards([1, 2], single) == [1, 2] and gather_shards([3], None) == [3]


def test_outside_torchrun_the_context_is_a_world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
    assert not torch.distributed.is_initialized()  # no process group for one process
    assert ctx.any_true(True) and not ctx.any_true(False) and ctx.gather_objects("x") == ["x"]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="missing WORLD_SIZE, LOCAL_RANK"):
        init_from_env("cpu")


def test_the_global_batch_must_split_evenly_over_the_ranks() -> None:
    with pytest.raises(ValueError, match=r"multiple of world_size \* micro_batch_size \(2 \* 2 = 4\)"):
        plan_steps(config(batch_size=6, micro_batch_size=2), 100, world_size=2)
    # A dataset smaller than one batch: equal shares, the odd item out.
    assert plan_steps(config(batch_size=8, micro_batch_size=2), 5, world_size=2).batch_size == 4
    assert plan_steps(config(batch_size=8, micro_batch_size=2), 5).batch_size == 5
    with pytest.raises(ValueError, match="cannot be shared by 4 ranks"):
        plan_steps(config(batch_size=8, micro_batch_size=2), 3, world_size=4)


EXIT_RANK_SCRIPT = """
import atexit, logging, sys
from pathlib import Path
from ctpd_core.distributed import exit_rank
marker = Path(sys.argv[1])
atexit.register(lambda: marker.write_text("finalized"))  # would run in a normal interpreter exit
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
logging.getLogger("rank").info("the rank's last log line")
sys.stdout.write("buffered, no newline")  # a pipe is block-buffered: lost without the flush
exit_rank(int(sys.argv[2]))
"""


@pytest.mark.parametrize("code", [0, 3])
def test_a_rank_exits_with_its_code_its_output_flushed_and_no_finalization(tmp_path: Path, code: int) -> None:
    # Interpreter finalization is where a gloo rank's leftover C++ threads can abort a finished rank (SIGABRT,
    # "terminate called without an active exception"), so exit_rank must skip it and still lose no output.
    marker = tmp_path / "atexit-ran"
    ended = subprocess.run([sys.executable, "-c", EXIT_RANK_SCRIPT, str(marker), str(code)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert ended.returncode == code, ended.stderr
    assert ended.stdout == "buffered, no newline"
    assert "the rank's last log line" in ended.stderr
    assert not marker.exists()  # finalization (atexit, then the C++ destructors) was skipped
