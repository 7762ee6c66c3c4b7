"""The ``ctpd`` command. Each subcommand imports only what it needs, so ``ctpd --help`` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

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
        self.bar = None
        self.stage = None

    def stage_started(self, stage: str, cached: bool) -> None:
        self.stage = stage
        if cached:
            print(f"[{stage}] cached: reusing the stored output")

    def progress(self, progress) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.desc != progress.stage:
            self._close()
            self.bar = tqdm(total=progress.total, desc=progress.stage, unit="step", dynamic_ncols=True, leave=True)
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
    from ctpd_core.spec import load_spec
    from worker.recipe import RunContext, run_spec

    spec = load_spec(args.spec, args.set)
    artifacts = Path(args.artifacts) if args.artifacts else ctpd_home() / "artifacts"
    run_dir = artifacts / "runs" / content_key(spec.model_dump(mode="json"))[:16]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"ctpd run: method {spec.method}, student {spec.student.model}"
          + (f", teacher {spec.teacher.model}" if spec.teacher else "") + f", device {device}, run folder {run_dir}")
    context = RunContext(
        artifact_root=artifacts, run_dir=run_dir, model_cache=catalog_cache(), device=device,
        observer=_ConsoleObserver(),
    )
    result = run_spec(spec, context)
    print(_result_table(result))
    return 0 if result.status == "succeeded" else 1


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


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # a URL SQLAlchemy cannot parse: show it without credentials
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}" if "@" in rest else url


def _cmd_db(args: argparse.Namespace) -> int:
    from app.db.engine import Database

    settings = _service_settings()
    db = Database(settings.database_url)
    try:
        db.upgrade()
    finally:
        db.dispose()
    print(f"database {_redacted(settings.database_url)}: migrated to the latest revision")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    """API keys, straight in the service database (the operator's side; admins use /v1/api-keys remotely)."""
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
            print(_key_table(key_rows.list_api_keys(db, args.tenant)))
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


def _key_table(rows) -> str:
    """The keys as a table; the key itself is never stored, so only its prefix can be shown."""
    lines = [("id", "tenant", "name", "prefix", "admin", "created (UTC)", "revoked (UTC)")]
    for row in rows:
        revoked = f"{row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "-"
        lines.append((row.id, row.tenant, row.name, row.prefix + "...", "yes" if row.is_admin else "no",
                      f"{row.created_at:%Y-%m-%d %H:%M}", revoked))
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _cmd_serve(args: argparse.Namespace) -> int:
    from app.main import serve  # uvicorn on app.main:create_app(get_settings()), logging configured

    serve(_service_settings(), host=args.host, port=args.port, log_level=args.log_level.upper())
    return 0


WORKER_QUEUES = ("train", "default")


def _cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker: one per GPU (``CUDA_VISIBLE_DEVICES=i``), concurrency 1, a fresh child per job."""
    from worker.celery_app import create_celery

    queues = [name.strip() for name in args.queues.split(",") if name.strip()]
    unknown = sorted(set(queues) - set(WORKER_QUEUES))
    if not queues or unknown:
        raise ValueError(f"--queues {args.queues!r}: use a comma-separated subset of {','.join(WORKER_QUEUES)}")
    settings = _service_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices and "," in devices and "train" in queues:
        logger.warning("CUDA_VISIBLE_DEVICES=%s lists several GPUs; a worker trains on the first one only: "
                       "start one `ctpd worker` per GPU, each with CUDA_VISIBLE_DEVICES=<index>", devices)
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


def _die_with_parent(signum: int):
    """A preexec_fn: the child gets ``signum`` when ``ctpd up`` dies, even by SIGKILL (Linux only)."""

    def set_death_signal() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG

    return set_death_signal


class _Child:
    """A service process of ``ctpd up``, in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str], death_signal: int) -> None:
        import subprocess

        self.name, self.log_path = name, log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with_parent(death_signal),
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def terminate(self) -> None:
        import signal

        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the child's process group (a worker's pool process, beat)."""
        import contextlib
        import signal

        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _ensure_api_key(db, key_file: Path) -> tuple[str, bool]:
    """The admin key of the embedded service: the stored one if it still authenticates, else a new one."""
    from app.db.auth import authenticate, create_api_key

    if key_file.exists():
        stored = key_file.read_text().strip()
        if stored and authenticate(db, stored) is not None:
            return stored, False
    key = create_api_key(db, "default", "ctpd up", is_admin=True)
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, (key + "\n").encode())
    finally:
        os.close(descriptor)
    return key, True


def _prepare_broker(settings) -> None:
    """Declare the queues before the API and the worker start (``worker.celery_app.declare_queues``); nothing
    consumes while ``ctpd up`` starts (it holds the home's lock), so delivered messages are purged too."""
    from worker.celery_app import declare_queues

    declare_queues(settings, purge_delivered=True)


def _requeue_orphans(db, settings) -> list[str]:
    """Embedded mode owns its SQLite database, so a job still ``running`` at start was left by a previous
    ``ctpd up`` that died: requeue it now (it resumes from its checkpoints) instead of after its lease."""
    from datetime import timedelta

    from app.db.jobs import reap_stale_jobs
    from app.db.models import utcnow
    from app.queue import CeleryTaskQueue

    job_ids = reap_stale_jobs(db, now=utcnow() + timedelta(seconds=settings.lease_seconds + 1))
    if job_ids:
        queue = CeleryTaskQueue(settings.broker_url)
        try:
            for job_id in job_ids:
                queue.enqueue_job(job_id)
        finally:
            queue.close()
    return job_ids


def _wait_ready(url: str, children: list[_Child], stop, timeout: float) -> bool:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        for child in children:
            if not child.alive():
                raise RuntimeError(f"the {child.name} exited during start-up (code {child.process.returncode}); "
                                   f"its log {child.log_path} ends with:\n{child.tail()}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(0.5)
    return False


def _stop_children(children: list[_Child], grace: float) -> None:
    """SIGTERM (uvicorn: graceful; Celery: warm shutdown, in which a running job checkpoints and hands itself
    back) and, after ``grace`` seconds, SIGKILL to each child's whole process group. A job killed here stays
    ``running`` in SQL and is requeued by the next ``ctpd up``, resuming from its last checkpoint."""
    import subprocess
    import time

    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"ctpd up: the {child.name} did not stop within {grace:g} s; killing it", file=sys.stderr)
        child.kill_group()


API_RESTARTS, API_RESTART_WINDOW_SECONDS = 5, 300.0


def _may_restart(restarts: list[float]) -> bool:
    """At most API_RESTARTS restarts within API_RESTART_WINDOW_SECONDS: a crash loop stops ``ctpd up``."""
    import time

    now = time.monotonic()
    restarts[:] = [at for at in restarts if now - at < API_RESTART_WINDOW_SECONDS]
    if len(restarts) >= API_RESTARTS:
        return False
    restarts.append(now)
    return True


def _cmd_up(args: argparse.Namespace) -> int:
    """The embedded service: SQLite state, Celery's SQLAlchemy transport, the API and one worker (with beat)."""
    import fcntl
    import signal
    import threading

    from app.db.engine import Database

    settings = _service_settings()
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    lock = open(home / "up.lock", "w")  # noqa: SIM115 (held for the life of the command)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        raise ValueError(f"another `ctpd up` is already running on CTPD_HOME={home}; stop it first") from error

    db = Database(settings.database_url)
    try:
        db.upgrade()
        key, created = _ensure_api_key(db, home / "api-key")
        _prepare_broker(settings)
        orphans = _requeue_orphans(db, settings) if db.is_sqlite else []
    finally:
        db.dispose()
    if orphans:
        print(f"requeued {len(orphans)} job(s) left running by a previous start: {', '.join(orphans)}")

    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "CTPD_HOME": str(home),
        "CTPD_DATABASE_URL": settings.database_url,
        "CTPD_BROKER_URL": settings.broker_url,
        "CTPD_ARTIFACT_ROOT": str(settings.artifact_root),
        "CTPD_MODEL_CACHE": str(settings.model_cache),
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
        # One user who owns the machine: their own files are fair game (a multi-tenant deployment keeps the
        # safe default, off). An explicit CTPD_ALLOW_SERVER_PATHS still wins.
        "CTPD_ALLOW_SERVER_PATHS": os.environ.get("CTPD_ALLOW_SERVER_PATHS", "true"),
    }
    command = [sys.executable, "-m", "ctpd_cli.main"]
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    api_argv = [*command, "serve", "--host", args.host, "--port", str(args.port)]
    children = [
        _Child("API", api_argv, logs / "api.log", env, signal.SIGTERM),
        # SIGTERM (a warm shutdown) also if ctpd up dies: the running job checkpoints and hands itself back
        # within CTPD_SHUTDOWN_GRACE_SECONDS (worker/tasks.py), so the next start resumes it.
        _Child("worker", [*command, "worker", "--queues", "train,default", "--beat"], logs / "worker.log", env,
               signal.SIGTERM),
    ]
    api_restarts: list[float] = []
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    url = f"http://{host}:{args.port}"
    code = 0
    try:
        if not _wait_ready(url, children, stop, args.start_timeout):
            if stop.is_set():
                return 130
            raise RuntimeError(f"the API did not answer {url}/readyz within {args.start_timeout:g} s; "
                               f"see {children[0].log_path}:\n{children[0].tail()}")
        print(f"ctpd is up at {url} (OpenAPI: {url}/docs)")
        if created:
            print(f"admin API key (shown once; stored in {home / 'api-key'}, mode 0600):\n  {key}")
        else:
            print(f"admin API key: in {home / 'api-key'}")
        print(f"state {_redacted(settings.database_url)}, broker {_redacted(settings.broker_url)}, "
              f"artifacts {settings.artifact_root}")
        print(f"logs: {logs / 'api.log'}, {logs / 'worker.log'}. Ctrl-C stops.", flush=True)
        while not stop.wait(0.5):
            if not children[0].alive() and children[1].alive() and _may_restart(api_restarts):
                # The API died (OOM, a crash): the worker's running job is not its business. Start a new API
                # beside it instead of stopping everything.
                print(f"ctpd up: the API exited (code {children[0].process.returncode}); restarting it "
                      f"({len(api_restarts)} of {API_RESTARTS} in {API_RESTART_WINDOW_SECONDS:g} s). "
                      f"{children[0].log_path} ends with:\n{children[0].tail()}", file=sys.stderr, flush=True)
                children[0].kill_group()
                children[0] = _Child("API", api_argv, logs / "api.log", env, signal.SIGTERM)
                continue
            dead = [child for child in children if not child.alive()]
            if dead:
                child = dead[0]
                print(f"ctpd up: the {child.name} exited (code {child.process.returncode}); stopping. "
                      f"{child.log_path} ends with:\n{child.tail()}", file=sys.stderr)
                code = 1
                break
    finally:
        print("ctpd up: stopping", flush=True)
        _stop_children(children, args.stop_timeout)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        lock.close()
    print("ctpd up: stopped", flush=True)
    return code


