"""A preflight report for a person (``ctpd submit SPEC --dry-run``): what is wrong and how to fix it first, then the
numbers (tokenizers, dataset, the sample's alignment and truncation, steps, memory, duration). ``--json`` prints
the report object itself (docs/preflight.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _percent(value: Any) -> str:
    return f"{100 * float(value):.1f} %" if isinstance(value, int | float) else "?"


def _lengths(summary: Mapping[str, Any] | None) -> str:
    if not summary or not summary.get("count"):
        return "none"
    return f"mean {summary['mean']:g}, p50 {summary['p50']}, p95 {summary['p95']}, max {summary['max']}"


def _issues(title: str, mark: str, issues: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [f"{title}:"]
    for entry in issues:
        where = f" {entry['param']}" if entry.get("param") else ""
        lines.append(f"  {mark} [{entry['code']}]{where}: {entry['message']}")
        lines.append(f"      fix: {entry['fix']}")
    return lines


def _seconds(value: float) -> str:
    value = float(value)
    if value < 90:
        return f"{value:.0f} s"
    if value < 5400:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def report_text(report: Mapping[str, Any]) -> str:
    """The report, errors and warnings first (each with its fix), then the numbers."""
    errors, warnings = report.get("errors") or [], report.get("warnings") or []
    pending = report.get("status") == "pending"
    verdict = ("incomplete: a worker has not answered yet" if pending else
               "refused: a job with this spec would fail" if errors else
               "ok: it can run; read the warnings below first" if warnings else "ok: no problem a preflight can see")
    lines = [f"preflight {report['id']}: {len(errors)} error(s), {len(warnings)} warning(s): {verdict}"]
    if pending:
        lines.append(f"  poll: {report.get('poll')} (the data part below is missing until a worker answers)")
    if errors:
        lines += ["", *_issues("errors", "x", errors)]
    if warnings:
        lines += ["", *_issues("warnings", "!", warnings)]

    spec = report.get("spec") or {}
    lines += ["", f"job: {spec.get('method')}, teacher {(spec.get('teacher') or {}).get('model')}, student "
                  f"{(spec.get('student') or {}).get('model')}"]
    tokenizers = report.get("tokenizers") or {}
    models = report.get("models") or {}
    if tokenizers:
        lines += ["", "tokenizers:"]
        for role, facts in tokenizers.items():
            model = models.get(role) or {}
            limit = model.get("max_position_embeddings")
            lines.append(f"  {role:<8} {facts['class']}, {facts['tokens']:,} tokens, offsets "
                         f"{'yes' if facts['offsets'] else 'NO'}, EOS {facts.get('eos_token')!r}, chat template "
                         f"{'yes' if facts.get('chat_template') else 'no'}"
                         + (f"; model: {limit:,} positions, vocabulary {model.get('vocab_size'):,}"
                            if isinstance(limit, int) and isinstance(model.get("vocab_size"), int) else ""))
    dataset = report.get("dataset") or {}
    if dataset.get("valid"):
        lines += ["", f"dataset: {dataset['train_pairs']} training pairs, {dataset['validation_pairs']} validation pairs"]
    elif dataset:
        lines += ["", f"dataset: invalid ({dataset.get('total_errors')} bad row(s))",
                  *(f"  {row}" for row in dataset.get("row_errors") or [])]
    sample = report.get("sample") or {}
    if sample:
        truncation = sample.get("truncation") or {}
        unit = truncation.get("length_unit")
        lines += ["", f"sample: {sample['pairs']} pairs ({truncation.get('responses')} responses) through the prepare "
                      "stage's encoding and alignment"]
        lines.append(f"  truncated responses: {truncation.get('truncated_responses')} of {truncation.get('responses')} "
                     f"({_percent(truncation.get('truncated_share'))}) at max_response_tokens "
                     f"{truncation.get('max_response_tokens')} {unit} tokens; cut by {truncation.get('tokens_cut_mean')} "
                     f"tokens on average, at most {truncation.get('tokens_cut_max')}")
        lines.append(f"  response tokens ({unit}): {_lengths(truncation.get('response_tokens'))}")
        lines.append(f"  truncated prompts: {truncation.get('truncated_prompts')} of {sample['pairs']} at "
                     f"max_prompt_tokens {truncation.get('max_prompt_tokens')}; prompt tokens: "
                     f"{_lengths(truncation.get('prompt_tokens'))}")
        if "alignment" in sample:
            alignment = sample["alignment"]
            dropped = sample.get("dropped") or {}
            lines.append(f"  kept pairs: {sample.get('kept_pairs')} (dropped: {dropped.get('unalignable', 0)} "
                         f"unalignable, {dropped.get('empty_response', 0)} empty)")
            lines.append(f"  spans per response: {_lengths(sample.get('spans_per_response'))}")
            lines.append(f"  spans: {alignment.get('spans'):,}; 1:1 {_percent(alignment.get('share_1:1'))}, "
                         f"1:n {_percent(alignment.get('share_1:n'))}, n:1 {_percent(alignment.get('share_n:1'))}, "
                         f"n:m {_percent(alignment.get('share_n:m'))} (teacher:student tokens per span)")
            histogram = sample.get("span_length_histogram") or {}
            if histogram.get("bins"):
                cells = "  ".join(f"{label}: {count}" for label, count in zip(histogram["bins"], histogram["spans"],
                                                                              strict=True))
                lines.append(f"  span length (bytes): {cells}")
            longest = sample.get("sequence_tokens") or {}
            lines.append(f"  longest sequence: {longest.get('student')} student, {longest.get('teacher')} teacher tokens")
    steps = report.get("steps") or {}
    if steps:
        lines += ["", f"steps (over {steps.get('train_pairs')} training pairs"
                      f"{', estimated from the sample' if steps.get('estimated') else ''}):"]
        if "contrastive" in steps:
            contrastive = steps["contrastive"]
            lines.append(f"  contrastive  {contrastive['total_steps']} steps for each of pi+ and pi-, batch "
                         f"{contrastive['batch_size']}")
        if "distill" in steps:
            distill = steps["distill"]
            lines.append(f"  distill      {distill['total_steps']} steps, batch {distill['batch_size']}, "
                         f"{distill['warmup_steps']} warmup")
        evaluate = steps.get("evaluate") or {}
        lines.append(f"  evaluate     {evaluate.get('pairs')} held-out pairs, {evaluate.get('batches')} batches")
    memory = report.get("memory") or {}
    if memory.get("text"):
        lines += ["", "memory per device:", *(f"  {line}" if line else "" for line in memory["text"].splitlines())]
    duration = report.get("duration") or {}
    lines += [""]
    if duration.get("seconds") is not None:
        lines.append(f"duration: about {_seconds(duration['seconds'])} on this deployment's workers")
    else:
        lines.append(f"duration: {duration.get('status', 'unknown')}: {duration.get('reason')}")
    if duration.get("basis"):
        lines.append(f"  basis: {duration['basis']}")
    for stage, estimate in (duration.get("stages") or {}).items():
        if estimate.get("seconds") is not None:
            lines.append(f"  {stage:<12} {_seconds(estimate['seconds'])} (from {estimate['measured_jobs']} job(s))")
        else:
            lines.append(f"  {stage:<12} unknown: {estimate.get('reason')}")
    return "\n".join(lines)
