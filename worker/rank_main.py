"""One training rank of a multi-GPU job (``python -m torch.distributed.run ... -m worker.rank_main PAYLOAD``).

Started by :func:`worker.launch.run_ranks`, never by hand: it rebuilds the job's RunContext from the payload the
job process wrote, joins the process group (torchrun's environment), runs the same recipe as a one-device job
with ``context.dist`` set, and reports through the control channel (rank 0 only). Rank 0 writes the run's result
for the job process; a rank that fails writes its classified error before it exits non-zero.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ctpd_core.observe import NullObserver
from worker.launch import RANK_ERROR_FILE, RESULT_FILE, ChannelObserver, ChannelStop, ControlClient

logger = logging.getLogger("worker.rank_main")


def main(payload_path: str) -> int:
    from ctpd_core import logs

    payload = json.loads(Path(payload_path).read_text(encoding="utf-8"))
    logs.configure_logging(payload.get("log_format", "auto"))
    control = Path(payload["control_dir"])
    rank = -1
    try:
        from ctpd_core.distributed import init_from_env
        from ctpd_core.spec import JobSpec
        from worker.recipe import RunContext, run_spec

        dist = init_from_env(payload["device_type"])
        rank = dist.rank
        client = ControlClient(payload["address"], bytes.fromhex(payload["authkey"]))
        datasets = {key: Path(value) for key, value in payload["datasets"].items()}

        def resolve(dataset_id: str) -> Path:
            if dataset_id not in datasets:
                raise ValueError(f"dataset {dataset_id!r} was not resolved by the job process")
            return datasets[dataset_id]

        mirror = None
        if dist.is_main:  # rank 0 publishes and fetches for all: the ranks share this host's artifact root
            from app.settings import Settings
            from app.storage import StorageMirror, configured_storage

            storage = configured_storage(Settings(), check=False)  # the worker's environment, inherited
            mirror = StorageMirror(storage) if storage is not None else None
        context = RunContext(
            artifact_root=Path(payload["artifact_root"]), run_dir=Path(payload["run_dir"]),
            model_cache=Path(payload["model_cache"]), device=dist.device,
            observer=ChannelObserver(client) if dist.is_main else NullObserver(),
            stop_signal=ChannelStop(client), dataset_resolver=resolve, publish_guard=client.holds,
            generation=payload["generation"], inference_batch_size=payload["inference_batch_size"], dist=dist,
            mirror=mirror,
        )
        result = run_spec(JobSpec.model_validate(payload["spec"]), context)
        if dist.is_main:
            (control / RESULT_FILE).write_text(json.dumps({
                "status": result.status, "metrics": result.metrics,
                "export_dir": str(result.export_dir) if result.export_dir else None,
                "stage_seconds": result.stage_seconds, "cached_stages": result.cached_stages,
            }), encoding="utf-8")
        client.close()
        return 0
    except Exception as error:  # the rank's process boundary: classified for the job process, then re-raised
        from worker.tasks import _message_of, classify_error

        kind, code = classify_error(error)
        logger.exception("rank %d failed", rank)
        (control / RANK_ERROR_FILE.format(rank=rank if rank >= 0 else "unknown")).write_text(
            json.dumps({"kind": kind, "code": code, "message": _message_of(error, kind)}), encoding="utf-8")
        return 1


if __name__ == "__main__":
    from ctpd_core.distributed import exit_rank

    exit_rank(main(sys.argv[1]))  # leaves the process group and skips the finalization that can abort a rank