def _service_key(args: argparse.Namespace) -> str:
    if args.key:
        return args.key
    if os.environ.get("CTPD_API_KEY"):
        return os.environ["CTPD_API_KEY"]
    key_file = ctpd_home() / "api-key"
    if key_file.exists():
        return key_file.read_text().strip()
    raise ValueError(f"no API key: pass --key, set CTPD_API_KEY, or start `ctpd up` (it writes {key_file})")


def _upload_datasets(client, train_file: Path, dataset: dict) -> dict:
    """``dataset`` with the uploaded ``train_file`` as ``id`` and, when the spec names a ``validation_path``, that
    file uploaded too as ``validation_id``: a service reads uploads, not the paths of the submitting machine."""
    uploaded = client.upload_dataset(train_file)
    print(f"uploaded {train_file}: dataset {uploaded['id']} ({uploaded.get('num_rows')} rows)")
    kept = {key: value for key, value in dataset.items() if key not in ("path", "validation_path")}
    resolved = {**kept, "id": uploaded["id"]}
    validation_path = dataset.get("validation_path")
    if validation_path:
        validation = client.upload_dataset(Path(validation_path))
        print(f"uploaded {validation_path}: validation dataset {validation['id']} ({validation.get('num_rows')} rows)")
        resolved["validation_id"] = validation["id"]
    return resolved


