"""PEFT's public API beyond the core, against real PEFT 0.21 on tiny models: statuses, state-dict functions,
injection into plain models, the tuner's switches, PeftModel's loading arguments, config files."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import warnings
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from conftest import MODEL_FACTORIES, input_ids, tiny_llama
from lorakit.errors import AdapterExistsError, AdapterFileError, ConfigError, MergeError, ShapeMismatchError

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # PEFT's notices (fan_in_fan_out, embeddings saved, ...)
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning"),
]

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
LORA = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
OTHER = {"llama": ["k_proj"], "gpt2": ["c_fc"], "bert": ["query"]}  # a second adapter, partly elsewhere
IA3_OTHER = {"llama": (["q_proj", "up_proj"], ["up_proj"]), "gpt2": (["c_fc"], ["c_fc"]), "bert": (["key"], [])}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


def configs(method: str, arch: str, second: bool = False) -> dict[str, Any]:
    if method == "ia3":
        if not second:
            return {"task_type": TASK[arch], "init_ia3_weights": False}
        targets, feedforward = IA3_OTHER[arch]
        return {"task_type": TASK[arch], "target_modules": targets, "feedforward_modules": feedforward}
    targets = OTHER[arch] if second else LORA[arch]
    extra = {} if second else {"use_dora": arch == "llama"}
    return {
        "task_type": TASK[arch],
        "r": 4,
        "lora_alpha": 8,
        "init_lora_weights": False,
        "target_modules": targets,
        **extra,
    }


def config_of(library: Any, method: str, cfg: dict[str, Any]) -> Any:
    return (library.IA3Config if method == "ia3" else library.LoraConfig)(**copy.deepcopy(cfg))


def build(method: str, arch: str, second: bool = True) -> tuple[peft.PeftModel, lorakit.PeftModel]:
    """The same base model adapted by PEFT and by lorakit (two adapters), with identical weights."""
    p = peft.get_peft_model(MODEL_FACTORIES[arch](), config_of(peft, method, configs(method, arch)))
    k = lorakit.get_peft_model(MODEL_FACTORIES[arch](), config_of(lorakit, method, configs(method, arch)))
    if second:
        for model, library in ((p, peft), (k, lorakit)):
            model.add_adapter("other", config_of(library, method, configs(method, arch, second=True)))
    k.load_state_dict(p.state_dict())
    return p.eval(), k.eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def same_status(theirs: Any, ours: Any) -> None:
    """Field by field; ``module_type`` is each library's class name (lorakit.status's docstring)."""
    a, b = dataclasses.asdict(theirs), dataclasses.asdict(ours)
    a.pop("module_type", None), b.pop("module_type", None)
    assert b == a


def same_state(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


# -- the names, with PEFT's parameters ------------------------------------------------------------------------

FUNCTIONS = [
    "inject_adapter_in_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "load_peft_weights",
    "get_layer_status",
    "get_model_status",
]
AUTO = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
]
# (owner, method): PEFT's parameters must come first, in PEFT's order; lorakit may add keyword ones after them
METHODS = [
    ("PeftModel", "add_adapter"),
    ("PeftModel", "set_adapter"),
    ("PeftModel", "load_adapter"),
    ("PeftModel", "from_pretrained"),
    ("PeftModel", "get_layer_status"),
    ("PeftModel", "get_model_status"),
    ("PeftModel", "set_requires_grad"),
    ("LoraModel", "set_adapter"),
    ("LoraModel", "set_requires_grad"),
    ("LoraModel", "disable_adapter_layers"),
    ("LoraModel", "enable_adapter_layers"),
    ("IA3Model", "disable_adapter_layers"),
    ("PeftConfig", "from_pretrained"),
    ("PeftConfig", "from_json_file"),
    ("LoraConfig", "from_json_file"),
]


def params(fn: Any) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]


@pytest.mark.parametrize("name", FUNCTIONS + AUTO)
def test_every_name_is_importable_with_peft_parameters(name):
    theirs, ours = getattr(peft, name), getattr(lorakit, name)
    if name.startswith("Auto"):
        theirs, ours = theirs.from_pretrained, ours.from_pretrained
    assert params(ours) == params(theirs)


@pytest.mark.parametrize(("owner", "method"), METHODS)
def test_methods_take_peft_parameters_in_peft_order(owner, method):
    theirs = getattr(getattr(peft, owner), method)
    ours = getattr(getattr(lorakit, owner), method)
    skip = 1 if inspect.isfunction(theirs) else 0  # an instance method's first parameter is the instance
    assert params(ours)[skip : len(params(theirs))] == params(theirs)[skip:]
    var = inspect.Parameter.VAR_KEYWORD
    if any(p.kind is var for p in inspect.signature(theirs).parameters.values()):
        assert any(p.kind is var for p in inspect.signature(ours).parameters.values())


def test_status_dataclasses_have_peft_fields():
    for name in ("TunerLayerStatus", "TunerModelStatus"):
        theirs = [f.name for f in dataclasses.fields(getattr(peft.peft_model, name))]
        assert [f.name for f in dataclasses.fields(getattr(lorakit, name))] == theirs


def test_targeted_module_names_on_the_tuner_and_the_model():
    p, k = build("lora", "llama")
    assert sorted(k.base_model.targeted_module_names) == sorted(p.base_model.targeted_module_names)
    assert k.targeted_module_names == k.base_model.targeted_module_names  # through the PeftModel, as PEFT's
    k.delete_adapter("other")  # lorakit lists the modules adapted now (PEFT keeps deleted adapters' names)
    assert all("k_proj" not in name for name in k.targeted_module_names)


# -- statuses ---------------------------------------------------------------------------------------------------


def switch(model: nn.Module, step: str) -> None:
    if step == "other":
        model.set_adapter("other")
    elif step == "both":
        model.base_model.set_adapter(["default", "other"])
    elif step == "disabled":
        model.base_model.disable_adapter_layers()
    elif step == "enabled":
        model.base_model.enable_adapter_layers()
    elif step == "merged":
        model.merge_adapter()
    elif step == "inference":
        model.set_adapter("default", inference_mode=True)


STEPS = ["start", "other", "disabled", "enabled", "both", "inference", "merged"]


@pytest.mark.parametrize(("method", "arch"), [("lora", "llama"), ("lora", "bert"), ("ia3", "gpt2"), ("ia3", "llama")])
def test_layer_and_model_status_equal_peft_through_switches(method, arch):
    p, k = build(method, arch)
    for step in STEPS:
        if step == "both" and arch == "bert":
            continue  # two adapters with their own classifier copy cannot both be active (both libraries refuse)
        switch(p, step)
        switch(k, step)
        theirs, ours = p.get_layer_status(), k.get_layer_status()
        assert [s.name for s in ours] == [s.name for s in theirs], step
        for a, b in zip(theirs, ours):
            same_status(a, b)
        assert lorakit.get_layer_status(k) == ours
        same_status(p.get_model_status(), k.get_model_status())
        assert k.get_model_status() == lorakit.get_model_status(k)
    layer = {"lora": "LoraLayer", "ia3": "IA3Layer"}[method]
    assert {s.module_type for s in k.get_layer_status()} <= {layer, "ModulesToSaveWrapper"}


def test_status_refuses_models_without_adapter_layers():
    with pytest.raises(ConfigError, match="no adapter layers"):
        lorakit.get_layer_status(tiny_llama())
    prompt = lorakit.get_peft_model(
        tiny_llama(), lorakit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    with pytest.raises(ConfigError, match="prompts"):
        prompt.get_model_status()
    prompt.set_adapter("default", inference_mode=True)  # freezing works for every method
    assert not trainable(prompt)
    with pytest.raises(ConfigError, match="is_trainable=True"):  # PEFT refuses it for prompt learning (TypeError)
        prompt.set_requires_grad("default")


# -- injection into a plain model, and the state-dict functions ---------------------------------------------------


def inject_both(arch: str, cfg: dict[str, Any], **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    cfg = {k: v for k, v in cfg.items() if k != "task_type"}
    p = peft.inject_adapter_in_model(peft.LoraConfig(**copy.deepcopy(cfg)), MODEL_FACTORIES[arch](), **kwargs)
    k = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**copy.deepcopy(cfg)), MODEL_FACTORIES[arch](), **kwargs)
    return p, k


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inject_adapter_in_model_equals_peft(arch):
    p, k = inject_both(arch, configs("lora", arch))
    assert type(k) is type(p) and isinstance(k.peft_config["default"], lorakit.LoraConfig)
    assert trainable(k) == trainable(p)
    assert set(k.state_dict()) == set(p.state_dict())  # nothing of the tuner is in the model's state dict
    theirs = peft.get_peft_model_state_dict(p)
    assert sorted(lorakit.get_peft_model_state_dict(k)) == sorted(theirs)
    result = lorakit.set_peft_model_state_dict(k, theirs)
    same_state(theirs, lorakit.get_peft_model_state_dict(k))
    expected = peft.set_peft_model_state_dict(p, theirs)
    assert sorted(result.missing_keys) == sorted(expected.missing_keys) and result.unexpected_keys == []
    torch.testing.assert_close(k(input_ids()).logits, p(input_ids()).logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(peft.get_layer_status(p), lorakit.get_layer_status(k)):
        same_status(a, b)
    same_status(peft.get_model_status(p), lorakit.get_model_status(k))
    assert sorted(lorakit.get_base_model_state_dict(k)) == sorted(MODEL_FACTORIES[arch]().state_dict())


def test_inject_from_a_state_dict_adapts_the_modules_its_keys_name():
    p, k = inject_both("llama", configs("lora", "llama"))
    state = peft.get_peft_model_state_dict(p)  # q_proj and v_proj
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["down_proj"]}  # overridden by the keys, in both libraries
    with pytest.warns(UserWarning, match="state_dict adapts"):  # PEFT warns too: the keys decide
        p2, k2 = inject_both("llama", cfg, state_dict=state, low_cpu_mem_usage=True)  # PEFT: weights on meta
    assert trainable(k2) == trainable(p2) and any("v_proj" in n for n in trainable(k2))
    lorakit.set_peft_model_state_dict(k2, state, low_cpu_mem_usage=True)
    peft.set_peft_model_state_dict(p2, state, low_cpu_mem_usage=True)
    torch.testing.assert_close(k2(input_ids()).logits, p2(input_ids()).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="prompts"):
        lorakit.inject_adapter_in_model(lorakit.PromptTuningConfig(num_virtual_tokens=2), tiny_llama())


def test_a_second_injection_adds_an_adapter_and_a_refused_one_changes_nothing():
    model = lorakit.inject_adapter_in_model(lorakit.LoraConfig(target_modules=["q_proj"]), tiny_llama())
    lorakit.inject_adapter_in_model(lorakit.LoraConfig(target_modules=["v_proj"]), model, adapter_name="b")
    assert sorted(model.peft_config) == ["b", "default"]
    assert lorakit.get_model_status(model).available_adapters == ["b", "default"]
    assert lorakit.get_model_status(model).active_adapters == ["default"]  # as add_adapter: not made active
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(AdapterExistsError):
        lorakit.inject_adapter_in_model(lorakit.LoraConfig(target_modules=["k_proj"]), model, adapter_name="b")
    with pytest.raises(ConfigError):
        lorakit.inject_adapter_in_model(lorakit.LoraConfig(target_modules=["nothing"]), model, adapter_name="c")
    assert sorted(model.peft_config) == ["b", "default"] and set(model.state_dict()) == set(before)
    with pytest.raises(ConfigError, match="holds no lorakit adapters"):
        lorakit.get_peft_model_state_dict(tiny_llama())


@pytest.mark.parametrize(("method", "arch"), [("lora", "llama"), ("lora", "bert"), ("ia3", "gpt2")])
def test_get_peft_model_state_dict_equals_peft(method, arch):
    p, k = build(method, arch)
    for name in ("default", "other"):
        same_state(
            peft.get_peft_model_state_dict(p, adapter_name=name),
            lorakit.get_peft_model_state_dict(k, adapter_name=name),
        )
    given = {n: torch.zeros_like(t) for n, t in p.state_dict().items()}  # values come from a passed state dict
    ours = lorakit.get_peft_model_state_dict(k, state_dict=given)
    same_state(peft.get_peft_model_state_dict(p, state_dict=given), ours)


def test_get_peft_model_state_dict_with_embedding_layers_equals_peft():
    cfg = {"task_type": "CAUSAL_LM", "target_modules": ["embed_tokens", "q_proj"], "init_lora_weights": False}
    p = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    k = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**cfg))
    k.load_state_dict(p.state_dict())
    for mode in (True, False, "auto"):
        theirs = peft.get_peft_model_state_dict(p, save_embedding_layers=mode)
        same_state(theirs, lorakit.get_peft_model_state_dict(k, save_embedding_layers=mode))


@pytest.mark.parametrize(("method", "arch"), [("lora", "llama"), ("lora", "bert"), ("ia3", "llama")])
def test_set_peft_model_state_dict_equals_peft(method, arch):
    p, _ = build(method, arch)
    _, k = build(method, arch)
    with torch.no_grad():  # lorakit's weights now differ from PEFT's; the state dict brings them back
        for param in k.parameters():
            if param.requires_grad:
                param.add_(1.0)
    state = peft.get_peft_model_state_dict(p)
    result = lorakit.set_peft_model_state_dict(k, state)
    expected = peft.set_peft_model_state_dict(copy.deepcopy(p), state)
    assert type(result) is type(expected)
    assert sorted(result.missing_keys) == sorted(expected.missing_keys) and result.unexpected_keys == []
    torch.testing.assert_close(logits(k), logits(p), rtol=1e-5, atol=1e-6)
    partial = {key: t for key, t in list(state.items())[1:]}
    partial["base_model.model.nowhere.lora_A.weight"] = torch.zeros(1)
    result = lorakit.set_peft_model_state_dict(k, partial)
    expected = peft.set_peft_model_state_dict(copy.deepcopy(p), partial)
    assert sorted(result.missing_keys) == sorted(expected.missing_keys)
    assert result.unexpected_keys == expected.unexpected_keys == ["base_model.model.nowhere.lora_A.weight"]


def test_set_peft_model_state_dict_checks_before_writing():
    p, k = build("lora", "llama", second=False)
    state = peft.get_peft_model_state_dict(p)
    before = {n: t.clone() for n, t in k.state_dict().items()}
    wrong = dict(state)
    last = list(state)[-1]
    wrong[last] = torch.zeros(7, 7)
    with pytest.raises(ShapeMismatchError, match="shape"):
        lorakit.set_peft_model_state_dict(k, wrong)
    with pytest.raises(AdapterFileError, match="does not own"):  # PEFT would overwrite the base weight
        lorakit.set_peft_model_state_dict(k, {**state, "base_model.model.model.norm.weight": torch.zeros(32)})
    assert all(torch.equal(t, before[n]) for n, t in k.state_dict().items())
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        result = lorakit.set_peft_model_state_dict(k, wrong, ignore_mismatched_sizes=True)
    expected = peft.set_peft_model_state_dict(copy.deepcopy(p), dict(wrong), ignore_mismatched_sizes=True)
    assert sorted(result.missing_keys) == sorted(expected.missing_keys)
    assert any(key.startswith(last.rsplit(".", 1)[0]) for key in result.missing_keys)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_base_model_state_dict_equals_peft_and_the_original(arch):
    p, k = build("lora", arch)
    theirs, ours = peft.get_base_model_state_dict(p), lorakit.get_base_model_state_dict(k)
    same_state(theirs, ours)
    assert sorted(ours) == sorted(MODEL_FACTORIES[arch]().state_dict())
    fresh = MODEL_FACTORIES[arch](seed=3).state_dict()
    result = lorakit.set_base_model_state_dict(k, fresh)
    expected = peft.set_base_model_state_dict(p, fresh)
    assert (result.missing_keys, result.unexpected_keys) == (expected.missing_keys, expected.unexpected_keys)
    same_state(peft.get_base_model_state_dict(p), lorakit.get_base_model_state_dict(k))
    torch.testing.assert_close(logits(k), logits(p), rtol=1e-5, atol=1e-6)


def test_set_base_model_state_dict_refusals_change_nothing():
    _, k = build("lora", "llama", second=False)
    before = {n: t.clone() for n, t in k.state_dict().items()}
    state = lorakit.get_base_model_state_dict(k)
    with pytest.raises(ConfigError, match="missing"):
        lorakit.set_base_model_state_dict(k, {n: t for n, t in state.items() if "norm" not in n})
    with pytest.raises(ShapeMismatchError, match="model.norm.weight"):
        lorakit.set_base_model_state_dict(k, {**state, "model.norm.weight": torch.zeros(3)})
    assert all(torch.equal(t, before[n]) for n, t in k.state_dict().items())
    result = lorakit.set_base_model_state_dict(
        k, {"model.norm.weight": state["model.norm.weight"], "x": 1}, strict=False
    )
    assert result.unexpected_keys == ["x"] and "model.norm.weight" not in result.missing_keys


def test_load_peft_weights_equals_peft(tmp_path):
    p, _ = build("lora", "llama")
    p.save_pretrained(tmp_path)
    same_state(peft.load_peft_weights(str(tmp_path)), lorakit.load_peft_weights(tmp_path))
    sub = lorakit.load_peft_weights(tmp_path, device="cpu", subfolder="other")
    same_state(peft.load_peft_weights(str(tmp_path), device="cpu", subfolder="other"), sub)
    mapping = {r"layers\.1\.": "layers.9."}
    same_state(
        peft.load_peft_weights(str(tmp_path), key_mapping=mapping),
        lorakit.load_peft_weights(tmp_path, key_mapping=mapping),
    )
    with pytest.raises(ConfigError, match="unknown keyword"):
        lorakit.load_peft_weights(tmp_path, revison="main")


# -- PeftModel's loading arguments -------------------------------------------------------------------------------


def renamed_adapter(tmp_path) -> tuple[peft.PeftModel, str]:
    """A PEFT adapter whose file names LLaMA's layers ``blocks`` (as if saved from a renamed architecture)."""
    p, _ = build("lora", "llama", second=False)
    p.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    save_file({k.replace(".layers.", ".blocks."): v for k, v in load_file(file).items()}, file)
    return p, str(tmp_path)


