"""``lora_bias=True`` (a trainable bias on B) against PEFT 0.21: files both ways, forward, merge, mixed batches.

PEFT computes ``lora_B(lora_A(x)) * s``, so the bias b_B is scaled too, and merging adds ``s·b_B`` to the base
layer's bias. Models: tiny LLaMA with biased projections (``attention_bias``/``mlp_bias``; the plain one has no
bias, so its adapters cannot merge) and GPT-2 (transformers ``Conv1D``).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as PeftLinear
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import input_ids, tiny_gpt2, tiny_llama
from lorakit.errors import ConfigError, MergeError, UnsupportedModuleError
from lorakit.layers import kind_for
from lorakit.tuners.lora.layer import LoraLayer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def biased_llama() -> nn.Module:
    return tiny_llama(attention_bias=True, mlp_bias=True)


FACTORIES = {"llama": biased_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def config(arch: str, **kw) -> dict:
    cfg = dict(r=4, lora_alpha=8, init_lora_weights=False, lora_bias=True, target_modules=TARGETS[arch])
    return {**cfg, **kw}


def logits(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def b_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("lora_B.default.bias")}


def peft_model(arch: str, **kw) -> peft.PeftModel:
    model = peft.get_peft_model(FACTORIES[arch](), peft.LoraConfig(**config(arch, **kw))).eval()
    with torch.no_grad():  # B's biases far from their init, so that a dropped or unscaled bias shows
        for p in b_biases(model).values():
            p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_file_loads_in_lorakit_with_equal_logits(arch, tmp_path):
    ids = input_ids()
    p = peft_model(arch)
    p.save_pretrained(tmp_path)
    assert any(k.endswith("lora_B.bias") for k in load_file(tmp_path / "adapter_model.safetensors"))
    k = lorakit.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(logits(k, ids), logits(p, ids))
    assert logits(k, ids).sub(logits(FACTORIES[arch](), ids)).abs().max() > 1e-3  # the adapter does something
    assert set(b_biases(k)) == set(b_biases(p))  # PEFT's parameter names: <module>.lora_B.default.bias


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lorakit_file_loads_in_peft_with_equal_logits_and_keys(arch, tmp_path):
    ids = input_ids()
    k = lorakit.get_peft_model(FACTORIES[arch](), lorakit.LoraConfig(**config(arch))).eval()
    assert all(p.abs().max() > 0 for p in b_biases(k).values())  # init False: torch's default draw, not zero
    k.save_pretrained(tmp_path / "k")
    p = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "k").eval()
    torch.testing.assert_close(logits(p, ids), logits(k, ids))
    peft_model(arch).save_pretrained(tmp_path / "p")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("k", "p"))
    assert set(ours) == set(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainable_parameters_match_peft(arch):
    p = peft_model(arch)
    k = lorakit.get_peft_model(FACTORIES[arch](), lorakit.LoraConfig(**config(arch)))
    names = [n for n, q in k.named_parameters() if q.requires_grad]
    assert names == [n for n, q in p.named_parameters() if q.requires_grad]
    assert any(n.endswith("lora_B.default.bias") for n in names)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_folds_scaled_bias_into_base_bias_as_peft(arch, tmp_path):
    ids = input_ids()
    p = peft_model(arch)
    p.save_pretrained(tmp_path)
    k = lorakit.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path)
    unmerged = logits(k, ids)
    layer = next(m for m in k.modules() if isinstance(m, LoraLayer))
    bias_before = layer.base_layer.bias.detach().clone()
    k.merge_adapter()
    torch.testing.assert_close(logits(k, ids), unmerged)
    expected = bias_before + layer.scaling["default"] * layer.lora_B["default"].bias
    torch.testing.assert_close(layer.base_layer.bias, expected)
    k.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, bias_before)
    torch.testing.assert_close(logits(k, ids), unmerged)
    k.merge_adapter(safe_merge=True)
    torch.testing.assert_close(logits(k, ids), unmerged)
    k.unmerge_adapter()
    ours = k.merge_and_unload()
    theirs = p.merge_and_unload()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids))
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


def test_default_init_starts_at_the_base_model():
    ids = input_ids()
    k = lorakit.get_peft_model(biased_llama(), lorakit.LoraConfig(**config("llama", init_lora_weights=True)))
    assert all(p.abs().max() == 0 for p in b_biases(k).values())
    torch.testing.assert_close(logits(k, ids), logits(biased_llama(), ids))


def linear_pair(bias: bool = True) -> tuple[LoraLayer, PeftLinear]:
    """A lorakit and a PEFT layer on copies of one ``nn.Linear`` with the same A, B and b_B."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ours = LoraLayer(copy.deepcopy(base), kind_for(base))
    ours.add("default", 4, 8, init_lora_weights=False, lora_bias=bias)
    ours.set_active(["default"])
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_bias=bias, target_modules=["x"])
    theirs = PeftLinear(copy.deepcopy(base), "default", config=cfg, r=4, lora_alpha=8)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(theirs, name)["default"].load_state_dict(getattr(ours, name)["default"].state_dict())
    return ours, theirs


