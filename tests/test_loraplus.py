"""LoRA+ (arXiv 2402.12354): lorakit's parameter groups and steps against PEFT's ``create_loraplus_optimizer``."""

from __future__ import annotations

import copy
import re
from typing import Any

import peft
import peft.optimizers
import pytest
import torch

import lorakit
import lorakit.optimizers
from conftest import tiny_llama

CASES = {
    "lora": dict(target_modules=["q_proj", "v_proj"]),
    "embedding": dict(target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "dora+modules_to_save": dict(target_modules=["q_proj", "down_proj"], use_dora=True, modules_to_save=["lm_head"]),
}


def pair(case: str, adalora: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(lorakit's, PEFT's) model on one tiny LLaMA, with PEFT's adapter weights copied into lorakit's."""
    base = tiny_llama()
    if adalora:
        kw: dict[str, Any] = dict(target_modules=["q_proj", "v_proj"], init_r=6, target_r=4, total_step=10)
        ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.AdaLoraConfig(**kw))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**kw))
    else:
        kw = dict(r=4, lora_alpha=8, init_lora_weights=False, **CASES[case])
        ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    mine = {canon(n): p for n, p in ours.named_parameters() if p.requires_grad}
    ref = {canon(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == ref.keys()
    with torch.no_grad():
        for name, p in ref.items():
            mine[name].copy_(p)
    return ours, theirs


def canon(name: str) -> str:
    """PEFT's AdaLoRA names its factors ``lora_A.default`` where lorakit's modules hold ``lora_A.default.weight``."""
    return re.sub(r"(\.lora_[AB]\.\w+)\.weight$", r"\1", name)


def named_groups(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[tuple[list[str], float, float]]:
    names = {id(p): canon(n) for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in opt.param_groups]


@pytest.mark.parametrize("case", [*CASES, "adalora"])
def test_groups_and_steps_match_peft(case):
    ours, theirs = pair(case, adalora=case == "adalora")
    kw = dict(lr=1e-2, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-3)
    opt = lorakit.create_loraplus_optimizer(ours, torch.optim.AdamW, **kw)
    ref = peft.optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, **kw)
    groups = named_groups(ours, opt)
    assert groups == named_groups(theirs, ref)
    assert [bool(g[0]) for g in groups][2] and groups[2][1] == pytest.approx(0.16)  # B factors at lr x ratio
    if case == "embedding":
        assert groups[1][0]  # the embedding's factors
    if case == "dora+modules_to_save":
        assert any("lora_magnitude_vector" in n for n in groups[2][0])  # PEFT: 1-D, so with B
    if case == "adalora":
        return  # the groups only: the two AdaLoRA losses differ (orthogonality penalty), not the optimizers
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            o.step()
    # fp32 forwards summed in a different order (1e-7), which Adam's normalised steps at lr x 16 magnify to 1e-6
    ref_params = {canon(n): p for n, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(
                p, ref_params[canon(name)], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
            )


def test_peft_import_path_and_defaults():
    assert lorakit.optimizers.create_loraplus_optimizer is lorakit.create_loraplus_optimizer
    ours, theirs = pair("embedding")
    opt = lorakit.optimizers.create_loraplus_optimizer(ours, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4.0)
    ref = peft.optimizers.create_loraplus_optimizer(theirs, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4.0)
    assert named_groups(ours, opt) == named_groups(theirs, ref)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 1e-6, 0.4, 0.4])
