"""Every number in the job spec is finite and bounded, and the paper's defaults lie inside the bounds."""

from __future__ import annotations

import copy
import math
import typing

import pytest
from pydantic import BaseModel, ValidationError

from ctpd_core.spec import JobSpec

MINIMAL = {
    "teacher": {"model": "gemma-3-270m"},
    "student": {"model": "smollm2-135m-instruct"},
    "dataset": {"path": "examples/data/sentiment-pairs.jsonl"},
}


def _number_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> dict[str, typing.Any]:
    """Dotted path -> FieldInfo for every int or float field of the spec, nested sections included."""
    found = {}
    for name, field in model.model_fields.items():
        args = typing.get_args(field.annotation) or (field.annotation,)
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                found.update(_number_fields(arg, f"{prefix}{name}."))
        if int in args or float in args:
            found[f"{prefix}{name}"] = field
    return found


NUMBER_FIELDS = _number_fields()


def _nested(path: str, value: object) -> dict:
    """MINIMAL with ``path`` (dotted) set to ``value``."""
    data = copy.deepcopy(MINIMAL)
    *parents, leaf = path.split(".")
    target = data
    for parent in parents:
        target = target.setdefault(parent, {})
    target[leaf] = value
    return data


def test_every_number_has_a_lower_and_an_upper_bound_in_its_json_schema():
    assert len(NUMBER_FIELDS) >= 25  # the walk found the nested sections
    schema = JobSpec.model_json_schema()
    for path, field in NUMBER_FIELDS.items():
        bounds = {type(item).__name__.lower() for item in field.metadata} & {"gt", "ge", "lt", "le"}
        assert bounds & {"gt", "ge"} and bounds & {"lt", "le"}, f"{path} is unbounded"
        *parents, leaf = path.split(".")
        node = schema
        for parent in parents:  # follow $ref into the section's definition
            node = schema["$defs"][node["properties"][parent]["$ref"].rsplit("/", 1)[-1]]
        prop = node["properties"][leaf]
        branches = prop.get("anyOf", [prop])
        number = next(b for b in branches if b.get("type") in ("integer", "number"))
        assert {"maximum", "exclusiveMaximum"} & set(number), f"{path}: no maximum in the JSON schema"
        assert {"minimum", "exclusiveMinimum"} & set(number), f"{path}: no minimum in the JSON schema"


def test_the_papers_defaults_are_valid_and_the_bounds_themselves_are_accepted():
    spec = JobSpec.model_validate(MINIMAL)
    assert spec.training.seed == 0 and spec.weights.lower == -0.5
    accepted = {"training.max_steps": 10_000_000, "training.seed": 2**32 - 1, "sequence.max_prompt_tokens": 1_048_576,
                "training.learning_rate": 1.0, "beta": 1000.0, "weights.upper": 50.0}
    for path, value in accepted.items():
        JobSpec.model_validate(_nested(path, value))


@pytest.mark.parametrize("path", sorted(NUMBER_FIELDS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e30, 2**63], ids=["nan", "inf", "-inf", "1e30", "2**63"])
def test_non_finite_and_huge_numbers_are_refused_at_the_field(path, value):
    with pytest.raises(ValidationError) as raised:
        JobSpec.model_validate(_nested(path, value))
    locations = [".".join(str(part) for part in error["loc"]) for error in raised.value.errors()]
    assert path in locations, (path, raised.value.errors())


def test_weight_bounds_are_finite_so_the_order_check_holds():
    # NaN compared with anything is False: without allow_inf_nan=False, lower=NaN passed "lower < upper".
    with pytest.raises(ValidationError, match="finite number"):
        JobSpec.model_validate({**MINIMAL, "weights": {"lower": math.nan}})
