"""The export: a student (the distilled one, or a checkpoint of it) as a Hugging Face folder ``from_pretrained`` loads.

The folder holds the weights (safetensors, in the export dtype), the tokenizer, ``metrics.json``,
``ctpd_spec.json`` (the resolved spec) and a model card (``README.md``) that ``huggingface_hub.ModelCard`` and the
Hub read: ``base_model``, ``license``, ``datasets``, ``tags`` and the held-out metrics as a ``model-index``. A LoRA
run exports the merged weights at the top level and the adapter alone under ``adapter/``.

**Dtype.** Training keeps fp32 master weights; the export casts what it *writes* (the in-memory model is left as
it is) and says so in ``config.json``, so ``from_pretrained`` loads it in that dtype. ``auto`` is the dtype the
base model declares (:func:`declared_dtype`): a bf16 model fine-tuned into an fp32 file is twice the size people
expect, and loads as fp32 by default.

**Names on the card** are public ones only (:func:`public_model_id`): a catalog model's Hub id, a hub id, or the
repository of a Hub cache folder; a local folder's path (a server's business, perhaps a secret) never reaches it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctpd_core.catalog import CATALOG

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# config.json's spelling of each (transformers writes and reads ``dtype``; before 4.56 ``torch_dtype``).
CONFIG_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Every card: ctpd and the method. A ctpd student was distilled from a teacher across tokenizers; the dpo and
# tisdpo baselines trained the student alone.
DISTILLATION_TAGS = ("distillation", "preference-distillation", "cross-tokenizer")
BASELINE_TAGS = ("preference-optimization",)
KD_TAGS = ("distillation", "knowledge-distillation", "cross-tokenizer")  # uld, dskd: on the chosen responses
SFT_TAGS = ("sft",)
# What the card says the method did, after "fine-tuned from <base> with **<method>**".
_METHOD_CLAUSE = {
    "ctpd": ", distilling the preferences of{teacher} across tokenizers",
    "uld": ", distilling the next-token distributions of{teacher} across tokenizers on the chosen responses "
    "(Universal Logit Distillation)",
    "dskd": ", distilling{teacher} across tokenizers on the chosen responses (Dual-Space KD with cross-model "
    "attention; its projector is saved beside the weights)",
    "sft": " on the chosen responses",
}


def _method_tags(method: str) -> tuple[str, ...]:
    return {"ctpd": DISTILLATION_TAGS, "uld": KD_TAGS, "dskd": KD_TAGS, "sft": SFT_TAGS}.get(method, BASELINE_TAGS)
_HUB_CACHE_FOLDER = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/[^/]+/?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


# ------------------------------------------------------------------------------------------ names and dtype


def public_model_id(reference: str) -> str | None:
    """The name a model card may give a model reference: a catalog entry's Hub id, the repository of a Hugging
    Face cache snapshot folder (``.../models--org--name/snapshots/<sha>``), a hub id; None for any other local
    folder or file (its path is not a name anyone else can use)."""
    if reference in CATALOG:
        return CATALOG[reference].hub_id
    path = Path(reference).expanduser()
    cached = _HUB_CACHE_FOLDER.search(path.as_posix())
    if cached is not None:
        return cached.group("repo").replace("--", "/")
    if path.exists() or reference.startswith((".", "/", "~")) or not _HUB_ID.match(reference):
        return None
    return reference


def _config_dtype(config: Mapping[str, Any]) -> str | None:
    value = config.get("dtype") or config.get("torch_dtype")
    if not isinstance(value, str):
        return None
    value = value.removeprefix("torch.")
    return {name: short for short, name in CONFIG_DTYPES.items()}.get(value)


def declared_dtype(reference: str, *, revision: str | None = None) -> str | None:
    """The dtype (``fp32``, ``bf16``, ``fp16``) a base model's own files declare, or None when they declare none
    (or declare one the export cannot write). Catalog models: the dtype they are published in upstream (their
    converted folder is fp32). A hub id is read from the local Hub cache only, where loading it put it."""
    if reference in CATALOG:
        return _config_dtype({"dtype": CATALOG[reference].upstream_dtype})
    path = Path(reference).expanduser()
    config_file: Path | None = path / "config.json" if path.is_dir() else None
    if config_file is None and not path.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(reference, "config.json", revision=revision)
        config_file = Path(cached) if isinstance(cached, str) else None
    if config_file is None or not config_file.is_file():
        return None
    try:
        return _config_dtype(json.loads(config_file.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def resolve_export_dtype(choice: str, declared: str | None) -> str:
    """The dtype to write: ``choice`` unless it is ``auto``, then the declared one, else fp32."""
    if choice == "auto":
        return declared or "fp32"
    if choice not in DTYPES:
        raise ValueError(f"export.dtype {choice!r} is not one of auto, {', '.join(DTYPES)}")
    return choice


def base_license(reference: str, *, revision: str | None = None) -> str | None:
    """The license a base model's card declares: a catalog entry's Hub license id, or the ``license`` of the
    README.md in its folder (or in the Hub cache); None when unknown."""
    if reference in CATALOG:
        return CATALOG[reference].hub_license
    path = Path(reference).expanduser()
    readme: Path | None = path / "README.md" if path.is_dir() else None
    if readme is None and not path.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(reference, "README.md", revision=revision)
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except (OSError, ValueError) as error:
        logger.debug("cannot read the card of %s: %s", reference, error)
        return None
    return value if isinstance(value, str) else None


# -------------------------------------------------------------------------------------------- the card


@dataclass(frozen=True)
class CardFacts:
    """What the model card says, in public terms (the recipe maps the spec to it)."""

    title: str
    method: str
    base_model: str | None  # a public id (public_model_id), never a path
    teacher: str | None  # likewise
    license: str | None
    datasets: Sequence[str] = ()  # Hub ids only
    held_out: Mapping[str, float] = field(default_factory=dict)  # -> eval_results (model-index)
    checkpoint_step: int | None = None  # a checkpoint of the run rather than its final student
    training_metrics: Mapping[str, float] = field(default_factory=dict)  # at that step
    data_fingerprint: str | None = None
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)  # the hyperparameters (no paths, no references)


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(facts: CardFacts, dtype: str) -> str:
    """The README.md: YAML metadata from ``huggingface_hub.ModelCardData`` (so the Hub and ``ModelCard.load``
    read it back) and a body for people."""
    from huggingface_hub import EvalResult, ModelCardData

    held_out = {name: float(value) for name, value in sorted(facts.held_out.items())
                if name != "pairs" and isinstance(value, (int, float))}  # pairs is a count, not a result
    dataset_type = facts.datasets[0] if facts.datasets else "preference-pairs"
    evaluated_on = f"held-out preference pairs ({int(facts.held_out['pairs'])})" if "pairs" in facts.held_out \
        else "held-out preference pairs"
    eval_results = [
        EvalResult(task_type="text-generation", task_name="Preference distillation", dataset_type=dataset_type,
                   dataset_name=evaluated_on, dataset_split="validation", metric_type=name, metric_name=name,
                   metric_value=value)
        for name, value in held_out.items()
    ]
    data = ModelCardData(
        model_name=facts.title, base_model=facts.base_model, license=facts.license,
        datasets=list(facts.datasets) or None, library_name="transformers", pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["ctpd", facts.method, *_method_tags(facts.method)])),
        eval_results=eval_results or None,
    )
    about = f"`{facts.base_model}`" if facts.base_model else "a local model"
    teacher = f" teacher `{facts.teacher}`" if facts.teacher else " a teacher"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {facts.title}", "",
        f"A student fine-tuned from {about} with **{facts.method}**"
        + _METHOD_CLAUSE.get(facts.method, "").format(teacher=teacher)
        + " (CTPD, arXiv 2601.11865), exported by ctpd.", "",
    ]
    if facts.checkpoint_step is not None:
        lines += [f"This is the training checkpoint at **step {facts.checkpoint_step}**, not the run's final "
                  "student: the held-out evaluation ran on the final one only.", ""]
    lines += [f"- Weights: {CONFIG_DTYPES[dtype]} safetensors"]
    if facts.data_fingerprint:
        lines += [f"- Training data fingerprint (sha256 of the pairs): `{facts.data_fingerprint}`"]
    lines += [""]
    if held_out:
        lines += ["## Held-out metrics", "", "| metric | value |", "|---|---|",
                  *(f"| {name} | {_number(value)} |" for name, value in held_out.items()), ""]
    if facts.training_metrics:
        lines += [f"## Training metrics at step {facts.checkpoint_step}", "", "| metric | value |", "|---|---|",
                  *(f"| {name} | {_number(value)} |" for name, value in sorted(facts.training_metrics.items())), ""]
    if facts.stage_seconds:
        lines += ["## Stage wall times (s)", "", "| stage | seconds |", "|---|---|",
                  *(f"| {stage} | {seconds:.1f} |" for stage, seconds in facts.stage_seconds.items()), ""]
    if facts.settings:
        lines += ["## Settings", "", "```json", json.dumps(dict(facts.settings), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- writing


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def cast_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The model's tensors in ``dtype`` (None when they already are): copies, so the model is untouched, and one
    copy per storage, so tied weights stay tied (save_pretrained then writes them once)."""
    state = model.state_dict()
    if all(not tensor.is_floating_point() or tensor.dtype == dtype for tensor in state.values()):
        return None
    copies: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in copies:
            copies[key] = tensor.detach().to(device="cpu", dtype=dtype)
        out[name] = copies[key]
    return out


