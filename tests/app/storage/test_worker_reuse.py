"""Two workers on two machines (two artifact roots) sharing a bucket (a real S3-compatible server over HTTP): the
second runs a job that shares the first's teacher, data and settings, fetches the teacher stages from the bucket
instead of computing them (the teacher is never loaded), and both exports are pushed where the API looks."""

from __future__ import annotations

import torch

import ctpd_core.models as models_module
from app.storage import Storage, StorageMirror, export_key
from tests.app.storage.conftest import new_bucket, s3_options
from tests.worker.test_recipe import RecordingObserver, tiny_spec
from worker import recipe as recipe_module
from worker.recipe import RunContext, run_spec


def _worker_context(root, job_id: str, mirror: StorageMirror, observer: RecordingObserver) -> RunContext:
    """As worker.tasks builds it: the run folder under the artifact root, the mirror from the settings."""
    return RunContext(artifact_root=root, run_dir=root / "jobs" / job_id, model_cache=root.parent / "catalog",
                      device=torch.device("cpu"), observer=observer, inference_batch_size=4, mirror=mirror)


def test_a_second_machine_reuses_the_first_machines_stages_through_the_bucket(
        tiny_student_folder, tiny_teacher_folder, tiny_dataset_path, s3_endpoint, tmp_path, monkeypatch):
    storage = Storage.from_url(f"s3://{new_bucket(s3_endpoint)}/ctpd", s3_options(s3_endpoint))
    mirror = StorageMirror(storage)
    spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path)

    first = run_spec(spec, _worker_context(tmp_path / "a" / "artifacts", "job_a", mirror, RecordingObserver()))
    assert first.status == "succeeded"
    assert storage.folder_manifest(export_key("job_a")) is not None

    loaded = []
    real_loader = models_module.load_causal_lm

    def counting_loader(reference, **kwargs):
        loaded.append(str(reference))
        return real_loader(reference, **kwargs)

    monkeypatch.setattr(recipe_module, "load_causal_lm", counting_loader)
    observer = RecordingObserver()
    second_spec = tiny_spec(tiny_student_folder, tiny_teacher_folder, tiny_dataset_path,
                            training={"learning_rate": 5e-4})
    second = run_spec(second_spec, _worker_context(tmp_path / "b" / "artifacts", "job_b", mirror, observer))
    assert second.status == "succeeded"
    assert {"prepare", "reference", "contrastive", "weights"} <= set(second.cached_stages)
    assert str(tiny_teacher_folder) not in loaded
    assert not any(p.stage.startswith(("reference", "contrastive", "weights")) for p in observer.progress_rows)
    assert storage.folder_manifest(export_key("job_b")) is not None
