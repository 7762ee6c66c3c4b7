"""The worker's part of a preflight (``ctpd.preflight``): what only a process with the tokenizers can check.

The API (``app/preflight.py``) checks the spec, the references, the memory plan and the duration; it cannot load a
tokenizer (``app/`` imports no transformers), so it stores a ``preflights`` row and sends this task. Here, with the
recipe's own functions (``worker/recipe.py``: the same loading, splitting, encoding and step arithmetic a job
uses):

* the models each role names exist where the worker would load them (catalog package, folder with config.json and
  safetensors), and their configs' vocabulary and positions fit their tokenizers and the sequence budget;
* both tokenizers load and give offsets; the encoder accepts them (EOS for ``eos_span``, a chat template for
  ``prompt_format: chat_template``);
* the whole dataset is read and validated (every row, as the job's loader does) and split as the job splits it;
* a seeded sample of pairs goes through the prepare stage's encoding and alignment: spans per response, the share
  of 1:1 spans, the span length histogram, pairs dropped, and how many responses (and prompts) the length budget
  truncates and by how many tokens, measured with the counting tokenizer on the uncut text;
* LoRA ``target_modules`` exist in the student (its modules listed on the meta device, no weights loaded);
* the steps of each training stage (``ctpd_core.train.plan_steps``), refusing what fit() would refuse.

Every problem is an issue (``level`` error or warning, ``code``, ``param``, ``message``, ``fix``); the task never
fails for a bad dataset or an unloadable model: that is the report. The token lengths measured on an uploaded
dataset are recorded on it (``app.db.datasets.record_token_lengths``) per tokenizer.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.db import datasets as dataset_rows
from app.db import preflights as preflight_rows
from app.db.engine import Database
from app.policy import PolicyViolation
from app.preflight import issue
from app.settings import Settings
from ctpd_core.alignment import AlignmentError, TokenizerOffsetsError
from ctpd_core.catalog import CATALOG, ModelLoadError, catalog_gguf_path
from ctpd_core.data import DatasetError, PreferencePair
from ctpd_core.encoding import PairEncoder, has_chat_template
from ctpd_core.models import check_model_folder, resolve_model_folder
from ctpd_core.records import Side
from ctpd_core.spec import JobSpec, ModelRef
from ctpd_core.vocab import Stage

logger = logging.getLogger(__name__)

Issue = dict[str, Any]
SAMPLE_SEED = 0  # the sample is the same for the same dataset: two preflights of one spec agree
SIDES: tuple[Side, ...] = ("student", "teacher")
MAX_CONVERSATION_SHAPES = 2048  # distinct (roles, system turn) a preflight renders: a few seconds of templates
TRUNCATION_WARNING_SHARE = 0.10  # more responses cut than this: a warning naming the budget that would keep 95 %


def _percentile(values: list[int], q: float) -> int:
    return int(np.percentile(np.asarray(values), q, method="higher")) if values else 0


def _length_summary(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    return {"count": len(values), "mean": round(float(np.mean(values)), 2), "p50": _percentile(values, 50),
            "p95": _percentile(values, 95), "max": max(values)}


# ------------------------------------------------------------------------------------------------ models


def _model_config(ref: ModelRef, model_cache: Path) -> tuple[Path | None, str | None]:
    """Where the worker would load ``ref``'s weights from (a folder; None: a hub id, checked through its
    tokenizer), or why it cannot. Cheap: a catalog entry's package is located, not converted."""
    reference = ref.model
    if reference in CATALOG:
        try:
            catalog_gguf_path(reference, model_cache)
        except ModelLoadError as error:
            return None, str(error)
        converted = model_cache / reference / "model"
        return (converted if (converted / "config.json").is_file() else None), None
    try:  # a folder, checked as the loader checks it; None for a hub id (not a catalog name: nothing converts)
        folder = resolve_model_folder(reference, cache_dir=model_cache)
        if folder is not None:
            check_model_folder(folder)
    except ModelLoadError as error:
        return None, str(error)
    return folder, None


