"""add_weighted_adapter: against real PEFT where PEFT is right, against the closed form where it is not."""

from __future__ import annotations

import peft
import pytest
import torch

from conftest import input_ids, tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import AdapterExistsError, AdapterNotFoundError, ConfigError

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

TARGETS = ["q_proj", "v_proj", "down_proj"]


def pair(r=(4, 4), alphas=(8, 4), **extra):
    """PEFT and lorakit models with the same two adapters "a" and "b" (random A and B)."""
    common = dict(target_modules=TARGETS, init_lora_weights=False, **extra)
    configs = [dict(r=r[0], lora_alpha=alphas[0], **common), dict(r=r[1], lora_alpha=alphas[1], **common)]
    torch.manual_seed(0)
    p = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**configs[0]), adapter_name="a")
    p.add_adapter("b", peft.LoraConfig(**configs[1]))
    k = get_peft_model(tiny_llama(), LoraConfig(**configs[0]), adapter_name="a")
    k.add_adapter("b", LoraConfig(**configs[1]))
    k.load_state_dict(p.state_dict())
    return p, k


def delta(model, name, layer=("model", "layers", 0, "mlp", "down_proj")):
    module = model.base_model.model
    for part in layer:
        module = module[part] if isinstance(part, int) else getattr(module, part)
    return module.delta_weight(name) if hasattr(module, "delta_weight") else module.get_delta_weight(name)


def run(model, name):
    model.set_adapter(name)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


@pytest.mark.parametrize(
    "kind, kw",
    [("cat", {}), ("linear", {}), ("svd", {}), ("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.5}),
     ("ties_svd", {"density": 0.5}), ("magnitude_prune_svd", {"density": 0.7}), ("svd", {"svd_rank": 3})],
)  # fmt: skip
def test_equals_peft_for_positive_equal_weights(kind, kw):
    p, k = pair(alphas=(8, 8))  # equal scales too: TIES elects signs on weighted tensors, PEFT on unweighted
    for model in (p, k):
        model.add_weighted_adapter(["a", "b"], [0.7, 0.7], "mix", combination_type=kind, **kw)
    torch.testing.assert_close(delta(k, "mix"), delta(p, "mix"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(k, "mix"), run(p, "mix"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dare_linear_svd", "dare_ties_svd"])
def test_dare_keeps_a_density_fraction_and_rescales_it(kind):
    """One adapter, weight 1, full rank: every entry of the new ΔW is 0 or the old one / density (DARE)."""
    _, k = pair()
    torch.manual_seed(3)
    k.add_weighted_adapter(["a"], [1.0], "dare", combination_type=kind, density=0.6, svd_rank=32)
    old, new = delta(k, "a"), delta(k, "dare")
    kept = new.abs() > 0.5 * old.abs() / 0.6  # nearer the rescaled value than 0 (the SVD adds ~1e-7 noise)
    torch.testing.assert_close(new[kept], old[kept] / 0.6, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(new[~kept], torch.zeros_like(new[~kept]), rtol=0, atol=1e-5)
    assert 0.5 < kept.float().mean().item() < 0.7


@pytest.mark.parametrize("use_rslora", [False, True])
def test_cat_and_full_rank_svd_are_exact_with_negative_weights_and_rslora(use_rslora):
    _, k = pair(r=(4, 2), use_rslora=use_rslora)
    weights = [0.7, -1.3]
    expected = 0.7 * delta(k, "a") - 1.3 * delta(k, "b")
    k.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    k.add_weighted_adapter(["a", "b"], weights, "svd", combination_type="svd", svd_rank=6)
    torch.testing.assert_close(delta(k, "cat"), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta(k, "svd"), expected, rtol=1e-4, atol=1e-5)
    assert k.peft_config["cat"].r == 6 and k.peft_config["cat"].lora_alpha == 6 and not k.peft_config["cat"].use_rslora


def test_negating_one_adapter_with_linear_gives_minus_its_update():
    _, k = pair()
    k.add_weighted_adapter(["a"], [-1.0], "neg", combination_type="linear")
    torch.testing.assert_close(delta(k, "neg"), -delta(k, "a"), rtol=1e-5, atol=1e-6)


def test_dora_adapters_combine_through_their_whole_update():
    torch.manual_seed(0)
    k = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for n, t in k.named_parameters():
            if "lora_magnitude_vector" in n:
                t.mul_(1.3)
    expected = run(k, "default")
    k.add_weighted_adapter(["default"], [1.0], "full", combination_type="svd", svd_rank=64)  # full rank: exact
    torch.testing.assert_close(run(k, "full"), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="DoRA adapters \\['default'\\] change the weight by a rescaled direction"):
        k.add_weighted_adapter(["default"], [1.0], "cat", combination_type="cat")


def test_refusals_leave_the_model_as_it_was():
    _, k = pair(r=(4, 2))
    before = {n: t.clone() for n, t in k.state_dict().items()}
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'c'"):
        k.add_weighted_adapter(["a", "c"], [1, 1], "x")
    with pytest.raises(ConfigError, match="weights must be 2 finite numbers"):
        k.add_weighted_adapter(["a", "b"], [1.0], "x")
    with pytest.raises(ConfigError, match="the ranks must be equal"):
        k.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ConfigError, match="needs density in \\(0, 1\\]"):
        k.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="ties_svd")
    with pytest.raises(ConfigError, match="combination_type='sum' is not known"):
        k.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="sum")
    with pytest.raises(AdapterExistsError):
        k.add_weighted_adapter(["a", "b"], [1, 1], "b")
    assert set(k.peft_config) == {"a", "b"}
    after = k.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
