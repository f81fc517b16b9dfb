"""Grouped convolutions, ``nn.MultiheadAttention`` and AdaLoRA on ``nn.Conv2d``, against PEFT 0.21.

One small network holds all three: a grouped ``Conv2d(4, 6, 3, groups=2)``, a plain 3×3 ``Conv2d``, a linear
layer and an ``nn.MultiheadAttention``. Each test wraps copies of it with PEFT and with lorakit and checks files
both ways (equal outputs), merging (merged == unmerged where the algebra allows it, refused where it does not)
and the refusals PEFT makes.
"""

from __future__ import annotations

import copy
import threading

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.errors import ConfigError, MergeError, UnsupportedModuleError
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.mha import LoraMultiheadAttention

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.lin = nn.Linear(6, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(torch.relu(self.grouped(x)))  # (B, 6, H, W)
        seq = self.lin(h.flatten(2).transpose(1, 2))  # (B, H·W, 8)
        return self.mha(seq, seq, seq)[0]


def inputs() -> torch.Tensor:
    return torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs())


def lora(**kw) -> dict:
    return {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw}


def both_ways(tmp_path, peft_config, lorakit_config) -> tuple[nn.Module, nn.Module]:
    """PEFT's file loaded by lorakit and lorakit's loaded by PEFT; each pair gives equal outputs. Returns the
    lorakit model that loaded PEFT's file and the PEFT model it came from."""
    p = peft.get_peft_model(Net(), peft_config).eval()
    p.save_pretrained(tmp_path / "peft")
    k = lorakit.PeftModel.from_pretrained(Net(), tmp_path / "peft")
    torch.testing.assert_close(run(k), run(p))
    assert (run(k) - run(Net())).abs().max() > 1e-4  # the adapter changes the output
    ours = lorakit.get_peft_model(Net(), lorakit_config).eval()
    ours.save_pretrained(tmp_path / "lorakit")
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path / "lorakit").eval()
    torch.testing.assert_close(run(theirs), run(ours))
    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "lorakit")]
    assert {k: v.shape for k, v in files[0].items()} == {k: v.shape for k, v in files[1].items()}
    return k, p


# -- grouped convolutions -------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_bias", [False, True])
def test_grouped_conv_files_both_ways(tmp_path, lora_bias):
    cfg = lora(target_modules=["grouped"], lora_bias=lora_bias)
    k, _ = both_ways(tmp_path, peft.LoraConfig(**cfg), lorakit.LoraConfig(**cfg))
    layer = k.base_model.model.grouped
    assert layer.lora_A["default"].weight.shape == (4, 4, 3, 3)  # A: a full convolution into r channels
    assert layer.lora_B["default"].weight.shape == (6, 2, 1, 1)  # B: grouped, (out, r/groups, 1, 1)


def test_grouped_conv_update_is_the_block_diagonal_matrix():
    model = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**lora(target_modules=["grouped"])))
    layer = model.base_model.model.grouped
    a, b = layer.kind.factors(layer, "default")  # (r, in·k·k), (out, r)
    assert b.shape == (6, 4) and torch.count_nonzero(b[:3, 2:]) == 0 and torch.count_nonzero(b[3:, :2]) == 0
    dense = (layer.scaling["default"] * b @ a).view(6, 4, 3, 3)  # the update as a full (ungrouped) convolution
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), F.conv2d(x, dense, padding=1))