def model_facts(role: str, ref: ModelRef, model_cache: Path, issues: list[Issue]) -> dict[str, Any]:
    """What the worker sees of one model: loadable, and its config's vocabulary and positions (when on disk)."""
    param = f"{role}.model"
    folder, problem = _model_config(ref, model_cache)
    facts: dict[str, Any] = {"model": ref.model, "loadable": problem is None}
    if problem is not None:
        issues.append(issue("error", "model_not_found", f"the {role} {ref.model!r} cannot be loaded: {problem}",
                            f"fix {param}: a catalog name ({', '.join(sorted(CATALOG))}), or a folder with "
                            "config.json and *.safetensors", param))
        return facts
    if folder is None:
        return facts
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=ref.trust_remote_code)
    except (OSError, ValueError) as error:
        facts["loadable"] = False
        issues.append(issue("error", "model_not_found", f"the {role} config in {folder} cannot be read: {error}",
                            f"fix {param}: a folder whose config.json transformers knows (or set "
                            f"{role}.trust_remote_code where the deployment allows it)", param))
        return facts
    text_config = getattr(config, "get_text_config", lambda: config)()
    facts["vocab_size"] = getattr(text_config, "vocab_size", None)
    facts["max_position_embeddings"] = getattr(text_config, "max_position_embeddings", None)
    return facts


def _lora_check(spec: JobSpec, facts: dict[str, Any], model_cache: Path, issues: list[Issue]) -> None:
    """LoRA ``target_modules`` the student lacks make peft refuse the distill stage after prepare, reference and
    contrastive already ran: the module names are read from the student's config on the meta device (no weights)."""
    targets = spec.lora.target_modules
    if not spec.lora.enabled or targets == "all-linear" or not facts.get("loadable"):
        return
    folder, _ = _model_config(spec.student, model_cache)
    if folder is None:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                            trust_remote_code=spec.student.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.student.trust_remote_code)
    except (OSError, ValueError, ImportError) as error:  # the config itself is reported by model_facts
        logger.info("preflight: the student's modules cannot be listed (%s); LoRA targets not checked", error)
        return
    leaves = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules() if name}
    missing = [target for target in targets if target not in leaves]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        issues.append(issue(
            "error", "lora_targets_missing",
            f"lora.target_modules {missing} name no module of the student {spec.student.model!r}; peft would refuse "
            "the distill stage after the earlier stages ran",
            f"use its linear layers ({', '.join(linear)}) or lora.target_modules: all-linear", "lora.target_modules"))


def _vocabulary_check(role: str, tokenizer: Any, facts: dict[str, Any], issues: list[Issue]) -> None:
    vocab = facts.get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        issues.append(issue(
            "error", "tokenizer_mismatch",
            f"the {role} tokenizer has {len(tokenizer)} tokens but the {role} model's embedding has {vocab}: token "
            f"ids from {vocab} up would fail the first forward pass",
            f"use the tokenizer that came with the {role} model (the same folder or catalog name)", f"{role}.model"))


def _tokenizer_facts(tokenizer: Any) -> dict[str, Any]:
    return {"class": type(tokenizer).__name__, "tokens": len(tokenizer), "offsets": bool(getattr(tokenizer, "is_fast", False)),
            "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
            "chat_template": has_chat_template(tokenizer)}


# ------------------------------------------------------------------------------------------------ the sample


def _sample(pairs: list[PreferencePair], size: int) -> list[PreferencePair]:
    if len(pairs) <= size:
        return pairs
    chosen = sorted(random.Random(SAMPLE_SEED).sample(range(len(pairs)), size))
    return [pairs[i] for i in chosen]


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def _budgeted_prompt_tokens(encoder: PairEncoder, role: Side, pair: PreferencePair) -> int:
    """The prompt's length as prepare measures it against ``max_prompt_tokens``: a conversation's ids through the
    counting side's chat template (``truncate_messages``), a text prompt's own tokens (``truncate_prompt``)."""
    if pair.messages is not None:
        return len(encoder.prompt_ids("", role, pair.messages))
    return _token_count(encoder.student_tokenizer if role == "student" else encoder.teacher_tokenizer, pair.prompt)


