"""Each recipe stage alone, on the tiny models: it takes the records it needs and returns a frozen one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.worker.test_recipe import RecordingObserver, context, tiny_spec
from worker.recipe import (
    ModelPool,
    Prepared,
    Reference,
    StageRunner,
    Weights,
    contrastive_stage,
    job_reference,
    prepare_stage,
    reference_stage,
    weights_stage,
)


@pytest.fixture
def spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path):
    return tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, weights={"source": "uniform"})


def _runner(spec, tmp_path, observer=None):
    run_context = context(tmp_path, "stages", observer or RecordingObserver())
    return StageRunner(run_context, precision=spec.training.precision), ModelPool(run_context)


def test_prepare_alone_then_cached(spec, tmp_path):
    runner, _ = _runner(spec, tmp_path)
    prepared = prepare_stage(spec, runner)
    assert isinstance(prepared, Prepared) and prepared.data.train and prepared.data.validation
    assert prepared.pad_ids["student"] == prepared.student_tokenizer.eos_token_id
    with pytest.raises(dataclasses.FrozenInstanceError):
        prepared.key = "other"  # type: ignore[misc]
    observer = RecordingObserver()
    again = prepare_stage(spec, _runner(spec, tmp_path, observer)[0])
    assert again.key == prepared.key and observer.started == [("prepare", True)]


def test_reference_alone_is_one_row_per_response(spec, tmp_path):
    runner, models = _runner(spec, tmp_path)
    prepared = prepare_stage(spec, runner)
    reference = reference_stage(spec, runner, models, prepared, *job_reference(spec))
    assert isinstance(reference, Reference) and reference.side == "teacher"
    for split, records in (("train", prepared.data.train), ("validation", prepared.data.validation)):
        rows = reference.logprobs[split].chosen
        assert [len(row) for row in rows] == [len(record.chosen.teacher_span) for record in records]
        assert all(float(row.max()) <= 0 for row in rows)  # log-probs


def test_uniform_weights_need_no_contrastive_models(spec, tmp_path):
    runner, models = _runner(spec, tmp_path)
    prepared = prepare_stage(spec, runner)
    reference = reference_stage(spec, runner, models, prepared, *job_reference(spec))
    assert contrastive_stage(spec, runner, models, prepared, reference) is None
    weights = weights_stage(spec, runner, models, prepared, reference, None)
    assert isinstance(weights, Weights) and weights.values is not None
    assert all(torch.all(torch.as_tensor(row) == 1) for row in weights.values.chosen)
    assert [len(row) for row in weights.values.chosen] == [record.chosen.num_spans for record in prepared.data.train]
