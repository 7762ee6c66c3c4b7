"""A job's checkpoints after a real (tiny) run: which are kept once the student is exported, and a checkpoint made
into a model folder whose weights are the checkpoint's (full fine-tuning and LoRA), in the export dtype."""

from __future__ import annotations

import json

import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ctpd_core.checkpoint_layout import RESUME_ONLY_FILES, TRAINABLE_FILE, stored_checkpoints
from tests.worker.test_recipe import context, tiny_spec
from worker.recipe import materialize_checkpoint, run_spec


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_checkpoints_are_kept_without_resume_state_and_make_models(tiny_student_folder, tiny_teacher_folder,
                                                                   tiny_dataset_path, tmp_path):
    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, weights={"source": "uniform"},
                     training={"checkpoint_every": 1}, export={"dtype": "bf16"}, name="tiny")
    run_context = context(tmp_path, "kept")
    result = run_spec(spec, run_context)
    assert result.status == "succeeded"
    run_dir = run_context.run_dir
    assert sorted(path.name for path in run_dir.iterdir()) == ["checkpoints", "export"]

    # fit keeps the newest two of the four; they survive the export, weights only.
    kept = stored_checkpoints(run_dir, "distill")
    assert [(c.id, c.kept) for c in kept] == [("distill-00000003", True), ("distill-00000004", True)]
    for checkpoint in kept:
        assert not any((checkpoint.folder / name).exists() for name in RESUME_ONLY_FILES)
        assert checkpoint.size_bytes() >= (checkpoint.folder / TRAINABLE_FILE).stat().st_size

    # The last checkpoint, made a model, is the exported student (same weights, same dtype).
    last = materialize_checkpoint(spec, kept[-1], model_cache=run_context.model_cache)
    assert last == kept[-1].model_folder and kept[-1].model_ready()
    exported = _weights(result.export_dir)
    assert exported.keys() == _weights(last).keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in _weights(last).items())

    # An earlier one is its own weights: the checkpoint's tensors, cast to the export dtype.
    earlier = materialize_checkpoint(spec, kept[0], model_cache=run_context.model_cache)
    model = AutoModelForCausalLM.from_pretrained(str(earlier))
    assert model.dtype == torch.bfloat16
    parameters = dict(model.named_parameters())
    trained = load_file(str(kept[0].folder / TRAINABLE_FILE))
    assert trained and all(torch.equal(parameters[name], tensor.to(torch.bfloat16)) for name, tensor in trained.items())
    assert not torch.equal(parameters["model.embed_tokens.weight"], exported["model.embed_tokens.weight"])

    card = ModelCard.load(earlier / "README.md")
    assert "step 3" in card.text and card.data.eval_results is None
    assert card.data.base_model is None  # the base is a local folder: its path is nobody's business
    assert str(tiny_student_folder) not in (earlier / "README.md").read_text()
    step_metrics = json.loads((earlier / "metrics.json").read_text())
    assert "loss" in step_metrics and (earlier / "tokenizer.json").is_file()

    # Asked again, it is already there: nothing is rebuilt.
    mtime = (earlier / "model.safetensors").stat().st_mtime_ns
    assert materialize_checkpoint(spec, kept[0], model_cache=run_context.model_cache) == earlier
    assert (earlier / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_lora_checkpoint_is_merged_into_its_base(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path,
                                                    tmp_path):
    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, weights={"source": "uniform"},
                     training={"max_steps": 2, "checkpoint_every": 1}, lora={"enabled": True, "r": 4},
                     export={"dtype": "fp32"})
    run_context = context(tmp_path, "lora")
    result = run_spec(spec, run_context)
    assert result.status == "succeeded"
    last = stored_checkpoints(run_context.run_dir, "distill")[-1]
    assert all("lora_" in name for name in load_file(str(last.folder / TRAINABLE_FILE)))  # adapters only
    folder = materialize_checkpoint(spec, last, model_cache=run_context.model_cache)
    exported, built = _weights(result.export_dir), _weights(folder)
    assert exported.keys() == built.keys()
    assert all(torch.allclose(exported[name], tensor, atol=1e-6) for name, tensor in built.items())
    assert (folder / "adapter").is_dir()


def test_a_dskd_checkpoint_makes_the_student_and_its_projector(tiny_student_folder, tiny_teacher_folder,
                                                               tiny_dataset_path, tmp_path):
    # dskd trains a DualSpaceStudent, so its checkpoints name tensors student.* and projector.*: made a model, the
    # last one is the exported student, with the exported projector beside it.
    from ctpd_core.dskd import load_projector

    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, method="dskd",
                     training={"max_steps": 2, "checkpoint_every": 1}, export={"dtype": "fp32"})
    run_context = context(tmp_path, "dskd")
    result = run_spec(spec, run_context)
    assert result.status == "succeeded"
    last = stored_checkpoints(run_context.run_dir, "distill")[-1]
    names = load_file(str(last.folder / TRAINABLE_FILE)).keys()
    assert {name.split(".")[0] for name in names} == {"student", "projector"}
    folder = materialize_checkpoint(spec, last, model_cache=run_context.model_cache)
    exported, built = _weights(result.export_dir), _weights(folder)
    assert exported.keys() == built.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in built.items())
    made, trained = load_projector(folder).state_dict(), load_projector(result.export_dir).state_dict()
    assert made.keys() == trained.keys() and all(torch.equal(made[name], trained[name]) for name in made)
