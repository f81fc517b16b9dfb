"""Equivalence with the real Hugging Face PEFT on tiny random LLaMA, GPT-2 (Conv1D) and BERT (SEQ_CLS) models.

PEFT is the oracle here (lorakit itself never imports it). Every test builds the same base model twice, wraps
one copy with ``peft`` and one with ``lorakit`` from the same config (``init_lora_weights=False``, so the
adapters are not zero), randomises every trainable non-LoRA tensor of the PEFT model (``modules_to_save``
copies, trainable biases) and copies PEFT's state dict into lorakit, so both hold identical weights. Then
structure, outputs, files, merging, generation and trainability are compared.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.utils import ModulesToSaveWrapper as PeftModulesToSaveWrapper
from safetensors.torch import load_file

import lorakit
from conftest import MODEL_FACTORIES, input_ids, tiny_gpt2, tiny_llama

pytestmark = [
    # PEFT's own notices (fan_in_fan_out fixed up for Conv1D, embedding layers saved, ...): expected noise here.
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


ARCHS = ["llama", "gpt2", "bert"]
CAUSAL = ["llama", "gpt2"]

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value"]}
REGEX = {
    "llama": r".*\.self_attn\.(q|v)_proj",
    "gpt2": r".*\.attn\.c_(attn|proj)",
    "bert": r".*\.attention\.self\.(query|key)",
}
EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
LAYERS_PATTERN = {"llama": "layers", "gpt2": "h", "bert": "layer"}
MODULES_TO_SAVE = {"llama": ["lm_head"], "gpt2": ["ln_f"], "bert": ["pooler"]}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
# Targets for merging: embeddings too, except GPT-2's wte, tied to lm_head (see test_merge_tied_wte_matches_peft).
MERGE_TARGETS = {
    "llama": ["embed_tokens", "q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["word_embeddings", "query", "value", "dense"],
}


def _patterns(arch: str) -> dict[str, Any]:
    first, second = TARGETS[arch]
    layers = LAYERS_PATTERN[arch]
    return {
        "target_modules": TARGETS[arch],
        # a plain name and a regex over the full path, as both libraries read them
        "rank_pattern": {first: 2, rf"{layers}\.1\..*{second}": 6},
        "alpha_pattern": {second: 3, rf"{layers}\.0\..*{first}": 5},
    }


VARIANTS: dict[str, Callable[[str], dict[str, Any]]] = {
    "list": lambda a: {"target_modules": TARGETS[a]},
    "regex": lambda a: {"target_modules": REGEX[a]},
    "all_linear": lambda a: {"target_modules": "all-linear"},
    "exclude": lambda a: {"target_modules": "all-linear", "exclude_modules": TARGETS[a]},
    "exclude_regex": lambda a: {"target_modules": TARGETS[a], "exclude_modules": rf".*\.{LAYERS_PATTERN[a]}\.0\..*"},
    "layers": lambda a: {"target_modules": TARGETS[a], "layers_to_transform": [1], "layers_pattern": LAYERS_PATTERN[a]},
    "patterns": _patterns,
    "rslora": lambda a: {"target_modules": TARGETS[a], "r": 16, "lora_alpha": 4, "use_rslora": True},
    "dropout": lambda a: {"target_modules": TARGETS[a], "lora_dropout": 0.3},
    "embedding": lambda a: {"target_modules": [EMBEDDING[a], *TARGETS[a]]},
    # (the tiny LLaMA has no biases at all, so the bias variants only matter for GPT-2 and BERT)
    "bias_all": lambda a: {"target_modules": TARGETS[a], "bias": "all"},
    "bias_lora_only": lambda a: {"target_modules": TARGETS[a], "bias": "lora_only"},
    "modules_to_save": lambda a: {"target_modules": TARGETS[a], "modules_to_save": MODULES_TO_SAVE[a]},
}
FILE_VARIANTS = ["list", "layers", "patterns", "embedding", "bias_all", "bias_lora_only", "modules_to_save"]


def _cases(variants: list[str]) -> list[Any]:
    return [pytest.param(arch, variant, id=f"{arch}-{variant}") for arch in ARCHS for variant in variants]


# -- helpers ------------------------------------------------------------------------------------------


def config_dict(arch: str, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "task_type": TASK[arch]}
    cfg.update(overrides)
    return cfg


def variant_config(arch: str, variant: str) -> dict[str, Any]:
    return config_dict(arch, **VARIANTS[variant](arch))


def build(
    arch: str,
    cfg: dict[str, Any],
    factory: Callable[[], torch.nn.Module] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    sync: bool = True,
) -> tuple[peft.PeftModel, lorakit.PeftModel]:
    """The same base model wrapped by PEFT and by lorakit, with identical (non-trivial) weights.

    Each library gets its own deep copy of the config dict: PEFT mutates ``modules_to_save`` lists in place.
    """
    factory = factory or MODEL_FACTORIES[arch]
    p = peft.get_peft_model(factory(), peft.LoraConfig(**copy.deepcopy(cfg)))
    k = lorakit.get_peft_model(factory(), lorakit.LoraConfig(**copy.deepcopy(cfg)))
    for name, extra_cfg in (extra or {}).items():
        p.add_adapter(name, peft.LoraConfig(**copy.deepcopy(extra_cfg)))
        k.add_adapter(name, lorakit.LoraConfig(**copy.deepcopy(extra_cfg)))
    if sync:
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for name, param in p.named_parameters():
                # trained copies and trainable biases must differ from the base to be seen in outputs and files
                if (param.requires_grad or ".modules_to_save." in name) and "lora_" not in name:
                    param.add_(0.1 * torch.randn(param.shape, generator=gen))
        k.load_state_dict(p.state_dict())
    return p.eval(), k.eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def modules_of(model: torch.nn.Module, cls: type) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, cls)}


def assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m, key=key: f"{key}: {m}")


def read_adapter(folder) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    return weights, config


# -- 1. structure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant"), _cases(list(VARIANTS)))
def test_same_modules_and_state_dict_keys(arch, variant):
    p, k = build(arch, variant_config(arch, variant), sync=False)
    assert set(k.state_dict()) == set(p.state_dict())
    assert modules_of(k, lorakit.LoraLayer) == modules_of(p, PeftLoraLayer)
    assert modules_of(k, lorakit.ModulesToSaveWrapper) == modules_of(p, PeftModulesToSaveWrapper)
    assert modules_of(k, lorakit.LoraLayer)  # the config selected something
    assert type(k).__name__ == type(p).__name__  # task wrapper class


@pytest.mark.parametrize(("arch", "variant"), _cases(list(VARIANTS)))
def test_same_trainable_parameters(arch, variant, capsys):
    p, k = build(arch, variant_config(arch, variant), sync=False)
    assert trainable(k) == trainable(p)
    assert k.get_nb_trainable_parameters() == p.get_nb_trainable_parameters()
    capsys.readouterr()
    p.print_trainable_parameters()
    peft_out = capsys.readouterr().out
    k.print_trainable_parameters()
    assert capsys.readouterr().out == peft_out


def test_all_linear_selects_the_same_modules():
    expected = {
        "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        "gpt2": {"c_attn", "c_proj", "c_fc"},
        "bert": {"query", "key", "value", "dense"},
    }
    for arch in ARCHS:
        p, k = build(arch, config_dict(arch, target_modules="all-linear"), sync=False)
        names = modules_of(k, lorakit.LoraLayer)
        assert names == modules_of(p, PeftLoraLayer)
        assert {n.rsplit(".", 1)[-1] for n in names} == expected[arch]  # output heads are left out


@pytest.mark.parametrize(
    ("arch", "heads"),
    [
        pytest.param("gpt2", ["ln_f"], id="gpt2-ln_f"),
        pytest.param("bert", None, id="bert-seq_cls"),
    ],
)
def test_bias_all_keeps_modules_to_save_original_frozen(arch, heads):
    # PEFT freezes ModulesToSaveWrapper.original_module after marking biases (the forward never uses it while an
    # adapter is active); lorakit's bias="all" loop over named_parameters() turns its bias back on.
    p, k = build(arch, config_dict(arch, target_modules=TARGETS[arch], bias="all", modules_to_save=heads), sync=False)
    assert not {n for n in trainable(p) if ".original_module." in n}
    assert not {n for n in trainable(k) if ".original_module." in n}
    assert trainable(k) == trainable(p)


# -- 2. outputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant"), _cases(list(VARIANTS)))
def test_same_logits(arch, variant):
    ids = input_ids()
    p, k = build(arch, variant_config(arch, variant))
    base = logits(MODEL_FACTORIES[arch](), ids)
    expected = logits(p, ids)
    assert not torch.allclose(expected, base)  # the adapter does something
    torch.testing.assert_close(logits(k, ids), expected)


def test_seq_cls_adds_classifier_head_to_modules_to_save():
    cfg = config_dict("bert", target_modules=TARGETS["bert"])
    p, k = build("bert", cfg)
    assert cfg.get("modules_to_save") is None
    assert k.peft_config["default"].modules_to_save == p.peft_config["default"].modules_to_save
    assert {"classifier", "score"} <= set(k.peft_config["default"].modules_to_save)
    assert (
        modules_of(k, lorakit.ModulesToSaveWrapper)
        == modules_of(p, PeftModulesToSaveWrapper)
        == {"base_model.model.classifier"}
    )
    assert {n for n in trainable(k) if "classifier" in n} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    assert trainable(k) == trainable(p)
    torch.testing.assert_close(logits(k, input_ids()), logits(p, input_ids()))  # uses the (randomised) copy


def test_dropout_is_active_in_train_mode_only():
    ids = input_ids()
    p, k = build("llama", variant_config("llama", "dropout"))
    k.train()
    torch.manual_seed(0)
    assert not torch.allclose(logits(k, ids), logits(k, ids))  # dropout is really applied to the adapter input
    k.eval()
    torch.testing.assert_close(logits(k, ids), logits(p, ids))


# -- 3. files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant"), _cases(FILE_VARIANTS))
def test_lorakit_file_loads_in_peft(arch, variant, tmp_path):
    ids = input_ids()
    p, k = build(arch, variant_config(arch, variant))
    k.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(p, ids))
    torch.testing.assert_close(logits(loaded, ids), logits(k, ids))


@pytest.mark.parametrize(("arch", "variant"), _cases(FILE_VARIANTS))
def test_peft_file_loads_in_lorakit(arch, variant, tmp_path):
    ids = input_ids()
    p, k = build(arch, variant_config(arch, variant))
    p.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path)
    assert type(loaded).__name__ == type(p).__name__
    torch.testing.assert_close(logits(loaded, ids), logits(p, ids))


def assert_same_adapter_files(peft_dir, lorakit_dir, bias: str = "none") -> None:
    """The two libraries' weight files for the same weights: same keys, same tensors.

    Known difference (allowed): with bias="all" PEFT selects biases by filtering the *raw* state dict for
    keys ending in ".bias", so for every ModulesToSaveWrapper its file also holds
    ``<m>.original_module.<..>.bias`` (the frozen original) and ``<m>.modules_to_save.<..>.bias`` (the trained
    copy again, after the adapter name is stripped) next to the ``<m>.<..>.bias`` that both libraries write.
    lorakit does not write these two redundant aliases (and accepts them when loading). With bias="lora_only"
    PEFT 0.21 writes exactly what lorakit writes (the adapted layers' ``base_layer.bias``).
    """
    pw, _ = read_adapter(peft_dir)
    kw, _ = read_adapter(lorakit_dir)
    if bias == "all":
        extra = set(pw) - set(kw)
        assert all(
            key.endswith(".bias") and (".original_module." in key or ".modules_to_save." in key) for key in extra
        ), sorted(extra)
        pw = {key: t for key, t in pw.items() if key not in extra}
    assert set(kw) == set(pw), (sorted(set(kw) - set(pw)), sorted(set(pw) - set(kw)))
    for key in pw:
        assert torch.equal(kw[key], pw[key]), key


@pytest.mark.parametrize(
    ("arch", "variant"),
    _cases(FILE_VARIANTS),
)
def test_safetensors_files_equal(arch, variant, tmp_path):
    cfg = variant_config(arch, variant)
    p, k = build(arch, cfg)
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    assert_same_adapter_files(tmp_path / "peft", tmp_path / "lorakit", bias=cfg.get("bias", "none"))


def test_lm_head_target_file_holds_base_weight_as_in_peft(tmp_path):
    # PEFT ("auto", lm_head in target_modules) writes lm_head.base_layer.weight; lorakit only does that for Embedding.
    p, k = build("llama", config_dict("llama", target_modules=["q_proj", "lm_head"]))
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    assert_same_adapter_files(tmp_path / "peft", tmp_path / "lorakit")


@pytest.mark.parametrize(
    ("arch", "factory"),
    [
        pytest.param("llama", lambda: tiny_llama(tie=True), id="llama-tied"),
        pytest.param("gpt2", tiny_gpt2, id="gpt2"),
    ],
)
def test_peft_file_with_tied_lm_head_target_loads_in_lorakit(arch, factory, tmp_path):
    ids = input_ids()
    p, _ = build(arch, config_dict(arch, target_modules=[TARGETS[arch][0], "lm_head"]), factory=factory, sync=False)
    p.save_pretrained(tmp_path)
    assert any(key.endswith("lm_head.base_layer.weight") for key in read_adapter(tmp_path)[0])
    loaded = lorakit.PeftModel.from_pretrained(factory(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), logits(p, ids))


def rich_config(arch: str) -> dict[str, Any]:
    first, second = TARGETS[arch]
    return config_dict(
        arch,
        target_modules=TARGETS[arch],
        layers_to_transform=[1],
        layers_pattern=LAYERS_PATTERN[arch],
        rank_pattern={first: 2},
        alpha_pattern={second: 3},
        use_rslora=True,
        lora_dropout=0.1,
        bias="lora_only",
        modules_to_save=MODULES_TO_SAVE[arch],
    )


def assert_same_adapter_config(peft_dir, lorakit_dir, skip: tuple[str, ...] = ()) -> None:
    """Every key lorakit writes into adapter_config.json is in PEFT's, with the same value."""
    _, pc = read_adapter(peft_dir)
    _, kc = read_adapter(lorakit_dir)
    assert set(kc) <= set(pc), sorted(set(kc) - set(pc))
    for key, value in kc.items():
        if key in skip:
            continue
        if key == "base_model_name_or_path":  # models built from a config have no name
            assert value in (None, "") and pc[key] in (None, "")
        elif key == "target_modules" and isinstance(value, list):
            assert set(value) == set(pc[key])  # PEFT keeps a set; its JSON order is arbitrary
        else:
            assert value == pc[key], (key, value, pc[key])
    assert kc["inference_mode"] is True


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_config_json_matches_peft(arch, tmp_path):
    p, k = build(arch, rich_config(arch), sync=False)
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    assert_same_adapter_config(tmp_path / "peft", tmp_path / "lorakit")


def test_adapter_config_fan_in_fan_out_for_conv1d(tmp_path):
    p, k = build("gpt2", config_dict("gpt2", target_modules=["c_attn"]), sync=False)
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    assert (
        read_adapter(tmp_path / "lorakit")[1]["fan_in_fan_out"] == read_adapter(tmp_path / "peft")[1]["fan_in_fan_out"]
    )


def other_adapter_config(arch: str) -> dict[str, Any]:
    return config_dict(arch, r=2, lora_alpha=3, target_modules=TARGETS[arch][:1])


@pytest.mark.parametrize("style", ["path", "subfolder"])
@pytest.mark.parametrize("direction", ["lorakit_to_peft", "peft_to_lorakit"])
@pytest.mark.parametrize("arch", ARCHS)
def test_second_adapter_files_both_ways(arch, direction, style, tmp_path):
    ids = input_ids()
    p, k = build(arch, variant_config(arch, "list"), extra={"other": other_adapter_config(arch)})
    source, target_lib = (k, peft) if direction == "lorakit_to_peft" else (p, lorakit)
    source.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    loaded = target_lib.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path)
    if style == "path":
        loaded.load_adapter(tmp_path / "other", adapter_name="other")
    else:
        loaded.load_adapter(tmp_path, adapter_name="other", subfolder="other")
    loaded.eval()
    outputs = {}
    for name in ("other", "default"):
        p.set_adapter(name)
        loaded.set_adapter(name)
        outputs[name] = logits(loaded, ids)
        torch.testing.assert_close(outputs[name], logits(p, ids), msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.allclose(outputs["other"], outputs["default"])


@pytest.mark.parametrize("arch", ARCHS)
def test_second_adapter_safetensors_files_equal(arch, tmp_path):
    p, k = build(arch, variant_config(arch, "list"), extra={"other": other_adapter_config(arch)})
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    assert_same_adapter_files(tmp_path / "peft", tmp_path / "lorakit")
    assert_same_adapter_files(tmp_path / "peft" / "other", tmp_path / "lorakit" / "other")
    skip = ("fan_in_fan_out",) * (arch == "gpt2")  # see test_adapter_config_fan_in_fan_out_for_conv1d
    assert_same_adapter_config(tmp_path / "peft", tmp_path / "lorakit", skip=skip)
    assert_same_adapter_config(tmp_path / "peft" / "other", tmp_path / "lorakit" / "other", skip=skip)


# -- 4. merging and disabling ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_equal(arch):
    ids = input_ids()
    p, k = build(arch, config_dict(arch, target_modules=MERGE_TARGETS[arch]))
    expected = logits(p, ids)
    pm, km = p.merge_and_unload(), k.merge_and_unload()
    assert type(km) is type(pm)
    assert not modules_of(km, lorakit.LoraLayer) and not modules_of(km, lorakit.ModulesToSaveWrapper)
    assert set(km.state_dict()) == set(MODEL_FACTORIES[arch]().state_dict())
    assert_state_dicts_equal(km.state_dict(), pm.state_dict())
    torch.testing.assert_close(logits(km, ids), logits(pm, ids))
    torch.testing.assert_close(logits(km, ids), expected, rtol=1e-4, atol=1e-5)


def test_merge_tied_wte_matches_peft():
    # GPT-2's wte is tied to lm_head, so merging into wte changes the output head too: the merged model differs
    # from the unmerged one in both libraries, but they must agree with each other.
    ids = input_ids()
    p, k = build("gpt2", config_dict("gpt2", target_modules=["wte", "c_attn"]))
    pm, km = p.merge_and_unload(), k.merge_and_unload()
    assert_state_dicts_equal(km.state_dict(), pm.state_dict())
    torch.testing.assert_close(logits(km, ids), logits(pm, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_round_trip(arch):
    ids = input_ids()
    p, k = build(arch, config_dict(arch, target_modules=MERGE_TARGETS[arch]))
    before = {key: t.clone() for key, t in k.state_dict().items()}
    expected = logits(p, ids)
    p.merge_adapter()
    k.merge_adapter()
    assert_state_dicts_equal(k.state_dict(), p.state_dict())
    torch.testing.assert_close(logits(k, ids), logits(p, ids))
    torch.testing.assert_close(logits(k, ids), expected, rtol=1e-4, atol=1e-5)
    p.unmerge_adapter()
    k.unmerge_adapter()
    assert_state_dicts_equal(k.state_dict(), p.state_dict())
    assert_state_dicts_equal(k.state_dict(), before)
    torch.testing.assert_close(logits(k, ids), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_gives_base_logits(arch):
    ids = input_ids()
    p, k = build(arch, config_dict(arch, target_modules=MERGE_TARGETS[arch]))  # bert: randomised classifier copy
    base = logits(MODEL_FACTORIES[arch](), ids)
    adapted = logits(p, ids)
    with p.disable_adapter(), k.disable_adapter():
        torch.testing.assert_close(logits(p, ids), base)
        torch.testing.assert_close(logits(k, ids), base)
    torch.testing.assert_close(logits(k, ids), adapted)


# -- 5. generation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", CAUSAL)
def test_generate_same_tokens(arch):
    ids = input_ids()
    p, k = build(arch, config_dict(arch, target_modules=[EMBEDDING[arch], *TARGETS[arch]], lora_alpha=32))
    with torch.no_grad():
        expected = p.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        got = k.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        with p.disable_adapter():
            base = p.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert got.shape == (ids.shape[0], ids.shape[1] + 5)
    assert torch.equal(got, expected)
    assert not torch.equal(got, base)  # the adapter changes what is generated


# -- 6. trainability of loaded adapters ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_adapter_trainability_matches_peft(arch, tmp_path):
    cfg = config_dict(arch, target_modules=TARGETS[arch], bias="lora_only", modules_to_save=MODULES_TO_SAVE[arch])
    p, _ = build(arch, cfg, extra={"other": other_adapter_config(arch)})
    p.save_pretrained(tmp_path)

    frozen = lorakit.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path, is_trainable=False)
    assert trainable(frozen) == set()
    assert frozen.get_nb_trainable_parameters()[0] == 0
    # (PEFT 0.21 itself leaves the bias="lora_only" biases requires_grad=True after an is_trainable=False load;
    # only its adapter tensors are frozen. lorakit freezes everything, as is_trainable=False promises.)
    assert not {
        n for n in trainable(peft.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path)) if "bias" not in n
    }

    k_train = lorakit.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path, is_trainable=True)
    p_train = peft.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path, is_trainable=True)
    assert trainable(k_train)
    assert trainable(k_train) == trainable(p_train)
    assert k_train.get_nb_trainable_parameters() == p_train.get_nb_trainable_parameters()

    for model in (k_train, p_train):
        model.load_adapter(tmp_path / "other", adapter_name="other", is_trainable=True)
        model.set_adapter("other")
    assert any(".other." in n for n in trainable(k_train))
    assert trainable(k_train) == trainable(p_train)
