"""What this worker can run, and its row in the ``workers`` table (docs/service-contract.md, "Scheduling").

**GPUs** (:func:`detect_capacity`), first that applies:

1. ``CTPD_WORKER_GPUS`` (the ``worker_gpus`` setting): the deployment says so (0 makes a GPU host a CPU worker).
2. ``CUDA_VISIBLE_DEVICES``: one GPU per listed device (``""`` or ``-1``: none), as one worker per GPU host with
   a device range is deployed (docs/deploy.md).
3. ``nvidia-smi --query-gpu=memory.total``: every GPU of the host.
4. None of these: a CPU host, 0 GPUs.

Never through torch.cuda: the parent of the job processes must not initialise CUDA (design.md: the children fork
from it). The memory is nvidia-smi's per-GPU total (the smallest of the visible GPUs), when it answers.

**Devices it may claim** (:attr:`Capacity.devices`): its GPUs, and 1 for a CPU host: a 1-device job runs on CPU
there (the embedded ``ctpd up`` and CI), a multi-GPU job never does.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from app.db import workers as worker_rows
from app.db.engine import Database

if TYPE_CHECKING:
    from app.settings import Settings

logger = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Capacity:
    gpus: int
    gpu_memory_mb: int | None  # per GPU (the smallest visible one); None when unknown or no GPU
    source: str  # worker_gpus | CUDA_VISIBLE_DEVICES | nvidia-smi | none: where the figure came from

    @property
    def devices(self) -> int:
        """The widest job this worker claims (a job's gpus_required): a CPU host runs 1-device jobs on CPU."""
        return max(self.gpus, 1)


def _visible_devices(value: str) -> list[str]:
    devices = [part.strip() for part in value.split(",") if part.strip()]
    # CUDA stops at the first invalid entry; "-1" is the usual way to hide every GPU.
    visible = []
    for device in devices:
        if device.startswith("-"):
            break
        visible.append(device)
    return visible


def _nvidia_smi_memory() -> list[int] | None:
    """Each GPU's total memory in MiB, in nvidia-smi's index order; None when nvidia-smi is missing or fails."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        result = subprocess.run([binary, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_SECONDS, check=True)
        return [int(float(line.strip())) for line in result.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        logger.warning("nvidia-smi did not report the GPUs (%s); counting none", error)
        return None


def detect_capacity(worker_gpus: int | None = None, environ: dict[str, str] | None = None) -> Capacity:
    env = os.environ if environ is None else environ
    memory = _nvidia_smi_memory()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    selected = memory
    if visible is not None and memory is not None:
        names = _visible_devices(visible)
        indexed = [int(name) for name in names if name.isdigit() and int(name) < len(memory)]
        # Indices pick their GPUs' memory; UUIDs or MIG names cannot be matched here: the smallest of all then.
        selected = [memory[index] for index in indexed] if len(indexed) == len(names) else memory
    per_gpu = min(selected) if selected else None
    if worker_gpus is not None:
        return Capacity(worker_gpus, per_gpu if worker_gpus else None, "worker_gpus")
    if visible is not None:
        count = len(_visible_devices(visible))
        return Capacity(count, per_gpu if count else None, "CUDA_VISIBLE_DEVICES")
    if memory:
        return Capacity(len(memory), per_gpu, "nvidia-smi")
    return Capacity(0, None, "none")


@lru_cache(maxsize=4)
def worker_capacity(worker_gpus: int | None) -> Capacity:
    """:func:`detect_capacity` once per process (nvidia-smi takes a moment; the hardware does not change)."""
    capacity = detect_capacity(worker_gpus)
    logger.info("this worker offers %d GPU(s) (%s)%s; it claims jobs of up to %d device(s)", capacity.gpus,
                capacity.source, f", {capacity.gpu_memory_mb} MiB each" if capacity.gpu_memory_mb else "",
                capacity.devices)
    return capacity


class WorkerRegistration:
    """This worker's row in ``workers``: registered at start, refreshed every ``REFRESH_SECONDS`` by a daemon
    thread, removed at a clean shutdown. It runs in the Celery parent, which forks the job processes: its
    database connections are closed after every use (``dispose``) so that no child inherits one in use."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.db = Database(settings.database_url)
        self.worker_id = worker_id
        self.capacity = worker_capacity(settings.worker_gpus)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_forever, name="ctpd-worker-registration", daemon=True)

    def start(self) -> WorkerRegistration:
        self._register()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            worker_rows.remove_worker(self.db, self.worker_id)
        except SQLAlchemyError as error:  # it goes stale by itself
            logger.warning("could not remove worker %s from the workers table (%s)", self.worker_id, error)
        finally:
            self.db.dispose()

    def _register(self) -> None:
        try:
            worker_rows.register_worker(self.db, self.worker_id, socket.gethostname(), self.capacity.gpus,
                                        self.capacity.gpu_memory_mb)
        except SQLAlchemyError as error:  # the next refresh registers it
            logger.warning("could not register worker %s (%s); retrying in %.0f s", self.worker_id, error,
                           worker_rows.REFRESH_SECONDS)
        finally:
            self.db.dispose()

    def _refresh_forever(self) -> None:
        while not self._stop.wait(worker_rows.REFRESH_SECONDS):
            try:
                if not worker_rows.touch_worker(self.db, self.worker_id):
                    self._register()  # removed meanwhile (a test, an operator): advertise again
            except SQLAlchemyError as error:
                logger.warning("could not refresh worker %s (%s)", self.worker_id, error)
            finally:
                self.db.dispose()
