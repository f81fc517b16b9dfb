"""LoraConfig validation and serialisation."""

from __future__ import annotations

import copy
import json

import pytest

from lorakit import ConfigError, LoraConfig, PeftType, TaskType


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, r"r=0 is invalid; the rank must be a positive integer"),
        ({"r": -4}, r"r=-4 is invalid"),
        ({"r": 2.5}, r"r=2.5 is invalid"),
        ({"r": True}, r"r=True is invalid"),
        ({"lora_alpha": 0}, r"lora_alpha=0 is invalid; accepted: a positive finite number"),
        ({"lora_alpha": -1.0}, r"lora_alpha=-1.0 is invalid"),
        ({"lora_alpha": float("nan")}, r"lora_alpha=nan is invalid"),
        ({"lora_dropout": 1.0}, r"lora_dropout=1.0 is invalid; accepted: a number in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout=-0.1 is invalid"),
        ({"bias": "some"}, r"bias='some' is invalid; accepted: 'none', 'all', 'lora_only'"),
        ({"init_lora_weights": "lora_ga"}, r"init_lora_weights='lora_ga' is not supported; accepted: True, False"),
        ({"task_type": "CAUSAL"}, r"task_type='CAUSAL' is not known; accepted: 'SEQ_CLS'"),
        ({"target_modules": 3}, r"target_modules=3 is invalid; accepted: a list of module names, a regex"),
        ({"layers_pattern": "layers"}, r"layers_pattern is set but layers_to_transform is not"),
        ({"layers_to_transform": [-1]}, r"layers_to_transform holds \[-1\]"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]=0 is invalid"),
        ({"alpha_pattern": {"q_proj": -2}}, r"alpha_pattern\['q_proj'\]=-2 is invalid"),
        ({"peft_type": "IA3"}, r"LoraConfig got peft_type='IA3'"),
    ],
)
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_config_errors_are_value_errors():
    """Code written for PEFT catches ValueError."""
    with pytest.raises(ValueError):
        LoraConfig(r=0)


def test_normalisation():
    cfg = LoraConfig(task_type="CAUSAL_LM", target_modules={"v_proj", "q_proj"}, layers_to_transform=3)
    assert cfg.task_type is TaskType.CAUSAL_LM and cfg.peft_type is PeftType.LORA
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.layers_to_transform == [3]


def test_json_round_trip():
    cfg = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj"],
        task_type=TaskType.SEQ_CLS,
        use_rslora=True,
        rank_pattern={"q_proj": 4},
    )
    text = cfg.to_json()
    data = json.loads(text)
    assert list(data) == sorted(data), "keys sorted as PEFT writes them"
    assert data["task_type"] == "SEQ_CLS" and data["peft_type"] == "LORA"
    assert LoraConfig.from_dict(data) == cfg


def test_save_and_load(tmp_path):
    cfg = LoraConfig(r=4, target_modules="all-linear")
    cfg.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path) == cfg
    assert LoraConfig.from_pretrained(tmp_path, r=2).r == 2


def test_unknown_field_warns_and_is_written_back(tmp_path):
    newer = {"r": 4, "shiny_new_option": {"a": [1, 2]}, "velora_config": None, "peft_version": "0.30.0"}
    with pytest.warns(UserWarning, match="field 'shiny_new_option' is unknown to lorakit.*written back unchanged"):
        cfg = LoraConfig.from_dict(newer)
    assert cfg.r == 4 and cfg.extra_fields == {"shiny_new_option": {"a": [1, 2]}, "velora_config": None}
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["shiny_new_option"] == {"a": [1, 2]} and data["velora_config"] is None
    assert "peft_version" not in data  # who wrote the file is not carried over
    with pytest.warns(UserWarning, match="shiny_new_option"):
        again = LoraConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert copy.deepcopy(cfg).extra_fields == cfg.extra_fields
    assert LoraConfig(r=4).extra_fields == {} and "shiny_new_option" not in LoraConfig(r=4).to_dict()


def test_peft_feature_switched_on_is_refused():
    with pytest.raises(ConfigError, match="velora_config=.*a PEFT feature lorakit does not implement"):
        LoraConfig.from_dict({"r": 4, "velora_config": {"rank": 2}})


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("layer_replication", [[0, 2]], "repeated base layers"),
        ("use_qalora", True, "GPTQ/AWQ"),
        ("megatron_config", {"tensor_model_parallel_size": 2}, "Megatron-LM"),
    ],
)
def test_refused_peft_fields_name_the_field_and_why(field, value, why):
    with pytest.raises(ConfigError, match=rf"{field}=.* is not supported by lorakit: .*{why}"):
        LoraConfig(**{field: value})
    with pytest.raises(ConfigError, match=rf"{field}=.* is not supported by lorakit"):
        LoraConfig.from_dict({"r": 4, field: value})
    assert LoraConfig.from_dict({"r": 4, "qalora_group_size": 32, "megatron_core": "x"}).qalora_group_size == 32


def test_new_lora_fields_are_checked():
    with pytest.raises(ConfigError, match="target_parameters='experts.down_proj' is invalid"):
        LoraConfig(target_parameters="experts.down_proj")
    with pytest.raises(ConfigError, match=r"trainable_token_indices holds \[-1\]"):
        LoraConfig(trainable_token_indices=[3, -1])
    with pytest.raises(ConfigError, match=r"trainable_token_indices\['embed_tokens'\]=\[\] is invalid"):
        LoraConfig(trainable_token_indices={"embed_tokens": []})
    with pytest.raises(ConfigError, match="lora_bias=True is not supported with use_dora=True"):
        LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ConfigError, match="lora_bias=True needs init_lora_weights=True or False"):
        LoraConfig(lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(ConfigError, match="init_lora_weights='pissa_niter_0' is not supported"):
        LoraConfig(init_lora_weights="pissa_niter_0")
    assert LoraConfig(init_lora_weights="pissa_niter_4").init_lora_weights == "pissa_niter_4"
    assert LoraConfig(target_parameters={"b", "a"}).target_parameters == ["a", "b"]


def test_dora_fields():
    cfg = LoraConfig.from_dict({"r": 4, "use_dora": True})
    assert cfg.use_dora and not cfg.dora_grad_through_norm
    assert "dora_grad_through_norm" not in cfg.to_dict()  # PEFT's file unless the lorakit option is used
    assert LoraConfig(use_dora=True, dora_grad_through_norm=True).to_dict()["dora_grad_through_norm"] is True
    with pytest.raises(ConfigError, match="dora_grad_through_norm=True needs use_dora=True"):
        LoraConfig(dora_grad_through_norm=True)
    with pytest.raises(ConfigError, match="use_dora='yes' is invalid"):
        LoraConfig(use_dora="yes")
