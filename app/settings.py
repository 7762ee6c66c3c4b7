"""Service settings (docs/service-contract.md, "Settings"): pydantic-settings, env prefix ``CTPD_``.

Nothing is created at import: :func:`get_settings` builds (and caches) a :class:`Settings` from the
environment; tests build ``Settings(...)`` explicitly and pass it to ``create_app``. Paths that default to a
place under ``home`` are filled in after validation, so ``Settings(home=tmp)`` moves everything at once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTPD_", extra="ignore")

    home: Path = Field(default=Path(".ctpd"), description="Root of everything local (CTPD_HOME).")
    database_url: str = Field(
        default="", description="SQLAlchemy URL; default sqlite:///$CTPD_HOME/ctpd.db (postgresql+psycopg://... in production)."
    )
    broker_url: str = Field(
        default="", description="Celery broker; default sqla+sqlite:///$CTPD_HOME/broker.db (redis://... in production)."
    )
    # An unset one is filled in under home by _default_paths before validation (the Path() default is never
    # seen), so every reader gets a Path; _fill_paths makes it absolute.
    artifact_root: Path = Field(
        default=Path(), description="Stage cache, job run folders (jobs/<job_id>/), uploaded datasets (datasets/<id>/); default "
        "$CTPD_HOME/artifacts."
    )
    model_cache: Path = Field(default=Path(), description="Catalog model conversions; default $CTPD_HOME/catalog.")
    lease_seconds: int = Field(default=120, ge=5, description="A running job's lease; the worker heartbeats every lease/4.")
    max_attempts: int = Field(default=3, ge=1, description="Deliveries of a job before it fails with worker_lost.")
    reaper_interval_seconds: float = Field(
        default=30.0, gt=0, le=3600, description="How often beat runs the reaper (expired leases, unclaimed jobs, orphans)."
    )
    shutdown_grace_seconds: float = Field(
        default=60.0, gt=0, le=3600,
        description="On SIGTERM a running job checkpoints and hands itself back within this many seconds; past it, "
        "the lease is released without a new checkpoint (the job resumes from its previous one).",
    )
    requeue_after_seconds: int = Field(
        default=300, ge=1, description="A queued job no worker claimed for this long is enqueued again."
    )
    max_upload_bytes: int = Field(default=512 * MiB, ge=1, description="Dataset upload cap in bytes.")
    upload_orphan_grace_seconds: int = Field(
        default=3600, ge=0,
        description="An unfinished upload (datasets/.incoming-*) whose API process died is removed at once; one "
        "whose writer cannot be asked (written without a lock, or on a filesystem without flock) only after "
        "this long without a change.",
    )
    allow_server_paths: bool = Field(
        default=False,
        description="Whether non-admin keys may name files and folders on the server (dataset.path, local model "
        "folders) outside the artifact root. Off by default, so in a multi-tenant deployment tenants use uploads, "
        "catalog names, hub ids and their own exported students (job:<id>) only; the embedded single-user "
        "`ctpd up` turns it on (its one user owns the machine). app/policy.py has the rules.",
    )
    allow_remote_code: bool = Field(
        default=False,
        description="Whether `trust_remote_code: true` may run a model repository's own Python on the workers; "
        "even when on, only admin keys may ask for it.",
    )

    # ----------------------------------------------------------------------------------------- webhooks
    webhook_allow_private_targets: bool = Field(
        default=False,
        description="Whether webhook endpoints may resolve to loopback, link-local, private or otherwise "
        "non-public addresses. Off by default, so a tenant cannot make the service call its own internals; "
        "a single-machine deployment (or a test with a local receiver) turns it on.",
    )
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=120, description="One delivery attempt's timeout.")
    webhook_retry_window_seconds: float = Field(
        default=28 * 3600, ge=1,
        description="A message whose delivery keeps failing is retried (exponential backoff with jitter) for this "
        "long after it was written, then given up; default 28 h.",
    )
    webhook_disable_after_failures: int = Field(
        default=50, ge=1,
        description="An endpoint whose last this-many delivery attempts all failed is disabled (an event says so); "
        "re-enable it with PATCH /v1/webhooks/{id} {\"enabled\": true}.",
    )
    webhook_dispatch_interval_seconds: float = Field(
        default=1.0, gt=0, le=60, description="How often the outbox dispatcher looks for messages that are due."
    )
    webhook_dispatcher: bool = Field(
        default=True,
        description="Whether this API process runs the webhook outbox dispatcher (a thread; several API processes "
        "share the work through row leases, so every API process may run one). Off: this process sends nothing; "
        "at least one process of the deployment must send (app.webhooks.dispatcher.run_forever).",
    )
    # ---------------------------------------------------------------------------------- metrics and logs
    metrics_token: str = Field(
        default="",
        description="When set, GET /metrics asks for `Authorization: Bearer <token>`; empty: open to anyone who "
        "reaches the API. Open, the scrape shows deployment-wide counts and, for each running job, its job id and "
        "its worker's host name (the per-job heartbeat and tokens/s series); set a token unless only the "
        "platform's scrape network can reach the API.",
    )
    log_format: str = Field(
        default="auto", pattern="^(auto|json|text)$",
        description="json: one JSON object per line (job id, attempt, stage, tenant, request id); text: for a "
        "person at a terminal; auto: text when stderr is a terminal, json otherwise.",
    )
    # ----------------------------------------------------------------------------------------- scheduling
    tenant_max_running: int = Field(
        default=4, ge=1, le=10_000,
        description="Jobs one tenant may have running (or cancelling) at once, across every worker; enforced at "
        "claim time in SQL. An admin overrides it per tenant (PUT /v1/tenants/{tenant}/limits).",
    )
    tenant_max_queued: int = Field(
        default=100, ge=1, le=1_000_000,
        description="Queued jobs one tenant may have waiting; POST /v1/jobs beyond it is a 429 (queue_full) and "
        "stores nothing. An admin overrides it per tenant.",
    )
    worker_gpus: int | None = Field(
        default=None, ge=0, le=1024,
        description="The GPUs this worker advertises (CTPD_WORKER_GPUS); default: CUDA_VISIBLE_DEVICES, else "
        "nvidia-smi, else 0 (a CPU host, which still runs 1-device jobs on CPU).",
    )
    # ---------------------------------------------------------------------------------- preflight
    gpu_memory_gb: float = Field(
        default=80.0, ge=0, le=100_000,
        description="One GPU's memory in GiB (nvidia-smi's memory.total / 1024; an 80 GB A100 or H100 is 80), for "
        "the memory plan at submission (app/preflight.py) when no live worker with the job's GPUs has advertised "
        "its own. 0: a CPU-only deployment, where no job is refused for GPU memory.",
    )
    preflight_wait_seconds: float = Field(
        default=90.0, ge=0, le=3600,
        description="How long POST /v1/jobs?dry_run=true waits for a worker's part of the preflight (tokenizers, "
        "alignment and truncation on a sample of the dataset) before it answers 202 with the API's part and a "
        "GET /v1/preflights/{id} to poll.",
    )
    preflight_sample_pairs: int = Field(
        default=256, ge=1, le=100_000,
        description="Dataset pairs a preflight encodes and aligns with both tokenizers (every row is validated).",
    )
    # ---------------------------------------------------------------------------------- experiment tracking
    mlflow_tracking_uri: str = Field(
        default="",
        description="The deployment's MLflow tracking URI: every job becomes an MLflow run there, unless its spec "
        "names its own (tracking.mlflow.uri). Empty: only jobs whose spec asks are tracked.",
    )
    mlflow_experiment: str = Field(default="ctpd", description="The MLflow experiment of jobs that name none.")
    # ---------------------------------------------------------------------------------- shared storage
    storage_url: str = Field(
        default="",
        description="Where workers on several machines share the stage cache, uploaded datasets and exported "
        "models, and where the API serves downloads from: s3://bucket/prefix (an S3-compatible bucket) or "
        "file:///folder (a shared mount). Empty (or the artifact root itself): the artifact root alone, one "
        "machine. Checked when every process starts (app/storage/).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, repr=False,
        description="JSON options of the storage's fsspec filesystem; for s3: endpoint_url, key, secret, "
        "client_kwargs ({\"region_name\": ...}), config_kwargs. Holds credentials: never logged or shown.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_paths(cls, data: Any) -> Any:
        if isinstance(data, dict):
            home = Path(data.get("home") or cls.model_fields["home"].default)
            data = {**data}
            for name, under_home in (("artifact_root", "artifacts"), ("model_cache", "catalog")):
                if not data.get(name):
                    data[name] = home / under_home
        return data

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        # Absolute, so that a later chdir (or a worker started elsewhere) sees the same files.
        self.home = self.home.expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'ctpd.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.db'}"
        self.artifact_root = self.artifact_root.expanduser().absolute()
        self.model_cache = self.model_cache.expanduser().absolute()
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
