"""Multi-GPU jobs: the job process launches its training ranks with ``torch.distributed.run`` and stays the job.

A job whose widest training stage asks for more than one device (``JobSpec.gpus_required``) runs the whole
recipe in ``N`` rank processes (``python -m torch.distributed.run --standalone --nproc-per-node N -m
worker.rank_main``), one per GPU this worker owns (``cuda:LOCAL_RANK`` of its ``CUDA_VISIBLE_DEVICES``), or N
gloo processes on the CPU. The job process that claimed the job stays what the control plane sees: it holds the
lease and its heartbeat, and everything the ranks report or ask goes through it, over a private control channel
(a Unix socket in a 0700 temporary folder, with a random authkey):

* **report**: rank 0's observer calls (stages, progress, metrics, checkpoints) are forwarded to the job's observer
  (the fenced SQL writer and the MLflow run), in order; the other ranks report nothing.
* **stop**: every rank asks the job's stop signal (cancel, SIGTERM hand-back, lost lease) after each step and
  batch; ctpd_core.train makes the ranks agree, so all stop at the same step with one checkpoint.
* **fence**: rank 0 asks the job's publish guard before it renames a checkpoint or the export into place.

The ranks hold no lease and write no SQL. If the job process dies, the channel breaks: a rank then stops and
publishes nothing more (its stop token fires and its guard answers no), so an orphaned rank never outlives its
attempt's right to write.

A rank that dies (a SIGKILL, an OOM kill, a lost GPU) takes the launch down: torch.distributed.run's agent stops
the other ranks (none is left waiting in a collective) and exits non-zero. The attempt then ends as
:class:`RanksLost`: the job process records nothing, stops its heartbeat and leaves the job to its lease, so the
reaper retries it from its last checkpoint (resharded to the new world size if it changed). A rank that fails with
an error of its own (a bad dataset, a model that does not load) reports it, and the job fails with that error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from ctpd_core.observe import NeverStop, Observer, Progress, StopToken

logger = logging.getLogger(__name__)

# The observer methods a rank may call through the channel (anything else is refused: the channel is not RPC).
OBSERVER_CALLS = frozenset({"stage_started", "stage_finished", "progress", "metrics", "checkpoint", "replay_metrics"})
PAYLOAD_FILE = "payload.json"
RESULT_FILE = "result.json"
RANK_ERROR_FILE = "error-rank{rank}.json"


class RanksLost(RuntimeError):
    """A rank died without an error of its own (killed, out of memory): the attempt is lost, not the job."""


class RankFailure(Exception):
    """A rank ended with an error it classified itself (``kind`` user | system, ``code``): the job's error."""

    def __init__(self, kind: str, code: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.code = kind, code


# ------------------------------------------------------------------------------------- the job process's side


class ControlServer:
    """The job process's end of the channel: one thread per rank connection, answering in arrival order."""

    def __init__(self, address: Path, authkey: bytes, *, observer: Observer, stop: StopToken,
                 guard: Callable[[], bool] | None) -> None:
        self.observer, self.stop, self.guard = observer, stop, guard
        self.listener = Listener(address=str(address), family="AF_UNIX", authkey=authkey)
        self._lock = threading.Lock()  # the observer and the stop signal are not thread-safe: one call at a time
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="ctpd-rank-control", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection = self.listener.accept()
            except (OSError, EOFError):  # closed, or a client that failed the authkey handshake
                if self._closed.is_set():
                    return
                continue
            thread = threading.Thread(target=self._serve, args=(connection,), name="ctpd-rank-conn", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, connection: Connection) -> None:
        with connection:
            while True:
                try:
                    op, name, args = connection.recv()
                except (EOFError, OSError):
                    return
                try:
                    reply = self._handle(op, name, args)
                except Exception:  # a report that fails must not take the ranks down; the writer logs its own
                    logger.exception("the rank channel could not handle %s %s", op, name)
                    reply = None
                if op != "observe":
                    try:
                        connection.send(reply)
                    except OSError:
                        return

    def _handle(self, op: str, name: str, args: tuple[Any, ...]) -> Any:
        with self._lock:
            if op == "observe":
                if name not in OBSERVER_CALLS:
                    raise ValueError(f"observer call {name!r} is not one of {sorted(OBSERVER_CALLS)}")
                getattr(self.observer, name)(*args)
                return None
            if op == "should_stop":
                return bool(self.stop.should_stop())
            if op == "holds":
                return True if self.guard is None else bool(self.guard())
            raise ValueError(f"unknown rank channel operation {op!r}")

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        for thread in self._threads:
            thread.join(timeout=5)


# ------------------------------------------------------------------------------------------- a rank's side


class ControlClient:
    """A rank's end of the channel. A broken channel (the job process is gone) reads as stop and as no right to
    publish: the rank winds down without writing anything its attempt may no longer own."""

    def __init__(self, address: str, authkey: bytes) -> None:
        self._connection: Connection | None = Client(address, family="AF_UNIX", authkey=authkey)
        self._lock = threading.Lock()

    def _call(self, op: str, name: str = "", args: tuple[Any, ...] = (), *, reply: bool = True) -> Any:
        with self._lock:
            if self._connection is None:
                return None
            try:
                self._connection.send((op, name, args))
                return self._connection.recv() if reply else None
            except (EOFError, OSError):
                logger.error("the job process is gone (the rank channel broke): stopping without publishing")
                self._connection = None
                return None

    def observe(self, name: str, *args: Any) -> None:
        self._call("observe", name, args, reply=False)

    def should_stop(self) -> bool:
        answer = self._call("should_stop")
        return True if answer is None else bool(answer)

    def holds(self) -> bool:
        return bool(self._call("holds"))

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


class ChannelObserver:
    """Rank 0's observer: every report goes to the job process's observer, in order."""

    def __init__(self, client: ControlClient) -> None:
        self.client = client

    def stage_started(self, stage: str, cached: bool) -> None:
        self.client.observe("stage_started", stage, cached)

    def stage_finished(self, stage: str, seconds: float, cached: bool, summary: Mapping[str, Any]) -> None:
        self.client.observe("stage_finished", stage, seconds, cached, dict(summary))

    def progress(self, progress: Progress) -> None:
        self.client.observe("progress", progress)

    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        self.client.observe("metrics", stage, step, dict(metrics))

    def checkpoint(self, stage: str, step: int, path: Path) -> None:
        self.client.observe("checkpoint", stage, step, Path(path))

    def replay_metrics(self, stage: str, history: Any) -> None:
        self.client.observe("replay_metrics", stage, [(step, dict(values)) for step, values in history])


class ChannelStop:
    """Every rank's stop token: the job's stop signal, asked through the channel."""

    def __init__(self, client: ControlClient) -> None:
        self.client = client

    def should_stop(self) -> bool:
        return self.client.should_stop()


# ------------------------------------------------------------------------------------------------ launching


@dataclass(frozen=True)
class LaunchPlan:
    """What the ranks need to rebuild the job's RunContext (everything else they get through the channel)."""

    world_size: int
    device_type: str  # cuda | cpu
    spec: dict[str, Any]  # the policy-checked spec, as JSON
    artifact_root: str
    run_dir: str
    model_cache: str
    generation: int | None
    inference_batch_size: int
    datasets: dict[str, str]  # uploaded dataset id -> local file, resolved by the job process
    log_format: str


def launch_command(world_size: int, payload: Path) -> list[str]:
    # --standalone: a rendezvous on a free local port; --max-restarts 0: a lost rank ends the attempt (the reaper
    # retries it), instead of torchrun restarting every rank from scratch behind the control plane's back.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            "--max-restarts=0", "--monitor-interval=0.5", "-m", "worker.rank_main", str(payload)]


def run_ranks(plan: LaunchPlan, *, observer: Observer, stop: StopToken | None,
              guard: Callable[[], bool] | None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run the ranks to their end; rank 0's result (``RunResult`` fields as JSON). Raises :class:`RankFailure`
    for a rank's own error and :class:`RanksLost` for a rank that died."""
    with tempfile.TemporaryDirectory(prefix="ctpd-ranks-") as folder:  # 0700: the socket and the key stay ours
        control = Path(folder)
        authkey = secrets.token_bytes(32)
        server = ControlServer(control / "control.sock", authkey, observer=observer, stop=stop or NeverStop(),
                               guard=guard)
        payload = control / PAYLOAD_FILE
        payload.write_text(json.dumps({**plan.__dict__, "address": str(control / "control.sock"),
                                       "authkey": authkey.hex(), "control_dir": str(control)}), encoding="utf-8")
        payload.chmod(0o600)
        command = launch_command(plan.world_size, payload)
        logger.info("launching %d ranks on %s: %s", plan.world_size, plan.device_type, " ".join(command))
        try:
            # A session of its own: a signal to the worker's process group (a terminal's Ctrl-C, a pool shutdown)
            # reaches the job process, which decides; torchrun would otherwise kill the ranks before they checkpoint.
            process = subprocess.Popen(command, env={**os.environ, **(env or {})}, start_new_session=True)
            try:
                returncode = process.wait()
            except BaseException:
                process.kill()
                process.wait()
                raise
        finally:
            server.close()
        errors = sorted(control.glob(RANK_ERROR_FILE.format(rank="*")))
        if returncode != 0 or errors:
            if errors:
                # A rank's own error (a user error first) is the cause; the others' are usually its echo: a peer
                # that left mid-collective.
                reported = [json.loads(path.read_text(encoding="utf-8")) for path in errors]
                first = next((error for error in reported if error["kind"] == "user"), reported[0])
                raise RankFailure(first["kind"], first["code"], first["message"])
            raise RanksLost(f"a training rank died (torch.distributed.run exited {returncode}) with no error of its "
                            "own: killed or out of memory")
        result_file = control / RESULT_FILE
        if not result_file.is_file():
            raise RanksLost("the ranks exited without rank 0's result")
        result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
        return result


def run_job_spec(spec: Any, context: Any, *, log_format: str = "auto") -> Any:
    """The worker's way to run a job: in this process when it trains on one device, else on
    ``spec.gpus_required`` ranks (CUDA GPUs of this worker, or gloo processes on a CPU worker)."""
    from worker.recipe import RunResult, run_spec

    world_size = spec.gpus_required
    if world_size <= 1:
        return run_spec(spec, context)
    device_type = context.device.type
    if device_type == "cuda":
        import torch

        visible = torch.cuda.device_count()  # NVML: no CUDA context in the job process
        if visible < world_size:
            raise RuntimeError(f"the job trains on {world_size} GPUs and this worker sees {visible} "
                               "(CUDA_VISIBLE_DEVICES); the scheduler should not have placed it here")
    datasets = {}
    for dataset_id in (spec.dataset.id, spec.dataset.validation_id):
        if dataset_id is not None and context.dataset_resolver is not None:
            datasets[dataset_id] = str(context.dataset_resolver(dataset_id))
    plan = LaunchPlan(world_size=world_size, device_type=device_type, spec=spec.model_dump(mode="json"),
                      artifact_root=str(context.artifact_root), run_dir=str(context.run_dir),
                      model_cache=str(context.model_cache), generation=context.generation,
                      inference_batch_size=context.inference_batch_size, datasets=datasets, log_format=log_format)
    result = run_ranks(plan, observer=context.observer, stop=context.stop_signal, guard=context.publish_guard)
    export_dir = result.get("export_dir")
    return RunResult(status=result["status"], metrics=dict(result["metrics"]),
                     export_dir=Path(export_dir) if export_dir else None,
                     stage_seconds=dict(result["stage_seconds"]), cached_stages=list(result["cached_stages"]))
