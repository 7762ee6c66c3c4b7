"""The ``ctpd`` command. Each subcommand imports only what it needs, so ``ctpd --help`` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ctpd_core.vocab import QueueName

logger = logging.getLogger("ctpd_cli")


def ctpd_home() -> Path:
    """``$CTPD_HOME`` (default ``./.ctpd``): artifacts, the catalog cache, the embedded database."""
    return Path(os.environ.get("CTPD_HOME", ".ctpd")).expanduser()


def catalog_cache() -> Path:
    return ctpd_home() / "catalog"


def _cmd_align(args: argparse.Namespace) -> int:
    from ctpd_core.alignment import align_texts
    from ctpd_core.models import load_tokenizer

    text = sys.stdin.read() if args.text in (None, "-") else args.text
    student = load_tokenizer(args.student, cache_dir=catalog_cache(), role="student tokenizer")
    teacher = load_tokenizer(args.teacher, cache_dir=catalog_cache(), role="teacher tokenizer")
    (alignment,) = align_texts(student, teacher, [text])
    document = alignment.to_json()
    if args.json:
        print(json.dumps(document, ensure_ascii=False))
        return 0
    student_ids = student(text, add_special_tokens=False)["input_ids"]
    teacher_ids = teacher(text, add_special_tokens=False)["input_ids"]
    # Escape control characters so a token such as "\n\n" does not break the table.
    student_pieces = [json.dumps(p, ensure_ascii=False)[1:-1] for p in student.convert_ids_to_tokens(student_ids)]
    teacher_pieces = [json.dumps(p, ensure_ascii=False)[1:-1] for p in teacher.convert_ids_to_tokens(teacher_ids)]
    rows = [("span", "bytes", "text", "student tokens", "teacher tokens")]
    for index, span in enumerate(document["spans"]):
        rows.append(
            (
                str(index),
                f"{span['start']}-{span['end']}",
                repr(span["text"]),
                " ".join(student_pieces[i] for i in span["student"]),
                " ".join(teacher_pieces[i] for i in span["teacher"]),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4])
    stats = document["stats"]
    print(
        f"\n{stats['spans']} spans; student {stats['student_tokens']} tokens, teacher {stats['teacher_tokens']} tokens; "
        + ", ".join(f"{name} {stats['share_' + name]:.1%}" for name in ("1:1", "1:n", "n:1", "n:m"))
        + " (teacher:student)"
    )
    return 0


class _ConsoleObserver:
    """Draws one progress bar per stage and prints each stage's wall time (the local `ctpd run`)."""

    def __init__(self) -> None:
        self.bar: Any = None  # a tqdm bar, imported on first use
        self.stage: str | None = None
        self.progress_stage: str | None = None  # what the bar counts: a stage, or stage:detail

    def stage_started(self, stage: str, cached: bool) -> None:
        self.stage = stage
        if cached:
            print(f"[{stage}] cached: reusing the stored output")

    def progress(self, progress) -> None:
        from tqdm import tqdm

        from ctpd_cli.follow import substage_label

        if self.bar is None or self.progress_stage != progress.stage:
            self._close()
            stage, _, detail = progress.stage.partition(":")  # contrastive:positive -> "contrastive π+"
            self.bar = tqdm(total=progress.total, desc=substage_label(stage, detail), unit="step", dynamic_ncols=True,
                            leave=True)
            self.progress_stage = progress.stage
        self.bar.total = progress.total
        self.bar.n = progress.step
        self.bar.refresh()

    def metrics(self, stage: str, step: int, metrics) -> None:
        if self.bar is not None and "loss" in metrics:
            shown = {k: f"{metrics[k]:.3g}" for k in ("loss", "reward_accuracy", "reward_margin") if k in metrics}
            self.bar.set_postfix(shown, refresh=True)

    def checkpoint(self, stage: str, step: int, path) -> None:
        pass

    def replay_metrics(self, stage: str, history) -> None:
        pass  # a resumed stage's earlier steps: the console shows only what this run does

    def stage_finished(self, stage: str, seconds: float, cached: bool, summary) -> None:
        self._close()
        print(f"[{stage}] done in {seconds:.1f} s")

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    from ctpd_core.artifacts import content_key
    from ctpd_core.observe import FanOut
    from ctpd_core.spec import load_spec
    from worker.recipe import RunContext, run_spec
    from worker.tracking import start_local_tracking

    spec = load_spec(args.spec, args.set)
    artifacts = Path(args.artifacts) if args.artifacts else ctpd_home() / "artifacts"
    # Where a run is tracked does not change what it trains: the run folder (and its checkpoints) stays put.
    run_dir = artifacts / "runs" / content_key(spec.model_dump(mode="json", exclude={"tracking"}))[:16]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"ctpd run: method {spec.method}, student {spec.student.model}"
          + (f", teacher {spec.teacher.model}" if spec.teacher else "") + f", device {device}, run folder {run_dir}")
    tracker = start_local_tracking(spec, run_dir.name, artifacts)  # the spec's tracking.mlflow, if any
    context = RunContext(
        artifact_root=artifacts, run_dir=run_dir, model_cache=catalog_cache(), device=device,
        observer=_ConsoleObserver() if tracker is None else FanOut(_ConsoleObserver(), tracker),
    )
    outcome, export_dir = "failed", None
    try:
        result = run_spec(spec, context)
        outcome, export_dir = ("succeeded" if result.status == "succeeded" else "cancelled"), result.export_dir
    finally:
        if tracker is not None:
            tracker.finish(outcome, export_dir=export_dir)
    print(_result_table(result))
    return 0 if result.status == "succeeded" else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    """The memory plan of a spec (ctpd_core.memory_plan): per stage, per GPU, against one GPU's memory. Exit 1
    when a stage does not fit (the service would refuse the job), 0 otherwise."""
    from app.preflight import model_shapes
    from ctpd_core.memory_plan import GiB, plan_job
    from ctpd_core.spec import load_spec

    spec = load_spec(args.spec, args.set)
    gb = args.gpu_memory_gb if args.gpu_memory_gb is not None else float(os.environ.get("CTPD_GPU_MEMORY_GB") or 80)
    source = "--gpu-memory-gb" if args.gpu_memory_gb is not None else f"CTPD_GPU_MEMORY_GB={gb:g}"
    plan = plan_job(spec, model_shapes(spec), gpu_memory_bytes=int(gb * GiB) if gb > 0 else None,
                    gpu_source=source if gb > 0 else "a CPU run: no GPU budget")
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.to_text())
    return 0 if plan.fits else 1


