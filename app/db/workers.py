"""The ``workers`` table: what each live worker can run (docs/service-contract.md, "Scheduling").

A Celery worker that consumes ``train`` upserts its row when it is ready (worker/capacity.py detects its GPUs),
refreshes ``last_seen_at`` every :data:`REFRESH_SECONDS` while it runs, and deletes it at a clean shutdown. A
worker killed with SIGKILL cannot delete its row: it stops counting once it is :data:`STALE_SECONDS` old. The
claim never reads this table (a worker claims with its own capacity); the queue view does, to say why a job waits
(no live worker at all, or none with the GPUs it needs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update

from app.db.engine import Database, updated_rows
from app.db.models import Worker, utcnow

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 30.0
STALE_SECONDS = 120.0  # four missed refreshes: the worker is gone (killed, or its host lost)


def register_worker(db: Database, worker_id: str, hostname: str, gpus: int, gpu_memory_mb: int | None,
                    now: datetime | None = None) -> None:
    """Insert or replace the worker's row (a restarted node keeps its id and starts over)."""
    now = now or utcnow()
    with db.write() as session:
        session.execute(delete(Worker).where(Worker.worker_id == worker_id))
        session.add(Worker(worker_id=worker_id, hostname=hostname, gpus=gpus, gpu_memory_mb=gpu_memory_mb,
                           started_at=now, last_seen_at=now))


def touch_worker(db: Database, worker_id: str, now: datetime | None = None) -> bool:
    """Refresh ``last_seen_at``; False when the row is gone (then the caller registers again)."""
    with db.write() as session:
        return bool(updated_rows(session, update(Worker).where(Worker.worker_id == worker_id)
                                 .values(last_seen_at=now or utcnow())))


def remove_worker(db: Database, worker_id: str) -> None:
    with db.write() as session:
        session.execute(delete(Worker).where(Worker.worker_id == worker_id))


@dataclass(frozen=True)
class LiveWorkers:
    """The workers seen within :data:`STALE_SECONDS`: how many, and the most devices one of them offers."""

    count: int
    max_gpus: int  # 0 when every live worker is a CPU host (or none is live)

    @property
    def max_devices(self) -> int:
        """The widest job one of them can run: a CPU host runs 1-device jobs (on CPU)."""
        return max(self.max_gpus, 1) if self.count else 0


def live_workers(db: Database, now: datetime | None = None) -> LiveWorkers:
    cutoff = (now or utcnow()) - timedelta(seconds=STALE_SECONDS)
    with db.read() as session:
        count, max_gpus = session.execute(
            select(func.count(), func.max(Worker.gpus)).where(Worker.last_seen_at >= cutoff)).one()
    return LiveWorkers(int(count or 0), int(max_gpus or 0))
