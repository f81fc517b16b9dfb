"""Saving and loading adapters: layout, byte stability, atomicity, bad files, rollback on failure."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit.persistence as persistence
from conftest import tiny_bert, tiny_llama
from lorakit import (
    AdapterExistsError,
    AdapterFileError,
    ConfigError,
    LoraConfig,
    LoraLayer,
    PeftModel,
    ShapeMismatchError,
    get_peft_model,
)

QV = ["q_proj", "v_proj"]


def lora(**kw) -> LoraConfig:
    kw = {"r": 4, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": False, **kw}
    return LoraConfig(**kw)


def snapshot(model) -> dict:
    return {
        "modules": {n: type(m).__name__ for n, m in model.named_modules()},
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    }


def assert_same(model, snap) -> None:
    now = snapshot(model)
    assert now["modules"] == snap["modules"]
    assert now["params"].keys() == snap["params"].keys()
    for n, (p, rg) in snap["params"].items():
        assert torch.equal(now["params"][n][0], p), n
        assert now["params"][n][1] == rg, n


@pytest.fixture
def saved(tmp_path, ids):
    model = get_peft_model(tiny_llama(), lora())
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a", model(ids).logits.detach()


def test_layout_and_keys(saved):
    path, _ = saved
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # + card
    keys = sorted(load_file(path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert len(keys) == 2 * 2 * 2
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["inference_mode"] is True
    assert cfg["target_modules"] == QV


def test_round_trip_equal_outputs_and_frozen(saved, ids):
    path, logits = saved
    model = PeftModel.from_pretrained(tiny_llama(), path)
    torch.testing.assert_close(model(ids).logits, logits)
    assert model.get_nb_trainable_parameters()[0] == 0
    assert not model.training
    trainable = PeftModel.from_pretrained(tiny_llama(), path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 896


def test_save_load_save_is_byte_stable(saved, tmp_path):
    path, _ = saved
    PeftModel.from_pretrained(tiny_llama(), path).save_pretrained(tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (path / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_several_adapters_in_subfolders(tmp_path, ids):
    model = get_peft_model(tiny_llama(), lora())
    model.add_adapter("second", lora(target_modules=["k_proj"], r=2))
    model.set_adapter("second")
    out_second = model(ids).logits
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "second" / "adapter_model.safetensors")
    assert json.loads((tmp_path / "second" / "adapter_config.json").read_text())["r"] == 2
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    loaded.set_adapter("second")
    torch.testing.assert_close(loaded(ids).logits, out_second)
    also = PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="second", adapter_name="second")
    torch.testing.assert_close(also(ids).logits, out_second)


def test_selected_adapters(tmp_path):
    model = get_peft_model(tiny_llama(), lora())
    model.add_adapter("x", lora())
    model.save_pretrained(tmp_path, selected_adapters=["x"])
    assert sorted(os.listdir(tmp_path)) == ["README.md", "x"]  # the card stays at the root, as PEFT writes it
    assert sorted(os.listdir(tmp_path / "x")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_modules_to_save_and_bias_round_trip(tmp_path):
    model = get_peft_model(tiny_bert(), lora(target_modules=["query"], task_type="SEQ_CLS", bias="lora_only"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    ids = torch.randint(0, 96, (2, 7))
    out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, out)


def test_legacy_bin_loads_with_weights_only(tmp_path, ids):
    model = get_peft_model(tiny_llama(), lora())
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "adapter_model.bin")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_pickled_code_in_bin_is_refused(tmp_path):
    get_peft_model(tiny_llama(), lora()).save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="cannot be loaded safely|corrupt"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_failed_save_keeps_previous_adapter(saved, monkeypatch):
    path, _ = saved
    before = {n: (path / n).read_bytes() for n in os.listdir(path)}
    model = get_peft_model(tiny_llama(seed=5), lora(r=2))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(persistence, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert {n: (path / n).read_bytes() for n in os.listdir(path)} == before


def test_interrupted_save_keeps_previous_adapter(saved, monkeypatch):
    path, _ = saved
    before = {n: (path / n).read_bytes() for n in os.listdir(path)}
    model = get_peft_model(tiny_llama(seed=5), lora(r=2))
    real = LoraConfig.to_json

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(LoraConfig, "to_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    monkeypatch.setattr(LoraConfig, "to_json", real)
    assert {n: (path / n).read_bytes() for n in os.listdir(path)} == before


def test_unwritable_folder_is_reported(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file"
        target.write_text("x")
        with pytest.raises(AdapterFileError, match="is a file"):
            get_peft_model(tiny_llama(), lora()).save_pretrained(target)
        with pytest.raises(AdapterFileError, match="cannot create"):
            get_peft_model(tiny_llama(), lora()).save_pretrained(target / "sub")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(AdapterFileError):
            get_peft_model(tiny_llama(), lora()).save_pretrained(ro)


# -- bad files: clear errors, model untouched ------------------------------------------------------------


def test_missing_folder(tmp_path):
    base = tiny_llama()
    snap = snapshot(base)
    with pytest.raises(AdapterFileError, match="does not exist"):
        PeftModel.from_pretrained(base, tmp_path / "nope")
    assert_same(base, snap)


def test_missing_weights_file(saved):
    path, _ = saved
    os.remove(path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="no adapter weights.*adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_missing_config_lists_folder(saved):
    path, _ = saved
    os.remove(path / "adapter_config.json")
    with pytest.raises(AdapterFileError, match="adapter_config.json.*not found.*adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_corrupt_weights_file(saved):
    path, _ = saved
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    base = tiny_llama()
    snap = snapshot(base)
    with pytest.raises(AdapterFileError, match="corrupt"):
        PeftModel.from_pretrained(base, path)
    assert_same(base, snap)


def test_corrupt_config_file(saved):
    path, _ = saved
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="cannot read adapter config"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_unknown_peft_type(saved):
    path, _ = saved
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["peft_type"] = "MAGIC"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="peft_type='MAGIC' is not known; accepted: 'LORA'"):
        PeftModel.from_pretrained(tiny_llama(), path)
    cfg["peft_type"] = "LOHA"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'LOHA' is not supported by lorakit; supported: 'LORA'"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_unsupported_peft_feature_is_refused(saved):
    path, _ = saved
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["layer_replication"] = [[0, 2]]
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="layer_replication"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_inert_peft_fields_are_accepted(saved, ids):
    path, logits = saved
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(peft_version="0.21.2", layer_replication=None, loftq_config={}, use_dora=False, megatron_core="x")
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = PeftModel.from_pretrained(tiny_llama(), path)
    torch.testing.assert_close(model(ids).logits, logits)


def test_shape_mismatch_names_key_and_shapes_and_rolls_back(saved):
    path, _ = saved
    state = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key] = torch.zeros(17, 4)
    save_file(state, path / "adapter_model.safetensors")
    base = tiny_llama()
    snap = snapshot(base)
    with pytest.raises(ShapeMismatchError, match=rf"{key}.*\(17, 4\).*expects \(16, 4\)"):
        PeftModel.from_pretrained(base, path)
    assert_same(base, snap)


def test_adapter_for_other_model_is_refused(tmp_path):
    get_peft_model(tiny_bert(), lora(target_modules=["query", "value"])).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="matched no module"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_and_unexpected_keys(saved):
    path, _ = saved
    state = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensor = state.pop(key)
    save_file(state, path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match=rf"lacks 1 of the 8 tensors.*{key}"):
        PeftModel.from_pretrained(tiny_llama(), path)
    state[key] = tensor
    state["base_model.model.model.layers.0.mystery.lora_A.weight"] = torch.zeros(2)
    save_file(state, path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="match no module.*mystery"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_failed_load_adapter_leaves_model_unchanged(saved, tmp_path, ids):
    path, _ = saved
    model = get_peft_model(tiny_llama(seed=3), lora(target_modules=["k_proj"]))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    state = load_file(path / "adapter_model.safetensors")
    state["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 31)
    save_file(state, bad / "adapter_model.safetensors")
    snap = snapshot(model)
    out = model(ids).logits
    with pytest.raises(ShapeMismatchError):
        model.load_adapter(bad, adapter_name="bad")
    assert_same(model, snap)
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(ids).logits, out)
    with pytest.raises(AdapterExistsError):
        model.load_adapter(path, adapter_name="default")


def test_loaded_adapter_matches_saved_tensors(saved):
    path, _ = saved
    model = PeftModel.from_pretrained(tiny_llama(), path)
    state = load_file(path / "adapter_model.safetensors")
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer)
    torch.testing.assert_close(
        layer.lora_A["default"].weight, state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    )


def test_tied_embeddings_save(tmp_path, ids):
    model = get_peft_model(tiny_llama(tie=True), lora(target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(tie=True), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    copy.deepcopy(loaded)
