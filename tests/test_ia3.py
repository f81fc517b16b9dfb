"""IA³ (Liu et al. 2022, arXiv 2205.05638) against real PEFT on identical weights, and its own guarantees."""

from __future__ import annotations

import copy
import json
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import MODEL_FACTORIES, input_ids, tiny_bert, tiny_gpt2, tiny_llama
from lorakit.errors import ConfigError, MergeError, UnsupportedModuleError
from lorakit.tuners.ia3.layer import IA3Layer

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # PEFT's notices (fan_in_fan_out fixed up, unmerge)
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

ARCHS = ["llama", "gpt2", "bert"]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
# A second adapter with its own targets (one feedforward module each).
OTHER = {
    "llama": {"target_modules": ["q_proj", "up_proj"], "feedforward_modules": ["up_proj"]},
    "gpt2": {"target_modules": ["c_fc", "attn.c_proj"], "feedforward_modules": ["c_fc"]},
    "bert": {"target_modules": ["query", "intermediate.dense"], "feedforward_modules": ["intermediate.dense"]},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


def config(arch: str, **overrides: Any) -> dict[str, Any]:
    """The architecture's default targets (keys, values, feedforward output), random vectors."""
    return {"task_type": TASK[arch], "init_ia3_weights": False, **overrides}


def build(arch: str, cfg: dict[str, Any], extra: dict[str, Any] | None = None):
    """The same base model adapted by PEFT and by lorakit, with identical random (non-one) vectors."""
    p = peft.get_peft_model(MODEL_FACTORIES[arch](), peft.IA3Config(**copy.deepcopy(cfg)))
    k = lorakit.get_peft_model(MODEL_FACTORIES[arch](), lorakit.IA3Config(**copy.deepcopy(cfg)))
    if extra is not None:
        p.add_adapter("other", peft.IA3Config(**copy.deepcopy(extra)))
        k.add_adapter("other", lorakit.IA3Config(**copy.deepcopy(extra)))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in p.named_parameters():
            if ".modules_to_save." in name:  # trained head copies must differ from the base to be seen
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    k.load_state_dict(p.state_dict())
    return p.eval(), k.eval()


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def ia3_layers(model: nn.Module) -> dict[str, IA3Layer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Layer)}


# -- the same model as PEFT -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_same_modules_keys_shapes_and_logits_as_peft(arch):
    p, k = build(arch, config(arch))
    assert {n: t.shape for n, t in k.state_dict().items()} == {n: t.shape for n, t in p.state_dict().items()}
    assert any("ia3_l.default" in n for n in k.state_dict())
    torch.testing.assert_close(logits(k), logits(p), rtol=0, atol=0)
    assert not torch.allclose(logits(k), logits(MODEL_FACTORIES[arch]()))  # the vectors do change the model


@pytest.mark.parametrize("arch", ARCHS)
def test_feedforward_vectors_scale_the_input_and_others_the_output(arch):
    _, k = build(arch, config(arch))
    feedforward = lorakit.IA3Config.DEFAULT_FEEDFORWARD[arch]
    for name, layer in ia3_layers(k).items():
        is_ff = any(name.endswith(f) for f in feedforward)
        assert layer.feedforward["default"] is is_ff
        assert tuple(layer.ia3_l["default"].shape) == ((1, layer.in_features) if is_ff else (layer.out_features, 1))