def test_fused_kernel_steps_aside_and_agrees_with_the_generic_path():
    ours, theirs = linear_pair()
    plain, _ = linear_pair(bias=False)  # the same A and B, no b_B: the fused kernel's case
    x = torch.randn(3, 5, 16, requires_grad=True)
    assert ours.kind.fused_forward(ours, "default", x) is None  # b_B: the kernels add no bias, the layer steps aside
    assert plain.kind.fused_forward(plain, "default", x) is not None
    y = ours(x)
    torch.testing.assert_close(y, theirs(x))
    s, b_bias = ours.scaling["default"], ours.lora_B["default"].bias
    torch.testing.assert_close(y, plain(x) + s * b_bias)  # generic (with b_B) = fused (without) + s·b_B
    grads = torch.autograd.grad(y.square().sum(), [x, *ours.adapter_parameters("default")])
    peft_params = [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight, theirs.lora_B["default"].bias]
    peft_grads = torch.autograd.grad(theirs(x).square().sum(), [x, *peft_params])
    for g, h in zip(grads, peft_grads):
        torch.testing.assert_close(g, h)
    assert len(ours.adapter_parameters("default")) == 3  # A, B and b_B train


def test_hot_swappable_scaling_scales_the_bias_too():
    ours, theirs = linear_pair()
    x = torch.randn(2, 16)
    ours.scaling["default"] = torch.tensor(ours.scaling["default"])  # a compiled hot-swap's 0-d tensor
    torch.testing.assert_close(ours(x), theirs(x))


def test_mixed_adapter_batch_adds_each_rows_bias_as_peft(tmp_path):
    ids = input_ids(batch=4)
    p = peft_model("gpt2")
    p.add_adapter("plain", peft.LoraConfig(**config("gpt2", lora_bias=False, r=2)))
    p.save_pretrained(tmp_path)
    k = lorakit.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    k.load_adapter(tmp_path / "plain", "plain")
    for names in (["default", "plain", "__base__", "default"], ["default", "default", "default", "plain"]):
        torch.testing.assert_close(logits(k, ids, adapter_names=names), logits(p, ids, adapter_names=names))