def test_grouped_conv_rank_must_be_a_multiple_of_groups():
    model = Net()
    with pytest.raises(ConfigError, match="rank 3 on a Conv2d with groups=2"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(r=3, target_modules=["grouped", "conv"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    with pytest.raises(ValueError, match="rank is divisible by groups"):  # PEFT refuses the same rank
        peft.get_peft_model(Net(), peft.LoraConfig(r=3, target_modules=["grouped"]))
    assert lorakit.get_peft_model(
        Net(), lorakit.LoraConfig(r=3, rank_pattern={"grouped": 2}, target_modules=["grouped"])
    )


def test_grouped_conv_refuses_to_merge_and_nothing_else_merges():
    cfg = lora(target_modules=["grouped", "conv", "lin", "mha"])
    model = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**cfg)).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = run(model)
    for call in (model.merge_adapter, lambda: model.merge_adapter(safe_merge=True), model.merge_and_unload):
        with pytest.raises(MergeError, match="groups=2"):
            call()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert not any(m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))
    torch.testing.assert_close(run(model), out)
    p = peft.get_peft_model(Net(), peft.LoraConfig(**cfg))
    with pytest.raises(NotImplementedError, match="groups > 1"):  # PEFT refuses it too
        p.merge_adapter()


def test_grouped_conv_takes_plain_lora_only():
    with pytest.raises(UnsupportedModuleError, match="groups=2 takes plain LoRA"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_modules=["grouped"], use_dora=True))
    with pytest.raises(UnsupportedModuleError, match="groups=2 takes plain LoRA"):
        lorakit.get_peft_model(Net(), lorakit.AdaLoraConfig(**adalora(target_modules=["grouped"])))
    with pytest.raises(ConfigError, match="grouped convolutions"):
        model = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**lora(target_modules=["grouped"])))
        model.add_adapter("two", lorakit.LoraConfig(**lora(target_modules=["grouped"])))
        model.add_weighted_adapter(["default", "two"], [1.0, 1.0], "mix", combination_type="cat")


@pytest.mark.parametrize("target", ["grouped", "mha"])
def test_hotswap_rank_padding_is_refused_where_it_cannot_lay_out_the_factors(target):
    from lorakit.tuners.lora.hotswap import prepare_model_for_compiled_hotswap

    model = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**lora(target_modules=[target, "lin"])))
    before = run(model)
    with pytest.raises(ConfigError, match=rf"target_rank cannot pad the adapter on '{target}'"):
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert torch.equal(run(model), before)
    assert all(not isinstance(s, torch.Tensor) for _, m in model.base_model.lora_layers() for s in m.scaling.values())
    prepare_model_for_compiled_hotswap(model)  # same-rank swaps need no padding: allowed
    torch.testing.assert_close(run(model), before)


# -- nn.MultiheadAttention ------------------------------------------------------------------------------


def test_mha_files_both_ways_with_peft_keys(tmp_path):
    cfg = lora(target_modules=["mha"])
    k, p = both_ways(tmp_path, peft.LoraConfig(**cfg), lorakit.LoraConfig(**cfg))
    keys = set(load_file(tmp_path / "lorakit" / "adapter_model.safetensors"))
    assert keys == {
        f"base_model.model.mha.{part}.weight"
        for part in ("lora_A", "lora_B", "base_layer.out_proj.lora_A", "base_layer.out_proj.lora_B")
    }
    assert isinstance(k.base_model.model.mha, LoraMultiheadAttention)
    assert type(k.base_model.model.mha.base_layer.out_proj) is type(Net().mha.out_proj)  # base left as it was
    fresh = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**cfg))
    ours = sorted(q.shape for q in fresh.parameters() if q.requires_grad)
    assert len(ours) == 4 and ours == sorted(q.shape for q in p.parameters() if q.requires_grad)


def test_mha_update_is_peft_021s_with_the_out_projection_counted_twice():
    """PEFT 0.21.2 adds out_proj's ΔW twice (huggingface/peft PR #3774); lorakit reproduces it (mha.py)."""
    model = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**lora(target_modules=["mha"]))).eval()
    layer = model.base_model.model.mha
    ref = copy.deepcopy(Net().mha)
    with torch.no_grad():
        s, (a_o, b_o) = layer.scaling["default"], layer.out_factors("default")
        ref.in_proj_weight += s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        ref.out_proj.weight += 2 * s * b_o @ a_o
        x = torch.randn(2, 5, 8)
        torch.testing.assert_close(layer(x, x, x)[0], ref(x, x, x)[0])