def _cmd_submit(args: argparse.Namespace) -> int:
    from ctpd_cli.client import Client, ServiceError, evaluation_table, follow
    from ctpd_core.spec import apply_overrides, read_spec_data

    client = Client(args.url, _service_key(args))
    spec = apply_overrides(read_spec_data(args.spec), args.set)
    try:
        if args.upload:
            spec["dataset"] = _upload_datasets(client, Path(args.upload), spec.get("dataset") or {})
        job = client.create_job(spec, idempotency_key=args.idempotency_key)
        print(f"submitted job {job['id']} ({job['status']})")
        if not args.follow:
            print(json.dumps(job, indent=2))
            return 0
        job = follow(client, job["id"])
        print(f"job {job['id']}: {job['status']}")
        if job["status"] == "failed":
            print(f"error: {job['error']['code']}: {job['error']['message']}", file=sys.stderr)
            return 1
        if job["status"] == "succeeded":
            print("evaluation (held-out pairs):")
            print(evaluation_table(client.metrics(job["id"])))
            model = job.get("model") or {}
            print(f"model folder: {model.get('id')}")
            print(f"download: {args.url.rstrip('/')}{model.get('download_url', '')}")
        return 0 if job["status"] == "succeeded" else 1
    except ServiceError as error:
        raise ValueError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctpd", description="Cross-Tokenizer Preference Distillation")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
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
    keys.set_defaults(handler=_cmd_keys)

    serve = commands.add_parser("serve", help="the API server (uvicorn on app.main:create_app)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in a container)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_cmd_serve)

    worker = commands.add_parser(
        "worker",
        help="a Celery worker: run one per GPU with CUDA_VISIBLE_DEVICES=<index>",
        description="A Celery worker with concurrency 1 and a fresh process per job. Start one per GPU, each "
        "with CUDA_VISIBLE_DEVICES=<index>, on --queues train; run exactly one worker with --beat (the reaper's "
        "clock), e.g. a CPU worker on --queues default.",
    )
    worker.add_argument("--queues", default="train,default", help="comma-separated: train, default (default both)")
    worker.add_argument("--beat", action="store_true", help="also run beat (the reaper every 30 s); one per deployment")
    worker.add_argument("--hostname", help="the Celery node name (default ctpd-gpu<CUDA_VISIBLE_DEVICES>@<host>)")
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(handler=_cmd_worker)

    submit = commands.add_parser("submit", help="submit a job to a running service (optionally follow it live)")
    submit.add_argument("spec", help="a job spec, YAML or JSON")
    submit.add_argument("--url", default=os.environ.get("CTPD_URL", "http://127.0.0.1:8000"))
    submit.add_argument("--key", help="API key (default: $CTPD_API_KEY or $CTPD_HOME/api-key)")
    submit.add_argument("--upload", metavar="FILE",
                        help="upload this dataset first and use it as dataset.id (the spec's dataset.validation_path, "
                        "if any, is uploaded too and used as dataset.validation_id)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    submit.add_argument("--idempotency-key")
    submit.add_argument("--follow", action="store_true", help="print events and progress until the job ends")
    submit.set_defaults(handler=_cmd_submit)

    up = commands.add_parser(
        "up",
        help="the embedded service: API + one worker, SQLite state and broker under CTPD_HOME",
        description="Runs the migrations, creates an admin key on first start (stored in $CTPD_HOME/api-key), "
        "starts the API and one worker (with beat) as child processes, and stops both on Ctrl-C or SIGTERM.",
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
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args)
    except ValueError as error:
        # The user errors: ModelLoadError, AlignmentError, TokenizerOffsetsError, DatasetError and pydantic's
        # ValidationError are all ValueErrors. Not importing them keeps the service commands torch-free.
        print(f"ctpd {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
