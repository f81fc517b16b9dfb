"""LoRA on ``nn.Parameter`` s (``target_parameters``): the fused experts of transformers 5 MoE models, against PEFT.

PEFT 0.21.2 is the oracle: its ``lora.ParamWrapper`` fixes the per-expert layout of the factors, the nesting of two
parameters of one module (and so the file keys), and, on Mixtral and Qwen3-MoE, the rewrite of ``"all-linear"`` into
attention modules + experts + routers (``gate_up_proj`` at rank 2r). Files written by either library load in the other
with equal logits; counts, merging, training, several adapters and the errors are checked on tiny random models.
"""

from __future__ import annotations

import json
import threading
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import lorakit
from conftest import input_ids, tiny_llama
from lorakit import ConfigError, LoraConfig, get_peft_model
from lorakit.tuners.lora.param_wrapper import ParamLoraLayer

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


def tiny_moe(kind: str, seed: int = 0) -> nn.Module:
    """A random 2-layer, 32-wide MoE model with 4 experts (2 per token) of transformers' ``kind``."""
    torch.manual_seed(seed)
    moe = dict(max_position_embeddings=64, num_experts_per_tok=2)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**COMMON, **moe, intermediate_size=64, num_local_experts=4)).eval()
    if kind == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **COMMON, **moe, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=48
        )
        return Qwen2MoeForCausalLM(cfg.__class__(**{**cfg.to_dict(), "num_experts": 4})).eval()
    cfg = Qwen3MoeConfig(**COMMON, **moe, intermediate_size=64, moe_intermediate_size=24, num_experts=4, head_dim=8)
    return Qwen3MoeForCausalLM(cfg).eval()


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids(seed=3) if ids is None else ids).logits


CASES = {  # model kind -> config fields; every one of them adapts expert parameters
    "mixtral-all-linear": ("mixtral", dict(target_modules="all-linear")),
    "qwen3-modules-and-parameters": ("qwen3_moe", dict(target_modules=["q_proj", "o_proj"], target_parameters=EXPERTS)),
    "qwen2-all-linear-and-parameters": ("qwen2_moe", dict(target_modules="all-linear", target_parameters=EXPERTS)),
    "mixtral-parameters-only": ("mixtral", dict(target_modules=[], target_parameters=["experts.down_proj"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_lorakit_with_equal_logits(case, tmp_path):
    kind, fields = CASES[case]
    theirs = peft.get_peft_model(tiny_moe(kind), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **fields))
    theirs.save_pretrained(tmp_path)
    assert (logits(theirs) - logits(tiny_moe(kind))).abs().max() > 1e-3  # the experts' update changes the output
    ours = lorakit.PeftModel.from_pretrained(tiny_moe(kind), tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)
    assert any(isinstance(m, ParamLoraLayer) for m in ours.modules())
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for n, p in ours.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_file_is_peft_s_file_and_loads_in_peft(case, tmp_path):
    kind, fields = CASES[case]
    ours = get_peft_model(tiny_moe(kind), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **fields))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-6)
    # PEFT's own file for the same config: the same keys, shapes and targeting fields
    reference = peft.get_peft_model(tiny_moe(kind), peft.LoraConfig(r=4, lora_alpha=8, **fields))
    reference.save_pretrained(tmp_path / "peft")
    mine, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in peft_file.items()}
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft")]
    assert sorted(configs[0]["target_parameters"] or []) == sorted(configs[1]["target_parameters"] or [])
    leaves = [sorted({name.rsplit(".", 1)[-1] for name in c["target_modules"] or []}) for c in configs]
    assert leaves[0] == leaves[1]  # PEFT writes all-linear's full module names on some models, lorakit their leaves
    for key in ("rank_pattern", "alpha_pattern"):
        assert configs[0][key] == configs[1][key], key


