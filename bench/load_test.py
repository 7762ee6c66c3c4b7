"""Load test of the scheduler (issue 12): many tiny real jobs from 3 tenants on 3 Celery workers, one killed.

Starts everything it uses on this machine, on its own ports, under one temporary folder (removed at the end):

* a PostgreSQL cluster (``initdb``, run as the ``postgres`` OS user) and a ``redis-server``: never the shared ones;
* ``ctpd serve`` (the API), one reaper worker (``--queues default --beat``) and ``--workers`` training workers
  (``ctpd worker --queues train``), the production entry points;
* a tiny student (a 2-layer Llama on a BPE trained on Botchan) saved as a Hugging Face folder, and 8 pairs.

Then it sets the tenants' limits through the admin API (``PUT /v1/tenants/{t}/limits``: max_running 1, 2, 3),
submits ``--jobs`` DPO jobs (max_steps 1, evaluation on 2 pairs) through ``POST /v1/jobs``, shared among the
tenants in proportion to their limits (so that all three queues drain together), kills one training worker with
SIGKILL (its whole process group: the job it runs dies with it) once ``--kill-at`` of the jobs have ended,
restarts it under the same node name, and waits for every job to end. Everything it reports is read from SQL
(``jobs`` and ``job_events``), never from logs:

* lost: jobs without a terminal status or without exactly one terminal event (job_succeeded / job_failed /
  job_cancelled);
* run twice at once: jobs one of whose attempts started before the previous one ended (its job_succeeded ...,
  job_handed_back or the reaper's job_restarted), or that have an event of an attempt stamped after the next
  attempt started;
* per tenant, the most attempts running at one instant (a sweep over the attempts' [start, end) intervals)
  against its max_running.

    .venv/bin/python bench/load_test.py                   # 1000 jobs, 3 workers, limits 1,2,3
    .venv/bin/python bench/load_test.py --jobs 60         # a quick run

Settings of the run (printed): lease 15 s (the killed attempt is requeued within ~15 s), reaper every 2 s,
``requeue_after_seconds`` 900 (every queued job is otherwise re-rung each period: 1000 empty doorbells), one
torch thread per job process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

CTPD = [sys.executable, "-m", "ctpd_cli.main"]
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
TERMINAL_EVENTS = ("job_succeeded", "job_failed", "job_cancelled")
ATTEMPT_ENDS = (*TERMINAL_EVENTS, "job_handed_back", "job_restarted")
SETTINGS = {
    "lease_seconds": "15",
    "reaper_interval_seconds": "2",
    "requeue_after_seconds": "900",
    "shutdown_grace_seconds": "20",
    "max_attempts": "3",
    "allow_server_paths": "true",  # the tiny student and the pairs are files of this machine
    "log_format": "text",
    "webhook_dispatcher": "false",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def reachable(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


class Proc:
    """A subprocess in its own process group (so a SIGKILL takes its children too), logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=20)
        if not self._log.closed:
            self._log.close()

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.kill_group()


# ------------------------------------------------------------------------------------ PostgreSQL, Redis


class Postgres:
    """A throw-away cluster on a free port, data under ``root`` (owned by the postgres OS user: it refuses root)."""

    def __init__(self, root: Path) -> None:
        binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
        if not binaries or shutil.which("runuser") is None:
            raise SystemExit("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) and runuser are needed: "
                             "apt-get install -y postgresql")
        pwd.getpwnam("postgres")
        self.bin = binaries[-1].parent
        self.root, self.port = root, free_port()
        self.data, self.socket_dir, self.log_path = root / "data", root / "socket", root / "postgres.log"
        root.mkdir(parents=True)
        self.socket_dir.mkdir()
        for path in (root, self.socket_dir):
            shutil.chown(path, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/ctpd"

    def _run(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, cwd=self.root,
                       timeout=180)

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        options = (f"-k {self.socket_dir} -h 127.0.0.1 -p {self.port} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=200")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options, "-w",
                  "-t", "60", "start")
        wait_for(lambda: reachable(self.port), 30, "PostgreSQL")
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute('CREATE DATABASE "ctpd"')

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")