def test_key_mapping_and_the_models_conversion_mapping_as_peft(tmp_path):
    p, path = renamed_adapter(tmp_path)
    mapping = {r"^model\.blocks": "model.layers"}
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), path, key_mapping=mapping)
    ours = lorakit.PeftModel.from_pretrained(tiny_llama(), path, key_mapping=mapping)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(ours), logits(p), rtol=1e-5, atol=1e-6)
    model = tiny_llama()
    model._checkpoint_conversion_mapping = mapping  # transformers' renames of old checkpoints: PEFT's default
    torch.testing.assert_close(logits(lorakit.PeftModel.from_pretrained(model, path)), logits(p), rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterFileError, match="lacks"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), path)
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), path, key_mapping=mapping)
    assert loaded.load_adapter(path, "again", key_mapping=mapping) == ([], [])
    with pytest.raises(ConfigError, match="invalid regex"):
        loaded.load_adapter(path, "bad", key_mapping={"(": "x"})


def test_load_adapter_returns_peft_load_result_and_accepts_peft_arguments(tmp_path):
    p, k = build("lora", "llama")
    p.save_pretrained(tmp_path)
    args = dict(torch_device="cpu", ephemeral_gpu_offload=True, low_cpu_mem_usage=True)
    result = k.load_adapter(tmp_path, "loaded", autocast_adapter_dtype=False, **args)
    expected = p.load_adapter(str(tmp_path), "loaded", **args)
    assert type(result) is type(expected) and result.missing_keys == [] and result.unexpected_keys == []
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path, key_mapping=None, **args)
    torch.testing.assert_close(logits(loaded), logits(p), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="ignore_mismatched_sizes"):
        k.load_adapter(tmp_path, "x", ignore_mismatched_sizes=True)
    with pytest.raises(ConfigError, match="ignore_mismatched_sizes"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path, ignore_mismatched_sizes=True)
    assert "x" not in k.peft_config


