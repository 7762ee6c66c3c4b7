"""The job spec: the minimal form, the paper's defaults, the rules between fields, files and overrides."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ctpd_core.spec import JobSpec, SpecError, load_spec

MINIMAL = {
    "method": "ctpd",
    "teacher": {"model": "gemma-3-270m"},
    "student": {"model": "smollm2-135m-instruct"},
    "dataset": {"path": "examples/data/sentiment-pairs.jsonl"},
}


def test_minimal_form_gets_the_papers_defaults():
    spec = JobSpec.model_validate(MINIMAL)
    assert spec.beta == 0.1 and spec.training.learning_rate == 1e-6 and spec.training.batch_size == 16
    assert (spec.weights.lower, spec.weights.upper, spec.weights.scale) == (-0.5, 1.5, 1.0)
    assert spec.weights.source == "teacher_contrastive"
    assert spec.contrastive.beta == 0.3 and spec.contrastive.learning_rate == 2e-6
    assert spec.training.lr_schedule == "cosine" and spec.training.warmup_ratio == 0.1
    assert spec.sequence.eos_span is True and spec.lora.enabled is False
    resolved = spec.model_dump(mode="json")
    assert JobSpec.model_validate(resolved) == spec  # the stored resolved spec round-trips


@pytest.mark.parametrize(
    "change, message",
    [
        ({"betta": 0.2}, "Extra inputs are not permitted"),
        ({"teacher": None}, "method ctpd needs a teacher"),
        ({"method": "dpo", "weights": {"source": "random"}}, "method dpo uses no weights"),
        ({"method": "tisdpo", "weights": {"source": "teacher_contrastive"}}, "needs method ctpd"),
        ({"training": {"batch_size": 6, "micro_batch_size": 4}}, "must be a multiple"),
        ({"weights": {"lower": 2.0}}, "must be below weights.upper"),
        ({"dataset": {"path": "a", "id": "b"}}, "exactly one of dataset.path"),
        ({"contrastive": {"positive": {"model": "x"}}}, "give both contrastive.positive"),
        ({"beta": 0}, "greater than 0"),
        ({"weights": {"source": "uniform", "average": True}}, "has none to average"),
        ({"method": "dpo", "teacher": None, "weights": {"average": True}}, "weights.average averages contrastive"),
    ],
)
def test_bad_specs_name_the_problem(change, message):
    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate({**MINIMAL, **change})


@pytest.mark.parametrize(
    "change, field",
    [
        ({"teacher": None}, ("teacher",)),
        ({"method": "dpo", "weights": {"source": "random"}}, ("weights", "source")),
        ({"method": "tisdpo", "weights": {"source": "teacher_contrastive"}}, ("weights", "source")),
        ({"weights": {"source": "uniform", "average": True}}, ("weights", "average")),
        ({"training": {"batch_size": 6, "micro_batch_size": 4}}, ("training", "batch_size")),
        ({"weights": {"lower": 2.0}}, ("weights", "lower")),
        ({"weights": {"random_low": 2.0}}, ("weights", "random_low")),
        ({"dataset": {"path": "a", "id": "b"}}, ("dataset", "path")),
        ({"dataset": {}}, ("dataset", "path")),
        ({"dataset": {"path": "a", "validation_path": "b", "validation_id": "c"}}, ("dataset", "validation_path")),
        ({"contrastive": {"positive": {"model": "x"}}}, ("contrastive", "negative")),  # the one left out
        ({"contrastive": {"negative": {"model": "x"}}}, ("contrastive", "positive")),
    ],
)
def test_a_rule_across_fields_raises_a_spec_error_naming_the_field_to_fix(change, field):
    # pydantic reports the rule at the model that checked it, with the SpecError as ctx["error"]; together they
    # are the field's full location, so no caller has to find the field's name in the message.
    with pytest.raises(ValidationError) as raised:
        JobSpec.model_validate({**MINIMAL, **change})
    [error] = raised.value.errors()
    cause = error["ctx"]["error"]
    assert error["type"] == "value_error" and isinstance(cause, SpecError) and isinstance(cause, ValueError)
    assert (*error["loc"], *cause.loc) == field
    assert str(cause) in error["msg"]  # the message is unchanged: "Value error, <message>"


def test_baseline_defaults():
    assert JobSpec.model_validate({**MINIMAL, "method": "tisdpo", "teacher": None}).weights.source == "student_contrastive"
    dpo = JobSpec.model_validate({**MINIMAL, "method": "dpo", "teacher": None})
    assert dpo.weights.source == "uniform" and not dpo.needs_contrastive


@pytest.mark.parametrize(
    "change, message, field",
    [
        ({"method": "uld", "teacher": None}, "method uld needs a teacher", ("teacher",)),
        ({"method": "dskd", "teacher": None}, "method dskd needs a teacher", ("teacher",)),
        ({"method": "sft", "weights": {"source": "student_contrastive"}}, "uses no span weights", ("weights", "source")),
        ({"method": "uld", "weights": {"source": "random"}}, "uses no span weights", ("weights", "source")),
        ({"method": "sft", "kd": {"kappa": 0.3}}, "kd.kappa is read by uld and dskd only", ("kd", "kappa")),
        ({"method": "uld", "kd": {"temperature": 1.0}}, "kd.temperature is read by dskd only", ("kd", "temperature")),
        ({"method": "dskd", "kd": {"uld_alignment": "position"}}, "kd.uld_alignment is read by uld only",
         ("kd", "uld_alignment")),
        ({"kd": {"kappa": 0.2}}, "method ctpd would ignore it", ("kd", "kappa")),
        ({"method": "dskd", "training": {"devices": 2}}, "dskd trains on one device", ("training", "devices")),
    ],
)
def test_the_chosen_response_baselines_refuse_what_they_cannot_serve(change, message, field):
    with pytest.raises(ValidationError, match=message) as raised:
        JobSpec.model_validate({**MINIMAL, **change})
    [error] = raised.value.errors()
    assert (*error["loc"], *error["ctx"]["error"].loc) == field


def test_the_chosen_response_baselines_resolve_and_round_trip():
    sft = JobSpec.model_validate({**MINIMAL, "method": "sft", "teacher": None})
    assert sft.weights.source == "uniform" and not sft.needs_contrastive and not sft.uses_teacher
    uld = JobSpec.model_validate({**MINIMAL, "method": "uld", "kd": {"kappa": 0.3, "uld_alignment": "position"}})
    assert uld.uses_teacher and (uld.kd.kappa, uld.kd.uld_alignment, uld.kd.temperature) == (0.3, "position", 2.0)
    dskd = JobSpec.model_validate({**MINIMAL, "method": "dskd", "kd": {"temperature": 1.0}})
    for spec in (sft, uld, dskd):  # the stored resolved spec holds every kd default, and validates again
        assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_yaml_json_and_overrides(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps(MINIMAL))
    (tmp_path / "spec.yaml").write_text(
        "method: ctpd\nteacher: {model: gemma-3-270m}\nstudent: {model: smollm2-135m-instruct}\n"
        "dataset: {path: examples/data/sentiment-pairs.jsonl}\n"
    )
    assert load_spec(tmp_path / "spec.json") == load_spec(tmp_path / "spec.yaml")
    spec = load_spec(tmp_path / "spec.yaml", ["training.max_steps=4", "method=dpo", "teacher=null", "name=x y"])
    assert spec.training.max_steps == 4 and spec.method == "dpo" and spec.teacher is None and spec.name == "x y"
    with pytest.raises(ValueError, match="must look like section.field=value"):
        load_spec(tmp_path / "spec.yaml", ["training.max_steps"])
