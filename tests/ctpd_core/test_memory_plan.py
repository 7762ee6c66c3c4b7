"""The memory planner: parameter counts against real transformers models built from the same configs (on the
meta device: no memory), the issue's 8B example, strategy choice, and what is never refused."""

from __future__ import annotations

import pytest

from ctpd_core import memory_plan
from ctpd_core.catalog import CATALOG
from ctpd_core.memory_plan import (
    GiB,
    ShapeUnknown,
    choose_strategy,
    known_shape,
    params_from_safetensors,
    plan_job,
    shape_from_config,
    shape_from_folder,
    stage_strategy,
)
from ctpd_core.spec import JobSpec

GPU_80 = 80 * GiB


def _meta_count(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied matrix once


def _tiny_configs():
    from transformers import (
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = {"vocab_size": 211, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
              "num_attention_heads": 6, "num_key_value_heads": 2}
    return {
        "llama-tied": LlamaConfig(**common, tie_word_embeddings=True),
        "llama-untied-bias": LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        "mistral": MistralConfig(**common),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**common, head_dim=16),
        "gemma3": Gemma3TextConfig(**common, head_dim=24, sliding_window=16),
        "phi3": Phi3Config(**common, pad_token_id=0),
        "mixtral": MixtralConfig(**common, num_local_experts=3, num_experts_per_tok=2),
        "gpt2": GPT2Config(vocab_size=211, n_embd=48, n_layer=3, n_head=6, n_positions=64),
    }


@pytest.mark.parametrize("name", list(_tiny_configs()))
def test_the_count_from_a_config_is_the_built_models(name):
    config = _tiny_configs()[name]
    shape = shape_from_config(config.to_dict())
    assert shape.params == _meta_count(config), name
    assert "Llama-style" not in shape.source  # a family the planner counts, not a guess


@pytest.mark.parametrize("reference, published", [
    ("meta-llama/Llama-3.1-8B", 8_030_261_248),
    ("meta-llama/Llama-3.2-1B-Instruct", 1_235_814_400),
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),
    ("Qwen/Qwen2.5-0.5B", 494_032_768),
    ("smollm2-135m-instruct", 134_515_008),
    ("gemma-3-270m", 268_098_176),
])
def test_the_table_gives_the_published_counts_and_transformers_agrees(reference, published):
    from transformers import AutoConfig

    shape = known_shape(reference)
    assert shape is not None and shape.params == published
    table = memory_plan.CATALOG_CONFIGS.get(reference) or memory_plan.KNOWN_HUB_MODELS[reference]
    fields = {k: v for k, v in table.items() if k != "model_type"}
    assert _meta_count(AutoConfig.for_model(table["model_type"], **fields)) == published


def test_every_catalog_model_has_a_shape_and_hub_ids_ignore_case():
    assert set(CATALOG) <= set(memory_plan.CATALOG_CONFIGS)
    assert known_shape("qwen/qwen2.5-14b-instruct") == known_shape("Qwen/Qwen2.5-14B-Instruct") is not None
    assert known_shape("someone/unknown-model") is None


def test_chunk_rows_are_the_logprobs_chunk():
    from ctpd_core.logprobs import DEFAULT_CHUNK_SIZE

    assert memory_plan.LOGIT_CHUNK_ROWS == DEFAULT_CHUNK_SIZE


def test_a_folder_is_counted_exactly_from_its_safetensors_headers(tiny_student_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_folder))
    exact = sum(p.numel() for p in model.parameters())
    assert params_from_safetensors(tiny_student_folder) == exact
    shape = shape_from_folder(tiny_student_folder)
    assert shape.params == exact and shape.hidden_size == model.config.hidden_size
    assert shape_from_config(model.config.to_dict()).params == exact  # the config's count agrees


def test_a_config_without_its_dimensions_is_unknown(tmp_path):
    with pytest.raises(ShapeUnknown, match="hidden_size"):
        shape_from_config({"model_type": "llama", "vocab_size": 10})
    with pytest.raises(ShapeUnknown, match="config.json"):
        shape_from_folder(tmp_path)


def test_lora_parameters_are_peft_s_count():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _tiny_configs()["llama-tied"]
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable, _ = model.get_nb_trainable_parameters()
    shape = shape_from_config(config.to_dict())
    assert shape.lora_params(4) == trainable
    assert shape.lora_params(4, ["q_proj", "v_proj"]) == 4 * 3 * ((48 + 48) + (48 + 16))