def _result_table(result) -> str:
    lines = ["", "evaluation (held-out pairs)", "-" * 44]
    for name, value in result.metrics.items():
        lines.append(f"{name:<34}{value:>10.4f}" if isinstance(value, float) else f"{name:<34}{value:>10}")
    lines += ["", "stage wall times", "-" * 44]
    for stage, seconds in result.stage_seconds.items():
        cached = " (cached)" if stage in result.cached_stages else ""
        lines.append(f"{stage:<34}{seconds:>9.1f}s{cached}")
    lines += ["", f"status: {result.status}", f"model: {result.export_dir}"]
    return "\n".join(lines)


def _cmd_models(args: argparse.Namespace) -> int:
    from ctpd_core.models import CATALOG, resolve_model_folder

    if args.models_command == "list":
        for entry in CATALOG.values():
            cached = (catalog_cache() / entry.name / "model" / "config.json").exists()
            print(f"{entry.name:<24} {entry.description}")
            print(f"{'':<24} tokenizer: {entry.tokenizer_kind}; licence: {entry.license}")
            print(f"{'':<24} package: {entry.install}; converted: {'yes' if cached else 'no (first use converts it)'}")
        return 0
    if args.name not in CATALOG:
        raise ValueError(f"{args.name!r} is not in the catalog; `ctpd models list` shows the names")
    folder = resolve_model_folder(args.name, cache_dir=catalog_cache())
    print(f"{args.name}: {folder}")
    return 0


# ------------------------------------------------------------------------------------------- the service
# These commands import only the control plane (app/) unless they run a worker, so they also work in the
# API image, which carries no torch.


def _service_settings():
    from app.settings import get_settings

    return get_settings()