def start_redis(root: Path) -> tuple[Proc, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is needed: apt-get install -y redis-server")
    root.mkdir(parents=True)
    port = free_port()
    proc = Proc("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(root)], {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, root / "redis.log")
    wait_for(lambda: reachable(port), 30, "Redis")
    return proc, f"redis://127.0.0.1:{port}/0"


# --------------------------------------------------------------------------------------- the tiny job


def build_student_and_pairs(folder: Path, pairs: int = 8) -> tuple[Path, Path]:
    """A 2-layer Llama on a byte-level BPE (vocab 1000) trained on Botchan, and preference pairs of its sentences."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from bench.textdata import gutenberg_body, paragraphs, sentences

    assets = Path(os.environ.get("CTPD_ASSETS", REPO / ".cache" / "assets"))
    body = gutenberg_body((assets / "botchan.txt").read_text(encoding="utf-8"))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(paragraphs(body), trainer=trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id))
    student = folder / "student"
    model.save_pretrained(str(student), safe_serialization=True)
    tokenizer.save_pretrained(str(student))
    usable = [sentence for sentence in sentences(body) if len(sentence.split()) >= 8]
    rows = []
    for index in range(pairs):
        words, other = usable[index].split(), usable[(index * 7 + 3) % len(usable)].split()
        rows.append({"prompt": " ".join(words[:6]), "chosen": " " + " ".join(words[6:16]),
                     "rejected": " " + " ".join(other[-10:])})
    dataset = folder / "pairs.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return student, dataset


def tiny_spec(student: Path, dataset: Path, index: int) -> dict[str, Any]:
    return {
        "method": "dpo",
        "student": {"model": str(student)},
        "dataset": {"path": str(dataset), "validation_fraction": 0.25},
        "sequence": {"max_prompt_tokens": 16, "max_response_tokens": 16},
        "training": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "learning_rate": 1e-3},
        "evaluation": {"max_pairs": 2},
        "name": f"load-{index}",
        "metadata": {"bench": "load_test"},
    }


# ------------------------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    root: Path
    postgres: Postgres
    redis: Proc
    broker_url: str
    env: dict[str, str]
    api_port: int = 0
    procs: list[Proc] = field(default_factory=list)
    workers: dict[str, Proc] = field(default_factory=dict)

    def start_worker(self, name: str, queues: str = "train", beat: bool = False) -> Proc:
        argv = [*CTPD, "worker", "--queues", queues, "--hostname", f"{name}@%h", "--log-level", "info"]
        proc = Proc(f"worker {name}", [*argv, "--beat"] if beat else argv, self.env,
                    self.root / f"worker-{name}.log")
        wait_for(lambda: " ready." in proc.log() or not proc.alive(), 180, f"worker {name} to be ready")
        if not proc.alive():
            raise RuntimeError(f"worker {name} exited:\n{proc.log()[-3000:]}")
        if queues == "train":
            self.workers[name] = proc
        else:
            self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in [*self.workers.values(), *reversed(self.procs)]:
            proc.stop(timeout=10)
        self.redis.stop(timeout=5)
        self.postgres.stop()


def service_env(home: Path, database_url: str, broker_url: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CTPD_")}
    env.update(CTPD_HOME=str(home), CTPD_DATABASE_URL=database_url, CTPD_BROKER_URL=broker_url,
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", **{f"CTPD_{key.upper()}": value for key, value in SETTINGS.items()})
    return env


# ------------------------------------------------------------------------------------- the SQL history


def analyse(database_url: str, limits: dict[str, int]) -> dict[str, Any]:
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as connection:
        jobs = {row.id: row for row in connection.execute(text("SELECT id, tenant, status FROM jobs"))}
        events = connection.execute(text(
            "SELECT id, job_id, type, attempt, data, created_at FROM job_events ORDER BY job_id, id")).all()
        advertised = connection.execute(text("SELECT worker_id, gpus FROM workers ORDER BY worker_id")).all()
    engine.dispose()
    by_job: dict[str, list[Any]] = defaultdict(list)
    for event in events:
        by_job[event.job_id].append(event)
    lost: list[str] = []
    twice: list[str] = []
    unfinished: list[str] = []
    intervals: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    for job_id, job in jobs.items():
        history = by_job[job_id]
        terminal = [event for event in history if event.type in TERMINAL_EVENTS]
        if job.status not in TERMINAL_STATUSES:
            unfinished.append(job_id)
        elif len(terminal) != 1:
            lost.append(job_id)  # ended without exactly one recorded outcome
        outcomes[job.status] += 1
        started: dict[int, datetime] = {}
        open_attempt: tuple[int, datetime] | None = None
        overlapped = False
        for event in history:
            data = event.data if isinstance(event.data, dict) else json.loads(event.data or "{}")
            if event.type == "job_started":
                if open_attempt is not None:
                    overlapped = True  # a second attempt started while one had not ended
                open_attempt = (int(data["attempt"]), event.created_at)
                started[open_attempt[0]] = event.created_at
            elif event.type in ATTEMPT_ENDS and open_attempt is not None:
                if event.created_at < open_attempt[1]:
                    overlapped = True
                intervals[job.tenant].append((open_attempt[1], event.created_at))
                open_attempt = None
        attempts[len(started)] += 1
        for event in history:  # an attempt's own writes all come before the next attempt started
            later = started.get((event.attempt or 0) + 1)
            if event.attempt is not None and later is not None and event.created_at > later:
                overlapped = True
        if open_attempt is not None and job.status in TERMINAL_STATUSES:
            lost.append(job_id)  # an attempt that never ended although the job did
        if overlapped:
            twice.append(job_id)
    peaks = {}
    for tenant, spans in intervals.items():
        # An end sorts before a start at the same instant: the claim that took a freed slot counted after it.
        points = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
        running = peak = 0
        for _, step in points:
            running += step
            peak = max(peak, running)
        peaks[tenant] = peak
    return {"jobs": len(jobs), "lost": sorted(set(lost)), "twice": twice, "unfinished": unfinished, "outcomes": dict(outcomes),
            "attempts": dict(attempts), "peaks": peaks, "limits": limits,
            "advertised": [f"{worker_id} ({gpus} GPUs)" for worker_id, gpus in advertised]}


def history_summary(database_url: str) -> tuple[int, int]:
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as connection:
        total = connection.execute(text("SELECT count(*) FROM jobs")).scalar() or 0
        done = connection.execute(text("SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'failed', "
                                       "'cancelled')")).scalar() or 0
    engine.dispose()
    return int(total), int(done)


def busy_worker(database_url: str, names: set[str]) -> str | None:
    """A training worker (node name) that holds a running job now, from ``jobs.worker_id`` (``<node>@<host>:<pid>``)."""
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as connection:
        holders = connection.execute(text("SELECT worker_id FROM jobs WHERE status = 'running'")).scalars().all()
    engine.dispose()
    for holder in holders:
        node = (holder or "").split("@", 1)[0]
        if node in names:
            return node
    return None


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--limits", default="1,2,3", help="max_running of each tenant (one tenant per value)")
    parser.add_argument("--kill-at", type=float, default=0.5, help="kill a worker once this share of jobs ended")
    parser.add_argument("--timeout-minutes", type=float, default=90.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, data)")
    args = parser.parse_args()
    limits = {f"tenant{index + 1}": int(value) for index, value in enumerate(args.limits.split(","))}

    root = Path(tempfile.mkdtemp(prefix="ctpd-load-"))
    os.chmod(root, 0o755)  # the postgres user reaches its data folder below
    print(f"load test: {args.jobs} jobs, {args.workers} workers, limits {limits}; files under {root}", flush=True)
    postgres = Postgres(root / "pg")
    postgres.start()
    redis, broker_url = start_redis(root / "redis")
    home = root / "home"
    stack = Stack(root, postgres, redis, broker_url, service_env(home, postgres.url, broker_url))
    try:
        return run(stack, args, limits)
    finally:
        stack.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run(stack: Stack, args: argparse.Namespace, limits: dict[str, int]) -> int:
    from app.db import auth as key_rows
    from app.db.engine import Database

    database = Database(stack.postgres.url)
    database.upgrade()
    admin_key = key_rows.create_api_key(database, "operators", "load test admin", is_admin=True)
    keys = {tenant: key_rows.create_api_key(database, tenant, "load test") for tenant in limits}
    database.dispose()
    student, dataset = build_student_and_pairs(stack.root)

    stack.api_port = free_port()
    stack.procs.append(Proc("api", [*CTPD, "serve", "--port", str(stack.api_port)], stack.env,
                            stack.root / "api.log"))
    base = f"http://127.0.0.1:{stack.api_port}"
    wait_for(lambda: reachable(stack.api_port), 120, "the API")
    admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60)
    for tenant, limit in limits.items():
        response = admin.put(f"/v1/tenants/{tenant}/limits", json={"max_running": limit, "max_queued": args.jobs})
        response.raise_for_status()
    stack.start_worker("reaper", queues="default", beat=True)
    names = [f"train{index + 1}" for index in range(args.workers)]
    for name in names:
        stack.start_worker(name)

    # Jobs in proportion to the limits, interleaved, so that every tenant's queue drains at the same pace.
    total_share = sum(limits.values())
    plan = [tenant for tenant, limit in limits.items() for _ in range(round(args.jobs * limit / total_share))]
    plan = (plan + list(limits) * args.jobs)[: args.jobs]
    order = sorted(range(len(plan)), key=lambda index: (plan[:index + 1].count(plan[index]) / limits[plan[index]],
                                                        index))
    clients = {tenant: httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
               for tenant, key in keys.items()}
    started = time.monotonic()
    for count, index in enumerate(order):
        tenant = plan[index]
        response = clients[tenant].post("/v1/jobs", json=tiny_spec(student, dataset, index))
        if response.status_code != 201:
            raise RuntimeError(f"POST /v1/jobs: {response.status_code} {response.text}")
        if count % 100 == 99:
            print(f"  submitted {count + 1} ({time.monotonic() - started:.0f} s)", flush=True)
    submitted_s = time.monotonic() - started
    print(f"submitted {len(plan)} jobs in {submitted_s:.0f} s", flush=True)

    deadline = started + args.timeout_minutes * 60
    killed = None
    while True:
        total, done = history_summary(stack.postgres.url)
        busy = busy_worker(stack.postgres.url, set(stack.workers)) if killed is None else None
        if killed is None and done >= args.kill_at * total and busy is not None:
            killed = busy  # one that runs a job now: that attempt dies with it, and must be retried once
            print(f"  {done}/{total} ended after {time.monotonic() - started:.0f} s: SIGKILL to worker {killed} "
                  "(its process group: the job it runs dies with it), restarting it", flush=True)
            stack.workers.pop(killed).kill_group()
            time.sleep(2)
            stack.start_worker(killed)
        if done >= total:
            break
        if time.monotonic() > deadline:
            print(f"timed out with {done}/{total} ended", flush=True)
            break
        time.sleep(5)
        if int(time.monotonic() - started) % 60 < 5:
            print(f"  {done}/{total} ended after {time.monotonic() - started:.0f} s", flush=True)
    wall = time.monotonic() - started
    result = analyse(stack.postgres.url, limits)
    print_table(result, args.workers, wall, killed)
    (stack.root.parent / f"ctpd-load-{int(time.time())}.json").write_text(json.dumps(
        {**result, "wall_seconds": wall, "workers": args.workers, "killed": killed}, default=str, indent=1))
    ok = not result["lost"] and not result["twice"] and not result["unfinished"] and all(
        result["peaks"].get(tenant, 0) <= limit for tenant, limit in limits.items())
    return 0 if ok else 1


def print_table(result: dict[str, Any], workers: int, wall: float, killed: str | None) -> None:
    rows = [
        ("jobs", str(result["jobs"])),
        ("workers", f"{workers} (worker {killed} SIGKILLed mid-run and restarted)" if killed else str(workers)),
        ("tenants", str(len(result["limits"]))),
        ("workers table at the end", ", ".join(result["advertised"]) or "(empty)"),
        ("outcomes", ", ".join(f"{status} {count}" for status, count in sorted(result["outcomes"].items()))),
        ("attempts per job", ", ".join(f"{n}: {count}" for n, count in sorted(result["attempts"].items()))),
        ("lost", str(len(result["lost"])) + (f" {result['lost'][:5]}" if result["lost"] else "")),
        ("not ended (timeout)", str(len(result["unfinished"]))),
        ("run twice at once", str(len(result["twice"])) + (f" {result['twice'][:5]}" if result["twice"] else "")),
    ]
    for tenant, limit in result["limits"].items():
        rows.append((f"max concurrency {tenant}", f"{result['peaks'].get(tenant, 0)} / limit {limit}"))
    rows += [("wall time", f"{wall:.0f} s"), ("jobs/min", f"{result['jobs'] / (wall / 60):.1f}")]
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"| {name.ljust(width)} | {value} |" for name, value in rows), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