def save_weights(model: Any, folder: Path, dtype: str) -> None:
    """``model.save_pretrained`` in ``dtype`` (``fp32``, ``bf16``, ``fp16``), with config.json declaring it."""
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=cast_state_dict(model, DTYPES[dtype]))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["dtype"] = CONFIG_DTYPES[dtype]  # save_pretrained wrote the in-memory model's dtype
    config.pop("torch_dtype", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_student(
    model: Any,  # a transformers PreTrainedModel, or a PEFT model wrapping one
    tokenizer: Any,
    folder: Path,
    *,
    spec: Mapping[str, Any],
    metrics: Mapping[str, Any],
    card: CardFacts,
    dtype: str = "fp32",
) -> Path:
    """Write the folder; ``dtype`` is a resolved one (:func:`resolve_export_dtype`). A PEFT model is merged (in
    place: an export is the last use of the trained model)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if _is_peft(model):
        model.save_pretrained(str(folder / "adapter"), safe_serialization=True)
        model = model.merge_and_unload()
    save_weights(model, folder, dtype)
    tokenizer.save_pretrained(str(folder))
    (folder / "metrics.json").write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))
    (folder / "ctpd_spec.json").write_text(json.dumps(dict(spec), indent=2, sort_keys=True))
    (folder / "README.md").write_text(model_card(card, dtype), encoding="utf-8")
    return folder