def _spec(**fields) -> JobSpec:
    data = {"method": "dpo", "student": {"model": "meta-llama/Llama-3.1-8B"}, "dataset": {"path": "pairs.jsonl"}}
    for key, value in fields.items():
        section, _, name = key.partition("__")
        data.setdefault(section, {})[name] = value
    return JobSpec.model_validate(data)


def _plan(spec: JobSpec, gpu: int | None = GPU_80):
    shapes = {role: known_shape(ref) for role, ref in
              (("student", spec.student.model), ("teacher", spec.teacher.model if spec.teacher else None)) if ref}
    return plan_job(spec, shapes, gpu_memory_bytes=gpu, gpu_source="test")


def _stage(plan, name):
    (stage,) = [s for s in plan.stages if s.stage == name]
    return stage


def test_an_8b_full_fine_tune_on_one_80gb_gpu_is_refused_with_the_numbers_and_the_fixes():
    plan = _plan(_spec())
    distill = _stage(plan, "distill")
    assert distill.fits is False and not plan.fits
    states = sum(c.bytes for c in distill.components if c.name.split(" ")[0] in ("weights", "gradients", "AdamW"))
    assert states == 8_030_261_248 * 16  # fp32 master weights + gradients + two AdamW states
    ((param, message),) = plan.problems()
    assert param == "training.devices"
    assert "128.5 GB" in message and "16 bytes per trainable parameter" in message
    assert "72.0 GiB usable" in message and "training.strategy fsdp" in message and "lora.enabled true" in message
    # Each fix the message offers really fits when applied.
    devices = int(message.split("training.devices ")[1].split(" ")[0])
    assert devices == 2
    assert _stage(_plan(_spec(training__devices=devices)), "distill").fits
    assert _stage(_plan(_spec(lora__enabled=True)), "distill").fits
    assert "distill" in plan.to_text() and "does NOT fit" in plan.to_text()


def test_auto_is_ddp_when_a_replica_fits_and_fsdp_when_not():
    small = _spec(training__devices=2)
    small = small.model_copy(update={"student": small.student.model_copy(update={"model": "Qwen/Qwen2.5-0.5B"})})
    assert _stage(_plan(small), "distill").strategy == "ddp"
    big = _stage(_plan(_spec(training__devices=2)), "distill")
    assert big.strategy == "fsdp" and big.activation_checkpointing is True
    # What the worker calls with the loaded model (its counts, config and the spec); one rank is a single process.
    shape = known_shape("meta-llama/Llama-3.1-8B")
    assert shape is not None
    config = memory_plan.KNOWN_HUB_MODELS["meta-llama/Llama-3.1-8B"]
    counts = {"total_parameters": shape.params, "trainable_parameters": shape.params}
    spec = _spec(training__devices=4)
    assert choose_strategy(**counts, gpu_memory_bytes=GPU_80, devices=4, config=config, spec=spec) == "fsdp"
    assert choose_strategy(**counts, gpu_memory_bytes=300 * GiB, devices=4, config=config, spec=spec) == "ddp"
    assert choose_strategy(**counts, gpu_memory_bytes=GPU_80, devices=1) == "ddp"
    assert choose_strategy(**counts, gpu_memory_bytes=None, devices=4) == "ddp"  # CPU ranks (gloo)
    assert choose_strategy(**counts, gpu_memory_bytes=GPU_80, devices=4) == "fsdp"  # the counts alone
    # The plan and the worker agree: the plan's choice is stage_strategy's, which choose_strategy reproduces.
    for gpu in (GPU_80, 141 * GiB, 300 * GiB):
        planned = _stage(_plan(spec, gpu), "distill").strategy
        assert stage_strategy(spec, "distill", shape, gpu_memory_bytes=gpu) == planned
        assert choose_strategy(**counts, gpu_memory_bytes=gpu, devices=4, config=config, spec=spec) == planned


def test_fsdp_shards_the_states_and_checkpointing_shrinks_activations():
    one = {c.name: c.bytes for c in _stage(_plan(_spec(training__strategy="fsdp")), "distill").components}
    four = {c.name: c.bytes for c in _stage(_plan(_spec(training__devices=4, training__strategy="fsdp")),
                                             "distill").components}
    for name in ("weights (fp32 master)", "gradients (fp32)", "AdamW states (2 x fp32)"):
        assert four[name] == one[name] // 4
    plain = _stage(_plan(_spec(training__activation_checkpointing=False)), "distill").components
    checkpointed = _stage(_plan(_spec(training__activation_checkpointing=True)), "distill").components
    activations = {c.name: c.bytes for c in plain}["activations"]
    assert {c.name: c.bytes for c in checkpointed}["activations (checkpointed)"] < activations / 4


