"""What the fault tests assert on: a job's SQL history (jobs, job_events, metric_points), read with plain SQL.

Plain SQL and not the ORM, so the assertions see exactly what is stored, columns added by migrations included
(``attempt`` on events and metric points, ``handoffs`` on jobs: the fencing contract). The checks here are the
invariants every fault must keep: one outcome, the attempts the fault explains, no lost metric point, no row
written by an attempt that was no longer current, no orphaned file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

TERMINAL_EVENTS = ("job_succeeded", "job_failed", "job_cancelled")
# Events the job process writes while it runs (the repository's own transitions may carry no attempt).
RUN_EVENTS = ("stage_started", "stage_finished", "checkpoint_saved")
STAGES = ["prepare", "reference", "contrastive", "weights", "distill", "evaluate", "export"]
# Temporary names in the artifact root: uploads being received, checkpoints and stage outputs being written.
TEMPORARY_PREFIXES = (".incoming-", ".staging-")


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


class History:
    """Read-only access to the service database of one stack."""

    def __init__(self, url: str) -> None:
        # NullPool: no connection outlives a call, so stopping the database under a test never strands one.
        self.engine = create_engine(url, poolclass=NullPool)

    def dispose(self) -> None:
        self.engine.dispose()

    def columns(self, table: str) -> set[str]:
        return {column["name"] for column in inspect(self.engine).get_columns(table)}

    def _rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(text(sql), params).mappings()]

    def job(self, job_id: str) -> dict[str, Any]:
        (row,) = self._rows("SELECT * FROM jobs WHERE id = :id", id=job_id)
        return row

    def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM job_events WHERE job_id = :id ORDER BY id", id=job_id)
        for row in rows:
            row["data"] = _json(row["data"]) or {}
        return rows

    def metric_points(self, job_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM metric_points WHERE job_id = :id ORDER BY id", id=job_id)

    def max_metric_id(self) -> int:
        return self._rows("SELECT COALESCE(MAX(id), 0) AS top FROM metric_points")[0]["top"]

    def dataset_count(self) -> int:
        return self._rows("SELECT COUNT(*) AS n FROM datasets")[0]["n"]

    def describe(self, job_id: str) -> str:
        """The job row and its events, for a failure message."""
        try:
            job = self.job(job_id)
            events = [(e["id"], e["type"], e.get("stage"), e.get("attempt"), e["message"]) for e in self.events(job_id)]
        except Exception as error:  # a diagnostic must never hide the real failure
            return f"(the history of {job_id} is unreadable: {error})"
        shown = {key: job[key] for key in ("status", "stage", "progress_step", "progress_total", "attempt",
                                          "handoffs", "worker_id", "lease_expires_at", "error_code", "error_message")
                 if key in job}
        return f"job {job_id}: {shown}\nevents (id, type, stage, attempt, message):\n" + "\n".join(map(str, events))


# --------------------------------------------------------------------------------------------- the checks


def transitions(events: Sequence[dict[str, Any]]) -> list[str]:
    """The job's status changes: the repository writes ``data.status`` on exactly those events."""
    return [event["data"]["status"] for event in events if "status" in event["data"]]


def event_index(events: Sequence[dict[str, Any]], type: str, **data: Any) -> int:
    """The position of the first event of ``type`` whose data has ``data``; AssertionError if none."""
    for index, event in enumerate(events):
        if event["type"] == type and all(event["data"].get(key) == value for key, value in data.items()):
            return index
    raise AssertionError(f"no {type} event with {data}; events: {[(e['type'], e['data']) for e in events]}")


def assert_one_outcome(events: Sequence[dict[str, Any]], status: str) -> None:
    ends = [event["type"] for event in events if event["type"] in TERMINAL_EVENTS]
    assert ends == [f"job_{status}"], f"expected exactly one job_{status}, the history ends with {ends}"
    assert events[-1]["type"] == f"job_{status}", f"events after the outcome: {[e['type'] for e in events]}"


def distill_loss_steps(points: Iterable[dict[str, Any]]) -> dict[int, float]:
    """``distill/loss`` by step, a repeated step keeping its last value (the API's rule, app/api/jobs.py)."""
    series: dict[int, float] = {}
    for point in sorted(points, key=lambda p: p["id"]):
        if point["stage"] == "distill" and point["name"] == "loss":
            series[point["step"]] = point["value"]
    return series


def assert_every_distill_step(points: Sequence[dict[str, Any]], max_steps: int) -> None:
    steps = sorted(distill_loss_steps(points))
    missing = sorted(set(range(1, max_steps + 1)) - set(steps))
    assert steps == list(range(1, max_steps + 1)), f"distill/loss steps: missing {missing}, recorded {steps}"


def require_attempt_columns(history: History) -> None:
    """The fencing contract (migration 0002): every event and metric point names the attempt that wrote it."""
    for table in ("job_events", "metric_points"):
        assert "attempt" in history.columns(table), (
            f"{table} has no `attempt` column: migration 0002 (every write fenced by its attempt) is not applied")


def assert_nothing_from(history: History, job_id: str, stale_attempt: int, *, after_event_id: int,
                        after_metric_id: int) -> None:
    """No event (id > ``after_event_id``) and no metric point (id > ``after_metric_id``) of ``stale_attempt``:
    once a newer attempt owns the job, an older one writes nothing that counts."""
    require_attempt_columns(history)
    stale_events = [(e["id"], e["type"], e.get("stage"), e["message"]) for e in history.events(job_id)
                    if e["id"] > after_event_id and e["attempt"] == stale_attempt]
    assert not stale_events, f"attempt {stale_attempt} wrote events after it lost the job: {stale_events}"
    stale_points = [(p["id"], p["stage"], p["name"], p["step"]) for p in history.metric_points(job_id)
                    if p["id"] > after_metric_id and p["attempt"] == stale_attempt]
    assert not stale_points, f"attempt {stale_attempt} wrote metric points after it lost the job: {stale_points[:20]}"


def assert_run_events_carry(events: Sequence[dict[str, Any]], attempt: int, *, after_event_id: int) -> None:
    """The job process's own events after ``after_event_id`` are recorded as ``attempt``'s."""
    wrong = [(e["id"], e["type"], e.get("stage"), e.get("attempt")) for e in events
             if e["id"] > after_event_id and e["type"] in RUN_EVENTS and e.get("attempt") != attempt]
    assert not wrong, f"events of the run after id {after_event_id} not recorded as attempt {attempt}: {wrong}"


def assert_metrics_carry(points: Sequence[dict[str, Any]], attempt: int, *, after_metric_id: int) -> None:
    """Every metric point after ``after_metric_id`` is recorded as ``attempt``'s (not another's, not none)."""
    wrong = [(p["id"], p["stage"], p["name"], p["step"], p.get("attempt")) for p in points
             if p["id"] > after_metric_id and p.get("attempt") != attempt]
    assert not wrong, f"metric points after id {after_metric_id} not recorded as attempt {attempt}: {wrong[:20]}"


def temporary_leftovers(root: Path) -> list[str]:
    """Every temporary name under ``root``: the upload and checkpoint prefixes, and the stage cache's
    ``.<key>-<random>`` folders (ctpd_core/artifacts.py), which a finished write always renames or removes."""
    if not root.exists():
        return []
    found = []
    for path in root.rglob(".*"):
        cache_staging = path.is_dir() and path.parent.parent == root and "-" in path.name
        if path.name.startswith(TEMPORARY_PREFIXES) or cache_staging:
            found.append(str(path.relative_to(root)))
    return sorted(found)