def test_trainability_through_load_set_adapter_and_set_requires_grad_equals_peft(tmp_path):
    p, _ = build("lora", "bert")
    p.save_pretrained(tmp_path)
    models = [
        library.PeftModel.from_pretrained(MODEL_FACTORIES["bert"](), str(tmp_path), is_trainable=True)
        for library in (peft, lorakit)
    ]
    steps = [
        lambda m: m.load_adapter(str(tmp_path / "other"), "other", is_trainable=True),  # trainable though inactive
        lambda m: m.set_adapter("other", inference_mode=True),  # every adapter frozen
        lambda m: m.set_adapter("other"),
        lambda m: m.set_requires_grad("default"),
        lambda m: m.set_requires_grad(["default", "other"], requires_grad=False),
        lambda m: m.set_adapter("default"),
        lambda m: m.base_model.set_adapter("other", inference_mode=True),
        lambda m: m.base_model.disable_adapter_layers(),
        lambda m: m.base_model.enable_adapter_layers(),
    ]
    for i, step in enumerate(steps):
        for model in models:
            step(model)
        assert trainable(models[1]) == trainable(models[0]), i
        same_status(models[0].get_model_status(), models[1].get_model_status())


def test_disable_adapter_layers_runs_the_base_model_until_enabled():
    p, k = build("lora", "llama", second=False)
    adapted, base = logits(k), logits(tiny_llama())
    k.base_model.disable_adapter_layers()
    p.base_model.disable_adapter_layers()
    torch.testing.assert_close(logits(k), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(p), base, rtol=0, atol=0)
    with k.disable_adapter():  # the context manager leaves the switch as it found it
        pass
    torch.testing.assert_close(logits(k), base, rtol=0, atol=0)
    k.disable_adapter_layers()  # through the PeftModel too, as PEFT forwards it
    k.enable_adapter_layers()
    torch.testing.assert_close(logits(k), adapted, rtol=0, atol=0)
    k.merge_adapter()
    with pytest.raises(MergeError, match="unmerge"):
        k.base_model.disable_adapter_layers()
    assert k.get_model_status().enabled is True