def test_init_ia3_weights_starts_at_the_base_model():
    k = lorakit.get_peft_model(tiny_llama(), lorakit.IA3Config(task_type="CAUSAL_LM"))
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in k.named_parameters() if "ia3_l" in n)
    torch.testing.assert_close(logits(k), logits(tiny_llama()), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_trainable_parameters_as_peft(arch, capsys):
    p, k = build(arch, config(arch))
    assert k.get_nb_trainable_parameters() == p.get_nb_trainable_parameters()
    assert {n for n, t in k.named_parameters() if t.requires_grad} == {
        n for n, t in p.named_parameters() if t.requires_grad
    }
    p.print_trainable_parameters()
    expected = capsys.readouterr().out
    k.print_trainable_parameters()
    assert capsys.readouterr().out == expected


def grads(model: nn.Module, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of a loss on the logits (the models stay in eval mode: no dropout)."""
    model.zero_grad(set_to_none=True)
    model(input_ids=input_ids() if ids is None else ids).logits.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_equal_peft(arch):
    p, k = build(arch, config(arch))
    theirs, ours = grads(p), grads(k)
    assert set(ours) == set(theirs) and any("ia3_l" in n for n in ours)
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradients_of_two_active_adapters_equal_peft():
    p, k = build("llama", config("llama"), extra=config("llama", **OTHER["llama"]))
    p.base_model.set_adapter(["default", "other"])
    k.base_model.set_adapter(["default", "other"])
    theirs, ours = grads(p), grads(k)
    assert set(ours) == set(theirs) and any("ia3_l.other" in n for n in ours)
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_float32_vectors_on_a_bfloat16_model_compute_as_peft():
    cfg = config("llama")
    p = peft.get_peft_model(tiny_llama().to(torch.bfloat16), peft.IA3Config(**copy.deepcopy(cfg)))
    k = lorakit.get_peft_model(tiny_llama().to(torch.bfloat16), lorakit.IA3Config(**copy.deepcopy(cfg)))
    for model in (p, k):  # the vectors in float32, the activations in bfloat16: products cast back
        for layer in model.modules():
            if hasattr(layer, "ia3_l"):
                for name in list(layer.ia3_l):
                    layer.ia3_l[name] = nn.Parameter(layer.ia3_l[name].detach().float())
    k.load_state_dict(p.state_dict())
    out = logits(k)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, logits(p), rtol=0, atol=0)


def test_unmerge_then_forward_applies_the_adapter_again():
    _, k = build("llama", config("llama"), extra=config("llama", **OTHER["llama"]))
    k.base_model.set_adapter(["default", "other"])
    expected = logits(k)
    k.merge_adapter(["other"])
    torch.testing.assert_close(logits(k), expected, rtol=1e-5, atol=1e-6)
    k.unmerge_adapter()
    torch.testing.assert_close(logits(k), expected, rtol=1e-5, atol=1e-6)
    k.base_model.set_adapter(["default"])
    assert not torch.allclose(logits(k), expected)


# -- files both ways ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_lorakit_file_loads_in_peft_with_the_same_logits(arch, tmp_path):
    p, k = build(arch, config(arch))
    k.save_pretrained(tmp_path)
    p.save_pretrained(tmp_path / "peft")
    ours, theirs = (
        load_file(tmp_path / "adapter_model.safetensors"),
        load_file(tmp_path / "peft/adapter_model.safetensors"),
    )
    assert set(ours) == set(theirs) and any(key.endswith(".ia3_l") for key in ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    loaded = peft.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), logits(k), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_file_loads_in_lorakit_with_the_same_logits(arch, tmp_path):
    p, _ = build(arch, config(arch))
    p.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], lorakit.IA3Config)
    torch.testing.assert_close(logits(loaded), logits(p), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_config_json_matches_peft(arch, tmp_path):
    p, k = build(arch, config(arch))
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    ours = json.loads((tmp_path / "lorakit/adapter_config.json").read_text())
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    for key, value in ours.items():
        if key in ("target_modules", "feedforward_modules"):  # PEFT keeps sets: its JSON order is arbitrary
            assert sorted(value) == sorted(theirs[key]), key
        elif key == "base_model_name_or_path":
            assert value in (None, "") and theirs[key] in (None, "")
        else:
            assert value == theirs[key], (key, value, theirs[key])
    assert ours["peft_type"] == "IA3" and ours["inference_mode"] is True


def test_a_saved_config_reads_back_as_the_same_json(tmp_path):
    _, k = build("gpt2", config("gpt2"))
    k.save_pretrained(tmp_path)
    again = lorakit.PeftConfig.from_pretrained(tmp_path)
    assert type(again) is lorakit.IA3Config
    assert again.to_json() == (tmp_path / "adapter_config.json").read_text()


# -- merging ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_merge_and_unload_keep_the_outputs(arch):
    p, k = build(arch, config(arch))
    base = {n: t.clone() for n, t in k.state_dict().items()}
    expected = logits(k)
    k.merge_adapter()
    assert all(layer.merged_adapters == ["default"] for layer in ia3_layers(k).values())
    torch.testing.assert_close(logits(k), expected, rtol=1e-5, atol=1e-6)
    k.unmerge_adapter()
    for name, tensor in k.state_dict().items():
        torch.testing.assert_close(tensor, base[name], rtol=1e-6, atol=0, msg=name)
    merged = k.merge_and_unload()
    assert not ia3_layers(merged)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-6)
    theirs = p.merge_and_unload()  # PEFT's merged weights: the same products
    for name, tensor in theirs.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_unmerge_is_exact_where_a_vector_is_zero():
    _, k = build("llama", config("llama"))
    base = {n: t.clone() for n, t in k.state_dict().items()}
    layer = k.base_model.model.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        layer.ia3_l["default"][:3] = 0.0  # dividing cannot recover these rows: the merge keeps them
    expected = logits(k)
    k.merge_adapter()
    torch.testing.assert_close(logits(k), expected, rtol=1e-5, atol=1e-6)
    k.unmerge_adapter()
    for name, tensor in k.state_dict().items():
        if "ia3_l" not in name:
            torch.testing.assert_close(tensor, base[name], rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_nan_and_leaves_the_model_untouched(how):
    _, k = build("gpt2", config("gpt2"))
    with torch.no_grad():  # the last layer: an all-or-nothing merge must not have written the earlier ones
        k.base_model.model.transformer.h[1].mlp.c_proj.ia3_l["default"][0, 5] = float("nan")
    before = {n: t.clone() for n, t in k.state_dict().items()}
    with pytest.raises(MergeError, match=r"h\.1\.mlp\.c_proj.*NaN"):
        getattr(k, how)(safe_merge=True)
    assert all(not layer.merged_adapters for layer in ia3_layers(k).values())
    for name, tensor in k.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_safe_merge_checks_in_the_weights_own_dtype():
    model = tiny_llama().to(torch.float16)
    k = lorakit.get_peft_model(model, lorakit.IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        k.base_model.model.model.layers[0].mlp.down_proj.ia3_l["default"].fill_(1e6)  # finite in fp32, not in fp16
    with pytest.raises(MergeError, match="float16"):
        k.merge_adapter(safe_merge=True)


# -- several adapters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_two_adapters_switch_and_delete_as_in_peft(arch):
    p, k = build(arch, config(arch), extra=config(arch, **OTHER[arch]))
    for name in ("other", "default"):
        p.set_adapter(name)
        k.set_adapter(name)
        torch.testing.assert_close(logits(k), logits(p), rtol=0, atol=0)
    k.set_adapter("other")
    k.delete_adapter("other")
    assert "other" not in k.peft_config and k.active_adapter == "default"
    assert all(layer.adapter_names() == ["default"] for layer in ia3_layers(k).values())
    p.set_adapter("default")
    torch.testing.assert_close(logits(k), logits(p), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # BERT's head is copied per adapter: one may be active
def test_several_active_adapters_multiply_as_in_peft(arch):
    p, k = build(arch, config(arch), extra=config(arch, **OTHER[arch]))
    p.base_model.set_adapter(["default", "other"])
    k.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(logits(k), logits(p), rtol=1e-6, atol=1e-6)
    expected = logits(k)
    k.merge_adapter()
    torch.testing.assert_close(logits(k), expected, rtol=1e-5, atol=1e-6)


def test_disable_adapter_runs_the_base_model():
    _, k = build("llama", config("llama"))
    with k.disable_adapter():
        torch.testing.assert_close(logits(k), logits(tiny_llama()), rtol=0, atol=0)
    assert not torch.allclose(logits(k), logits(tiny_llama()))


def test_a_batch_can_mix_ia3_adapters_row_by_row():
    _, k = build("llama", config("llama"), extra=config("llama", **OTHER["llama"]))
    ids = input_ids(batch=3)
    with torch.no_grad():
        mixed = k(input_ids=ids, adapter_names=["other", "__base__", "default"]).logits
    k.set_adapter("other")
    torch.testing.assert_close(mixed[0], logits(k, ids)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], logits(tiny_llama(), ids)[1], rtol=1e-5, atol=1e-6)
    k.set_adapter("default")
    torch.testing.assert_close(mixed[2], logits(k, ids)[2], rtol=1e-5, atol=1e-6)


# -- configs and refusals ---------------------------------------------------------------------------------


def test_a_lora_config_cannot_join_an_ia3_model():
    k = lorakit.get_peft_model(tiny_llama(), lorakit.IA3Config(task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="IA³ adapters; a LORA adapter cannot join"):
        k.add_adapter("lora", lorakit.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    assert list(k.peft_config) == ["default"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, "subset of target_modules"),
        ({"init_ia3_weights": "false"}, "init_ia3_weights='false' is invalid"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out=1 is invalid"),
        ({"feedforward_modules": "all-linear"}, "feedforward_modules='all-linear'"),
        ({"feedforward_modules": "("}, "not a valid regular expression"),
        ({"target_modules": 3}, "target_modules=3 is invalid"),
    ],
)
def test_bad_config_fields_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        lorakit.IA3Config(**fields)


def test_an_architecture_without_defaults_needs_feedforward_modules():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="feedforward_modules is None"):
        lorakit.get_peft_model(model, lorakit.IA3Config(target_modules=["0"]))
    assert isinstance(model[0], nn.Linear)  # refused before any change
    lorakit.get_peft_model(model, lorakit.IA3Config(target_modules=["0"], feedforward_modules=[]))


def test_an_embedding_target_is_refused():
    with pytest.raises(UnsupportedModuleError, match="embedding"):
        lorakit.get_peft_model(tiny_llama(), lorakit.IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))


def test_a_regex_selects_feedforward_modules_as_in_peft():
    cfg = config("gpt2", target_modules=r".*\.(c_attn|c_fc)", feedforward_modules=r".*\.c_fc")
    p, k = build("gpt2", cfg)
    torch.testing.assert_close(logits(k), logits(p), rtol=0, atol=0)
    assert {n for n, m in ia3_layers(k.get_base_model()).items() if m.is_feedforward} == {
        f"transformer.h.{i}.mlp.c_fc" for i in (0, 1)
    }


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3)
        self.proj = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x)))


def test_conv2d_layers_match_peft_and_merge_exactly():
    cfg = {"target_modules": ["conv", "proj"], "feedforward_modules": ["proj"], "init_ia3_weights": False}
    p = peft.get_peft_model(_Convs(), peft.IA3Config(**copy.deepcopy(cfg))).eval()
    k = lorakit.get_peft_model(_Convs(), lorakit.IA3Config(**copy.deepcopy(cfg))).eval()
    k.load_state_dict(p.state_dict())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = p(x)
        torch.testing.assert_close(k(x), expected, rtol=0, atol=0)
        with pytest.raises(UnsupportedModuleError, match="linear layers only"):
            k(x, adapter_names=["default", "__base__"])
        k.merge_adapter()
        torch.testing.assert_close(k(x), expected, rtol=1e-5, atol=1e-6)


def test_other_architectures_get_their_default_targets():
    k = lorakit.get_peft_model(tiny_bert(), lorakit.IA3Config(task_type="SEQ_CLS"))
    assert set(ia3_layers(k.get_base_model())) == {
        f"bert.encoder.layer.{i}.{m}"
        for i in (0, 1)
        for m in ("attention.self.key", "attention.self.value", "attention.output.dense", "output.dense")
    }
    assert lorakit.IA3Config.DEFAULT_TARGETS["gpt2"] == ["c_attn", "mlp.c_proj"]
    assert set(ia3_layers(lorakit.get_peft_model(tiny_gpt2(), lorakit.IA3Config()).get_base_model())) == {
        f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_proj")
    }


def test_a_4bit_base_takes_ia3_refuses_merge_and_merge_and_unload_dequantizes():
    pytest.importorskip("bitsandbytes", reason="4-bit layers need bitsandbytes")
    k = lorakit.get_peft_model(
        lorakit.quantize(tiny_llama(), bits=4), lorakit.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)
    )
    expected = logits(k)
    with pytest.raises(MergeError, match="quantized"):
        k.merge_adapter()
    merged = k.merge_and_unload()
    assert not ia3_layers(merged)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-6)