def test_a_model_of_unknown_size_is_not_checked_and_not_refused():
    spec = _spec()
    spec = spec.model_copy(update={"student": spec.student.model_copy(update={"model": "someone/huge-model"})})
    plan = _plan(spec)
    assert plan.fits and plan.problems() == []
    assert all(stage.fits is None and "unknown" in (stage.not_checked or "") for stage in plan.stages)


def test_without_a_gpu_budget_nothing_is_refused():
    spec = _spec()
    spec = spec.model_copy(update={"student": spec.student.model_copy(update={"model": "meta-llama/Llama-3.1-70B"})})
    plan = _plan(spec, gpu=None)
    assert plan.fits and plan.problems() == []
    assert _stage(plan, "distill").peak_bytes > 70e9 * 16  # still estimated, for `ctpd plan`
    assert "none to check against" in plan.to_text()


def test_ctpd_plans_the_teacher_s_stages_too():
    spec = JobSpec.model_validate({"teacher": {"model": "Qwen/Qwen2.5-1.5B"}, "student": {"model": "Qwen/Qwen2.5-0.5B"},
                                   "dataset": {"path": "pairs.jsonl"}})
    plan = _plan(spec)
    assert [s.stage for s in plan.stages] == ["reference", "contrastive", "weights", "distill", "evaluate"]
    assert plan.fits
    # The recipe holds one frozen model at a time: π+ then π− in the weights pass, none while π+ / π− train.
    weights = {c.name for c in _stage(plan, "weights").components}
    assert "π+ or π−, one at a time weights" in weights and not any("teacher" in name for name in weights)
    contrastive = _stage(plan, "contrastive")
    assert not any("resident" in c.name for c in contrastive.components)
    # A 70B teacher's frozen passes cannot be helped by more GPUs: the fix says what can.
    big = JobSpec.model_validate({"teacher": {"model": "meta-llama/Llama-3.1-70B"},
                                  "student": {"model": "meta-llama/Llama-3.2-1B"}, "dataset": {"path": "pairs.jsonl"},
                                  "contrastive": {"positive": {"model": "a/p"}, "negative": {"model": "a/n"}}})
    refused = _plan(big)
    reference = _stage(refused, "reference")
    assert reference.fits is False and any("never the model" in fix for fix in reference.fixes)
    assert _stage(refused, "weights").fits is None  # the given π± are of unknown size


def test_uld_and_dskd_count_the_live_teacher_in_distill_and_sft_does_not():
    data = {"teacher": {"model": "Qwen/Qwen2.5-1.5B"}, "student": {"model": "Qwen/Qwen2.5-0.5B"},
            "dataset": {"path": "pairs.jsonl"}}
    plans = {method: _plan(JobSpec.model_validate({**data, "method": method})) for method in ("sft", "uld", "dskd")}
    for method, plan in plans.items():
        assert [s.stage for s in plan.stages] == ["reference", "distill", "evaluate"], method  # no π±, no weights
        # The reference of every chosen-response baseline is the initial student (for the held-out metrics).
        assert _stage(plan, "reference").model.startswith("student")
    teacher_bytes = known_shape("Qwen/Qwen2.5-1.5B").params * 4  # resident frozen weights, fp32
    sft, uld = _stage(plans["sft"], "distill"), _stage(plans["uld"], "distill")
    assert not any("teacher" in c.name for c in sft.components)
    assert [c.bytes for c in uld.components if "teacher" in c.name] == [teacher_bytes]
    assert uld.peak_bytes == sft.peak_bytes + teacher_bytes
    # dskd trains its projector beside the student: 16 bytes per parameter (weights, gradients, AdamW), on top of uld.
    dskd = _stage(plans["dskd"], "distill")
    projector = memory_plan.dskd_projector_params(known_shape("Qwen/Qwen2.5-0.5B").hidden_size,
                                                  known_shape("Qwen/Qwen2.5-1.5B").hidden_size)
    assert [c.bytes for c in dskd.components if "projector" in c.name] == [projector * 16]
    assert dskd.peak_bytes == uld.peak_bytes + projector * 16
    # A teacher of unknown size leaves distill unchecked rather than planned without it.
    unknown = _plan(JobSpec.model_validate({**data, "method": "uld", "teacher": {"model": "someone/unknown"}}))
    assert _stage(unknown, "distill").fits is None and "teacher" in (_stage(unknown, "distill").not_checked or "")