def test_mha_merge_equals_unmerged_and_unload_matches_peft(tmp_path):
    p = peft.get_peft_model(Net(), peft.LoraConfig(**lora(target_modules=["mha", "lin"]))).eval()
    p.save_pretrained(tmp_path)
    k = lorakit.PeftModel.from_pretrained(Net(), tmp_path)
    mha = k.base_model.model.mha
    weights = (mha.base_layer.in_proj_weight.detach().clone(), mha.base_layer.out_proj.weight.detach().clone())
    unmerged = run(k)
    k.merge_adapter()
    torch.testing.assert_close(run(k), unmerged)
    assert mha.merged_adapters == ["default"]
    assert not torch.equal(mha.base_layer.out_proj.weight, weights[1])
    k.unmerge_adapter()
    torch.testing.assert_close(mha.base_layer.in_proj_weight, weights[0])
    torch.testing.assert_close(mha.base_layer.out_proj.weight, weights[1])
    k.merge_adapter(safe_merge=True)
    torch.testing.assert_close(run(k), unmerged)
    k.unmerge_adapter()
    ours, theirs = k.merge_and_unload(), p.merge_and_unload()
    assert type(ours.mha) is nn.MultiheadAttention
    torch.testing.assert_close(run(ours), run(theirs))
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


def test_mha_forward_trains_all_four_factors_and_leaves_the_base_alone():
    model = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**lora(target_modules=["mha"])))
    mha = model.base_model.model.mha
    base = {n: t.detach().clone() for n, t in mha.base_layer.state_dict().items()}
    model(inputs()).square().sum().backward()
    assert all(torch.equal(t, base[n]) for n, t in mha.base_layer.state_dict().items())
    factors = mha.adapter_parameters("default")
    assert len(factors) == 4 and all(f.grad is not None and f.grad.abs().max() > 0 for f in factors)
    assert all(p.grad is None for p in mha.base_layer.parameters())


def test_mha_adapters_switch_and_delete():
    model = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**lora(target_modules=["mha"]))).eval()
    first = run(model)
    model.add_adapter("two", lorakit.LoraConfig(**lora(target_modules=["mha"], r=2)))
    model.set_adapter("two")
    second = run(model)
    assert (second - first).abs().max() > 1e-4
    model.set_adapter("default")
    torch.testing.assert_close(run(model), first)
    model.delete_adapter("two")
    assert "two" not in model.base_model.model.mha.lora_out_proj.lora_A
    torch.testing.assert_close(run(model), first)
    with model.disable_adapter():
        torch.testing.assert_close(run(model), run(Net()))
    assert type(model.unload().mha) is nn.MultiheadAttention


def test_mha_refusals_match_peft():
    with pytest.raises(UnsupportedModuleError, match="MultiheadAttention takes plain LoRA"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_modules=["mha"], use_dora=True))
    with pytest.raises(UnsupportedModuleError, match="MultiheadAttention takes plain LoRA"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_modules=["mha"], lora_bias=True))
    net = Net()
    net.mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
    with pytest.raises(UnsupportedModuleError, match="kdim = vdim = embed_dim"):
        lorakit.get_peft_model(net, lorakit.LoraConfig(target_modules=["mha"]))
    model = lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_modules=["mha"])).eval()
    with pytest.raises(UnsupportedModuleError, match="do not run through nn.MultiheadAttention"):
        with model.base_model.rows_routed(["default", "__base__"]):
            model(inputs())


# -- AdaLoRA on nn.Conv2d (PEFT's SVDConv2d) -------------------------------------------------------------


def adalora(**kw) -> dict:
    return {"init_r": 4, "target_r": 2, "total_step": 10, "lora_alpha": 8, "init_lora_weights": False, **kw}


