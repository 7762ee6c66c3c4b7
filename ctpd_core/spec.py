"""The job spec: THE contract shared by the API, the worker and the CLI. Torch-free (the API imports it).

Every default lives here and nowhere else; defaults follow the paper (method §6) unless a comment says why
not. Unknown fields are errors (``extra="forbid"``), so a typo never silently falls back to a default.
The minimal form names a teacher, a student and a dataset; everything else is filled in, and the resolved
spec (``JobSpec.model_validate(data).model_dump()``) is what gets stored and reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["ctpd", "dpo", "tisdpo", "sft", "uld", "dskd"]
PreferenceMethod = Literal["ctpd", "dpo", "tisdpo"]  # trained on preference pairs (ctpd_core.pipeline.make_distill_loss)
# The methods that train on the chosen responses alone, SFT-style (method §8), instead of on preference pairs.
KD_METHODS = ("sft", "uld", "dskd")
# The methods that read the teacher: CTPD as its reference, ULD and DSKD as the distribution they distil.
TEACHER_METHODS = ("ctpd", "uld", "dskd")
UldAlignment = Literal["span", "position"]
WeightSource = Literal["teacher_contrastive", "student_contrastive", "uniform", "random"]
Precision = Literal["auto", "fp32", "bf16"]
LrSchedule = Literal["cosine", "linear", "constant"]
# How a training stage spreads over ``devices`` GPUs (ctpd_core.distributed): ddp replicates the model on every
# rank (it must fit one GPU with its optimizer state); fsdp shards parameters, gradients and optimizer state
# (torch.distributed.fsdp.fully_shard); auto lets the memory planner (ctpd_core.memory_plan) choose.
Strategy = Literal["auto", "ddp", "fsdp"]
Priority = Literal["high", "normal", "low"]

# Every number is finite (``allow_inf_nan=False`` below) and bounded: an unbounded value such as
# training.max_steps 2**31 or 1e30 would otherwise be accepted and fail later (an integer column overflows, an ETA
# reads thousands of years). The bounds are generous next to real runs and sit in each Field, so the OpenAPI schema
# shows them; the paper's defaults lie well inside.
MAX_STEPS = 10_000_000  # optimizer steps (and checkpoint intervals): months of training at 1 step/s
MAX_PAIRS = 100_000_000  # preference pairs used or evaluated
MAX_TOKENS = 1_048_576  # token budgets: 1 Mi, beyond any context window a model here has
MAX_BATCH = 65_536  # pairs per step or per forward pass
MAX_EPOCHS = 1_000.0
MAX_LEARNING_RATE = 1.0  # far above any stable AdamW rate (the paper: 1e-6 and 2e-6)
MAX_BETA = 1_000.0  # DPO beta: the paper uses 0.1 and 0.3
MAX_SEED = 2**32 - 1  # numpy's seed range (torch and random accept it too)
MAX_CLAMP = 50.0  # |log-ratio clamp|: exp(50) ~ 5e21 stays inside the fp32 and bf16 ranges
MAX_SCALE = 1_000.0  # weight normaliser and random-weight range
MAX_LORA_RANK = 4_096
MAX_LORA_ALPHA = 65_536.0
MAX_GRAD_NORM = 1_000_000.0
MAX_WEIGHT_DECAY = 10.0
MAX_DEVICES = 64  # GPUs of one training stage (torchrun on one worker host)

# Text without NUL characters: PostgreSQL cannot store them, and file APIs refuse them ("embedded null byte"), so
# a NUL in a name, path or label would otherwise fail deep in the service instead of as a 422 on the field.
NO_NUL_PATTERN = r"^[^\x00]*$"
Text = Annotated[str, Field(pattern=NO_NUL_PATTERN)]


class SpecError(ValueError):
    """A rule across fields broke: the message says what and how to fix it, ``loc`` names the field to fix,
    relative to the model that checked it (``("batch_size",)`` from TrainingSpec is ``training.batch_size`` in a
    JobSpec). Raised in a model validator, pydantic reports it as a ``value_error`` at the model's location with
    this exception as ``ctx["error"]``, so a caller (the API's 422) joins the two locations instead of finding a
    field name in the message. A ValueError, so code that catches those (the CLI, the worker) is unchanged."""

    def __init__(self, message: str, *loc: str) -> None:
        super().__init__(message)
        self.loc: tuple[str, ...] = loc


def _text_map_schema(schema: dict[str, Any]) -> None:
    """pydantic renders a dict[Text, Text] as patternProperties (leaving keys with a NUL unconstrained); say it
    directly: every key and every value is NUL-free text."""
    _, value = schema.pop("patternProperties").popitem()
    schema["propertyNames"] = {"pattern": NO_NUL_PATTERN}
    schema["additionalProperties"] = value


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN and +-Infinity (which Python's json and YAML parse) are refused field by field.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelRef(_Strict):
    model: Text = Field(
        min_length=1,
        description="A catalog name (`ctpd models list`), a local Hugging Face folder, or a hub id "
        "(only where the Hugging Face Hub is reachable).",
    )
    revision: Text | None = Field(default=None, description="Hub revision (branch, tag or commit) of a hub id.")
    trust_remote_code: bool = Field(
        default=False, description="Run the model repository's own Python code. Off unless you trust it."
    )


class DatasetRef(_Strict):
    # _one_source in JSON Schema, so schema-driven tests and validators know what is refused: exactly one of path /
    # id is a string (the other absent or null). Said as `not` (neither both nor none), not as `oneOf`: client
    # generators read a `oneOf` beside `properties` as a union of its branches and drop the model's own fields.
    model_config = ConfigDict(json_schema_extra={"not": {"anyOf": [
        {"required": ["path", "id"], "properties": {"path": {"type": "string"}, "id": {"type": "string"}}},
        {"properties": {"path": {"type": "null"}, "id": {"type": "null"}}},
    ]}})

    path: Text | None = Field(
        default=None, description="A JSONL, JSON or Parquet file of preference pairs (TRL's preference formats, "
        "standard or conversational, or OpenAI's preference fine-tuning rows), or a Hugging Face datasets folder "
        "written by save_to_disk (docs/datasets.md).",
    )
    id: Text | None = Field(default=None, description="The id of a dataset uploaded with POST /v1/datasets.")
    split: Text | None = Field(
        default=None, min_length=1, max_length=200,
        description="The split of a DatasetDict folder (dataset.path written by DatasetDict.save_to_disk) to train "
        "on; needed when it has more than one.",
    )
    validation_path: Text | None = Field(
        default=None, description="A separate held-out file (or save_to_disk folder); when unset, "
        "`validation_fraction` of the rows is held out."
    )
    validation_split: Text | None = Field(
        default=None, min_length=1, max_length=200,
        description="The split of a DatasetDict folder to hold out: of dataset.validation_path, or of dataset.path "
        "itself when no validation_path or validation_id is given (e.g. split train, validation_split test).",
    )
    validation_id: Text | None = Field(
        default=None, description="The id of an uploaded dataset to hold out (instead of `validation_path`)."
    )
    validation_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of rows held out for evaluation when no validation set is given."
    )
    max_pairs: int | None = Field(default=None, ge=1, le=MAX_PAIRS, description="Use at most this many training pairs (for quick runs).")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetRef:
        if (self.path is None) == (self.id is None):
            raise SpecError("give exactly one of dataset.path (a file) or dataset.id (an uploaded dataset)", "path")
        if self.split is not None and self.id is not None:
            raise SpecError("dataset.split chooses a split of a save_to_disk folder (dataset.path), and dataset.id "
                            "is an upload (one file); drop split", "split")
        if self.validation_split is not None and self.validation_id is not None:
            raise SpecError("dataset.validation_split chooses a split of a save_to_disk folder, and "
                            "dataset.validation_id is an upload (one file); drop validation_split", "validation_split")
        if self.validation_split is not None and self.validation_path is None and self.path is None:
            raise SpecError("dataset.validation_split chooses a split of a save_to_disk folder: give it "
                            "dataset.path or dataset.validation_path as that folder", "validation_split")
        if self.validation_path is not None and self.validation_id is not None:
            raise SpecError("give at most one of dataset.validation_path (a file) or dataset.validation_id (an "
                            "uploaded dataset)", "validation_path")
        return self


class SequenceSpec(_Strict):
    max_prompt_tokens: int = Field(default=128, ge=1, le=MAX_TOKENS, description="Prompt budget; the prompt keeps its end.")
    max_response_tokens: int = Field(
        default=384, ge=1, le=MAX_TOKENS, description="Response budget; the response *text* is cut so both models see the same string."
    )
    length_unit: Literal["student", "teacher"] = Field(
        default="student", description="Whose tokens the budgets count."
    )
    eos_span: bool = Field(
        default=True,
        description="Score the end of the response as a final span of its own on both sides "
        "(false: the paper's behaviour, which never scores EOS).",
    )
    prompt_format: Literal["raw", "chat_template"] = Field(
        default="raw", description="raw text, or each model's own chat template around the prompt."
    )


class _RankLayout(_Strict):
    """How a training stage spreads over GPUs: the same three fields on ``training`` and ``contrastive``."""

    devices: int = Field(
        default=1, ge=1, le=MAX_DEVICES,
        description="GPUs this stage needs (torch.distributed, one rank per GPU on one worker host). The job runs "
        "on the largest of training.devices and contrastive.devices, and every training stage trains on all of "
        "them: the global batch_size is split over the ranks, so it must be a multiple of ranks * micro_batch_size.",
    )
    strategy: Strategy = Field(
        default="auto",
        description="ddp (a full replica per GPU), fsdp (parameters, gradients and optimizer state sharded), or "
        "auto: ddp when the student fits one GPU with its optimizer state, else fsdp (ctpd_core.memory_plan).",
    )
    activation_checkpointing: bool | None = Field(
        default=None, description="Recompute activations in the backward pass (less memory, ~30 % more compute); "
        "default: on with fsdp, off otherwise.",
    )


class ContrastiveSpec(_RankLayout):
    """π+ and π− (method §2, stages 2a/2b): given as models, or trained by DPO and by DPO on swapped pairs,
    both initialised from (and referenced to) the teacher (or the student, for TIS-DPO weights)."""

    # _both_or_neither in JSON Schema: both ready models given, or neither (each absent or null); said as `not`
    # (not just one of them) for the reason DatasetRef gives.
    model_config = ConfigDict(json_schema_extra={"not": {"anyOf": [
        {"required": ["positive"], "properties": {"positive": {"type": "object"}, "negative": {"type": "null"}}},
        {"required": ["negative"], "properties": {"negative": {"type": "object"}, "positive": {"type": "null"}}},
    ]}})

    positive: ModelRef | None = Field(default=None, description="A ready π+; trained when unset.")
    negative: ModelRef | None = Field(default=None, description="A ready π−; trained when unset.")
    beta: float = Field(default=0.3, gt=0, le=MAX_BETA, description="DPO β for training π+ and π− (paper: 0.3).")
    learning_rate: float = Field(default=2e-6, gt=0, le=MAX_LEARNING_RATE, description="Paper: 2e-6 for both π+ and π−.")
    epochs: float = Field(default=1.0, gt=0, le=MAX_EPOCHS)
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Cap on optimizer steps per contrastive model.")

    @model_validator(mode="after")
    def _both_or_neither(self) -> ContrastiveSpec:
        if (self.positive is None) != (self.negative is None):
            missing = "positive" if self.positive is None else "negative"  # the fix: add the one left out
            raise SpecError("give both contrastive.positive and contrastive.negative, or neither (to train them)",
                            missing)
        return self


class WeightsSpec(_Strict):
    source: WeightSource | None = Field(
        default=None,
        description="teacher_contrastive (the paper), student_contrastive, uniform or random. "
        "Default: teacher_contrastive for ctpd, student_contrastive for tisdpo, uniform for dpo.",
    )
    lower: float = Field(default=-0.5, ge=-MAX_CLAMP, le=MAX_CLAMP, description="Clamp lower bound L on log π+ − log π− (method §4.2).")
    upper: float = Field(default=1.5, ge=-MAX_CLAMP, le=MAX_CLAMP, description="Clamp upper bound U.")
    scale: float = Field(default=1.0, gt=0, le=MAX_SCALE, description="The normaliser k.")
    random_low: float = Field(default=0.7, gt=0, le=MAX_SCALE, description="Random ablation: U(random_low, random_high).")
    random_high: float = Field(default=1.3, gt=0, le=MAX_SCALE)
    average: bool = Field(
        default=False,
        description="Replace each response's contrastive weights by their mean: the paper's 'Average weight' "
        "ablation (method §4.3), read as sequence-level weighting. It keeps each response's total weight, so it "
        "separates *which* spans the weights favour from *how large* the weighted loss is.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> WeightsSpec:
        if self.lower >= self.upper:
            raise SpecError(f"weights.lower ({self.lower}) must be below weights.upper ({self.upper})", "lower")
        if self.random_low >= self.random_high:
            raise SpecError("weights.random_low must be below weights.random_high", "random_low")
        return self


class LoraSpec(_Strict):
    enabled: bool = Field(default=False, description="LoRA adapters (peft) instead of full fine-tuning (the paper).")
    r: int = Field(default=16, ge=1, le=MAX_LORA_RANK)
    alpha: float = Field(default=32.0, gt=0, le=MAX_LORA_ALPHA)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[Text] | Literal["all-linear"] = "all-linear"



class KdSpec(_Strict):
    """The knowledge-distillation baselines (method §8): ``(1 − κ)·CE + κ·KD`` on the chosen responses. Each
    field is read by the methods named in it; setting one for another method is an error."""

    kappa: float = Field(
        default=0.5, ge=0, le=1, description="uld, dskd: κ, the weight of the distillation term (paper: 0.5).",
    )
    temperature: float = Field(
        default=2.0, gt=0, le=100.0, description="dskd: the temperature of its KL terms (paper: 2.0).",
    )
    uld_alignment: UldAlignment = Field(
        default="span",
        description="uld: which student and teacher positions are compared. span: the position predicting the "
        "first token of each aligned span on both sides, where both models condition on the same text; position: "
        "the paper's ULD, response token j against response token j from the first answer token on.",
    )
    projector_learning_rate: float = Field(
        default=1e-3, gt=0, le=MAX_LEARNING_RATE,
        description="dskd: the learning rate of its freshly initialised projector (the student keeps "
        "training.learning_rate); DSKD's scripts use 1e-3.",
    )

    def fields_for(self, method: str) -> tuple[str, ...]:
        return _KD_FIELDS_READ_BY.get(method, ())


# Which kd fields each method reads (every other method reads none): the one table JobSpec checks kd against.
_KD_FIELDS_READ_BY: dict[str, tuple[str, ...]] = {
    "uld": ("kappa", "uld_alignment"), "dskd": ("kappa", "temperature", "projector_learning_rate"),
}


# A URI scheme (RFC 3986): what tells MLflow which store to use; a bare path would be its deprecated file store.
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")


class MlflowSpec(_Strict):
    """Where the job is mirrored as an MLflow run (worker/tracking.py). Unset fields fall back to the
    deployment's (``CTPD_MLFLOW_TRACKING_URI``, ``CTPD_MLFLOW_EXPERIMENT``); with no URI anywhere, nothing is
    tracked. Tracking only reports: a store that cannot be reached is a warning on the job, never its failure."""

    uri: Text | None = Field(
        default=None, min_length=1, max_length=2048,
        description="An MLflow tracking URI: an MLflow server (`https://mlflow.example.com`), or, where the "
        "deployment allows server paths, a local store (`sqlite:////data/mlflow.db`). No credentials in it: the "
        "spec is stored and shown with the job. The workers' own MLflow credentials (MLFLOW_TRACKING_TOKEN, ...) "
        "go only to the deployment's tracking server and to admin keys' specs; a tenant's server gets none.",
    )
    experiment: Text | None = Field(
        default=None, min_length=1, max_length=256,
        description="The MLflow experiment (created if missing); default: the deployment's (`ctpd`).",
    )

    @model_validator(mode="after")
    def _uri(self) -> MlflowSpec:
        if self.uri is None:
            return self
        try:
            parsed = urlsplit(self.uri)
            has_credentials = parsed.password is not None or "@" in parsed.netloc
        except ValueError as error:  # e.g. an unclosed [IPv6 address]
            raise SpecError(f"tracking.mlflow.uri {self.uri[:80]!r} is not a URI ({error}); name an MLflow server "
                            "(https://host[:port])", "uri") from None
        if not _URI_SCHEME.match(parsed.scheme or "") or len(parsed.scheme) < 2:  # "C:/..." is a path, not a URI
            raise SpecError(
                f"tracking.mlflow.uri {self.uri[:80]!r} is not a URI; name an MLflow server (https://host[:port]) "
                "or a local store such as sqlite:////abs/path/mlflow.db (a bare folder is MLflow's retired file "
                "store)", "uri",
            )
        if has_credentials:
            raise SpecError(
                "tracking.mlflow.uri must not carry credentials (the spec is stored and shown with the job); drop "
                "the user:password@ part (the operator gives the workers MLFLOW_TRACKING_TOKEN for the deployment's "
                "own server, CTPD_MLFLOW_TRACKING_URI; a tenant's server is sent no credentials)", "uri",
            )
        return self


class TrackingSpec(_Strict):
    """Experiment tracking: the job mirrored into an MLflow run (params, per-step metrics, the model)."""

    mlflow: MlflowSpec = MlflowSpec()


class TrainingSpec(_RankLayout):
    learning_rate: float = Field(default=1e-6, gt=0, le=MAX_LEARNING_RATE, description="Paper: 1e-6 for CTPD.")
    lr_schedule: LrSchedule = "cosine"
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of steps spent warming up (paper: 10 %).")
    epochs: float = Field(default=1.0, gt=0, le=MAX_EPOCHS, description="Paper: one epoch.")
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Stop after this many optimizer steps.")
    batch_size: int = Field(default=16, ge=1, le=MAX_BATCH, description="Pairs per optimizer step (paper: 16).")
    micro_batch_size: int = Field(default=2, ge=1, le=MAX_BATCH, description="Pairs per forward pass; gradients accumulate.")
    max_grad_norm: float = Field(default=1.0, gt=0, le=MAX_GRAD_NORM)
    weight_decay: float = Field(default=0.01, ge=0, le=MAX_WEIGHT_DECAY, description="AdamW (torch default).")
    precision: Precision = Field(default="auto", description="auto: bf16 autocast on GPU, fp32 on CPU.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seeds data order, sampling and initialisation.")
    checkpoint_every: int = Field(default=100, ge=1, le=MAX_STEPS, description="Save a resumable checkpoint every N steps.")

    @model_validator(mode="after")
    def _batches(self) -> TrainingSpec:
        if self.batch_size % self.micro_batch_size:
            raise SpecError(
                f"training.batch_size ({self.batch_size}) must be a multiple of training.micro_batch_size "
                f"({self.micro_batch_size})", "batch_size",
            )
        per_step = self.devices * self.micro_batch_size
        if self.devices > 1 and self.batch_size % per_step:
            raise SpecError(
                f"training.batch_size ({self.batch_size}) must be a multiple of training.devices * "
                f"training.micro_batch_size ({self.devices} * {self.micro_batch_size} = {per_step}): each of the "
                f"{self.devices} ranks takes an equal share of every batch; use batch_size "
                f"{per_step * max(1, round(self.batch_size / per_step))}", "batch_size",
            )
        return self


class EvaluationSpec(_Strict):
    max_pairs: int | None = Field(default=256, ge=1, le=MAX_PAIRS, description="Held-out pairs to evaluate (None: all).")
    batch_size: int = Field(default=8, ge=1, le=MAX_BATCH)


# ---------------------------------------------------------------------------------------------- export

ExportDtype = Literal["auto", "bf16", "fp16", "fp32"]
# A Hugging Face dataset id (``imdb``, ``org/name``): what the model card's ``datasets`` may name. An upload id or a
# server path is not one, so neither reaches a card that may be published.
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$"


class ExportSpec(_Strict):
    """What the exported student folder (and a materialised checkpoint) is written as. Training is unaffected:
    the trained weights stay fp32 in memory and in checkpoints; only the files written are cast."""

    dtype: ExportDtype = Field(
        default="auto",
        description="The dtype of the written weights. auto: the dtype the student's base declares (its "
        "config.json `dtype` / `torch_dtype`; bf16 for the catalog's models, which are bf16 upstream), fp32 when "
        "it declares none. bf16 and fp16 halve the files of an fp32 export.",
    )
    license: Text | None = Field(
        default=None, max_length=100,
        description="The model card's license (a Hub license id such as apache-2.0); default: the base's, when known.",
    )
    datasets: list[Annotated[str, Field(pattern=HUB_ID_PATTERN, max_length=200)]] = Field(
        default_factory=list, max_length=20,
        description="Hub ids of the training data, for the model card's `datasets` (an upload is not on the Hub, "
        "so only what you name here is listed).",
    )


class JobSpec(_Strict):
    method: Method = Field(
        default="ctpd",
        description="ctpd; a preference baseline on the student alone: dpo, tisdpo; or a baseline trained on the "
        "chosen responses: sft (the student alone), uld or dskd (cross-tokenizer distillation from the teacher).",
    )
    teacher: ModelRef | None = Field(default=None, description="The teacher; required for ctpd, uld and dskd.")
    student: ModelRef
    dataset: DatasetRef
    beta: float = Field(default=0.1, gt=0, le=MAX_BETA, description="β of the distillation loss (paper: 0.1).")
    weights: WeightsSpec = WeightsSpec()
    kd: KdSpec = Field(default=KdSpec(), description="Settings of the uld and dskd baselines.")
    contrastive: ContrastiveSpec = ContrastiveSpec()
    training: TrainingSpec = TrainingSpec()
    sequence: SequenceSpec = SequenceSpec()
    lora: LoraSpec = LoraSpec()
    tracking: TrackingSpec = Field(
        default=TrackingSpec(), description="Mirror the job into an MLflow run (see tracking.mlflow)."
    )
    evaluation: EvaluationSpec = EvaluationSpec()
    export: ExportSpec = ExportSpec()
    priority: Priority = Field(
        default="normal",
        description="Claim order among queued jobs that can run: high before normal before low, oldest first "
        "within a priority (per-tenant limits still apply).",
    )
    name: Text | None = Field(default=None, max_length=200, description="A label for people.")
    metadata: dict[Text, Text] = Field(
        default_factory=dict, json_schema_extra=_text_map_schema, description="Free-form key/value labels (filterable)."
    )

    @model_validator(mode="after")
    def _method_rules(self) -> JobSpec:
        default_source: dict[str, WeightSource] = {
            "ctpd": "teacher_contrastive",
            "tisdpo": "student_contrastive",
            "dpo": "uniform",
            **{method: "uniform" for method in KD_METHODS},
        }
        if self.weights.source is None:
            object.__setattr__(self, "weights", self.weights.model_copy(update={"source": default_source[self.method]}))
        if self.method in TEACHER_METHODS and self.teacher is None:
            raise SpecError(f"method {self.method} needs a teacher: add {{\"teacher\": {{\"model\": ...}}}}", "teacher")
        if self.method in KD_METHODS:
            self._kd_rules()
        # A kd setting the method does not read is refused rather than ignored. Compared with the defaults (not
        # with the fields given), so that the resolved spec, which holds every default, validates again.
        unread = [name for name in KdSpec.model_fields if name not in self.kd.fields_for(self.method)
                  and getattr(self.kd, name) != KdSpec.model_fields[name].default]
        if unread:
            readers = " and ".join(m for m, names in _KD_FIELDS_READ_BY.items() if unread[0] in names)
            raise SpecError(f"kd.{unread[0]} is read by {readers} only, and method {self.method} would "
                            "ignore it; drop it", "kd", unread[0])
        if self.weights.source == "teacher_contrastive" and self.method != "ctpd":
            raise SpecError(
                f"weights.source teacher_contrastive needs method ctpd (the {self.method} baseline trains the "
                "student alone); use student_contrastive or uniform", "weights", "source",
            )
        if self.weights.average and not self.needs_contrastive:  # checked once the default source is known
            raise SpecError(
                f"weights.average averages contrastive weights, and method {self.method} with weights.source "
                f"{self.weights.source} has none to average; use teacher_contrastive or student_contrastive, or "
                "drop weights.average", "weights", "average",
            )
        # One job runs on one set of ranks: every training stage trains on all gpus_required of them.
        per_step = self.gpus_required * self.training.micro_batch_size
        if self.gpus_required > self.training.devices and self.training.batch_size % per_step:
            raise SpecError(
                f"training.batch_size ({self.training.batch_size}) must be a multiple of contrastive.devices * "
                f"training.micro_batch_size ({per_step}): the job runs on {self.gpus_required} ranks and every "
                "training stage splits its batch over all of them", "contrastive", "devices",
            )
        if self.method == "dpo" and self.weights.source != "uniform":
            raise SpecError("method dpo uses no weights; use tisdpo for weighted DPO, or drop weights.source",
                            "weights", "source")
        return self

    def _kd_rules(self) -> None:
        if self.weights.source != "uniform":
            raise SpecError(f"method {self.method} trains on the chosen responses and uses no span weights; drop "
                            "weights.source (or use tisdpo / ctpd for weighted preference training)", "weights", "source")
        if self.method == "dskd" and self.gpus_required > 1:
            raise SpecError("method dskd trains on one device (its cross-model attention is not wired for "
                            "torch.distributed); set training.devices to 1, or use uld / ctpd on several GPUs",
                            "training", "devices")

    @property
    def uses_teacher(self) -> bool:
        """Whether the job reads the teacher (its tokenizer in prepare, its model in a stage)."""
        return self.method in TEACHER_METHODS

    @property
    def needs_contrastive(self) -> bool:
        return self.weights.source in ("teacher_contrastive", "student_contrastive")

    @property
    def trains_contrastive(self) -> bool:
        """Whether the job trains π+ / π− itself (they are needed and not given as ready models)."""
        return self.needs_contrastive and self.contrastive.positive is None

    @property
    def gpus_required(self) -> int:
        """The GPUs one worker host must have to run this job: its widest training stage."""
        return max(self.training.devices, self.contrastive.devices if self.trains_contrastive else 1)


def read_spec_data(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML or JSON spec file (not yet validated)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping (a job spec), not {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML: numbers, booleans, null, strings)."""
    import copy

    import yaml

    data = copy.deepcopy(data)
    for override in overrides:
        key, separator, raw = override.partition("=")
        if not separator or not key:
            raise ValueError(f"override {override!r} must look like section.field=value, e.g. training.max_steps=4")
        target = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = target.get(part)
            if child is None:
                child = target[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {override!r}: {part} is not a section")
            target = child
        target[leaf] = yaml.safe_load(raw)
    return data


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a spec from a YAML or JSON file, with optional ``dotted.key=value`` overrides."""
    return JobSpec.model_validate(apply_overrides(read_spec_data(path), overrides or []))
