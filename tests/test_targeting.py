"""Which modules a config selects."""

from __future__ import annotations

import pytest

from conftest import tiny_gpt2, tiny_llama
from lorakit import ConfigError, LoraConfig, TargetNotFoundError, get_peft_model
from lorakit.config import pattern_value
from lorakit.targeting import layer_index, matches_selector, select_targets
from lorakit.tuners.lora.layer import LoraLayer


def adapted(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def test_list_matches_full_name_or_dotted_suffix():
    assert matches_selector("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert matches_selector("q_proj", ["q_proj"])
    assert not matches_selector("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert matches_selector("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])


def test_regex_is_full_match():
    assert matches_selector("model.layers.1.mlp.up_proj", r".*\.1\.mlp\..*")
    assert not matches_selector("model.layers.1.mlp.up_proj", r"mlp")


def test_layer_index():
    assert layer_index("model.layers.3.self_attn.q_proj", None) == 3
    assert layer_index("transformer.h.11.attn.c_attn", "h") == 11
    assert layer_index("model.layers.2.experts.7.w1", ["layers"]) == 2
    assert layer_index("lm_head", None) is None


def test_pattern_value_matches_suffix_regex():
    patterns = {"q_proj": 16, r"layers\.1\..*v_proj": 2}
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 8) == 16
    assert pattern_value(patterns, "model.layers.1.self_attn.v_proj", 8) == 2
    assert pattern_value(patterns, "model.layers.0.self_attn.v_proj", 8) == 8


def test_all_linear_excludes_output_head():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    names = adapted(model.get_base_model())
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)


def test_all_linear_on_gpt2_conv1d():
    names = select_targets(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}


def test_default_targets_by_architecture():
    names = select_targets(tiny_llama(), LoraConfig())
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}


def test_exclude_and_layers_to_transform():
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[1])
    assert select_targets(tiny_llama(), cfg) == ["model.layers.1.self_attn.q_proj"]


def test_rank_and_alpha_pattern_apply_per_module():
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}
    )
    model = get_peft_model(tiny_llama(), cfg).get_base_model()
    q = model.model.layers[0].self_attn.q_proj
    v = model.model.layers[0].self_attn.v_proj
    assert (q.r["default"], q.scaling["default"]) == (4, 8.0)
    assert (v.r["default"], v.scaling["default"]) == (2, 4.0)


def test_nothing_matched_lists_similar_names():
    with pytest.raises(TargetNotFoundError, match=r"q_prj.*did you mean 'q_proj'.*Module names in this model"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_prj"]))


def test_nothing_matched_leaves_model_untouched():
    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TargetNotFoundError):
        get_peft_model(model, LoraConfig(target_modules=["nope"]))
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_architecture_without_targets():
    import torch.nn as nn

    with pytest.raises(ConfigError, match="no default targets"):
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig())


def test_unsupported_module_type_is_named():
    with pytest.raises(ConfigError, match="LlamaAttention.*cannot wrap.*supported: torch.nn.Linear"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["self_attn"]))