def test_expert_layout_is_peft_s():
    """ΔW of expert e is s·B_e A_e, A's rows e·r… and B's columns e, e+E, … (PEFT's reshape), stacked (E, out, in)."""
    model = get_peft_model(
        tiny_moe("mixtral"), LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=EXPERTS)
    )
    layer = model.get_submodule("base_model.model.model.layers.0.mlp.experts")  # down_proj (E, h, f): the outer one
    assert isinstance(layer, ParamLoraLayer) and layer.parameter_name == "down_proj"
    inner = layer.base_layer
    assert isinstance(inner, ParamLoraLayer) and inner.parameter_name == "gate_up_proj"
    assert layer.num_experts == 4 and (layer.in_features, layer.out_features) == (64, 32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (2 * 4, 64) and b.shape == (32, 2 * 4)
    torch.nn.init.normal_(b)
    delta = layer.delta_weight("default")
    for e in range(4):
        expected = 3.0 * b[:, e::4] @ a[2 * e : 2 * e + 2]
        torch.testing.assert_close(delta[e], expected)


def test_trainable_count_matches_peft_on_tiny_mixtral():
    """PEFT's all-linear on Mixtral adapts the experts and routers too (its v4 -> v5 rewrite): the same count here.
    Attention alone, what all-linear gave before, is 3,584 on this model."""
    attention = get_peft_model(tiny_moe("mixtral"), LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert attention.get_nb_trainable_parameters()[0] == 3584
    for fields in (dict(target_modules="all-linear"), dict(target_modules="all-linear", target_parameters=EXPERTS)):
        theirs = peft.get_peft_model(tiny_moe("mixtral"), peft.LoraConfig(**fields))
        ours = get_peft_model(tiny_moe("mixtral"), LoraConfig(**fields))
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        assert ours.get_nb_trainable_parameters()[0] == 30784
    assert sorted(ours.base_model.targeted_parameter_names) == sorted(theirs.base_model.targeted_parameter_names)
    assert sorted(ours.base_model.targeted_module_names) == sorted(theirs.base_model.targeted_module_names)
    config = ours.peft_config["default"]  # the rewrite, as PEFT makes it: gate_up_proj fuses two v4 modules
    assert sorted(config.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert set(config.target_parameters) >= {"gate_up_proj", "down_proj", "gate.weight"}
    assert config.rank_pattern == {r".*\.gate_up_proj": 16} and config.alpha_pattern == {r".*\.gate_up_proj": 16}


def test_v4_module_names_are_rewritten_as_peft_does():
    fields = dict(target_modules=["q_proj", "w1", "w3", "w2"])
    theirs = peft.get_peft_model(tiny_moe("mixtral"), peft.LoraConfig(**fields))
    ours = get_peft_model(tiny_moe("mixtral"), LoraConfig(**fields))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with pytest.raises(ConfigError, match=r"names \['w1'\] but not \['w3'\].*'gate_up_proj'"):
        get_peft_model(tiny_moe("mixtral"), LoraConfig(target_modules=["q_proj", "w1"]))


def test_merge_unmerge_and_unload():
    model = tiny_moe("mixtral")
    base = logits(model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERTS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    unmerged = logits(peft_model)
    peft_model.merge_adapter()
    experts = peft_model.get_submodule("base_model.model.model.layers.0.mlp.experts.base_layer.base_layer")
    assert (experts.down_proj - originals["model.layers.0.mlp.experts.down_proj"]).abs().max() > 1e-4
    torch.testing.assert_close(logits(peft_model), unmerged, rtol=0, atol=1e-5)
    peft_model.unmerge_adapter()
    for name, param in peft_model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(param, originals[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(peft_model), unmerged, rtol=0, atol=1e-5)
    merged = peft_model.merge_and_unload()
    assert type(merged.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert not any(isinstance(m, ParamLoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), unmerged, rtol=0, atol=1e-5)
    bare = get_peft_model(tiny_moe("mixtral"), config).unload()  # no merge: the base model itself
    assert [n for n, _ in bare.named_parameters()] == list(originals)
    torch.testing.assert_close(logits(bare), base, rtol=0, atol=0)


def test_training_gives_gradients_to_the_new_factors_only():
    model = get_peft_model(tiny_moe("qwen3_moe"), LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".experts.lora_A." in n for n in trainable)  # down_proj's factors, and gate_up_proj's (nested)
    assert any(".experts.base_layer.lora_B." in n for n in trainable)
    assert all("lora_" in n for n in trainable)
    ids = input_ids(batch=4, seq=12, seed=5)
    model.train()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    b = model.get_submodule("base_model.model.model.layers.0.mlp.experts").lora_B["default"].weight
    assert b.grad.abs().max() > 0  # B starts at zero: its gradient is what moves the experts first
    experts = model.get_submodule("base_model.model.model.layers.0.mlp.experts.base_layer.base_layer")
    order = list(experts._parameters)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    assert list(experts._parameters) == order == ["gate_up_proj", "down_proj"]  # the forward put them back


def test_several_adapters_set_adapter_and_disable():
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS, init_lora_weights=False)
    model = tiny_moe("mixtral")
    base = logits(model)
    single = {}
    for seed, name in ((1, "one"), (2, "two")):
        alone = tiny_moe("mixtral")  # (seeds the RNG itself)
        torch.manual_seed(seed)
        single[name] = get_peft_model(alone, LoraConfig(**config))
    torch.manual_seed(1)
    both = get_peft_model(model, LoraConfig(**config), adapter_name="one")
    torch.manual_seed(2)
    both.add_adapter("two", LoraConfig(**config))
    layer = both.get_submodule("base_model.model.model.layers.1.mlp.experts")
    assert sorted(layer.r) == ["one", "two"] and sorted(layer.base_layer.r) == ["one", "two"]  # no third nesting
    for name in ("one", "two"):
        both.set_adapter(name)
        torch.testing.assert_close(logits(both), logits(single[name]), rtol=0, atol=1e-6)
    with both.disable_adapter():
        torch.testing.assert_close(logits(both), base, rtol=0, atol=0)
    both.delete_adapter("one")
    torch.testing.assert_close(logits(both), logits(single["two"]), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match=r"must all target the same parameters.*'two'"):
        both.add_adapter("three", LoraConfig(target_parameters=["mlp.experts.down_proj"]))
    assert "three" not in both.peft_config


def test_two_peft_adapters_load_and_switch_as_in_peft(tmp_path):
    fields = dict(r=2, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_moe("qwen3_moe"), peft.LoraConfig(**fields))
    theirs.add_adapter("other", peft.LoraConfig(**{**fields, "r": 3}))
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(tiny_moe("qwen3_moe"), tmp_path)
    ours.load_adapter(tmp_path / "other", adapter_name="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)


def test_target_parameters_matching_nothing_names_it_and_lists_candidates():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ConfigError) as info:
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], target_parameters=["experts.gate_proj"]))
    message = str(info.value)
    assert "target_parameters entries ['experts.gate_proj'] matched no parameter of Qwen3MoeForCausalLM" in message
    assert "mlp.experts.gate_up_proj" in message and "mlp.experts.down_proj" in message and "mlp.gate.weight" in message
    assert "did you mean 'experts.gate_up_proj'" in message
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())  # the model was left as it was
    with pytest.raises(ConfigError, match=r"\['mlp.experts.up_proj'\] matched no parameter"):  # one of two
        get_peft_model(model, LoraConfig(target_parameters=["mlp.experts.down_proj", "mlp.experts.up_proj"]))


def test_all_linear_warns_about_the_experts_it_leaves_out():
    with pytest.warns(UserWarning, match=r"all-linear.*leaves out 6 parameters of Qwen2MoeForCausalLM") as caught:
        get_peft_model(tiny_moe("qwen2_moe"), LoraConfig(target_modules="all-linear"))
    message = str(next(w.message for w in caught if "leaves out" in str(w.message)))
    assert "target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj', 'mlp.gate.weight']" in message
    for model, fields in (
        (tiny_moe("qwen2_moe"), dict(target_parameters=[*EXPERTS, "mlp.gate.weight"])),  # all of them adapted
        (tiny_moe("mixtral"), {}),  # PEFT's rewrite adapts Mixtral's experts and routers
        (tiny_llama(), {}),  # no experts at all
    ):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*leaves out")
            get_peft_model(model, LoraConfig(target_modules="all-linear", **fields))


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (dict(lora_dropout=0.1), r"lora_dropout=0.1 cannot be used with target_parameters"),
        (dict(use_dora=True), r"target_parameters takes plain LoRA only.*not DoRA"),
        (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' cannot be used with target_parameters"),
        (dict(target_parameters=["model.norm.weight"]), r"'model.norm.weight' of shape \(32,\)"),
        (dict(target_modules=["experts"]), r"adapted through target_modules"),
    ],
)
def test_options_a_parameter_cannot_take_are_refused_before_any_change(fields, error):
    model = tiny_moe("mixtral")
    with pytest.raises(ConfigError, match=error):
        get_peft_model(model, LoraConfig(**{"target_modules": [], "target_parameters": EXPERTS, **fields}))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())


