"""Model and tokenizer loading: what is refused, and the catalog."""

from __future__ import annotations

import pytest

from ctpd_core.models import ModelLoadError, load_causal_lm, load_tokenizer, model_fingerprint


def test_folder_without_safetensors_is_refused(tmp_path, tiny_student_folder):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_student_folder, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled .bin weights are refused"):
        load_causal_lm(str(folder), cache_dir=tmp_path)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"), cache_dir=tmp_path)


def test_unknown_reference_fails_fast_and_says_why(tmp_path):
    with pytest.raises(ModelLoadError, match="not a catalog model .* Hugging Face Hub"):
        load_tokenizer("no-such-org/no-such-model", cache_dir=tmp_path)


def test_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_causal_lm(str(tmp_path / "weights.txt"), cache_dir=tmp_path)


def test_folder_loads_and_fingerprint_tracks_content(tmp_path, tiny_student_folder):
    import shutil

    model, tokenizer = load_causal_lm(str(tiny_student_folder), cache_dir=tmp_path)
    assert tokenizer.is_fast and model.config.model_type == "llama"
    copy = tmp_path / "copy"
    shutil.copytree(tiny_student_folder, copy)
    assert model_fingerprint(str(copy), cache_dir=tmp_path) == model_fingerprint(str(tiny_student_folder), cache_dir=tmp_path)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"hidden_act"', '"hidden_act" ', 1))
    assert model_fingerprint(str(copy), cache_dir=tmp_path) != model_fingerprint(str(tiny_student_folder), cache_dir=tmp_path)


@pytest.mark.real_model
def test_catalog_models_load_from_the_cache(tmp_path):
    from tests.conftest import catalog_cache

    model, tokenizer = load_causal_lm("smollm2-135m-instruct", cache_dir=catalog_cache())
    assert type(model).__name__ == "LlamaForCausalLM" and len(tokenizer) == 49152
    assert (catalog_cache() / "smollm2-135m-instruct" / "model" / "model.safetensors").exists()


def test_a_hub_model_loads_its_tokenizer_from_the_requested_revision(tmp_path, monkeypatch, tiny_student_folder):
    """Issue 10's bug: ``revision`` reached the weights but not the tokenizer, which came from the default branch."""
    from tests.fake_hub import FakeHub

    hub = FakeHub(monkeypatch, {("org/tiny", "v2"): tiny_student_folder})
    tokenizer = load_tokenizer("org/tiny", cache_dir=tmp_path, revision="v2")
    model, model_tokenizer = load_causal_lm("org/tiny", cache_dir=tmp_path, revision="v2")
    assert tokenizer.is_fast and model_tokenizer.is_fast and model.config.model_type == "llama"
    assert [(call.loader, call.revision) for call in hub.calls] == [
        ("tokenizer", "v2"), ("model", "v2"), ("tokenizer", "v2")
    ]
