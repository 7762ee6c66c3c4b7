"""Every JobSpec field is read by the recipe (issue 10): a field the recipe ignores is a setting that silently
does nothing, like ``ModelRef.revision`` was for tokenizers.

The recipe runs a few tiny specs that between them take every code path a field selects (trained and given
contrastive models, contrastive and random weights, LoRA, each way of naming the validation set) on a
recording view of the spec, and every leaf field must have been read. Reading the whole spec to store it
(the export's ``ctpd_spec.json`` and model card) does not count. The models are hub ids served by a fake hub
that has each one only at its requested revision, so a revision read but not passed to a loader fails the
load; every hub call is checked to carry it.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel

from ctpd_core.spec import JobSpec
from tests.fake_hub import FakeHub
from tests.worker.test_recipe import context
from worker.recipe import run_spec

# Fields only the API and people read. Each needs a reason.
ALLOWED_UNREAD = {
    "name": "a label for people: the API lists it; the model card prints it from the stored spec",
    "metadata": "the caller's own key/values: stored and returned by the API, never interpreted",
    "tracking.mlflow.uri": "where the run is mirrored, not what it computes: read by worker/tracking.py, which "
    "the worker task and ctpd run put beside the recipe (tests/worker/test_tracking.py)",
    "tracking.mlflow.experiment": "as tracking.mlflow.uri",
    "priority": "the claim order among queued jobs: read by the API and app/db/jobs.claim_next_job "
    "(tests/app/test_scheduling.py), never by a running job",
    # One-process runs (these specs) never read the rank layout: gpus_required picks the launch in worker/launch.py
    # and the recipe reads the rest on ranks only (tests/worker/test_distributed_job.py, test_memory_plan.py).
    **{f"{section}.{name}": "the rank layout of a multi-GPU job: read by worker/launch.run_job_spec "
       "(JobSpec.gpus_required), StageRunner.fit_layout on ranks, the scheduler and the memory plan"
       for section in ("training", "contrastive") for name in ("devices", "strategy", "activation_checkpointing")},
}


def leaf_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of every field that is not itself a model (optional sub-models included)."""
    leaves: set[str] = set()
    for name, info in model.model_fields.items():
        nested = [arg for arg in (info.annotation, *get_args(info.annotation))
                  if isinstance(arg, type) and issubclass(arg, BaseModel)]
        leaves |= leaf_fields(nested[0], f"{prefix}{name}.") if nested else {prefix + name}
    return leaves


class Recorded:
    """A read-only view of a pydantic model that notes every leaf field read through it (in ``reads``)."""

    def __init__(self, model: BaseModel, reads: set[str], path: str = "") -> None:
        self._recorded_model, self._recorded_reads, self._recorded_path = model, reads, path

    @property  # isinstance(view, ModelRef) holds, as for the model itself
    def __class__(self) -> type:  # type: ignore[override]
        return type(self._recorded_model)

    def __getattr__(self, name: str) -> Any:
        model, path = self._recorded_model, self._recorded_path
        if name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                return Recorded(value, self._recorded_reads, f"{path}{name}.")
            self._recorded_reads.add(path + name)
            return value
        if name == "model_dump":
            return self._model_dump
        return getattr(model, name)

    def _model_dump(self, **kwargs: Any) -> Any:
        if self._recorded_path:  # a section dumped into a stage key or a config: every field it holds is read
            dumped = self._recorded_model.model_dump(**kwargs)
            self._recorded_reads.update(leaf for leaf in leaf_fields(type(self._recorded_model), self._recorded_path)
                                        if leaf[len(self._recorded_path):].split(".")[0] in dumped)
            return dumped
        return self._recorded_model.model_dump(**kwargs)  # the whole spec, stored as a record: reads nothing

    def __eq__(self, other: object) -> bool:
        other_model = other._recorded_model if isinstance(other, Recorded) else other
        return self._recorded_model == other_model

    __hash__ = None  # type: ignore[assignment]


