"""Following a job live (``ctpd jobs follow``, ``ctpd submit --follow``): one progress bar per stage, the
sub-stage named, the latest loss, and an ETA for the stage and for the whole job.

The service reports, per job, the stage and its sub-stage (``progress.detail``: ``positive`` / ``negative`` while
π+ / π− train in ``contrastive``, ``chosen`` / ``rejected`` in a log-prob pass), the step and total of that
sub-stage and the worker's ETA for it (its mean time per step so far); the events say when each stage started and
finished (with its wall time, and ``prepare``'s pair counts); the metrics endpoint has the loss series.

**The job's ETA** is the current sub-stage's ETA (the worker's) plus an estimate of the work still to come:

* Work is counted in two units: *optimizer steps* (training: π+, π−, distill) and *responses through a frozen
  model* (the log-prob passes of reference and weights, evaluation). :func:`plan_stages` lists, from the
  resolved spec and prepare's counts (N training pairs, V held-out pairs), the passes each stage runs and their
  sizes: reference: chosen and rejected over N, then over V; contrastive: π+ and π− of
  ``contrastive.max_steps`` steps (else epochs × N // batch), after a chosen/rejected pass over N and V when π±
  start from another model than the job's reference; weights: chosen and rejected over N, for π+ then π−
  (``progress.detail`` ``positive:chosen``, ...);
  distill: ``training.max_steps`` (else epochs × N // batch) steps; evaluate: V pairs, about four responses each
  (both students, chosen and rejected). Export is not estimated (it writes a folder: seconds).
* A unit's duration is the throughput seen so far in this job: the worker's own rate in the sub-stage running
  now (its ETA divided by the steps left), else the recorded wall time of a finished stage of that unit divided by
  its size. Training steps of the teacher's π± and of the student are timed as one kind, so with a student much
  smaller than its teacher the estimate errs high until distill runs.
* Until prepare has counted the pairs, or while no stage of a unit still to come has run, that part is unknown:
  the ETA then counts only what is known and is shown as a lower bound (``≥ 1m20s``). Stages that turn out to be
  cached take no time, so the estimate errs high there too.

On a terminal the display is a tqdm bar per stage (finished ones stay on screen); otherwise plain lines: each
event, and the progress when a sub-stage starts and ends, at every tenth of it, and every ``LINE_INTERVAL``
seconds in between.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal, Protocol

from ctpd_core.spec import KD_METHODS
from ctpd_core.vocab import TERMINAL_STATUSES, EventType, JobStatus, Stage

Kind = Literal["step", "response", "prepare"]  # prepare's pairs are timed on their own (never needed later)

# How each sub-stage is named on screen.
DETAIL_LABELS = {"positive": "π+", "negative": "π−", "chosen": "chosen", "rejected": "rejected"}
STAGE_ORDER = tuple(Stage)
EVALUATE_RESPONSES_PER_PAIR = 4  # both students score the chosen and the rejected response
LINE_INTERVAL = 10.0
METRICS_INTERVAL = 10.0  # the metrics endpoint returns whole series: read it now and then, not on every poll
TRAINING = {Stage.CONTRASTIVE, Stage.DISTILL}


@dataclass(frozen=True)
class Pass:
    """One sub-stage of a stage: its ``detail`` (None for a stage of one part), its size in progress steps, the
    unit those steps are in and how many units one step is."""

    detail: str | None
    steps: int | None
    kind: Kind
    units_per_step: float = 1.0

    @property
    def units(self) -> float | None:
        return None if self.steps is None else self.steps * self.units_per_step


@dataclass(frozen=True)
class StagePlan:
    stage: Stage
    passes: tuple[Pass, ...]


def _training_steps(epochs: float, max_steps: int | None, batch_size: int, pairs: int | None) -> int | None:
    """``ctpd_core.train.plan_steps`` without torch: max_steps, else ceil(epochs × N // batch)."""
    if max_steps is not None:
        return max_steps
    if pairs is None or pairs < 1:
        return None
    return max(1, math.ceil(epochs * (pairs // min(batch_size, pairs))))


def plan_stages(spec: Mapping[str, Any], train_pairs: int | None, validation_pairs: int | None) -> list[StagePlan]:
    """The stages a job with the resolved ``spec`` runs, in order, with the passes of each (module docstring).
    The choice of stages follows ``worker.recipe.run_spec``: contrastive only for contrastive weight sources (and
    no passes when π+ and π− are given), weights for every method but dpo and the chosen-response baselines."""
    n, v = train_pairs, validation_pairs
    method = spec.get("method", "ctpd")
    weights = spec.get("weights") or {}
    source = weights.get("source")
    training = spec.get("training") or {}
    contrastive = spec.get("contrastive") or {}
    batch = int(training.get("batch_size") or 1)

    def logprob_passes(*sizes: int | None, model: str | None = None) -> list[Pass]:
        prefix = f"{model}:" if model else ""
        return [Pass(f"{prefix}{detail}", size, "response") for size in sizes for detail in ("chosen", "rejected")]

    plans = [StagePlan(Stage.PREPARE, (Pass(None, None if n is None or v is None else n + v, "prepare"),))]
    plans.append(StagePlan(Stage.REFERENCE, tuple(logprob_passes(n, v))))
    contrastive_runs = method != "dpo" and source in ("teacher_contrastive", "student_contrastive")
    if contrastive_runs:
        if contrastive.get("positive") and contrastive.get("negative"):
            plans.append(StagePlan(Stage.CONTRASTIVE, ()))
        else:
            reference_side = "teacher" if method == "ctpd" and spec.get("teacher") else "student"
            base_side = "teacher" if source == "teacher_contrastive" else "student"
            steps = _training_steps(float(contrastive.get("epochs") or 1.0), contrastive.get("max_steps"), batch, n)
            passes = logprob_passes(n, v) if base_side != reference_side else []
            passes += [Pass("positive", steps, "step"), Pass("negative", steps, "step")]
            plans.append(StagePlan(Stage.CONTRASTIVE, tuple(passes)))
    if method != "dpo" and method not in KD_METHODS:  # sft, uld, dskd train on the chosen responses: no weights
        weights_passes = logprob_passes(n, model="positive") + logprob_passes(n, model="negative")
        plans.append(StagePlan(Stage.WEIGHTS, tuple(weights_passes if contrastive_runs else ())))
    distill_steps = _training_steps(float(training.get("epochs") or 1.0), training.get("max_steps"), batch, n)
    plans.append(StagePlan(Stage.DISTILL, (Pass(None, distill_steps, "step"),)))
    plans.append(StagePlan(Stage.EVALUATE, (Pass(None, v, "response", EVALUATE_RESPONSES_PER_PAIR),)))
    plans.append(StagePlan(Stage.EXPORT, ()))
    return plans


def format_seconds(seconds: float) -> str:
    """``45s``, ``3m04s``, ``2h05m``."""
    whole = max(0, int(round(seconds)))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def substage_label(stage: str | None, detail: str | None) -> str:
    """``contrastive π+``, ``reference chosen``, ``weights π− rejected`` (detail ``negative:rejected``),
    ``distill``."""
    label = " ".join(DETAIL_LABELS.get(part, part) for part in (detail or "").split(":") if part)
    return f"{stage or 'waiting'} {label}".strip()


# ---------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class View:
    """What a display draws for one poll."""

    status: str
    stage: str | None
    detail: str | None
    step: int | None
    total: int | None
    stage_eta: float | None
    job_eta: float | None
    job_eta_is_lower_bound: bool
    loss: float | None

    @property
    def label(self) -> str:
        return substage_label(self.stage, self.detail)

    def summary(self) -> str:
        """``loss 0.693, stage ETA 12s, job ETA ≥ 3m04s``."""
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.stage_eta is not None:
            parts.append(f"stage ETA {format_seconds(self.stage_eta)}")
        if self.job_eta is not None:
            parts.append(f"job ETA {'≥ ' if self.job_eta_is_lower_bound else ''}{format_seconds(self.job_eta)}")
        return ", ".join(parts)


@dataclass
class JobTracker:
    """Reads a job's events and states as they come and answers :meth:`view`, with the job ETA of the module
    docstring. Pure bookkeeping, no I/O: tests feed it a recorded sequence."""

    spec: Mapping[str, Any]
    train_pairs: int | None = None
    validation_pairs: int | None = None
    finished: dict[str, tuple[float, bool]] = field(default_factory=dict)  # stage -> (seconds, cached)
    rates: dict[str, float] = field(default_factory=dict)  # kind -> seconds per unit
    loss: float | None = None
    _position: tuple[str, int] | None = None  # (stage, index of the pass running now)

    def plan(self) -> list[StagePlan]:
        return plan_stages(self.spec, self.train_pairs, self.validation_pairs)

    def event(self, event: Mapping[str, Any]) -> None:
        data = event.get("data") or {}
        if event.get("type") != EventType.STAGE_FINISHED or not event.get("stage"):
            return
        stage = str(event["stage"])
        seconds, cached = float(data.get("seconds") or 0.0), bool(data.get("cached"))
        self.finished[stage] = (seconds, cached)
        summary = data.get("summary") or {}
        if stage == Stage.PREPARE and "train_pairs" in summary:
            self.train_pairs = int(summary["train_pairs"])
            self.validation_pairs = int(summary.get("validation_pairs") or 0)
        if cached:
            return
        plan = next((p for p in self.plan() if p.stage == stage), None)
        if plan is None or stage == Stage.PREPARE or not plan.passes:
            return
        kinds = {p.kind for p in plan.passes}
        units = [p.units for p in plan.passes]
        if len(kinds) == 1 and all(u is not None and u > 0 for u in units):
            # A finished stage of one unit times that unit, unless the live rate of a sub-stage already did.
            kind = kinds.pop()
            self.rates.setdefault(kind, seconds / sum(u for u in units if u is not None))

    def metrics(self, metrics: Mapping[str, Any], stage: str | None, detail: str | None) -> None:
        """The latest loss of the training sub-stage running now (``distill/loss``, ``contrastive:positive/loss``);
        none until that sub-stage has one (another sub-stage's loss is not shown as this one's)."""
        self.loss = None
        if stage is None:
            return
        series = (metrics.get("data") or {}).get(f"{stage}:{detail}/loss" if detail else f"{stage}/loss")
        if series:
            self.loss = float(series[-1]["value"])

    def _current_pass(self, plan: StagePlan, detail: str | None, total: int | None) -> int | None:
        """The index of the running pass: the first one, from the last known position on, whose detail (and
        size, when known) match; the position only moves forward, so equal-looking passes are told apart."""
        start = self._position[1] if self._position and self._position[0] == plan.stage else 0
        for exact in (True, False):
            for index in range(start, len(plan.passes)):
                candidate = plan.passes[index]
                if candidate.detail != detail:
                    continue
                if exact and candidate.steps is not None and total is not None and candidate.steps != total:
                    continue
                self._position = (plan.stage, index)
                return index
        return None

    def view(self, job: Mapping[str, Any]) -> View:
        progress = job.get("progress") or {}
        stage, detail = job.get("stage"), progress.get("detail")
        step, total, eta = progress.get("step"), progress.get("total"), progress.get("eta_seconds")
        status = str(job.get("status"))
        plans = self.plan()
        job_eta: float | None = None
        lower_bound = False
        if status in (JobStatus.QUEUED, JobStatus.RUNNING) and stage is not None:
            index_of = {plan.stage: i for i, plan in enumerate(plans)}
            position = index_of.get(stage)
            current = plans[position] if position is not None else None
            pass_index = self._current_pass(current, detail, total) if current is not None else None
            if current is not None and pass_index is not None and eta is not None and step is not None and total:
                running = current.passes[pass_index]
                left = total - step
                if left > 0 and eta > 0:
                    self.rates[running.kind] = eta / left / running.units_per_step
            job_eta = float(eta) if eta is not None else 0.0
            lower_bound = eta is None
            later: list[Pass] = []
            if current is not None and pass_index is not None:
                later += current.passes[pass_index + 1:]
            if position is not None:
                for plan in plans[position + 1:]:
                    later += plan.passes
            else:
                lower_bound = True
            for upcoming in later:
                rate, units = self.rates.get(upcoming.kind), upcoming.units
                if rate is None or units is None:
                    lower_bound = True
                else:
                    job_eta += rate * units
        return View(status=status, stage=stage, detail=detail, step=step, total=total,
                    stage_eta=float(eta) if eta is not None else None, job_eta=job_eta,
                    job_eta_is_lower_bound=lower_bound, loss=self.loss)


# ----------------------------------------------------------------------------------------------- displays


class Display(Protocol):
    def event(self, event: Mapping[str, Any], elapsed: float) -> None: ...
    def update(self, view: View, elapsed: float) -> None: ...
    def close(self) -> None: ...


def _event_line(event: Mapping[str, Any]) -> str:
    return f"{event.get('type', ''):<17} {event.get('message', '')}"


class BarDisplay:
    """One tqdm bar per stage on a terminal; a finished stage's bar stays, with its wall time."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self.bar: Any = None  # tqdm, imported on first use
        self.stage: str | None = None
        self.label: str | None = None

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=self.file)

    def event(self, event: Mapping[str, Any], elapsed: float) -> None:
        kind = event.get("type")
        if kind == EventType.STAGE_FINISHED:
            data = event.get("data") or {}
            done = "cached" if data.get("cached") else f"done in {format_seconds(float(data.get('seconds') or 0))}"
            if self.bar is not None and self.stage == event.get("stage"):
                # The stage is done, whatever the last poll saw: a full bar under the stage's name.
                if self.bar.total:
                    self.bar.n = self.bar.total
                self.bar.set_description_str(str(event.get("stage")), refresh=False)
                self.bar.set_postfix_str(done, refresh=False)
                self._close()
            else:
                self._write(f"[{event.get('stage')}] {done}")
        elif kind not in (EventType.STAGE_STARTED, EventType.CHECKPOINT_SAVED):
            self._write(_event_line(event))

    def update(self, view: View, elapsed: float) -> None:
        from tqdm import tqdm

        if view.stage is None or view.total is None or view.status not in (JobStatus.RUNNING, JobStatus.CANCELLING):
            return
        if self.bar is not None and self.stage != view.stage:
            self._close()
        if self.bar is None:
            self.bar = tqdm(total=view.total, initial=view.step or 0, desc=view.label, file=self.file, leave=True,
                            dynamic_ncols=True, unit="step", postfix=view.summary(),
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}")
            self.stage, self.label = view.stage, view.label
            return
        # The same stage (its next sub-stage, if the label changed): the same bar, counting what runs now.
        self.bar.set_description_str(view.label, refresh=False)
        self.label = view.label
        self.bar.total = view.total
        self.bar.n = view.step or 0
        self.bar.set_postfix_str(view.summary(), refresh=False)
        self.bar.refresh()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.stage = self.label = None

    def close(self) -> None:
        self._close()


class LineDisplay:
    """Plain lines, for logs and pipes: each event, each sub-stage's start and end, and in between a line when a
    tenth of the sub-stage went by or ``interval`` seconds passed since the last one (and the step moved)."""

    def __init__(self, echo: Callable[[str], None], interval: float = LINE_INTERVAL) -> None:
        self.echo, self.interval = echo, interval
        self._shown: tuple[str, int | None, int | None] | None = None
        self._label: str | None = None
        self._at = -math.inf

    def event(self, event: Mapping[str, Any], elapsed: float) -> None:
        self.echo(f"{elapsed:7.1f}s  {_event_line(event)}")

    def update(self, view: View, elapsed: float) -> None:
        if view.stage is None or view.total is None or view.status not in (JobStatus.RUNNING, JobStatus.CANCELLING):
            return
        key = (view.label, view.step, view.total)
        if key == self._shown:
            return
        changed = view.label != self._label or self._shown is None
        finished = view.step == view.total
        last_step = self._shown[1] if self._shown is not None and not changed else None
        tenth = last_step is None or (view.step or 0) - (last_step or 0) >= view.total / 10
        if not (changed or finished or tenth or elapsed - self._at >= self.interval):
            return
        self._shown, self._label, self._at = key, view.label, elapsed
        summary = view.summary()
        self.echo(f"{elapsed:7.1f}s  {'progress':<17} {view.label}: {view.step}/{view.total}"
                  + (f"  {summary}" if summary else ""))

    def close(self) -> None:
        pass


def display_for(stream: IO[str]) -> Display:
    """Bars on a terminal, lines elsewhere."""
    if stream.isatty():
        return BarDisplay(stream)
    return LineDisplay(lambda line: print(line, file=stream, flush=True))


# ------------------------------------------------------------------------------------------------ the loop


class FollowClient(Protocol):
    def job(self, job_id: str) -> dict[str, Any]: ...
    def events(self, job_id: str, after: int | None = None, limit: int = 100) -> dict[str, Any]: ...
    def metrics(self, job_id: str) -> dict[str, Any]: ...


def follow(client: FollowClient, job_id: str, display: Display, *, poll_seconds: float = 2.0,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
           job: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Draw the job on ``display`` until it ends; return the final job. Reads every event from the first (so
    prepare's counts and the stages already done feed the estimate), the job on every poll and the metrics
    now and then while a training stage runs. A Ctrl-C raises KeyboardInterrupt to the caller (the job keeps
    running); the display is closed either way."""
    current = dict(job) if job is not None else client.job(job_id)
    tracker = JobTracker(current.get("spec") or {})
    started = clock()
    after: int | None = None
    metrics_at, metrics_of = -math.inf, None
    try:
        while True:
            has_more = True
            while has_more:
                page = client.events(job_id, after, limit=100)
                for event in page["data"]:
                    after = event["id"]
                    tracker.event(event)
                    display.event(event, clock() - started)
                has_more = bool(page.get("has_more")) and bool(page["data"])
            current = client.job(job_id)
            progress = current.get("progress") or {}
            running = (current.get("stage"), progress.get("detail"))
            # The metrics again when the training sub-stage changes, on every poll until it has a loss (its first
            # steps: a short series), then every METRICS_INTERVAL seconds.
            if running[0] in TRAINING and (running != metrics_of or tracker.loss is None
                                           or clock() - metrics_at >= METRICS_INTERVAL):
                tracker.metrics(client.metrics(job_id), *running)
                metrics_at, metrics_of = clock(), running
            elif running[0] not in TRAINING:
                tracker.loss = None
            display.update(tracker.view(current), clock() - started)
            if current["status"] in TERMINAL_STATUSES:
                # Events written with the final status are read once more, so none is left unshown.
                page = client.events(job_id, after, limit=1000)
                for event in page["data"]:
                    after = event["id"]
                    display.event(event, clock() - started)
                return current
            sleep(poll_seconds)
    finally:
        display.close()


def replay(states: Sequence[tuple[Sequence[Mapping[str, Any]], Mapping[str, Any]]], display: Display,
           spec: Mapping[str, Any]) -> list[View]:
    """Feed a recorded sequence of ``(new events, job)`` polls to a tracker and ``display``; returns the views.
    For tests and for looking at a display without a service."""
    tracker = JobTracker(spec)
    views = []
    for index, (events, job) in enumerate(states):
        for event in events:
            tracker.event(event)
            display.event(event, float(index))
        view = tracker.view(job)
        display.update(view, float(index))
        views.append(view)
    display.close()
    return views
