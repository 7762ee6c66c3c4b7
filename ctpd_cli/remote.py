"""The ``ctpd`` commands that are clients of a running service: ``submit``, ``jobs``, ``datasets``, ``webhooks``
and the remote side of ``keys``.

Each one resolves the service and the key in one place (:func:`ctpd_cli.client.resolve_connection`: ``--url`` /
``--key``, ``CTPD_URL`` / ``CTPD_API_KEY``, ``$CTPD_HOME/url`` / ``$CTPD_HOME/api-key``), prints a table for
people and, with ``--json``, the service's own JSON for scripts. Exit codes: 0 done, 1 the service refused or
could not be reached (or a followed job did not succeed), 2 a usage error, 130 interrupted (Ctrl-C: a followed
job keeps running, and the message says how to cancel it).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ctpd_core.vocab import JobStatus

Handler = Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------------------------- plumbing


def connection(args: argparse.Namespace) -> Any:
    from ctpd_cli.client import resolve_connection

    return resolve_connection(getattr(args, "url", None), getattr(args, "key", None))


def open_client(args: argparse.Namespace) -> Any:
    from ctpd_cli.client import Client

    return Client.from_connection(connection(args))


def remote_command(handler: Callable[[argparse.Namespace, Any], int]) -> Handler:
    """A command body ``handler(args, client)``: the client is opened and closed around it, a service error is
    printed as the service said it (exit 1), a Ctrl-C ends quietly (exit 130)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from ctpd_cli.client import ServiceError

        try:
            with open_client(args) as client:
                return handler(args, client)
        except ServiceError as error:
            print(f"ctpd {args.command}: error: {error}{_hint(error, args)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"\nctpd {args.command}: interrupted", file=sys.stderr)
            return 130

    return run


def _hint(error: Any, args: argparse.Namespace) -> str:
    database = "; on the service's machine, --database works in its database instead" if args.command == "keys" else ""
    if error.status == 401:
        where = connection(args)
        return f" (the key came from {where.key_source}; pass --key or set CTPD_API_KEY{database})"
    if error.status == 403 and error.code == "admin_required":
        return f" (this command needs an admin key{database})"
    return ""


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart; None shows as ``-``."""
    lines = [list(headers)] + [["-" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def when(value: str | None) -> str | None:
    """An API timestamp as ``2026-12-02 02:15:07`` (UTC, as the service writes them)."""
    if not value:
        return None
    return value.replace("T", " ")[:19]


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the service (default: $CTPD_URL, $CTPD_HOME/url, http://127.0.0.1:8000)")
    parser.add_argument("--key", help="API key (default: $CTPD_API_KEY, then $CTPD_HOME/api-key)")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the service's JSON instead of a table")


def _cancel_hint(args: argparse.Namespace, job_id: str) -> str:
    flags = f" --url {args.url}" if getattr(args, "url", None) else ""
    return f"ctpd jobs cancel {job_id}{flags}"


# ------------------------------------------------------------------------------------------------- follow


def follow_job(args: argparse.Namespace, client: Any, job: Mapping[str, Any]) -> int:
    """Draw the job until it ends and print its outcome: exit 0 if it succeeded, 1 if not, 130 on Ctrl-C (the
    job keeps running: the message says so and how to cancel it)."""
    from ctpd_cli.client import evaluation_table
    from ctpd_cli.follow import display_for, follow

    job_id = job["id"]
    try:
        final = follow(client, job_id, display_for(sys.stdout), poll_seconds=args.poll, job=job)
    except KeyboardInterrupt:
        print(f"\nstopped following job {job_id}: it keeps running on the service.\n"
              f"  to cancel it: {_cancel_hint(args, job_id)}", file=sys.stderr, flush=True)
        return 130
    print(f"job {job_id}: {final['status']}")
    if final["status"] == JobStatus.FAILED:
        error = final.get("error") or {}
        print(f"error: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    if final["status"] == JobStatus.SUCCEEDED:
        print("evaluation (held-out pairs):")
        print(evaluation_table(client.metrics(job_id)))
        model = final.get("model")
        if model:
            print(f"model: {model['id']} (use it as {{\"model\": \"{model['id']}\"}} in another job)")
            print(f"download: ctpd jobs download {job_id}  "
                  f"({client.url}{model.get('archive_url') or model['download_url']})")
        return 0
    return 1


def add_follow_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--poll", type=float, default=2.0, metavar="SECONDS", help="seconds between polls (default 2)")


# ------------------------------------------------------------------------------------------------- submit


def _upload_datasets(client: Any, train_file: Path, dataset: dict) -> dict:
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


EXIT_PREFLIGHT_PENDING = 3  # no worker answered within --wait: the report is incomplete


def _dry_run(args: argparse.Namespace, client: Any, spec: dict) -> int:
    """``submit --dry-run``: the preflight report (nothing is queued); polls while a worker's part is pending. Exit 0
    clean (warnings allowed), 1 with errors, 3 still pending after ``--wait`` seconds."""
    import contextlib

    from ctpd_cli.preflight_text import report_text

    if args.upload:  # the upload is stored (a dataset, not a job): the preflight reads it as the job would
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            spec["dataset"] = _upload_datasets(client, Path(args.upload), spec.get("dataset") or {})
    report = client.preflight(spec)
    deadline = time.monotonic() + args.wait
    if report["status"] == "pending":
        print(f"preflight {report['id']}: waiting for a worker's part (up to {args.wait:g} s)", file=sys.stderr)
    while report["status"] == "pending" and time.monotonic() < deadline:
        time.sleep(min(args.poll, max(0.0, deadline - time.monotonic())))
        report = client.get_preflight(report["id"])
    if args.json:
        print_json(report)
    else:
        print(report_text(report))
    if report["status"] == "pending":
        return EXIT_PREFLIGHT_PENDING
    return 1 if report["errors"] else 0


@remote_command
def cmd_submit(args: argparse.Namespace, client: Any) -> int:
    from ctpd_core.spec import apply_overrides, read_spec_data

    spec = apply_overrides(read_spec_data(args.spec), args.set)
    if args.dry_run:
        return _dry_run(args, client, spec)
    if args.upload:
        spec["dataset"] = _upload_datasets(client, Path(args.upload), spec.get("dataset") or {})
    job = client.create_job(spec, idempotency_key=args.idempotency_key)
    print(f"submitted job {job['id']} ({job['status']})")
    if not args.follow:
        print_json(job)
        return 0
    return follow_job(args, client, job)


# --------------------------------------------------------------------------------------------------- jobs


def _progress_cell(job: Mapping[str, Any]) -> str | None:
    from ctpd_cli.follow import substage_label

    if not job.get("stage"):
        return None
    progress = job.get("progress") or {}
    label = substage_label(job["stage"], progress.get("detail"))
    if progress.get("total") and job["status"] in (JobStatus.RUNNING, JobStatus.CANCELLING):
        return f"{label} {progress.get('step')}/{progress['total']}"
    return label


def _metadata_filters(pairs: Sequence[str]) -> dict[str, str]:
    filters = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--metadata {pair!r}: use KEY=VALUE, e.g. --metadata team=nlp")
        filters[name] = value
    return filters


@remote_command
def cmd_jobs_list(args: argparse.Namespace, client: Any) -> int:
    metadata = _metadata_filters(args.metadata)
    if args.all:
        jobs = list(client.iter_jobs(status=args.status, metadata=metadata))
        has_more = False
    else:
        page = client.list_jobs(status=args.status, limit=args.limit, metadata=metadata)
        jobs, has_more = page["data"], page["has_more"]
    if args.json:
        print_json({"object": "list", "data": jobs, "has_more": has_more})
        return 0
    print(table(("id", "status", "stage", "name", "created (UTC)", "finished (UTC)"),
                ((job["id"], job["status"], _progress_cell(job), job.get("name"), when(job["created_at"]),
                  when(job.get("finished_at"))) for job in jobs)))
    if has_more:
        print("(more jobs: --all lists every one, --limit up to 100 shows more per page)", file=sys.stderr)
    return 0


def _job_text(job: Mapping[str, Any]) -> str:
    progress = job.get("progress") or {}
    rows: list[tuple[str, Any]] = [
        ("id", job["id"]), ("status", job["status"]), ("name", job.get("name")),
        ("stage", _progress_cell(job)),
    ]
    if progress.get("eta_seconds") is not None and job["status"] == JobStatus.RUNNING:
        from ctpd_cli.follow import format_seconds

        rows.append(("stage ETA", format_seconds(progress["eta_seconds"])))
    spec = job.get("spec") or {}
    rows += [
        ("attempt", f"{job.get('attempt')} of {job.get('max_attempts')}"),
        ("method", spec.get("method")),
        ("teacher", (spec.get("teacher") or {}).get("model")),
        ("student", (spec.get("student") or {}).get("model")),
        ("metadata", ", ".join(f"{k}={v}" for k, v in (job.get("metadata") or {}).items()) or None),
        ("created", when(job.get("created_at"))), ("started", when(job.get("started_at"))),
        ("finished", when(job.get("finished_at"))),
    ]
    error = job.get("error")
    if error:
        rows.append(("error", f"{error.get('code')} ({error.get('kind')}): {error.get('message')}"))
    model = job.get("model")
    if model:
        rows += [("model", model.get("id")), ("download", f"ctpd jobs download {job['id']}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {'-' if value is None else value}" for name, value in rows)


@remote_command
def cmd_jobs_get(args: argparse.Namespace, client: Any) -> int:
    job = client.job(args.job_id)
    if args.json:
        print_json(job)
    else:
        print(_job_text(job))
    return 0


@remote_command
def cmd_jobs_cancel(args: argparse.Namespace, client: Any) -> int:
    job = client.cancel_job(args.job_id)
    if args.json:
        print_json(job)
    elif job["status"] == JobStatus.CANCELLING:
        print(f"job {job['id']}: cancelling (the worker checkpoints and stops at its next check; "
              f"`ctpd jobs follow {job['id']}` shows it end)")
    else:
        print(f"job {job['id']}: {job['status']}")
    return 0


def _event_text(event: Mapping[str, Any]) -> str:
    stage = f" [{event['stage']}]" if event.get("stage") else ""
    return f"{when(event['created_at'])}  {event['type']:<17}{stage} {event.get('message', '')}"


@remote_command
def cmd_jobs_events(args: argparse.Namespace, client: Any) -> int:
    """The job's events, oldest first; with ``--follow``, new ones as they come until the job ends."""
    import time

    from ctpd_core.vocab import TERMINAL_STATUSES

    after: int | None = args.after
    job_id = args.job_id
    try:
        while True:
            page = client.events(job_id, after, limit=1000)
            for event in page["data"]:
                after = event["id"]
                print(json.dumps(event, ensure_ascii=False) if args.json else _event_text(event), flush=True)
            if page["has_more"]:
                continue
            if not args.follow:
                return 0
            if client.job(job_id)["status"] in TERMINAL_STATUSES:
                # The last events are written with the final status: read them before stopping.
                if not client.events(job_id, after, limit=1)["data"]:
                    return 0
                continue
            time.sleep(args.poll)
    except KeyboardInterrupt:
        print(f"\nstopped following job {job_id}'s events: the job keeps running on the service.\n"
              f"  to cancel it: {_cancel_hint(args, job_id)}", file=sys.stderr, flush=True)
        return 130


@remote_command
def cmd_jobs_follow(args: argparse.Namespace, client: Any) -> int:
    return follow_job(args, client, client.job(args.job_id))


def _download_target(output: str | None, default_name: str) -> Path:
    """``-o``: an existing folder (or one named with a trailing /) gets ``default_name`` inside; anything else
    is the file to write. Nothing: ``default_name`` in the working directory."""
    if output is None:
        return Path(default_name)
    path = Path(output).expanduser()
    if path.is_dir() or output.endswith(("/", "\\")):
        return path / default_name
    return path


def _byte_progress(label: str) -> tuple[Callable[[int, int | None], None] | None, Callable[[], None]]:
    """A tqdm bar in bytes on a terminal, nothing elsewhere: ``(callback, close)``."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


@remote_command
def cmd_jobs_download(args: argparse.Namespace, client: Any) -> int:
    """The exported model of a succeeded job: the archive (the plain tar of ``model.archive_url``, or the tar.gz of
    ``model.download_url`` from a service without it), or with ``--file`` one file of the folder. Resumable: run the
    same command again after an interruption and it continues the ``.part`` file."""
    from urllib.parse import quote

    job_id = args.job_id
    if args.checkpoint and args.file:
        raise ValueError("--checkpoint and --file: pick one (a checkpoint's model comes as one archive)")
    if args.checkpoint:
        path, name = _checkpoint_archive(client, job_id, args.checkpoint, wait_seconds=args.wait)
        target = _download_target(args.output, name)
    elif args.file:
        relative = args.file.strip("/")
        if not relative or ".." in relative.split("/"):
            raise ValueError(f"--file {args.file!r}: name a file of the exported folder, e.g. config.json "
                             f"(`ctpd jobs get {job_id} --json` and GET /v1/jobs/{job_id}/artifacts list them)")
        path = f"/v1/jobs/{job_id}/model/files/{quote(relative)}"
        target = _download_target(args.output, relative.rsplit("/", 1)[-1])
    else:
        job = client.job(job_id)
        if job["status"] != JobStatus.SUCCEEDED:
            raise ValueError(f"job {job_id} is {job['status']}; its model can be downloaded once it has succeeded")
        model = job.get("model") or {}
        if model.get("archive_url"):  # the plain tar, which resumes with Range
            path, name = model["archive_url"], f"{job_id}-model.tar"
        else:  # a service without it: the tar.gz, which starts over after an interruption
            path, name = model.get("download_url") or f"/v1/jobs/{job_id}/artifacts/model.tar.gz", f"{job_id}-model.tar.gz"
        target = _download_target(args.output, name)
    progress, close = _byte_progress(target.name)
    try:
        written = client.download(path, target, progress=progress)
    finally:
        close()
    print(f"downloaded {written} ({written.stat().st_size} bytes)")
    return 0


def _checkpoint_archive(client: Any, job_id: str, checkpoint_id: str, *, wait_seconds: float,
                        poll_seconds: float = 2.0) -> tuple[str, str]:
    """The tar of a checkpoint's model folder: asked for if it has none (a worker builds it on the default
    queue), then waited for up to ``wait_seconds``. Returns (its URL, a file name)."""
    checkpoint = client.checkpoint(job_id, checkpoint_id)
    if checkpoint["model"]["status"] != "ready":
        checkpoint = client.build_checkpoint_model(job_id, checkpoint_id)
        print(f"checkpoint {checkpoint_id}: a worker is making it a model folder (waiting up to {wait_seconds:.0f} s)",
              file=sys.stderr)
    deadline = time.monotonic() + wait_seconds
    while checkpoint["model"]["status"] != "ready":
        if checkpoint["model"]["status"] == "failed":
            raise ValueError(f"checkpoint {checkpoint_id} of job {job_id} could not be made a model folder: "
                             f"{checkpoint['model'].get('error')}; fix that, then run the command again")
        if time.monotonic() > deadline:
            raise ValueError(f"checkpoint {checkpoint_id} of job {job_id} is still being built after {wait_seconds:.0f} s "
                             "(a busy worker on the default queue?); run the command again later, or pass --wait")
        time.sleep(poll_seconds)
        checkpoint = client.checkpoint(job_id, checkpoint_id)
    return checkpoint["model"]["archive_url"], f"{job_id}-{checkpoint_id}.tar"


@remote_command
def cmd_jobs_checkpoints(args: argparse.Namespace, client: Any) -> int:
    listing = client.checkpoints(args.job_id)
    if args.json:
        print_json(listing)
        return 0
    rows = [(c["id"], c["step"], c["size_bytes"], _metric(c["metrics"], "loss"),
             _metric(c["metrics"], "reward_accuracy"), c["model"]["status"], when(c["created_at"]))
            for c in listing["data"]]
    print(table(("id", "step", "bytes", "loss", "reward acc.", "model", "saved (UTC)"), rows))
    if rows:
        print(f"\nas a model folder: ctpd jobs download {args.job_id} --checkpoint {rows[-1][0]}")
    return 0


def _metric(metrics: Mapping[str, Any], name: str) -> str | None:
    value = metrics.get(name)
    return None if value is None else f"{value:.4g}"


# ----------------------------------------------------------------------------------------------- datasets


def _dataset_row(dataset: Mapping[str, Any]) -> tuple[Any, ...]:
    return (dataset["id"], dataset["filename"], dataset["format"], dataset["num_rows"], dataset["size_bytes"],
            when(dataset["created_at"]))


DATASET_HEADERS = ("id", "filename", "format", "rows", "bytes", "created (UTC)")


@remote_command
def cmd_datasets_upload(args: argparse.Namespace, client: Any) -> int:
    dataset = client.upload_dataset(Path(args.file))
    if args.json:
        print_json(dataset)
    else:
        print(f"uploaded {args.file}: dataset {dataset['id']} ({dataset['num_rows']} rows); "
              f"use it as {{\"dataset\": {{\"id\": \"{dataset['id']}\"}}}}")
    return 0


@remote_command
def cmd_datasets_list(args: argparse.Namespace, client: Any) -> int:
    datasets = list(client.pages("/v1/datasets", {"limit": 100}))
    if args.json:
        print_json({"object": "list", "data": datasets, "has_more": False})
    else:
        print(table(DATASET_HEADERS, (_dataset_row(dataset) for dataset in datasets)))
    return 0


def _lengths_text(lengths: Mapping[str, Any]) -> str:
    """``chosen: mean 12.5, p50 12, p95 30, max 41`` for each part that has lengths (a part measured on no row:
    ``none``)."""
    parts = []
    for part, summary in lengths.items():
        if not isinstance(summary, Mapping):
            continue
        numbers = [f"{key} {summary[key]:g}" for key in ("min", "mean", "p50", "p90", "p95", "p99", "max")
                   if isinstance(summary.get(key), int | float)]
        parts.append(f"{part}: {', '.join(numbers) if numbers else 'none'}")
    return "; ".join(parts)


def dataset_stats_text(stats: Mapping[str, Any] | None) -> list[str]:
    """The statistics of a Dataset object as lines under its table: the upload's counts, then the token lengths
    each preflight measured (per tokenizer, the prompt as that model is fed it)."""
    if not stats:
        return []
    if not stats.get("counted"):
        lines = [f"statistics: not counted ({stats.get('missing') or 'unknown why'})"]
    else:
        shapes = ", ".join(f"{shape} {count}" for shape, count in (stats.get("shapes") or {}).items()) or "none"
        lines = [f"rows:              {stats.get('rows')} ({shapes})",
                 f"system turns:      {stats.get('system_turn_rows')} rows; multi-turn: {stats.get('multi_turn_rows')} rows",
                 f"duplicates:        {stats.get('duplicate_rows')} rows, {stats.get('duplicate_prompts')} prompts",
                 f"identical pairs:   {stats.get('identical_pairs')} (left out of training: no preference)"]
        if stats.get("length_chars"):
            lines.append(f"characters:        {_lengths_text(stats['length_chars'])}")
    token_lengths = stats.get("token_lengths") or {}
    if token_lengths:
        lines.append("tokens (measured by preflights):")
        lines += [f"  {tokenizer}: {_lengths_text(lengths)}"
                  + (f" (over {lengths['sampled_pairs']} sampled pairs)" if "sampled_pairs" in lengths else "")
                  for tokenizer, lengths in token_lengths.items()]
    else:
        lines.append("tokens:            none measured yet (ctpd submit SPEC --dry-run on a job naming it measures them)")
    return lines


@remote_command
def cmd_datasets_get(args: argparse.Namespace, client: Any) -> int:
    dataset = client.dataset(args.dataset_id)
    if args.json:
        print_json(dataset)
    else:
        print(table((*DATASET_HEADERS, "sha256"), [(*_dataset_row(dataset), dataset["sha256"])]))
        lines = dataset_stats_text(dataset.get("stats"))
        if lines:
            print("\n" + "\n".join(lines))
    return 0


@remote_command
def cmd_datasets_delete(args: argparse.Namespace, client: Any) -> int:
    client.delete_dataset(args.dataset_id)
    print(f"deleted dataset {args.dataset_id}")
    return 0


# ----------------------------------------------------------------------------------------------- API keys


def key_table(keys: Iterable[Mapping[str, Any]]) -> str:
    """The keys as a table (API key objects, or rows shaped like them); the key itself is never stored, so only
    its prefix can be shown."""
    def minute(value: str | None) -> str | None:
        shown = when(value)
        return shown[:16] if shown else None

    return table(("id", "tenant", "name", "prefix", "admin", "created (UTC)", "revoked (UTC)"),
                 ((key["id"], key["tenant"], key["name"], f"{key['prefix']}...", "yes" if key["is_admin"] else "no",
                   minute(key.get("created_at")), minute(key.get("revoked_at"))) for key in keys))


@remote_command
def cmd_keys_remote(args: argparse.Namespace, client: Any) -> int:
    """``ctpd keys`` through ``/v1/api-keys`` (an admin key)."""
    if args.keys_command == "create":
        created = client.create_api_key(args.tenant, args.name or "cli", is_admin=args.admin)
        print(created["key"])
        print(f"(key {created['id']}, tenant {args.tenant}{', admin' if args.admin else ''}; shown once, stored "
              "only as a hash)", file=sys.stderr)
    elif args.keys_command == "list":
        keys = client.list_api_keys(args.tenant)["data"]
        if args.json:
            print_json({"object": "list", "data": keys, "has_more": False})
        else:
            print(key_table(keys))
    else:
        before = next((key for key in client.list_api_keys()["data"] if key["id"] == args.key_id), None)
        revoked = client.revoke_api_key(args.key_id)
        if before is not None and before.get("revoked_at"):
            print(f"{args.key_id} was already revoked at {when(revoked['revoked_at'])} UTC")
        else:
            print(f"revoked {args.key_id}: it is refused from the next request on")
    return 0


# ----------------------------------------------------------------------------------------------- webhooks


WEBHOOK_HEADERS = ("id", "url", "events", "enabled", "failures", "created (UTC)")


def _webhook_row(hook: Mapping[str, Any]) -> tuple[Any, ...]:
    enabled = "yes" if hook.get("enabled") else f"no ({hook.get('disabled_reason') or 'disabled'})"
    return (hook["id"], hook["url"], ",".join(hook.get("event_types") or []) or "all", enabled,
            hook.get("consecutive_failures"), when(hook.get("created_at")))


def _print_webhook(args: argparse.Namespace, hook: Mapping[str, Any]) -> None:
    if args.json:
        print_json(hook)
    else:
        print(table(WEBHOOK_HEADERS, [_webhook_row(hook)]))
        if hook.get("description"):
            print(f"description: {hook['description']}")


@remote_command
def cmd_webhooks(args: argparse.Namespace, client: Any) -> int:
    command = args.webhooks_command
    if command == "create":
        hook = client.create_webhook(args.target_url, args.event or None, args.description)
        if args.json:
            print_json(hook)
            return 0
        print(table(WEBHOOK_HEADERS, [_webhook_row(hook)]))
        print(f"signing secret (shown once; verify deliveries with it, Standard Webhooks format):\n  {hook['secret']}")
    elif command == "list":
        hooks = client.list_webhooks()["data"]
        if args.json:
            print_json({"object": "list", "data": hooks, "has_more": False})
        else:
            print(table(WEBHOOK_HEADERS, (_webhook_row(hook) for hook in hooks)))
    elif command == "get":
        _print_webhook(args, client.webhook(args.webhook_id))
    elif command == "delete":
        client.delete_webhook(args.webhook_id)
        print(f"deleted webhook {args.webhook_id}: nothing more is sent to it")
    elif command in ("enable", "disable"):
        hook = client.update_webhook(args.webhook_id, enabled=command == "enable")
        if args.json:
            print_json(hook)
        else:
            print(f"webhook {hook['id']}: {'enabled' if hook['enabled'] else 'disabled'}")
    elif command == "deliveries":
        page = client.webhook_deliveries(args.webhook_id, limit=args.limit)
        if args.json:
            print_json(page)
            return 0
        print(table(("attempted (UTC)", "message", "event", "job", "attempt", "status", "ms", "outcome", "error"),
                    ((when(d.get("attempted_at")), d.get("message_id"), d.get("event_type"), d.get("job_id"),
                      d.get("attempt"), d.get("status_code"),
                      None if d.get("latency_ms") is None else f"{d['latency_ms']:.0f}", d.get("outcome"),
                      d.get("error")) for d in page["data"])))
        if page.get("has_more"):
            print("(older deliveries: --limit up to the service's maximum shows more)", file=sys.stderr)
    else:  # redeliver
        client.redeliver(args.webhook_id, args.message_id)
        print(f"message {args.message_id} queued for delivery again to webhook {args.webhook_id} (same webhook-id)")
    return 0


# ------------------------------------------------------------------------------------------------- parser


def add_commands(commands: Any) -> None:
    """The remote commands' parsers (``submit`` is added by main, next to the local commands)."""
    jobs = commands.add_parser("jobs", help="jobs on a running service: list, get, cancel, events, follow, download")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)

    listing = jobs_commands.add_parser("list", help="the tenant's jobs, newest first")
    listing.add_argument("--status", choices=[str(status) for status in JobStatus], help="only jobs in this status")
    listing.add_argument("--limit", type=int, default=20, help="jobs on the page (1-100, default 20)")
    listing.add_argument("--all", action="store_true", help="every job, page after page")
    listing.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                         help="only jobs whose metadata has KEY=VALUE (repeatable: all must match)")
    listing.set_defaults(handler=cmd_jobs_list)

    get = jobs_commands.add_parser("get", help="one job: status, stage, progress, error, model")
    get.add_argument("job_id")
    get.set_defaults(handler=cmd_jobs_get)

    cancel = jobs_commands.add_parser("cancel", help="cancel a job (a running one checkpoints and stops)")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=cmd_jobs_cancel)

    events = jobs_commands.add_parser("events", help="a job's events, oldest first")
    events.add_argument("job_id")
    events.add_argument("--after", type=int, help="only events after this event id")
    events.add_argument("--follow", action="store_true", help="keep printing new events until the job ends")
    add_follow_flags(events)
    events.set_defaults(handler=cmd_jobs_events)

    follow = jobs_commands.add_parser("follow", help="a progress bar per stage, the loss and the ETA until the job ends")
    follow.add_argument("job_id")
    add_follow_flags(follow)
    follow.set_defaults(handler=cmd_jobs_follow)

    download = jobs_commands.add_parser("download", help="the exported model (archive, or one file); resumable")
    download.add_argument("job_id")
    download.add_argument("-o", "--output", metavar="DIR|FILE",
                          help="where to write it (default: <job>-model.tar, or the file's name, here)")
    download.add_argument("--file", metavar="PATH", help="one file of the exported folder, e.g. config.json")
    download.add_argument("--checkpoint", metavar="ID",
                          help="a checkpoint's model folder instead (from `ctpd jobs checkpoints`); built first if "
                          "it has none")
    download.add_argument("--wait", type=float, default=900.0, metavar="SECONDS",
                          help="with --checkpoint: how long to wait for the build (default 900)")
    download.set_defaults(handler=cmd_jobs_download)

    checkpoints = jobs_commands.add_parser("checkpoints", help="a job's checkpoints: step, size, loss, model status")
    checkpoints.add_argument("job_id")
    checkpoints.set_defaults(handler=cmd_jobs_checkpoints)

    for parser in (listing, get, cancel, events, follow, download, checkpoints):
        add_connection_flags(parser)
    for parser in (listing, get, cancel, events, checkpoints):
        add_json_flag(parser)

    datasets = commands.add_parser("datasets", help="uploaded datasets on a running service")
    datasets_commands = datasets.add_subparsers(dest="datasets_command", required=True)
    upload = datasets_commands.add_parser("upload", help="upload a .jsonl, .json or .parquet file of preference pairs")
    upload.add_argument("file")
    upload.set_defaults(handler=cmd_datasets_upload)
    dataset_list = datasets_commands.add_parser("list", help="the tenant's datasets")
    dataset_list.set_defaults(handler=cmd_datasets_list)
    dataset_get = datasets_commands.add_parser("get", help="one dataset")
    dataset_get.add_argument("dataset_id")
    dataset_get.set_defaults(handler=cmd_datasets_get)
    dataset_delete = datasets_commands.add_parser("delete", help="delete a dataset")
    dataset_delete.add_argument("dataset_id")
    dataset_delete.set_defaults(handler=cmd_datasets_delete)
    for parser in (upload, dataset_list, dataset_get, dataset_delete):
        add_connection_flags(parser)
    for parser in (upload, dataset_list, dataset_get):
        add_json_flag(parser)

    webhooks = commands.add_parser("webhooks", help="webhook endpoints notified of job events")
    webhooks_commands = webhooks.add_subparsers(dest="webhooks_command", required=True)
    create = webhooks_commands.add_parser("create", help="add an endpoint; prints its signing secret (once)")
    create.add_argument("target_url", metavar="URL", help="where the service POSTs the events (http or https)")
    create.add_argument("--event", action="append", default=[], metavar="TYPE",
                        help="an event type to send (repeatable; default: all): job.queued, job.running, "
                        "job.succeeded, job.failed, job.cancelled, job.checkpoint, job.evaluated")
    create.add_argument("--description", help="a note on what the endpoint is for")
    add_json_flag(create)
    add_json_flag(webhooks_commands.add_parser("list", help="the tenant's endpoints"))
    for name, text, has_json in (("get", "one endpoint", True), ("delete", "remove an endpoint", False),
                                 ("enable", "enable an endpoint (its failure run starts again from 0)", True),
                                 ("disable", "stop sending to an endpoint, keeping it", True),
                                 ("deliveries", "an endpoint's delivery attempts, newest first", True)):
        sub = webhooks_commands.add_parser(name, help=text)
        sub.add_argument("webhook_id", metavar="ID")
        if has_json:
            add_json_flag(sub)
    webhooks_commands.choices["deliveries"].add_argument("--limit", type=int, default=20,
                                                         help="attempts to show (default 20)")
    redeliver = webhooks_commands.add_parser("redeliver", help="send a message to the endpoint again (same webhook-id)")
    redeliver.add_argument("webhook_id", metavar="ID")
    redeliver.add_argument("message_id", metavar="MESSAGE_ID", help="from `ctpd webhooks deliveries ID`")
    for parser in webhooks_commands.choices.values():
        add_connection_flags(parser)
    webhooks.set_defaults(handler=cmd_webhooks)
