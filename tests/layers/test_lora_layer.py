"""LoraLayer against closed-form math, for every base layer kind."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import AdapterExistsError, AdapterNotFoundError, ConfigError, MergeError, UnsupportedModuleError
from lorakit.layers import kind_for
from lorakit.tuners.lora.delta import lora_delta, lora_scaling
from lorakit.tuners.lora.layer import LoraLayer


def wrap(base: nn.Module, r: int = 4, alpha: float = 8, init=False, **kw) -> LoraLayer:
    layer = LoraLayer(base, kind_for(base))
    layer.add("default", r, alpha, init_lora_weights=init, **kw)
    layer.set_active(["default"])
    return layer


def make_base(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 7), torch.randn(3, 5, 12)
    if kind == "conv1d_hf":
        return Conv1D(7, 12), torch.randn(3, 5, 12)  # Conv1D(nf=out, nx=in)
    if kind == "embedding":
        return nn.Embedding(20, 6, padding_idx=0), torch.randint(0, 20, (3, 5))
    if kind == "conv1d":
        return nn.Conv1d(4, 6, 3, padding=1), torch.randn(2, 4, 9)
    if kind == "conv2d":
        return nn.Conv2d(3, 5, (3, 2), stride=2, padding=1), torch.randn(2, 3, 8, 8)
    if kind == "conv2d_1x1":
        return nn.Conv2d(3, 5, 1), torch.randn(2, 3, 4, 4)
    raise AssertionError(kind)


KINDS = ["linear", "conv1d_hf", "embedding", "conv1d", "conv2d", "conv2d_1x1"]


def functional(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The base layer's forward with a replacement weight: the closed-form reference."""
    if isinstance(base, Conv1D):
        return x @ weight + base.bias
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    if isinstance(base, nn.Embedding):
        return F.embedding(x, weight, base.padding_idx)
    if isinstance(base, nn.Conv1d):
        return F.conv1d(x, weight, base.bias, base.stride, base.padding, base.dilation)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)


def test_scaling_formulas():
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 4, use_rslora=True) == 8.0
    assert math.isclose(lora_scaling(8, 3, use_rslora=True), 8 / math.sqrt(3))


def test_delta_is_scaled_product():
    b, a = torch.randn(5, 2), torch.randn(2, 7)
    torch.testing.assert_close(lora_delta(b, a, 0.5), 0.5 * b @ a)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_base_with_weight_plus_delta(kind):
    base, x = make_base(kind)
    layer = wrap(base)
    a, b = layer.kind.factors(layer, "default")
    delta = layer.kind.to_weight_layout(lora_delta(b, a, layer.scaling["default"]), base)
    assert delta.shape == base.weight.shape
    expected = functional(base, base.weight + delta, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), delta)


@pytest.mark.parametrize("kind", KINDS)
def test_default_init_starts_equal_to_base(kind):
    base, x = make_base(kind)
    layer = wrap(base, init=True)
    torch.testing.assert_close(layer(x), base(x))
    assert torch.count_nonzero(layer.delta_weight("default")) == 0


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gaussian_init(kind):
    base, x = make_base(kind)
    torch.manual_seed(0)
    layer = wrap(base, r=16, init="gaussian")
    a, b = layer.kind.factor_params(layer, "default")
    assert torch.count_nonzero(b) == 0
    assert abs(a.std().item() - 1 / 16) < 0.02
    torch.testing.assert_close(layer(x), base(x))


def test_kaiming_init_matches_nn_linear_distribution():
    layer = wrap(nn.Linear(64, 32), r=8, init=True)
    a = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert a.abs().max() <= bound + 1e-6 and a.abs().max() > 0.8 * bound


@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_unmerge_restores_weight_and_outputs_match(kind):
    base, x = make_base(kind)
    layer = wrap(base)
    w0 = base.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.merge()  # merging twice is a no-op, never adds ΔW twice
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)


def test_train_eval_never_change_weights():
    base, x = make_base("linear")
    layer = wrap(base)
    w0 = base.weight.detach().clone()
    layer.merge()
    layer.train()
    layer.eval()
    layer.train()
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(base.weight, w0 + layer.delta_weight("default"))


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    base, x = make_base("linear")
    layer = wrap(base)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    w0 = base.weight.detach().clone()
    with pytest.raises(MergeError, match="NaN"):
        layer.merge(safe_merge=True)
    torch.testing.assert_close(base.weight, w0)
    assert not layer.merged


def test_only_adapter_parameters_receive_gradients():
    base, x = make_base("linear")
    base.requires_grad_(False)
    layer = wrap(base)
    layer(x).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_A["default"].weight.grad is not None
    assert layer.lora_B["default"].weight.grad is not None


def test_gradients_match_closed_form():
    base, x = make_base("linear")
    base.requires_grad_(False)
    layer = wrap(base, r=3, alpha=6)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    g = torch.randn(3, 5, 7)
    (layer(x) * g).sum().backward()
    s = layer.scaling["default"]
    x2, g2 = x.reshape(-1, 12), g.reshape(-1, 7)
    torch.testing.assert_close(b.grad, s * g2.T @ (x2 @ a.T), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.grad, s * (g2 @ b).T @ x2, rtol=1e-4, atol=1e-5)