def _cmd_db(args: argparse.Namespace) -> int:
    from app.db.engine import Database
    from ctpd_cli.embedded import redacted_url

    settings = _service_settings()
    db = Database(settings.database_url)
    try:
        db.upgrade()
    finally:
        db.dispose()
    print(f"database {redacted_url(settings.database_url)}: migrated to the latest revision")
    return 0


def _keys_are_remote(args: argparse.Namespace) -> bool:
    """``ctpd keys`` goes through the API (``/v1/api-keys``, an admin key) when a service is named: ``--url`` or
    ``--key``, or ``$CTPD_URL``; otherwise, and always with ``--database``, it works in the service database
    (``CTPD_DATABASE_URL``), the operator's bootstrap before any key exists. ``$CTPD_HOME/url`` alone does not
    switch: on the machine ``ctpd up`` runs on, both paths reach the same keys."""
    if args.database:
        if args.url or args.key:
            raise ValueError("--database works in the service database directly; leave out --url and --key")
        return False
    return bool(args.url or args.key or os.environ.get("CTPD_URL"))


def _cmd_keys(args: argparse.Namespace) -> int:
    """API keys: through the API with an admin key, or straight in the service database (the operator's side)."""
    if _keys_are_remote(args):
        from ctpd_cli.remote import cmd_keys_remote

        try:
            return cmd_keys_remote(args)
        except ValueError as error:  # no key to reach the service with: the other path may be what was meant
            raise ValueError(f"{error}; or add --database to work in the service database (CTPD_DATABASE_URL)"
                             ) from error
    from app.db import auth as key_rows
    from app.db.engine import Database

    settings = _service_settings()
    db = Database(settings.database_url)
    try:
        if args.keys_command == "create":
            key = key_rows.create_api_key(db, args.tenant, args.name or "cli", is_admin=args.admin)
            print(key)
            print(f"(tenant {args.tenant}{', admin' if args.admin else ''}; shown once, stored only as a hash)",
                  file=sys.stderr)
        elif args.keys_command == "list":
            rows = key_rows.list_api_keys(db, args.tenant)
            if args.json:
                print(json.dumps({"object": "list", "data": [_key_object(row) for row in rows], "has_more": False},
                                 indent=2))
            else:
                print(_key_table(rows))
        else:
            if not key_rows.revoke_api_key(db, args.key_id):
                row = key_rows.get_api_key(db, args.key_id)
                if row is None:
                    raise ValueError(f"no API key {args.key_id!r}; `ctpd keys list` shows their ids")
                print(f"{args.key_id} was already revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
                return 0
            print(f"revoked {args.key_id}: it is refused from the next request on")
    finally:
        db.dispose()
    return 0


def _key_object(row) -> dict[str, Any]:
    """A key row as the API's key object (``/v1/api-keys``), so both paths print the same table and JSON."""
    return {"object": "api_key", "id": row.id, "tenant": row.tenant, "name": row.name, "prefix": row.prefix,
            "is_admin": row.is_admin, "created_at": row.created_at.isoformat(),
            "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None}


def _key_table(rows) -> str:
    from ctpd_cli.remote import key_table

    return key_table(_key_object(row) for row in rows)


def _cmd_serve(args: argparse.Namespace) -> int:
    from app.main import serve  # uvicorn on app.main:create_app(get_settings()), logging configured

    serve(_service_settings(), host=args.host, port=args.port, log_level=args.log_level.upper())
    return 0


WORKER_QUEUES = tuple(QueueName)


def _cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker: concurrency 1, a fresh child per job, on the GPUs ``CUDA_VISIBLE_DEVICES`` lists (one per
    GPU host or per range of its GPUs: a multi-GPU job runs one torch.distributed rank on each; docs/deploy.md)."""
    from worker.celery_app import create_celery

    queues = [name.strip() for name in args.queues.split(",") if name.strip()]
    unknown = sorted(set(queues) - set(WORKER_QUEUES))
    if not queues or unknown:
        raise ValueError(f"--queues {args.queues!r}: use a comma-separated subset of {','.join(WORKER_QUEUES)}")
    settings = _service_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    tag = f"gpu{devices.replace(',', '-')}" if devices else "worker"
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        "--concurrency=1",
        f"--hostname={args.hostname or f'ctpd-{tag}@%h'}",
        f"--loglevel={args.log_level.upper()}",
    ]
    if args.beat:
        argv += ["--beat", f"--schedule={settings.home / 'celerybeat-schedule'}"]
    create_celery(settings).worker_main(argv)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    """The embedded service: SQLite state, Celery's SQLAlchemy transport, the API, a job worker and a light one (with beat)."""
    from ctpd_cli.embedded import run_embedded

    return run_embedded(_service_settings(), host=args.host, port=args.port, start_timeout=args.start_timeout,
                        stop_timeout=args.stop_timeout)


def build_parser() -> argparse.ArgumentParser:
    # argparse and the vocabulary only: the HTTP client is imported when a remote command runs
    from ctpd_cli import remote

    parser = argparse.ArgumentParser(prog="ctpd", description="Cross-Tokenizer Preference Distillation")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--log-format", choices=["auto", "json", "text"],
                        help="log lines as JSON objects or text (default $CTPD_LOG_FORMAT, else auto: text at a "
                        "terminal, JSON otherwise); the service commands (serve, worker, up) pass it on")
    commands = parser.add_subparsers(dest="command", required=True)

    align = commands.add_parser(
        "align",
        help="show the aligned spans of a text under a student and a teacher tokenizer",
        description="TOK is a catalog model name (see `ctpd models list`), a Hugging Face folder or a tokenizer.json.",
    )
    align.add_argument("--student", required=True, metavar="TOK")
    align.add_argument("--teacher", required=True, metavar="TOK")
    align.add_argument("--json", action="store_true", help="print the alignment as one JSON document")
    align.add_argument("text", nargs="?", help="the response text ('-' or nothing: read standard input)")
    align.set_defaults(handler=_cmd_align)

    run = commands.add_parser("run", help="run a whole distillation job locally, in this process")
    run.add_argument("spec", help="a job spec, YAML or JSON (see examples/)")
    run.add_argument("--artifacts", help="artifact root (default: $CTPD_HOME/artifacts)")
    run.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec field, e.g. --set method=dpo --set training.max_steps=4 (repeatable)",
    )
    run.set_defaults(handler=_cmd_run)

    plan = commands.add_parser(
        "plan", help="will a job fit its GPUs? the memory plan of a spec, stage by stage",
        description="Estimates each GPU stage's peak memory per GPU (weights, gradients, AdamW state, activations, "
        "log-prob chunks, frozen models) and the strategy auto picks; for a stage that does not fit, the fixes "
        "that do. The service runs the same plan at submission. Exit status 1 when a stage does not fit.",
    )
    plan.add_argument("spec", help="a job spec, YAML or JSON")
    plan.add_argument("--gpu-memory-gb", type=float, metavar="GIB",
                      help="one GPU's memory in GiB (nvidia-smi's memory.total / 1024; default $CTPD_GPU_MEMORY_GB, "
                      "else 80; 0: a CPU run, nothing to check against)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    plan.set_defaults(handler=_cmd_plan)

    models = commands.add_parser("models", help="the catalog of packaged models")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="list the catalog")
    model_import = models_commands.add_parser("import", help="convert a catalog model now (otherwise its first use does)")
    model_import.add_argument("name")
    models.set_defaults(handler=_cmd_models)

    db = commands.add_parser("db", help="the service database")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="run the migrations (CTPD_DATABASE_URL; default SQLite under CTPD_HOME)")
    db.set_defaults(handler=_cmd_db)

    keys = commands.add_parser("keys", help="API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    keys_create = keys_commands.add_parser("create", help="create a key and print it (shown once)")
    keys_create.add_argument("--tenant", required=True, help="the tenant the key belongs to")
    keys_create.add_argument("--name", help="a label for the key (default: cli)")
    keys_create.add_argument("--admin", action="store_true", help="an admin key")
    keys_list = keys_commands.add_parser("list", help="list the keys (ids, tenants, prefixes; never the keys)")
    keys_list.add_argument("--tenant", help="only this tenant's keys")
    keys_revoke = keys_commands.add_parser("revoke", help="revoke a key: it is refused from the next request on")
    keys_revoke.add_argument("key_id", help="the key's id (key_...), from `ctpd keys list`")
    keys_list.add_argument("--json", action="store_true", help="print the key objects as JSON")
    for keys_parser in (keys_create, keys_list, keys_revoke):
        # Remote through /v1/api-keys (an admin key) when a service is named; else in the service database.
        remote.add_connection_flags(keys_parser)
        keys_parser.add_argument("--database", action="store_true",
                                 help="work in the service database (CTPD_DATABASE_URL) even when CTPD_URL is set")
    keys.set_defaults(handler=_cmd_keys)

    serve = commands.add_parser("serve", help="the API server (uvicorn on app.main:create_app)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in a container)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_cmd_serve)

    worker = commands.add_parser(
        "worker",
        help="a Celery worker: one per GPU host (or per range of its GPUs) with CUDA_VISIBLE_DEVICES",
        description="A Celery worker with concurrency 1 and a fresh process per job, on --queues train. It owns "
        "the GPUs CUDA_VISIBLE_DEVICES lists (e.g. 0-3 as 0,1,2,3) and runs one job at a time on them: a job with "
        "training.devices N > 1 runs N torch.distributed ranks, one per GPU (docs/deploy.md). Run exactly one "
        "worker with --beat (the reaper's "
        "clock), e.g. a CPU worker on --queues default.",
    )
    worker.add_argument("--queues", default=",".join(WORKER_QUEUES), help="comma-separated: train, default (default both)")
    worker.add_argument("--beat", action="store_true", help="also run beat (the reaper every 30 s); one per deployment")
    worker.add_argument("--hostname", help="the Celery node name (default ctpd-gpu<CUDA_VISIBLE_DEVICES>@<host>)")
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(handler=_cmd_worker)

    submit = commands.add_parser("submit", help="submit a job to a running service (optionally follow it live)")
    submit.add_argument("spec", help="a job spec, YAML or JSON")
    remote.add_connection_flags(submit)
    submit.add_argument("--upload", metavar="FILE",
                        help="upload this dataset first and use it as dataset.id (the spec's dataset.validation_path, "
                        "if any, is uploaded too and used as dataset.validation_id)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    submit.add_argument("--idempotency-key", help="a retried submit with the same key returns the same job "
                        "(default: a fresh one per command, so the client's own retries never make two jobs)")
    submit.add_argument("--follow", action="store_true",
                        help="a progress bar per stage, the loss and the job's ETA until it ends (Ctrl-C stops "
                        "following; the job keeps running)")
    submit.add_argument("--dry-run", action="store_true",
                        help="queue nothing: print the preflight report (errors and warnings with their fixes, "
                        "tokenizers, alignment and truncation on a sample, steps, memory, duration); exit 1 if it has "
                        "errors, 3 if no worker answered within --wait")
    submit.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                        help="--dry-run: how long to poll a pending report (default 300)")
    submit.add_argument("--json", action="store_true", help="--dry-run: print the report object as JSON")
    remote.add_follow_flags(submit)
    submit.set_defaults(handler=remote.cmd_submit)
    remote.add_commands(commands)

    up = commands.add_parser(
        "up",
        help="the embedded service: API + workers, SQLite state and broker under CTPD_HOME",
        description="Runs the migrations, creates an admin key on first start (stored in $CTPD_HOME/api-key), "
        "starts the API, a worker for jobs and a light one for everything else (with beat: the reaper, checkpoint "
        "models, preflights) as child processes, and stops them on Ctrl-C or SIGTERM.",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for /readyz (default 120)")
    up.add_argument("--stop-timeout", type=float, default=90.0,
                    help="seconds a running job gets to hand itself back on stop before it is killed (default 90)")
    up.set_defaults(handler=_cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_format:  # the flag wins over CTPD_LOG_FORMAT, for the service settings and `ctpd up`'s children too
        os.environ["CTPD_LOG_FORMAT"] = args.log_format
    from ctpd_core.logs import configure_logging

    configure_logging(os.environ.get("CTPD_LOG_FORMAT") or "auto", logging.INFO if args.verbose else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args)
    except ValueError as error:
        # The user errors: ModelLoadError, AlignmentError, TokenizerOffsetsError, DatasetError and pydantic's
        # ValidationError are all ValueErrors. Not importing them keeps the service commands torch-free.
        print(f"ctpd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the shell's exit code for SIGINT, without a traceback
        print(f"\nctpd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