def test_refusals_name_the_problem():
    with pytest.raises(UnsupportedModuleError, match="lora_bias=True is not supported on Embedding"):
        lorakit.get_peft_model(biased_llama(), lorakit.LoraConfig(**config("llama", target_modules=["embed_tokens"])))
    with pytest.raises(ConfigError, match="AdaLoRA does not combine with lora_bias"):
        lorakit.AdaLoraConfig(total_step=10, lora_bias=True)
    model = lorakit.get_peft_model(biased_llama(), lorakit.LoraConfig(**config("llama")))
    with pytest.raises(UnsupportedModuleError, match="'dora' adapter and a bias on B"):
        model.add_adapter("dora", lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    assert "dora" not in model.peft_config and all("dora" not in n for n, _ in model.named_parameters())


def test_base_without_bias_runs_but_refuses_to_merge(tmp_path):
    ids = input_ids()
    with pytest.warns(UserWarning, match="cannot be merged"):
        k = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**config("llama")))
    k.eval()
    before = logits(k, ids)
    weights = {n: p.detach().clone() for n, p in k.named_parameters()}
    with pytest.raises(MergeError, match="no bias to merge it into"):
        k.merge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in k.named_parameters())  # nothing merged anywhere
    torch.testing.assert_close(logits(k, ids), before)
    k.save_pretrained(tmp_path)  # PEFT runs such an adapter unmerged too
    p = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(p, ids), before)


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_weighted_combination_sums_the_biases(combination):
    k = lorakit.get_peft_model(biased_llama(), lorakit.LoraConfig(**config("llama", target_modules=["q_proj"])))
    k.add_adapter("two", lorakit.LoraConfig(**config("llama", target_modules=["q_proj"], r=2, lora_alpha=3)))
    # the update enters attention non-linearly: one layer's own output is where the combination is linear
    layer = k.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 32)
    outs = []
    for name in ("default", "two"):
        layer.set_active([name])
        outs.append(layer(x) - layer.base_layer(x))
    k.add_weighted_adapter(["default", "two"], [0.7, -1.5], "mix", combination_type=combination, svd_rank=6)
    assert k.peft_config["mix"].lora_bias
    layer.set_active(["mix"])
    torch.testing.assert_close(layer(x) - layer.base_layer(x), 0.7 * outs[0] - 1.5 * outs[1], atol=1e-5, rtol=1e-4)
    k.add_adapter("three", lorakit.LoraConfig(**config("llama", target_modules=["q_proj"])))  # rank 4, as default
    with pytest.raises(ConfigError, match="bias on B .* cannot combine"):
        k.add_weighted_adapter(["default", "three"], [1.0, 1.0], "ties", combination_type="ties", density=0.5)
    assert "ties" not in k.peft_config


def test_cli_flag_reaches_the_lora_config():
    from lorakit.cli import build_parser
    from lorakit.training.config import TrainConfig
    from lorakit.training.methods import lora_config

    args = build_parser().parse_args(["train", "--lora-bias", "--output", "x"])
    assert args.lora_bias is True
    cfg = TrainConfig.from_sources(None, {"output": "x", "lora_bias": True})
    assert lora_config(cfg, None, 10).lora_bias is True
    assert lora_config(TrainConfig(output="x"), None, 10).lora_bias is False
    with pytest.raises(ConfigError, match="lora_bias .* applies to plain LoRA"):
        TrainConfig(output="x", lora_bias=True, use_dora=True)
    with pytest.raises(ConfigError, match="lora_bias .* applies to plain LoRA"):
        TrainConfig(output="x", lora_bias=True, method="ia3")


def test_layer_level_forward_is_peft_formula_for_conv():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 6, 3, padding=1)
    layer = LoraLayer(base, kind_for(base))
    layer.add("default", 4, 8, init_lora_weights=False, lora_bias=True)
    layer.set_active(["default"])
    x = torch.randn(2, 3, 5, 5)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    expected = base(x) + layer.scaling["default"] * (F.conv2d(a(x), b.weight) + b.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():
        layer.merge()
    torch.testing.assert_close(base(x), expected, atol=1e-5, rtol=1e-5)


def test_loraplus_groups_match_peft():
    from peft.optimizers import create_loraplus_optimizer

    from lorakit.tuners.lora.loraplus import loraplus_param_groups

    k = lorakit.get_peft_model(tiny_gpt2(), lorakit.LoraConfig(**config("gpt2")))
    p = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**config("gpt2")))
    ours = [sorted(n for n, q in k.named_parameters() if any(q is x for x in g["params"])) for g in
            loraplus_param_groups(k, lr=1e-3, ratio=16)]  # fmt: skip
    groups = create_loraplus_optimizer(p, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16).param_groups
    assert ours == [sorted(n for n, q in p.named_parameters() if any(q is x for x in g["params"])) for g in groups]
    assert all(n.endswith("lora_B.default.bias") for n in ours[3]) and ours[3]  # B's biases: B, no weight decay
