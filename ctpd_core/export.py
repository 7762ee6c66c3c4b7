"""The export stage: the distilled student as a Hugging Face folder that ``from_pretrained`` loads.

The folder holds the weights (safetensors), the tokenizer, ``metrics.json``, ``ctpd_spec.json`` (the
resolved spec) and a model card (README.md) with the spec, the data fingerprint and the metrics. A LoRA run
exports the merged weights at the top level and the adapter alone under ``adapter/``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def export_student(
    model: Any,  # a transformers PreTrainedModel, or a PEFT model wrapping one
    tokenizer: Any,
    folder: Path,
    *,
    spec: Mapping[str, Any],
    metrics: Mapping[str, Any],
    data_fingerprint: str,
    stage_seconds: Mapping[str, float] | None = None,
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if _is_peft(model):
        model.save_pretrained(str(folder / "adapter"), safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / "metrics.json").write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))
    (folder / "ctpd_spec.json").write_text(json.dumps(dict(spec), indent=2, sort_keys=True))
    (folder / "README.md").write_text(model_card(spec, metrics, data_fingerprint, stage_seconds or {}))
    return folder


def model_card(
    spec: Mapping[str, Any], metrics: Mapping[str, Any], data_fingerprint: str, stage_seconds: Mapping[str, float]
) -> str:
    student = spec.get("student", {}).get("model", "?")
    teacher = (spec.get("teacher") or {}).get("model")
    method = spec.get("method", "ctpd")
    rows = "\n".join(
        f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
        for name, value in sorted(metrics.items())
    )
    timing = "\n".join(f"| {stage} | {seconds:.1f} |" for stage, seconds in stage_seconds.items())
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {student}",
        "tags: [ctpd, preference-distillation, cross-tokenizer]",
        "---",
        "",
        f"# {spec.get('name') or 'Distilled student'}",
        "",
        f"Student `{student}` trained with **{method}**"
        + (f", distilling the preferences of teacher `{teacher}` across tokenizers" if teacher and method == "ctpd" else "")
        + " (CTPD, arXiv 2601.11865).",
        "",
        f"- Training data fingerprint (sha256 of the pairs): `{data_fingerprint}`",
        "",
        "## Held-out metrics",
        "",
        "| metric | value |",
        "|---|---|",
        rows,
        "",
    ]
    if timing:
        lines += ["## Stage wall times (s)", "", "| stage | seconds |", "|---|---|", timing, ""]
    lines += ["## Resolved job spec", "", "```json", json.dumps(dict(spec), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