def _specs(dataset) -> list[dict[str, Any]]:
    hub_models = {"student": {"model": "org/student", "revision": "s1", "trust_remote_code": True},
                  "teacher": {"model": "org/teacher", "revision": "t1", "trust_remote_code": True}}
    common = {
        "method": "ctpd", **hub_models,
        "beta": 0.2,
        "sequence": {"max_prompt_tokens": 32, "max_response_tokens": 32, "length_unit": "teacher", "eos_span": True,
                     "prompt_format": "raw"},
        "training": {"learning_rate": 1e-3, "lr_schedule": "linear", "warmup_ratio": 0.2, "epochs": 1.0,
                     "max_steps": 1, "batch_size": 4, "micro_batch_size": 2, "max_grad_norm": 2.0,
                     "weight_decay": 0.0, "precision": "fp32", "seed": 3, "checkpoint_every": 1},
        "evaluation": {"max_pairs": 4, "batch_size": 4},
        "name": "coverage", "metadata": {"purpose": "test"},
    }
    return [
        {  # trained π±, contrastive weights, LoRA, a seeded hold-out
            **common,
            "dataset": {"path": str(dataset), "validation_fraction": 0.2, "max_pairs": 30},
            "contrastive": {"beta": 0.3, "learning_rate": 1e-3, "epochs": 1.0, "max_steps": 1},
            "weights": {"source": "teacher_contrastive", "lower": -0.4, "upper": 1.4, "scale": 1.1, "average": True},
            "lora": {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        },
        {  # given π±, uploaded datasets
            **common,
            "dataset": {"id": "ds_train", "validation_id": "ds_validation"},
            "contrastive": {"positive": {"model": "org/positive", "revision": "p1", "trust_remote_code": True},
                            "negative": {"model": "org/negative", "revision": "n1", "trust_remote_code": True}},
        },
        {  # the random ablation, a validation file
            **common,
            "dataset": {"path": str(dataset), "validation_path": str(dataset)},
            "weights": {"source": "random", "random_low": 0.6, "random_high": 1.4},
        },
        {  # the ULD baseline: the live teacher, its alignment and κ
            **common, "method": "uld",
            "dataset": {"path": str(dataset), "validation_fraction": 0.2},
            "kd": {"kappa": 0.4, "uld_alignment": "position"},
        },
        {  # the DSKD baseline: its temperature and the projector's own learning rate
            **common, "method": "dskd",
            "dataset": {"path": str(dataset), "validation_fraction": 0.2},
            "kd": {"kappa": 0.6, "temperature": 1.5, "projector_learning_rate": 1e-2},
        },
    ]


def test_every_spec_field_is_read_by_the_recipe(
    tmp_path, monkeypatch, tiny_student_folder, tiny_teacher_folder, tiny_dataset_path
):
    hub = FakeHub(monkeypatch, {("org/student", "s1"): tiny_student_folder, ("org/teacher", "t1"): tiny_teacher_folder,
                                ("org/positive", "p1"): tiny_teacher_folder,
                                ("org/negative", "n1"): tiny_teacher_folder})
    uploads = {"ds_train": tiny_dataset_path, "ds_validation": tiny_dataset_path}
    reads: set[str] = set()
    for index, data in enumerate(_specs(tiny_dataset_path)):
        run_context = context(tmp_path, f"spec-{index}")
        run_context.dataset_resolver = uploads.__getitem__
        result = run_spec(Recorded(JobSpec.model_validate(data), reads), run_context)  # type: ignore[arg-type]
        assert result.status == "succeeded", index
    revisions = {"org/student": "s1", "org/teacher": "t1", "org/positive": "p1", "org/negative": "n1"}
    assert {call.repo_id for call in hub.calls} == set(revisions)
    assert all(call.revision == revisions[call.repo_id] for call in hub.calls), hub.calls
    unread = leaf_fields(JobSpec) - reads - set(ALLOWED_UNREAD)
    assert not unread, f"JobSpec fields the recipe never reads: {sorted(unread)}"
    assert not set(ALLOWED_UNREAD) - leaf_fields(JobSpec), "the allow-list names fields the spec no longer has"