def test_one_optimizer_step_changes_output_from_zero_init():
    base, x = make_base("linear")
    base.requires_grad_(False)
    layer = wrap(base, init=True)
    before = layer(x).detach()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(x).pow(2).sum().backward()
    opt.step()
    assert not torch.allclose(layer(x), before)


def test_dropout_is_a_module_and_identity_when_zero():
    layer = wrap(nn.Linear(4, 4))
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    layer.add("drop", 2, 2, lora_dropout=0.3)
    assert isinstance(layer.lora_dropout["drop"], nn.Dropout) and layer.lora_dropout["drop"].p == 0.3
    assert "Dropout(p=0.3" in repr(layer)


def test_several_adapters_add_up_and_switch():
    base, x = make_base("linear")
    layer = LoraLayer(base, kind_for(base))
    layer.add("a", 2, 4, init_lora_weights=False)
    layer.add("b", 3, 3, init_lora_weights=False)
    layer.set_active(["a", "b"])
    both = F.linear(x, base.weight + layer.delta_weight("a") + layer.delta_weight("b"), base.bias)
    torch.testing.assert_close(layer(x), both, rtol=1e-5, atol=1e-5)
    layer.set_active(["b"])
    torch.testing.assert_close(layer(x), F.linear(x, base.weight + layer.delta_weight("b"), base.bias))
    layer.disable_adapters = True
    torch.testing.assert_close(layer(x), base(x))


def test_adapter_name_errors():
    layer = wrap(nn.Linear(4, 4))
    with pytest.raises(AdapterExistsError, match="default"):
        layer.add("default", 2, 2)
    with pytest.raises(AdapterNotFoundError, match="'defualt'.*did you mean 'default'"):
        layer.delta_weight("defualt")


def test_deleting_merged_adapter_is_refused():
    layer = wrap(nn.Linear(4, 4))
    layer.merge()
    with pytest.raises(MergeError, match="unmerge"):
        layer.delete("default")


def test_grouped_conv_needs_rank_multiple_of_groups():
    # LoRA takes grouped convolutions as PEFT does (tests/layers/test_conv_mha.py); the shared geometry, which
    # other methods use, still refuses them
    base = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(UnsupportedModuleError, match="groups=2"):
        kind_for(base).features(base)
    layer = LoraLayer(base, kind_for(base))
    with pytest.raises(ConfigError, match="rank 3 on a Conv2d with groups=2"):
        layer.add("default", 3, 8)
    assert layer.adapter_names() == [] and not len(layer.lora_A)


def test_half_precision_base_with_fp32_adapter():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoraLayer(base, kind_for(base))
    layer.add("default", 2, 4, init_lora_weights=False, dtype=torch.float32)
    layer.set_active(["default"])
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = F.linear(x.float(), base.weight.float() + layer.delta_weight("default"), base.bias.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@settings(max_examples=40, deadline=None)
@given(
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    r=st.integers(1, 12),
    alpha=st.floats(0.1, 64),
    rslora=st.booleans(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
)
def test_property_linear_matches_closed_form(d_in, d_out, r, alpha, rslora, lead):
    torch.manual_seed(d_in * 31 + d_out)
    base = nn.Linear(d_in, d_out).double()
    layer = LoraLayer(base, kind_for(base))
    layer.add("default", r, alpha, init_lora_weights=False, use_rslora=rslora)
    layer.set_active(["default"])
    x = torch.randn(*lead, d_in, dtype=torch.float64)
    s = alpha / math.sqrt(r) if rslora else alpha / r
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ (base.weight + s * b @ a).T + base.bias
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    assert layer.delta_weight("default").shape == (d_out, d_in)


@settings(max_examples=25, deadline=None)
@given(
    c_in=st.integers(1, 6),
    c_out=st.integers(1, 6),
    k=st.integers(1, 3),
    r=st.integers(1, 5),
    stride=st.integers(1, 2),
)
def test_property_conv2d_merge_equivalence(c_in, c_out, k, r, stride):
    torch.manual_seed(c_in + 7 * c_out + 13 * k)
    base = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2).double()
    layer = wrap(base, r=r, alpha=2 * r)
    layer.double()
    x = torch.randn(2, c_in, 7, 7, dtype=torch.float64)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged)
    layer.unmerge()


def test_a_variant_owns_its_state_on_the_layer():
    """DoRA's magnitudes and AdaLoRA's singular values exist on a layer only while it holds such an adapter."""
    import lorakit.tuners.adalora.layer  # noqa: F401  (registers the AdaLoRA variant)

    layer = LoraLayer(nn.Linear(6, 4), kind_for(nn.Linear(6, 4)))
    layer.add("plain", 2, 4)
    assert not {"lora_magnitude_vector", "lora_E", "ranknum"} & set(layer._modules)
    layer.add("d", 2, 4, variant="dora")
    layer.add("s", 2, 4, variant="adalora")
    assert {"lora_magnitude_vector", "lora_E", "ranknum"} <= set(layer._modules)
    assert "lora_magnitude_vector.d.weight" in layer.state_dict() and "lora_E.s" in layer.state_dict()
    layer.delete("d")
    layer.delete("s")
    assert not {"lora_magnitude_vector", "lora_E", "ranknum"} & set(layer._modules)
