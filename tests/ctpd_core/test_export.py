"""The export: the dtype of what is written (sizes, config.json, what transformers loads), the untouched in-memory
model, tied weights written once, and a model card the Hugging Face tooling reads back (model-index included)
that names nothing but public ids."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctpd_core.export import (
    CardFacts,
    base_license,
    declared_dtype,
    export_student,
    public_model_id,
    resolve_export_dtype,
)

HELD_OUT = {"preference_accuracy": 0.625, "reward_margin": 1.0018, "pairs": 8.0}


def _card(**overrides) -> CardFacts:
    facts = {"title": "tiny distilled", "method": "ctpd", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
             "teacher": "google/gemma-3-270m", "license": "apache-2.0", "datasets": ("Anthropic/hh-rlhf",),
             "held_out": HELD_OUT, "settings": {"beta": 0.1}}
    return CardFacts(**{**facts, **overrides})


@pytest.fixture(scope="module")
def student(tiny_student_folder):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_folder), dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(tiny_student_folder))


def _export(student, folder, dtype, card=None):
    model, tokenizer = student
    return export_student(model, tokenizer, folder, spec={"method": "ctpd"}, metrics=HELD_OUT, card=card or _card(),
                          dtype=dtype)


def _tensors(path):
    with safe_open(str(path), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)


def test_bf16_and_fp16_exports_are_half_an_fp32_one_and_load_in_their_dtype(student, tmp_path):
    model, _ = student
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    sizes, loaded = {}, {}
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        folder = _export(student, tmp_path / dtype, dtype)
        sizes[dtype] = (folder / "model.safetensors").stat().st_size
        tensors = _tensors(folder / "model.safetensors")
        assert {tensor.dtype for tensor in tensors.values()} == {torch_dtype}
        assert json.loads((folder / "config.json").read_text())["dtype"] == str(torch_dtype).removeprefix("torch.")
        reloaded = AutoModelForCausalLM.from_pretrained(str(folder))  # the dtype comes from config.json
        assert reloaded.dtype == torch_dtype
        assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch_dtype))
        loaded[dtype] = set(tensors)
    # Tied embeddings are written once in every dtype (a per-tensor cast would have written lm_head twice).
    assert loaded["bf16"] == loaded["fp16"] == loaded["fp32"]
    for half in ("bf16", "fp16"):
        assert 0.45 < sizes[half] / sizes["fp32"] < 0.55, sizes
    # The in-memory model is untouched: still fp32, same values (evaluation and later use see what was trained).
    assert model.dtype == torch.float32
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_auto_is_what_the_base_declares_else_fp32(student, tiny_student_folder, tmp_path):
    model, tokenizer = student
    bf16_base = tmp_path / "bf16-base"
    model.to(torch.bfloat16).save_pretrained(str(bf16_base))
    model.to(torch.float32)
    tokenizer.save_pretrained(str(bf16_base))
    assert declared_dtype(str(bf16_base)) == "bf16"
    assert declared_dtype(str(tiny_student_folder)) == "fp32"
    assert declared_dtype("smollm2-135m-instruct") == "bf16"  # upstream's dtype, not the fp32 conversion's
    assert declared_dtype("nobody/not-in-the-local-hub-cache") is None
    assert resolve_export_dtype("auto", "bf16") == "bf16"
    assert resolve_export_dtype("auto", None) == "fp32"
    assert resolve_export_dtype("fp16", "bf16") == "fp16"
    with pytest.raises(ValueError, match="export.dtype 'int8'"):
        resolve_export_dtype("int8", None)


def test_the_card_is_read_back_by_huggingface_hub_with_a_model_index(student, tmp_path):
    folder = _export(student, tmp_path / "card", "bf16")
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.license == "apache-2.0"
    assert data.datasets == ["Anthropic/hh-rlhf"]
    assert {"ctpd", "distillation", "preference-distillation"} <= set(data.tags)
    assert data.library_name == "transformers"
    results = {result.metric_type: result for result in data.eval_results}
    assert set(results) == {"preference_accuracy", "reward_margin"}  # pairs is a count, not a result
    assert results["preference_accuracy"].metric_value == 0.625
    assert results["reward_margin"].dataset_split == "validation"
    assert "model-index" in (folder / "README.md").read_text()
    assert "bfloat16 safetensors" in card.text


def test_a_baseline_is_tagged_with_its_method_not_as_a_distillation(student, tmp_path):
    card = ModelCard.load(_export(student, tmp_path / "dpo", "fp32", card=_card(method="dpo", teacher=None))
                          / "README.md")
    assert card.data.tags == ["ctpd", "dpo", "preference-optimization"]
    assert "teacher" not in card.text


def test_a_checkpoint_card_says_its_step_and_has_no_eval_results(student, tmp_path):
    facts = _card(held_out={}, checkpoint_step=40, training_metrics={"loss": 0.5}, datasets=())
    card = ModelCard.load(_export(student, tmp_path / "ckpt", "fp32", card=facts) / "README.md")
    assert "step 40" in card.text and "| loss | 0.5000 |" in card.text
    assert card.data.eval_results is None and card.data.datasets is None


def test_public_model_ids_never_name_a_local_folder(tmp_path):
    folder = tmp_path / "models" / "student"
    folder.mkdir(parents=True)
    assert public_model_id(str(folder)) is None
    assert public_model_id("/srv/models/student") is None  # a path, even one not on this machine
    assert public_model_id("./student") is None
    assert public_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_model_id("gemma-3-270m") == "google/gemma-3-270m"
    assert public_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert public_model_id(str(snapshot)) == "Qwen/Qwen2.5-0.5B"  # a Hub cache folder is that repository


def test_base_license_from_the_catalog_or_the_base_card(tmp_path):
    assert base_license("smollm2-135m-instruct") == "apache-2.0"
    assert base_license("gemma-3-270m") == "gemma"
    folder = tmp_path / "base"
    folder.mkdir()
    assert base_license(str(folder)) is None
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    assert base_license(str(folder)) == "mit"
