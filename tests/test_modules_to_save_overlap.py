"""``modules_to_save`` that could only give wrong results are refused, as PEFT refuses them, model unchanged:
two active adapters with their own copy of one module (only one copy can run), and containers (``ModuleDict``,
``ModuleList``, ``ParameterDict``, ``ParameterList``) that have no forward of their own to copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError
from lorakit.layers import AdapterLayer, ModulesToSaveWrapper


def two_heads():
    """Adapters "a" and "b" both keep a copy of lm_head; "c" has none."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("c", LoraConfig(r=2, target_modules=["v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save.b" in name or "lora_B" in name:
                p.normal_()
    return model.eval()


def grads(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_two_active_adapters_with_their_own_copy_of_a_module_are_refused(ids):
    model = two_heads()
    with torch.no_grad():
        before = model(ids).logits
    flags = grads(model)
    with pytest.raises(ConfigError, match=r"adapters \['a', 'b'\] each keep their own copy of 'lm_head'"):
        model.base_model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a"]
    assert grads(model) == flags
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_one_copy_among_the_active_adapters_is_accepted(ids):
    model = two_heads()
    model.base_model.set_adapter(["c", "b"])  # only "b" holds a copy of lm_head: that one runs
    head = model.get_base_model().lm_head
    assert isinstance(head, ModulesToSaveWrapper) and head.active_module() is head.modules_to_save["b"]
    model.base_model.set_adapter(["a", "c"])
    assert head.active_module() is head.modules_to_save["a"]


def test_a_wrapper_refuses_to_run_two_copies():
    model = two_heads()
    head = model.get_base_model().lm_head
    with pytest.raises(ConfigError, match=r"\['b', 'a'\] each keep their own copy"):
        head.set_active(["b", "a"])
    assert head.active_module() is head.modules_to_save["a"]


class WithContainers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.heads = nn.ModuleDict({"x": nn.Linear(8, 4)})
        self.blocks = nn.ModuleList([nn.Linear(8, 8)])
        self.table = nn.ParameterDict({"w": nn.Parameter(torch.ones(8))})
        self.extra = nn.ParameterList([nn.Parameter(torch.zeros(8))])

    def forward(self, x):
        return self.heads["x"](self.blocks[0](self.proj(x)) * self.table["w"] + self.extra[0])


@pytest.mark.parametrize(
    ("entry", "name", "kind"),
    [
        ("heads", "heads", "ModuleDict"),
        ("blocks", "blocks", "ModuleList"),
        ("table", "table", "ParameterDict"),
        ("extra", "extra", "ParameterList"),
    ],
)
def test_a_container_in_modules_to_save_is_refused_and_nothing_is_injected(entry, name, kind):
    base = WithContainers()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"modules_to_save entry '{entry}' names '{name}', a torch.nn.{kind}"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["proj"], modules_to_save=[entry]))
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_a_container_refused_when_added_as_a_second_adapter(ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ConfigError, match=r"names 'model.layers', a torch.nn.ModuleList"):
        model.add_adapter("other", LoraConfig(r=2, target_modules=["lm_head"], modules_to_save=["layers"]))
    assert "other" not in model.peft_config and set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