def test_mixed_batches_and_weighted_combinations_are_refused():
    config = LoraConfig(target_modules=["q_proj"], target_parameters=EXPERTS, init_lora_weights=False)
    model = get_peft_model(tiny_moe("mixtral"), config).eval()
    with pytest.raises(ConfigError, match="adapter_names .* not supported with target_parameters"):
        model(input_ids(), adapter_names=["default", "__base__"])
    with pytest.raises(ConfigError, match="add_weighted_adapter does not combine adapters with target_parameters"):
        model.add_weighted_adapter(["default"], [1.0], "sum")


def test_hotswap_and_state_dict_injection_are_refused():
    config = LoraConfig(target_modules=["q_proj"], target_parameters=EXPERTS)
    model = get_peft_model(tiny_moe("mixtral"), config)
    with pytest.raises(ConfigError, match="adapts parameter 'down_proj' .* hot-swapping supports target_modules"):
        lorakit.prepare_model_for_compiled_hotswap(model, target_rank=16)
    state = lorakit.get_peft_model_state_dict(model)
    with pytest.raises(ConfigError, match="with a state_dict cannot place target_parameters adapters"):
        lorakit.inject_adapter_in_model(config, tiny_moe("mixtral"), state_dict=state)


class ToyExperts(nn.Module):
    """Three experts as 3-D parameters, ``(E, out, in)`` or, with ``is_transposed``, ``(E, in, out)``."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        up, down = (torch.randn(3, 8, 6), torch.randn(3, 6, 8)) if transposed else (torch.randn(3, 6, 8), None)
        self.up = nn.Parameter(up)
        self.down = nn.Parameter(down if transposed else torch.randn(3, 8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = (self.up, self.down) if self.is_transposed else (self.up.mT, self.down.mT)  # (E, in, out)
        return torch.einsum("bf,efh->bh", torch.einsum("bh,ehf->ebf", x, up).relu().sum(0), down)


class ToyRouter(nn.Module):
    """A 2-D ``(out, in)`` parameter of a module that is not an ``nn.Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class Toy(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = ToyRouter()
        self.experts = ToyExperts(transposed)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(self.router(x)))