@pytest.mark.parametrize(("method", "dtype"), [("lora", torch.bfloat16), ("ia3", torch.float16)])
def test_autocast_adapter_dtype_equals_peft(method, dtype):
    cfg = {"target_modules": ["q_proj"], **({"feedforward_modules": []} if method == "ia3" else {})}
    dtypes = []
    for library in (peft, lorakit):
        model = library.get_peft_model(
            tiny_llama().to(dtype), config_of(library, method, cfg), autocast_adapter_dtype=False
        )
        model.add_adapter("cast", config_of(library, method, cfg))
        model.add_adapter("kept", config_of(library, method, cfg), autocast_adapter_dtype=False)
        dtypes.append({n: t.dtype for n, t in model.named_parameters() if f"{method}_" in n})
    assert dtypes[1] == dtypes[0]
    assert {d for n, d in dtypes[1].items() if ".cast" in n} == {torch.float32}
    assert {d for n, d in dtypes[1].items() if ".kept" in n or ".default" in n} == {dtype}


# -- config files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ia3", "adalora", "prompt"])
def test_peft_config_from_pretrained_builds_the_files_method(method, tmp_path):
    made = {
        "lora": lambda lib: lib.LoraConfig(r=4, target_modules=["q_proj"]),
        "ia3": lambda lib: lib.IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
        "adalora": lambda lib: lib.AdaLoraConfig(target_modules=["q_proj"], total_step=10),
        "prompt": lambda lib: lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }[method]
    made(peft).save_pretrained(tmp_path)
    theirs, ours = peft.PeftConfig.from_pretrained(str(tmp_path)), lorakit.PeftConfig.from_pretrained(tmp_path)
    assert type(ours).__name__ == type(theirs).__name__
    assert type(ours) is type(made(lorakit))


def test_from_json_file_returns_the_files_dict_as_peft(tmp_path):
    peft.LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    file = tmp_path / "adapter_config.json"
    data = json.loads(file.read_text())
    file.write_text(json.dumps({**data, "runtime_config": {"ephemeral_gpu_offload": False}}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = lorakit.LoraConfig.from_json_file(file)
        theirs = peft.LoraConfig.from_json_file(str(file))
    assert ours == theirs == data == lorakit.PeftConfig.from_json_file(str(file))
    assert sum("runtime_config" in str(w.message) for w in seen) >= 2
    with pytest.raises(AdapterFileError):
        lorakit.PeftConfig.from_json_file(tmp_path / "missing.json")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_devices_and_the_default_load_device_on_cuda_equal_peft(tmp_path):
    p, k = build("lora", "llama")
    p.cuda(), k.cuda()
    same_status(p.get_model_status(), k.get_model_status())
    assert k.get_model_status().devices == {"default": ["cuda"], "other": ["cuda"]}
    p.save_pretrained(tmp_path)
    theirs, ours = peft.load_peft_weights(str(tmp_path)), lorakit.load_peft_weights(tmp_path)
    assert {t.device.type for t in ours.values()} == {t.device.type for t in theirs.values()} == {"cuda"}