def _fed_prompt_tokens(encoder: PairEncoder, role: Side, pair: PreferencePair) -> int:
    """The uncut prompt's ids as prepare feeds them to ``role``'s model: its chat template's rendering of a
    conversation (or of a text prompt under ``prompt_format: chat_template``), the start tokens included."""
    return len(encoder.prompt_ids(pair.prompt, role, pair.messages))


def _conversation_label(pair: PreferencePair) -> str:
    last_user = next((content for role, content in reversed(pair.messages or ()) if role == "user"), pair.prompt)
    roles = ", ".join(role for role, _ in pair.messages or ())
    return f"the conversation ({roles}) ending {last_user[-60:]!r}"


def conversation_check(encoder: PairEncoder, pairs: list[PreferencePair],
                       issues: list[Issue]) -> tuple[set[int], dict[str, int]]:
    """Conversations prepare would raise on (and so fail the job, whichever row it is): a chat template that refuses
    their turns (Gemma's refuses a system turn), or a ``max_prompt_tokens`` the template and a kept system turn leave
    no room in. Both depend on the turns' roles and the system turn, not on the rest of the text, so each distinct
    (roles, system turn) of the whole dataset is tried once (on both sides), up to ``MAX_CONVERSATION_SHAPES`` of
    them. Returns the indexes of refused pairs and the counts (rows, shapes tried, rows left untried)."""
    tried: dict[tuple[Any, ...], tuple[str, str] | None] = {}  # shape -> None (fine) or (kind, message)
    refused: dict[str, list[int]] = {}
    budget: dict[str, list[int]] = {}
    conversations = untried = 0
    for index, pair in enumerate(pairs):
        if pair.messages is None:
            continue
        conversations += 1
        key = (tuple(role for role, _ in pair.messages),
               pair.messages[0][1] if pair.messages[0][0] == "system" else None)
        if key not in tried and len(tried) >= MAX_CONVERSATION_SHAPES:
            untried += 1
            continue
        if key not in tried:
            tried[key] = None
            try:
                for role in SIDES:
                    encoder.prompt_ids("", role, pair.messages)
            except ValueError as error:
                tried[key] = ("refused", str(error))
            else:
                try:
                    kept = encoder.truncate_messages(pair.messages)
                    for role in SIDES:
                        encoder.prompt_ids("", role, kept)
                except ValueError as error:
                    tried[key] = ("budget", str(error))
        problem = tried[key]
        if problem is not None:
            kind, message = problem
            (refused if kind == "refused" else budget).setdefault(message, []).append(index)
    for message, indexes in refused.items():
        issues.append(issue(
            "error", "conversation_refused",
            f"{len(indexes)} of {len(pairs)} pairs have a prompt a chat template refuses, e.g. "
            f"{_conversation_label(pairs[indexes[0]])}; the prepare stage would fail the job on it: {message}",
            "give those rows the turns the models' templates accept (without a system turn if one refuses it: fold "
            "it into the first user turn), or choose models whose chat templates accept them", "dataset"))
    for message, indexes in budget.items():
        issues.append(issue(
            "error", "conversation_refused",
            f"{len(indexes)} of {len(pairs)} conversations do not fit sequence.max_prompt_tokens="
            f"{encoder.config.max_prompt_tokens}, e.g. {_conversation_label(pairs[indexes[0]])}: {message}",
            "raise sequence.max_prompt_tokens (the chat template and a system turn are counted in it), or shorten "
            "the system turn", "sequence.max_prompt_tokens"))
    if untried:
        issues.append(issue(
            "warning", "conversations_unchecked",
            f"{untried} of {conversations} conversations were not rendered through the chat templates: the dataset "
            f"has more than {MAX_CONVERSATION_SHAPES} distinct turn patterns and system turns, and only that many "
            "are tried; one of the others that a template refuses, or whose system turn leaves no room in "
            "sequence.max_prompt_tokens, would fail the job in prepare", "accept the risk, or use fewer distinct "
            "system turns", "dataset"))
    summary = {"rows": conversations, "shapes_tried": len(tried), "untried_rows": untried}
    return {index for indexes in (*refused.values(), *budget.values()) for index in indexes}, summary