def test_adalora_conv2d_files_both_ways(tmp_path):
    cfg = adalora(target_modules=["conv", "lin"])
    k, _ = both_ways(tmp_path, peft.AdaLoraConfig(**cfg), lorakit.AdaLoraConfig(**cfg))
    layer = k.base_model.model.conv
    a, b = layer.kind.factor_params(layer, "default")
    assert a.shape == (4, 6 * 3 * 3) and b.shape == (6, 4)  # PEFT's flat SVD factors
    out = run(k)
    k.merge_adapter()
    torch.testing.assert_close(run(k), out)
    k.unmerge_adapter()
    torch.testing.assert_close(run(k), out)


def test_adalora_conv2d_trains_truncates_and_converts_to_lora():
    model = lorakit.get_peft_model(Net(), lorakit.AdaLoraConfig(**adalora(target_modules=["conv"], init_r=6)))
    model.train()
    model(inputs()).square().sum().backward()
    layer = model.base_model.model.conv
    assert all(p.grad is not None for p in layer.adapter_parameters("default"))
    assert model.base_model.orthogonal_penalty().isfinite()
    model.eval()
    pattern = {"conv.lora_E": [True, False, True, True, False, False]}
    model.peft_config["default"].rank_pattern = pattern
    with torch.no_grad():
        layer.lora_E["default"][torch.tensor([1, 4, 5])] = 0  # what masking leaves; truncating keeps the output
    out = run(model)
    assert model.base_model.truncate() == {"conv": 3}
    torch.testing.assert_close(run(model), out)
    config, tensors = model.base_model.lora_equivalent()
    plain = lorakit.get_peft_model(Net(), config).eval()
    plain.base_model.model.conv.load_state_dict(
        {f"lora_{f}.default.weight": t for f, t in (("A", tensors["conv"]["lora_A.weight"]),
                                                      ("B", tensors["conv"]["lora_B.weight"]))},
        strict=False,
    )  # fmt: skip
    torch.testing.assert_close(run(plain), out)


def test_adalora_refuses_other_convolutions_as_peft():
    net = Net()
    net.conv = nn.Conv1d(6, 6, 3)
    with pytest.raises(UnsupportedModuleError, match="AdaLoRA adapts linear layers .* not Conv1d"):
        lorakit.get_peft_model(copy.deepcopy(net), lorakit.AdaLoraConfig(**adalora(target_modules=["conv"])))
    with pytest.raises(ValueError, match="only `torch.nn.Linear`, `Conv1D`, and `torch.nn.Conv2d`"):
        peft.get_peft_model(net, peft.AdaLoraConfig(**adalora(target_modules=["conv"])))


def test_mha_threads_and_hooks_see_the_adapted_attention():
    model = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**lora(target_modules=["mha"]))).eval()
    expected = run(model)
    results: list[bool] = []

    def work() -> None:
        for _ in range(10):
            results.append(torch.equal(run(model), expected))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 30 and all(results)
    mha = model.base_model.model.mha
    seen = []
    hook = mha.base_layer.register_forward_hook(lambda m, args, out: seen.append(out[0]))
    torch.testing.assert_close(run(model), expected)  # a hooked module is called itself, with the same result
    hook.remove()
    assert len(seen) == 1 and torch.equal(mha.base_layer.in_proj_weight, Net().mha.in_proj_weight)


def test_mha_loraplus_puts_both_b_factors_in_the_b_group():
    from peft.optimizers import create_loraplus_optimizer

    from lorakit.tuners.lora.loraplus import loraplus_param_groups

    k = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**lora(target_modules=["mha"])))
    p = peft.get_peft_model(Net(), peft.LoraConfig(**lora(target_modules=["mha"])))
    ours = [sorted(q.shape for q in g["params"]) for g in loraplus_param_groups(k, lr=1e-3, ratio=16)]
    groups = create_loraplus_optimizer(p, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16).param_groups
    assert ours == [sorted(q.shape for q in g["params"]) for g in groups]
    assert ours[2] == [(8, 4), (24, 4)]  # B_out and B_in