@pytest.mark.parametrize("transposed", [False, True])
def test_transposed_and_2d_parameters_match_peft_both_ways(transposed, tmp_path):
    fields = dict(r=2, target_modules=[], target_parameters=["experts.up", "experts.down", "router.weight"])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    theirs = peft.get_peft_model(Toy(transposed), peft.LoraConfig(init_lora_weights=False, **fields))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorakit.PeftModel.from_pretrained(Toy(transposed), tmp_path / "peft")
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert (ours(x) - Toy(transposed)(x)).abs().max() > 1e-3
    mine = get_peft_model(Toy(transposed), LoraConfig(init_lora_weights=False, **fields))
    mine.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(Toy(transposed), tmp_path / "ours")
    torch.testing.assert_close(back(x), mine(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        before = mine(x)
        mine.merge_adapter()
        torch.testing.assert_close(mine(x), before, rtol=1e-5, atol=1e-5)


def test_file_with_another_rank_is_refused(tmp_path):
    get_peft_model(tiny_moe("mixtral"), LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS)).save_pretrained(
        tmp_path
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(lorakit.ShapeMismatchError, match="rank 3"):
        lorakit.PeftModel.from_pretrained(tiny_moe("mixtral"), tmp_path)


def test_threads_running_the_model_at_once_each_see_the_adapted_experts():
    model = get_peft_model(tiny_moe("mixtral"), LoraConfig(target_parameters=EXPERTS, init_lora_weights=False))
    expected = [logits(model, input_ids(seed=s)) for s in range(4)]
    results: dict[int, torch.Tensor] = {}

    def run(seed: int) -> None:
        for _ in range(5):
            results[seed] = logits(model, input_ids(seed=seed))

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in range(4):
        torch.testing.assert_close(results[seed], expected[seed], rtol=0, atol=0)


def test_estimate_and_inspect_count_the_expert_factors(tmp_path):
    from lorakit.cli.inspect import summarize
    from lorakit.estimate import build_meta_model, count_parameters

    config = MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=4, max_position_embeddings=64)
    estimate = count_parameters(build_meta_model(config), LoraConfig(target_modules="all-linear"))
    assert estimate.trainable == 30784
    groups = {g[0]: g for g in estimate.groups()}
    assert groups["experts.gate_up_proj"][1:] == ("parameter", 32, 128, 16, 16 * 4 * (32 + 128), 2)
    assert groups["experts.down_proj"][1:] == ("parameter", 64, 32, 8, 8 * 4 * (64 + 32), 2)
    model = get_peft_model(tiny_moe("mixtral"), LoraConfig(target_modules="all-linear"))
    model.save_pretrained(tmp_path)
    info = summarize(tmp_path)
    assert info["adapter_parameters"] == 30784
    assert sorted(info["target_parameters"]) == ["down_proj", "gate.weight", "gate_up_proj"]
    assert info["by_module"]["experts"]["count"] == 4 and info["by_module"]["experts"]["ranks"] == []


def test_train_cli_flag_reaches_the_lora_config(tmp_path, monkeypatch, capsys):
    import lorakit.training.trainer as trainer
    from lorakit.cli import main
    from lorakit.training.methods import lora_config

    seen = {}

    def fake_train(cfg, progress=True):
        seen["cfg"] = cfg
        return type("Result", (), {"interrupted": False})()

    monkeypatch.setattr(trainer, "train", fake_train)
    flags = ["train", "--target-parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj", "-o", str(tmp_path)]
    assert main([*flags, "--no-progress"]) == 0
    assert seen["cfg"].target_parameters == EXPERTS
    assert lora_config(seen["cfg"], None, 10).target_parameters == EXPERTS
    assert main([*flags, "--dora"]) == 1
    assert "target_parameters (--target-parameters) applies to plain LoRA" in capsys.readouterr().err