def sample_report(spec: JobSpec, pairs: list[PreferencePair], student_tokenizer: Any, teacher_tokenizer: Any,
                  issues: list[Issue]) -> tuple[dict[str, Any], dict[str, dict[str, Any]], float]:
    """The prepare stage's statistics on ``pairs``, the truncation the budget makes, and the token lengths per
    tokenizer; returns (report, lengths by tokenizer reference, the share of pairs that survive encoding).

    Prompts are counted as prepare counts them (``PairEncoder``): a conversation through each side's chat
    template, never its plain rendering. ``pairs`` are ones :func:`conversation_check` accepts."""
    from worker.recipe import encoding_config, prepare_sample

    sequence = spec.sequence
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, encoding_config(spec))
    counting_role = encoder.counting_role
    counting = encoder.counting_tokenizer
    response_tokens = [_token_count(counting, text) for pair in pairs for text in (pair.chosen, pair.rejected)]
    prompt_tokens = [_budgeted_prompt_tokens(encoder, counting_role, pair) for pair in pairs]
    cut = [n - sequence.max_response_tokens for n in response_tokens if n > sequence.max_response_tokens]
    prompt_cut = [n - sequence.max_prompt_tokens for n in prompt_tokens if n > sequence.max_prompt_tokens]
    report: dict[str, Any] = {
        "pairs": len(pairs),
        "truncation": {
            "length_unit": sequence.length_unit,
            "responses": len(response_tokens),
            "truncated_responses": len(cut),
            "truncated_share": round(len(cut) / len(response_tokens), 4) if response_tokens else 0.0,
            "tokens_cut_mean": round(float(np.mean(cut)), 2) if cut else 0.0,
            "tokens_cut_max": max(cut, default=0),
            "response_tokens": _length_summary(response_tokens),
            "max_response_tokens": sequence.max_response_tokens,
            "truncated_prompts": len(prompt_cut),
            "prompt_tokens": _length_summary(prompt_tokens),
            "max_prompt_tokens": sequence.max_prompt_tokens,
        },
    }
    roles: dict[Side, Any] = {"student": student_tokenizer} if teacher_tokenizer is student_tokenizer else \
        {"student": student_tokenizer, "teacher": teacher_tokenizer}
    lengths: dict[str, dict[str, Any]] = {}
    for role, tokenizer in roles.items():
        reference = (spec.student if role == "student" else spec.teacher or spec.student).model
        measured = tokenizer is counting
        lengths[reference] = {  # the prompt as this model is fed it, uncut; the responses' own tokens
            "prompt": _length_summary([_fed_prompt_tokens(encoder, role, p) for p in pairs]),
            "chosen": _length_summary(response_tokens[0::2] if measured else [_token_count(tokenizer, p.chosen) for p in pairs]),
            "rejected": _length_summary(response_tokens[1::2] if measured else [_token_count(tokenizer, p.rejected) for p in pairs]),
            "sampled_pairs": len(pairs),
        }
    share = report["truncation"]["truncated_share"]
    if share > TRUNCATION_WARNING_SHARE:
        keep = _percentile(response_tokens, 95)
        issues.append(issue(
            "warning", "responses_truncated",
            f"{share * 100:.0f} % of responses are truncated to sequence.max_response_tokens={sequence.max_response_tokens} "
            f"{sequence.length_unit} tokens (by {report['truncation']['tokens_cut_mean']:g} tokens on average, at most "
            f"{report['truncation']['tokens_cut_max']}); a truncated response gets no EOS span",
            f"raise sequence.max_response_tokens to {keep} (95 % of responses fit), or accept the cut",
            "sequence.max_response_tokens"))
    prompt_share = len(prompt_cut) / len(prompt_tokens) if prompt_tokens else 0.0
    if prompt_share > TRUNCATION_WARNING_SHARE:
        keep = _percentile(prompt_tokens, 95)
        issues.append(issue(
            "warning", "prompts_truncated",
            f"{prompt_share * 100:.0f} % of prompts are cut to their last sequence.max_prompt_tokens={sequence.max_prompt_tokens} "
            f"{sequence.length_unit} tokens" + (
                " (a conversation, counted with its chat template, loses its oldest exchanges first, keeping a system "
                "turn and the last user turn)" if any(pair.messages is not None for pair in pairs) else ""),
            f"raise sequence.max_prompt_tokens to {keep} (95 % of prompts fit), or accept the cut",
            "sequence.max_prompt_tokens"))

    try:
        prepared = prepare_sample(spec, pairs, student_tokenizer, teacher_tokenizer)
    except (AlignmentError, ValueError) as error:  # no pair survived: the job's prepare stage refuses it the same way
        issues.append(issue("error", "no_usable_pairs",
                            f"none of the {len(pairs)} sampled pairs survives encoding and alignment: {error}",
                            "check that the responses are text both tokenizers cover (and are not empty once cut to "
                            "sequence.max_response_tokens); ctpd align --student ... --teacher ... shows one response",
                            "dataset"))
        return report, lengths, 0.0
    stats = prepared.stats
    responses = [response for record in prepared.train for response in (record.chosen, record.rejected)]
    spans = [response.num_spans for response in responses]  # as the loss sees them: the EOS span included
    report.update({
        "kept_pairs": len(prepared.train),
        "dropped": stats["dropped"],
        "spans_per_response": _length_summary(spans),
        "alignment": stats["alignment"],
        "span_length_histogram": stats["span_length_histogram"],
        "sequence_tokens": {side: max((len(r.ids(side)) for r in responses), default=0) for side in SIDES},
    })
    dropped = sum(stats["dropped"].values())
    if dropped:
        issues.append(issue(
            "warning", "pairs_dropped",
            f"{dropped} of {len(pairs)} sampled pairs would be dropped by the prepare stage "
            f"({stats['dropped']['unalignable']} unalignable, {stats['dropped']['empty_response']} empty once cut)",
            "remove or fix those rows (ctpd align shows how both tokenizers split a response), or accept the loss",
            "dataset"))
    return report, lengths, len(prepared.train) / len(pairs) if pairs else 0.0


