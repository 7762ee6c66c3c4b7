"""What a running pipeline reports, and how it is stopped: one observer that only reports, one stop token.

Reporting and stopping are separate on purpose (issue 10). An :class:`Observer` receives stage boundaries,
progress, metrics, checkpoints and replayed metrics, and never decides anything: the CLI draws progress bars
with it, the worker writes SQL. A :class:`StopToken` is asked ``should_stop()`` by every long loop between
batches (training steps, batched inference, evaluation, sampling), the last batch included, and the loop
answers a yes by raising :class:`Stopped`, after a training loop has checkpointed. So a cancel that arrives
during a stage's last batch still stops the job: it never runs on into the next stage.

Torch-free: the worker's DB-backed observer and stop token import it without the training stack.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Progress:
    """Where a stage stands, for the job's progress columns."""

    stage: str  # a pipeline stage, or a training loop's name (``contrastive:positive``)
    step: int  # optimizer steps or items done
    total: int  # of the whole stage
    eta_seconds: float | None  # None until a step has been timed


def progress_of(stage: str, step: int, total: int, started: float) -> Progress:
    """A Progress whose ETA extrapolates the mean time per item since ``started`` (``time.monotonic()``)."""
    elapsed = time.monotonic() - started
    eta = elapsed / step * (total - step) if step else None
    return Progress(stage=stage, step=step, total=total, eta_seconds=eta)


class Observer(Protocol):
    """What the pipeline reports while it runs. Reporting only: an observer never stops the run."""

    def stage_started(self, stage: str, cached: bool) -> None: ...
    def stage_finished(self, stage: str, seconds: float, cached: bool, summary: Mapping[str, Any]) -> None: ...
    def progress(self, progress: Progress) -> None: ...
    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None: ...
    def checkpoint(self, stage: str, step: int, path: Path) -> None: ...

    def replay_metrics(self, stage: str, history: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """A resumed training loop's metrics of the steps before its checkpoint, which it does not run again: an
        observer that may have lost some (an attempt that died with its writes unflushed) restores them."""
        ...


class NullObserver:
    """An observer that ignores everything (subclass it and override what you need)."""

    def stage_started(self, stage: str, cached: bool) -> None:
        pass

    def stage_finished(self, stage: str, seconds: float, cached: bool, summary: Mapping[str, Any]) -> None:
        pass

    def progress(self, progress: Progress) -> None:
        pass

    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def checkpoint(self, stage: str, step: int, path: Path) -> None:
        pass

    def replay_metrics(self, stage: str, history: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        pass  # an observer that keeps what it saw lost nothing



class FanOut:
    """Reports to several observers, in order: the worker's SQL record first, then its mirrors (MLflow).

    A mirror must not raise (a tracking store that fails is the mirror's own warning, not the run's failure);
    FanOut does not catch for it, so a bug in an observer is not silently swallowed either."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def stage_started(self, stage: str, cached: bool) -> None:
        for observer in self.observers:
            observer.stage_started(stage, cached)

    def stage_finished(self, stage: str, seconds: float, cached: bool, summary: Mapping[str, Any]) -> None:
        for observer in self.observers:
            observer.stage_finished(stage, seconds, cached, summary)

    def progress(self, progress: Progress) -> None:
        for observer in self.observers:
            observer.progress(progress)

    def metrics(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        for observer in self.observers:
            observer.metrics(stage, step, metrics)

    def checkpoint(self, stage: str, step: int, path: Path) -> None:
        for observer in self.observers:
            observer.checkpoint(stage, step, path)

    def replay_metrics(self, stage: str, history: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        for observer in self.observers:
            observer.replay_metrics(stage, history)


class StopToken(Protocol):
    """Cooperative cancellation, polled between batches (the worker's reads the job's cancel flag)."""

    def should_stop(self) -> bool: ...


class NeverStop:
    """The stop token of a run nobody can cancel."""

    def should_stop(self) -> bool:
        return False


class Stopped(Exception):  # noqa: N818 -- a stop is an outcome, not an error
    """A stop token fired; the loop that saw it stopped between batches (a training loop after checkpointing).

    ``step`` is how far the loop got (optimizer steps or items), ``checkpoint`` the newest checkpoint a training
    loop left (None for inference, which has nothing to resume: a stage cache discards a partial output)."""

    def __init__(self, stage: str, step: int | None = None, checkpoint: Path | None = None) -> None:
        super().__init__(f"{stage} stopped" + (f" at {step}" if step is not None else ""))
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


def check_stop(stop: StopToken, stage: str, step: int | None = None) -> None:
    """Raise :class:`Stopped` if ``stop`` says so (call it between batches, after the last one too)."""
    if stop.should_stop():
        raise Stopped(stage, step)
