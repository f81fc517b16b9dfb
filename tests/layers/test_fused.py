"""The fused nn.Linear training kernel: exact gradients, equal to the generic path, taken only where valid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.layers import kind_for
from lorakit.tuners.lora import fused as fused_mod
from lorakit.tuners.lora.fused import LoraLinearFunction
from lorakit.tuners.lora.layer import LoraLayer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_gradcheck_float64(bias, lead):
    torch.manual_seed(0)
    x = torch.randn(*lead, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LoraLinearFunction.apply(*t, 0.7), (x, w, b, a, bb))


def test_matches_closed_form():
    torch.manual_seed(1)
    x, w, bias = torch.randn(7, 5), torch.randn(4, 5), torch.randn(4)
    a, b = torch.randn(3, 5), torch.randn(4, 3)
    y = LoraLinearFunction.apply(x, w, bias, a, b, 2.0)
    torch.testing.assert_close(y, x @ (w + 2.0 * b @ a).T + bias)


def _pair(dropout: float = 0.0, bias: bool = True):
    torch.manual_seed(2)
    base = nn.Linear(16, 12, bias=bias)
    base.weight.requires_grad_(False)
    if bias:
        base.bias.requires_grad_(False)
    layer = LoraLayer(base, kind_for(base))
    layer.add("default", 4, 8, lora_dropout=dropout)
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.set_active(["default"])
    return layer


@pytest.fixture
def count_fused(monkeypatch):
    calls = []
    real = LoraLinearFunction.apply

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fused_mod.LoraLinearFunction, "apply", spy)
    return calls


@pytest.mark.parametrize("bias", [True, False])
def test_fused_equals_generic_forward_and_grads(count_fused, bias):
    layer = _pair(bias=bias)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    assert len(count_fused) == 1
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight), g)

    generic = layer.base_layer(x)
    generic = layer.kind.add_output(layer, "default", x, generic)
    ref = torch.autograd.grad(generic, (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight), g)
    torch.testing.assert_close(y, generic)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want)


def test_fused_path_is_taken_only_where_equivalent(count_fused):
    x = torch.randn(2, 3, 16)
    layer = _pair()
    with torch.no_grad():
        layer(x)  # no backward needed: the generic path
    assert len(count_fused) == 0

    layer(x)  # A and B require grad: fused
    assert len(count_fused) == 1

    dropped = _pair(dropout=0.5)
    dropped(x)  # active dropout: generic
    assert len(count_fused) == 1
    dropped.eval()
    dropped(x)  # dropout inactive in eval: fused
    assert len(count_fused) == 2

    layer.add("other", 2, 2)
    layer.set_active(["default", "other"])
    layer(x)  # two active adapters: generic
    assert len(count_fused) == 2

    single = _pair()
    handle = single.base_layer.register_forward_hook(lambda *a: None)
    single(x)  # a hook must see the base layer run
    assert len(count_fused) == 2
    handle.remove()

    single.merge()
    single(x)  # merged: base only
    assert len(count_fused) == 2

    mixed = _pair()
    mixed.lora_A.to(torch.float64)
    mixed.lora_B.to(torch.float64)
    mixed(x)  # adapter dtype differs from the base's: generic (it casts)
    assert len(count_fused) == 2


def test_training_step_identical_to_generic():
    """One optimizer step through the fused path lands where the generic path lands."""
    fused_layer, generic_layer = _pair(), _pair()
    x = torch.randn(4, 8, 16)
    for layer, use_fused in ((fused_layer, True), (generic_layer, False)):
        opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
        if use_fused:
            y = layer(x)
        else:
            y = layer.kind.add_output(layer, "default", x, layer.base_layer(x))
        y.pow(2).mean().backward()
        opt.step()
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(
            getattr(fused_layer, name)["default"].weight, getattr(generic_layer, name)["default"].weight
        )