def _position_checks(sample: dict[str, Any], models: dict[str, dict[str, Any]], issues: list[Issue]) -> None:
    """A sequence longer than a model's positions fails (or silently degrades) its forward pass."""
    longest = sample.get("sequence_tokens") or {}
    for role in ("student", "teacher"):
        limit = (models.get(role) or {}).get("max_position_embeddings")
        if isinstance(limit, int) and longest.get(role, 0) > limit:
            issues.append(issue(
                "error", "sequence_too_long",
                f"the {role} reads at most {limit} positions, but the longest sampled sequence (prompt, response and "
                f"EOS) is {longest[role]} of its tokens",
                f"lower sequence.max_prompt_tokens and sequence.max_response_tokens so that they sum below {limit}",
                "sequence.max_response_tokens"))


# ------------------------------------------------------------------------------------------------ the report


def data_report(spec: JobSpec, *, model_cache: Path, dataset_resolver: Callable[[str], Path] | None,
                sample_pairs: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The worker's part of the report, and the token lengths per tokenizer reference (for the dataset's stats)."""
    from worker.recipe import export_dtype, job_tokenizer, split_dataset, stage_step_plans

    issues: list[Issue] = []
    report: dict[str, Any] = {"issues": issues}
    roles: dict[str, ModelRef] = {"student": spec.student}
    if spec.uses_teacher and spec.teacher is not None:
        roles["teacher"] = spec.teacher
    for direction in ("positive", "negative"):
        given = getattr(spec.contrastive, direction)
        if spec.needs_contrastive and given is not None:
            roles[f"contrastive.{direction}"] = given
    models = {role: model_facts(role, ref, model_cache, issues) for role, ref in roles.items()}
    report["models"] = models
    _lora_check(spec, models["student"], model_cache, issues)

    tokenizers: dict[str, Any] = {}
    for role in ("student", "teacher"):
        param = f"{role}.model" if role == "student" or spec.uses_teacher else "student.model"
        try:
            tokenizers[role] = (tokenizers["student"] if role == "teacher" and not spec.uses_teacher
                                else job_tokenizer(spec, role, model_cache))
        except TokenizerOffsetsError as error:
            issues.append(issue("error", "tokenizer_without_offsets", str(error),
                                f"give {param} a fast tokenizer (a folder with tokenizer.json)", param))
        except (ModelLoadError, OSError, ValueError) as error:
            issues.append(issue("error", "tokenizer_not_loadable", f"the {role} tokenizer cannot be loaded: {error}",
                                f"fix {param}: a catalog name, a Hugging Face folder or a tokenizer.json", param))
    if len(tokenizers) < 2:
        return report, {}
    student_tokenizer, teacher_tokenizer = tokenizers["student"], tokenizers["teacher"]
    report["tokenizers"] = {"student": _tokenizer_facts(student_tokenizer)}
    if teacher_tokenizer is not student_tokenizer:
        report["tokenizers"]["teacher"] = _tokenizer_facts(teacher_tokenizer)
    for role, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if role in models:
            _vocabulary_check(role, tokenizer, models[role], issues)
    try:
        from worker.recipe import encoding_config

        encoder = PairEncoder(student_tokenizer, teacher_tokenizer, encoding_config(spec))
    except ValueError as error:
        fix = "set sequence.prompt_format: raw" if "chat template" in str(error) else "set sequence.eos_span: false"
        issues.append(issue("error", "encoding_refused", str(error), fix, "sequence"))
        return report, {}

    try:
        train, validation = split_dataset(spec, dataset_resolver)
    except DatasetError as error:
        rows = [f"row {e.row}: {e.message}" for e in error.errors]
        report["dataset"] = {"valid": False, "row_errors": rows, "total_errors": error.total_errors}
        issues.append(issue("error", "invalid_dataset", str(error),
                            "fix or remove the rows listed (lines of a JSONL file, rows of a JSON list or Parquet "
                            "file), then upload the file again or point dataset.path at the fixed one" if rows else
                            "change the dataset as the message says, then upload it again (or point dataset.path at "
                            "the fixed file)", "dataset"))
        return report, {}
    except ValueError as error:
        issues.append(issue("error", "invalid_dataset", str(error), "add rows or lower dataset.validation_fraction",
                            "dataset"))
        return report, {}
    report["dataset"] = {"valid": True, "train_pairs": len(train), "validation_pairs": len(validation)}

    # A conversation prepare would raise on fails the whole job, whichever row it is: every row is tried (once per
    # distinct turns and system turn); the sample's statistics are of the others.
    refused, conversations = conversation_check(encoder, train + validation, issues)
    if conversations["rows"]:
        report["dataset"]["conversations"] = conversations
    usable = [pair for index, pair in enumerate(train + validation) if index not in refused]
    if not usable:
        return report, {}
    pairs = _sample(usable, sample_pairs)
    sample, lengths, surviving = sample_report(spec, pairs, student_tokenizer, teacher_tokenizer, issues)
    report["sample"] = sample
    _position_checks(sample, models, issues)

    # Steps over the pairs expected to survive prepare: exact when the sample is the whole dataset.
    expected_train = len(train) if surviving >= 1.0 else math.floor(len(train) * surviving)
    steps: dict[str, Any] = {"train_pairs": expected_train, "validation_pairs": len(validation),
                             "estimated": len(pairs) < len(train) + len(validation) and surviving < 1.0}
    if expected_train > 0:
        try:
            for stage, plan in stage_step_plans(spec, expected_train).items():
                steps[stage] = {"total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
                                "batch_size": plan.batch_size, "warmup_steps": plan.warmup_steps}
                if stage == Stage.CONTRASTIVE:
                    steps[stage]["runs"] = 2  # π+ and π−, each this many steps
        except ValueError as error:
            issues.append(issue("error", "steps_refused", str(error),
                                "give more training pairs, or change training.batch_size / training.devices",
                                "training"))
        if expected_train < spec.training.batch_size:
            issues.append(issue(
                "warning", "small_dataset",
                f"{expected_train} training pairs is less than training.batch_size={spec.training.batch_size}: each "
                "step trains on every pair", "add pairs or lower training.batch_size", "training.batch_size"))
    steps[Stage.EVALUATE] = {"pairs": len(validation),
                             "batches": math.ceil(len(validation) / spec.evaluation.batch_size)}
    if not validation:
        issues.append(issue("warning", "no_validation",
                            "no held-out pairs: the evaluation stage has nothing to measure",
                            "set dataset.validation_fraction above 0 or give dataset.validation_path / validation_id",
                            "dataset.validation_fraction"))
    report["steps"] = steps
    try:
        report["export_dtype"] = export_dtype(spec)
    except (ValueError, OSError) as error:
        issues.append(issue("error", "export_dtype", f"the export dtype cannot be resolved: {error}",
                            "set export.dtype to float32, bfloat16 or float16", "export.dtype"))
    return report, lengths


def run_preflight(db: Database, settings: Settings, preflight_id: str) -> str:
    """The body of ``ctpd.preflight``: the data report of one preflight row, written back; never raises for what
    the spec names (that is the report), only when the database itself fails."""
    from ctpd_core.spec import JobSpec as Spec
    from worker.policy import enforce_job_policy
    from worker.tasks import dataset_resolver

    row = preflight_rows.get_preflight(db, preflight_id)
    if row is None or row.status != preflight_rows.PENDING:
        logger.info("preflight %s: %s; nothing to do", preflight_id, "gone" if row is None else "already done")
        return "skipped"
    error_text: str | None = None
    lengths: dict[str, dict[str, Any]] = {}
    spec: JobSpec | None = None
    try:
        # The same policy a job's worker applies (the row carries the tenant and whether an admin asked).
        spec = enforce_job_policy(db, Spec.model_validate(row.spec), row, settings)  # type: ignore[arg-type]
        from app.storage import configured_storage

        storage = configured_storage(settings, check=False)
        report, lengths = data_report(
            spec, model_cache=settings.model_cache,
            dataset_resolver=dataset_resolver(db, row.tenant, storage, settings.artifact_root),
            sample_pairs=settings.preflight_sample_pairs)
    except PolicyViolation as violation:
        report = {"issues": [issue("error", "policy_violation", message, "name only what this API key may use", param)
                             for param, message in violation.problems]}
    except Exception as failure:  # the task boundary: a bug or a fault here is an error entry, never a lost answer
        logger.exception("preflight %s: the worker's part failed", preflight_id)
        error_text = f"{type(failure).__name__}: {failure}"
        report = {"issues": [issue("error", "preflight_failed", f"the worker's preflight failed: {error_text}",
                                   "this is not a problem of the spec; retry, and report it with the worker log if it "
                                   "persists")]}
    dataset_id = spec.dataset.id if spec is not None else None
    if dataset_id is not None:
        for tokenizer, measured in lengths.items():
            try:
                dataset_rows.record_token_lengths(db, dataset_id, tokenizer, measured)
            except dataset_rows.DatasetGone:
                logger.info("preflight %s: dataset %s is gone; its token lengths are not recorded", preflight_id, dataset_id)
    finished = preflight_rows.finish_preflight(db, preflight_id, report, error_text)
    return "done" if finished else "skipped"
