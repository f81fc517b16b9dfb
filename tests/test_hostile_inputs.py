"""What a hostile or careless input meets: one named error and an untouched model (issue 15, items 3, 7, 8, 12).

Each test is named after the behaviour it guarantees.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import input_ids, tiny_bert, tiny_llama
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError, LorakitError, ShapeMismatchError


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, snap) -> None:
    now = model.state_dict()
    assert list(now) == list(snap)
    for key, value in snap.items():
        assert torch.equal(now[key], value), key


@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


# -- item 3: an adapter file sets only what the adapter owns ----------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.layers.0.mlp.down_proj.weight",
        "base_model.model.model.rotary_emb.inv_freq",
        "base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight",
        "base_model.model.model.norm.weight",
    ],
)
def test_an_adapter_file_cannot_write_base_weights_or_buffers(saved, key):
    state = load_file(saved / "adapter_model.safetensors")
    reference = tiny_llama()
    target = dict(reference.named_parameters()) | dict(reference.named_buffers())
    name = key.removeprefix("base_model.model.").replace("q_proj.base_layer", "q_proj")
    state[key] = torch.full_like(target[name], 7.0)
    save_file(state, saved / "adapter_model.safetensors")

    base = tiny_llama()
    snap = snapshot(base)
    with pytest.raises(AdapterFileError, match=rf"{key}.*does not own"):
        PeftModel.from_pretrained(base, saved)
    assert_untouched(base, snap)

    host = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["k_proj"]))
    snap = snapshot(host)
    with pytest.raises(AdapterFileError, match="does not own"):
        host.load_adapter(saved, "other")
    assert_untouched(host, snap)
    assert list(host.peft_config) == ["default"]
    ids = input_ids()
    assert torch.equal(host.unload()(ids).logits, tiny_llama()(ids).logits)  # unload gives back the true base


def test_an_adapter_file_may_set_the_biases_its_config_trains(tmp_path):
    model = get_peft_model(
        tiny_bert(), LoraConfig(target_modules=["query"], bias="lora_only", modules_to_save=["classifier"])
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a")
    ids = input_ids()
    model.eval()
    assert torch.allclose(loaded(ids).logits, model(ids).logits)

    # a bias the config does not train (bias="lora_only": only adapted layers') is refused
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    state["base_model.model.bert.encoder.layer.0.attention.self.key.bias"] = torch.zeros(32)
    save_file(state, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="key.bias.*does not own"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path / "a")


# -- item 7: several all-linear adapters ---------------------------------------------------------------------------


def test_a_second_all_linear_adapter_can_be_added_and_loaded(tmp_path):
    config = LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    first = get_peft_model(tiny_llama(seed=0), config)
    first.save_pretrained(tmp_path / "a")
    first.add_adapter("second", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    adapted = {n for n, m in first.named_modules() if hasattr(m, "r") and "second" in getattr(m, "r", {})}
    assert len(adapted) == 2 * 7  # q k v o gate up down in 2 layers, not lm_head, not lorakit's own modules

    model = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "a")
    model.load_adapter(tmp_path / "a", "b")
    ids = input_ids()
    model.set_adapter("b")
    out_b = model(ids).logits
    model.set_adapter("default")
    assert torch.allclose(out_b, model(ids).logits)


def test_all_linear_is_saved_as_the_expanded_module_list(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(saved) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert model.peft_config["default"].target_modules == "all-linear"  # the live config is the user's


def test_all_linear_saved_file_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    ids = input_ids()
    model.eval()
    assert torch.allclose(theirs(ids).logits, model(ids).logits, atol=1e-6)


# -- item 8: every config field is checked for its type -------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_rslora", "false"),
        ("use_dora", "false"),
        ("fan_in_fan_out", "true"),
        ("inference_mode", 1),
        ("r", "8"),
        ("r", 8.0),
        ("r", True),
        ("lora_alpha", "16"),
        ("lora_alpha", True),
        ("lora_dropout", "0.1"),
        ("lora_dropout", True),
        ("bias", ["none"]),
        ("init_lora_weights", "false"),
        ("init_lora_weights", 1),
        ("layers_to_transform", [True]),
        ("layers_to_transform", "0"),
        ("layers_pattern", 3),
        ("modules_to_save", [1]),
        ("modules_to_save", {"classifier": 1}),
        ("rank_pattern", ["q_proj"]),
        ("rank_pattern", {"q_proj": "16"}),
        ("alpha_pattern", [1]),
        ("alpha_pattern", {"q_proj": "x"}),
        ("target_modules", 5),
        ("target_modules", "(unclosed"),
        ("exclude_modules", "[bad"),
        ("rank_pattern", {"(bad": 4}),
        ("task_type", ["CAUSAL_LM"]),
        ("base_model_name_or_path", 5),
        ("loftq_config", [4]),
        ("loftq_config", {"loftq_bits": "4"}),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_on_construction_and_on_load(saved, field, value):
    with pytest.raises(ConfigError, match=field):
        LoraConfig(**{field: value})
    data = json.loads((saved / "adapter_config.json").read_text())
    data[field] = value
    (saved / "adapter_config.json").write_text(json.dumps(data))
    base = tiny_llama()
    snap = snapshot(base)
    with pytest.raises(ConfigError, match=field):
        PeftModel.from_pretrained(base, saved)
    assert_untouched(base, snap)


def test_a_string_boolean_never_changes_the_scaling(saved):
    data = json.loads((saved / "adapter_config.json").read_text())
    data["use_rslora"] = "false"  # truthy in Python: read as True it would double the scaling
    (saved / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="use_rslora='false'.*boolean"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_a_rank_is_checked_against_the_file_before_anything_is_allocated(saved, monkeypatch):
    data = json.loads((saved / "adapter_config.json").read_text())
    data["r"] = 10**9
    (saved / "adapter_config.json").write_text(json.dumps(data))
    from lorakit.tuners.lora import kinds

    def no_allocation(*args, **kwargs):
        raise AssertionError("factors were allocated before the rank was checked")

    monkeypatch.setattr(kinds.LinearOps, "create", no_allocation)
    with pytest.raises(ShapeMismatchError, match="rank 1000000000.*holds rank 4"):
        PeftModel.from_pretrained(tiny_llama(), saved)
    data["r"], data["rank_pattern"] = 4, {"v_proj": 10**9}
    (saved / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ShapeMismatchError, match="v_proj"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_peft_creation_only_inits_still_load(saved):
    data = json.loads((saved / "adapter_config.json").read_text())
    for init in ("pissa", "pissa_niter_4", "olora", "eva", "orthogonal"):
        data["init_lora_weights"] = init
        (saved / "adapter_config.json").write_text(json.dumps(data))
        PeftModel.from_pretrained(tiny_llama(), saved)
    # CorDA's start needs preprocess_corda on the base first, on load as well (PEFT raises too): one clear error
    data["init_lora_weights"], data["corda_config"] = "corda", {"corda_method": "ipm"}
    (saved / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="preprocess_corda"):
        PeftModel.from_pretrained(tiny_llama(), saved)


# -- item 12: one clear error instead of a traceback ------------------------------------------------------------


def test_a_deeply_nested_config_is_one_clear_error(saved):
    (saved / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterFileError, match="nested too deeply"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_a_bad_regex_target_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"target_modules='\.\*\(q_proj' is not a valid regular expression"):
        LoraConfig(target_modules=".*(q_proj")


class _Payload:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickled code ran')",))


def test_inspect_of_a_pickled_bin_is_one_error_and_runs_nothing(saved, capsys):
    (saved / "adapter_model.safetensors").unlink()
    with open(saved / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": _Payload()}, fh)
    assert main(["inspect", str(saved)]) == 1
    err = capsys.readouterr().err
    assert "adapter_model.bin" in err and "cannot be loaded safely" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "name, why",
    [
        ("__base__", "reserved"),
        ("keys", "attribute"),
        ("training", "attribute"),
        ("forward", "attribute"),
        ("a\x00b", "holds"),
        ("x" * 300, "too long"),
        ("a.b", "holds"),
        ("../x", "holds"),
        ("", "invalid"),
        (5, "invalid"),
    ],
)
def test_names_that_cannot_be_used_are_refused_when_added(name, why, tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    snap = snapshot(model)
    with pytest.raises(ConfigError, match=why):
        model.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    assert_untouched(model, snap)
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ConfigError, match=why):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), adapter_name=name)


def test_base_rows_never_route_through_an_adapter():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False)).eval()
    ids = input_ids()
    with model.disable_adapter():
        base = model(ids).logits
    mixed = model(ids, adapter_names=["__base__", "default"]).logits
    assert torch.equal(mixed[0], base[0])
    assert not torch.allclose(mixed[1], base[1])


def test_every_refusal_is_a_lorakit_error():
    for bad in (dict(r=0), dict(target_modules="(x"), dict(rank_pattern=[1]), dict(use_rslora="no")):
        with pytest.raises(LorakitError):
            LoraConfig(**bad)
