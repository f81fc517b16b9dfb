"""``safe_merge``: all or nothing. Every layer's merged weight is checked in the base's own dtype before any is written.

The adapters here are finite everywhere; only the merged weight of the *last* adapted layer overflows, in the
half-precision base (W + ΔW past the dtype's largest value, or DoRA's rescale of its rows).
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import MergeError
from lorakit.tuners.lora.layer import LoraLayer

LAST = "model.layers.1.self_attn.v_proj"  # the last layer the adapters below adapt


def half_model(dtype, use_dora):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora, init_lora_weights=False
    )
    return get_peft_model(tiny_llama().to(dtype), config)


def overflow_last_layer(model, dtype):
    """Put the largest finite value of ``dtype`` at W[0, 0] of the last adapted layer, and make ΔW[0, 0] a large
    positive (finite) number: W + ΔW overflows there and nowhere else."""
    layer = model.get_base_model().get_submodule(LAST)
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = torch.finfo(dtype).max
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a[:, 0] = 1.0
        b[0, :] = 0.05 * torch.finfo(dtype).max / (layer.scaling["default"] * layer.r["default"])
    assert torch.isfinite(layer.delta_weight("default")).all()
    return layer


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_untouched(model, before):
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), f"{n} changed"
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(not layer.merged_adapters for layer in layers)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_safe_merge_that_overflows_in_the_last_layer_merges_nothing(dtype, use_dora):
    model = half_model(dtype, use_dora)
    overflow_last_layer(model, dtype)
    before = snapshot(model)
    with pytest.raises(MergeError, match="merging adapter 'default' would put NaN/Inf.*nothing was merged") as error:
        model.merge_adapter(safe_merge=True)
    assert_untouched(model, before)
    assert str(error.value).startswith(f"{LAST}: ")  # the message names the layer


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_and_unload_with_safe_merge_leaves_the_model_as_it_was(dtype, use_dora):
    model = half_model(dtype, use_dora)
    overflow_last_layer(model, dtype)
    before = snapshot(model)
    with pytest.raises(MergeError, match="nothing was merged"):
        model.merge_and_unload(safe_merge=True)
    assert_untouched(model, before)
    assert isinstance(model.get_base_model().get_submodule(LAST), LoraLayer)


def test_safe_merge_refuses_a_dora_rescale_that_overflows():
    """W + ΔW is finite; DoRA's m / ‖W + ΔW‖ takes a row of it past float16's largest value."""
    model = half_model(torch.float16, use_dora=True)
    layer = model.get_base_model().get_submodule(LAST)
    variant = layer.variant["default"]
    with torch.no_grad():
        layer.base_layer.weight[0].fill_(0.5 * torch.finfo(torch.float16).max)
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude[0] = 4 * variant.norm(layer, "default")[0]
        merged_sum = layer.base_layer.weight + layer.delta_weight("default").half()
    assert torch.isfinite(merged_sum).all()
    before = snapshot(model)
    with pytest.raises(MergeError, match="nothing was merged"):
        model.merge_adapter(safe_merge=True)
    assert_untouched(model, before)


def test_safe_merge_of_several_adapters_in_one_layer_is_all_or_nothing():
    """The second adapter's overflow undoes nothing of the first's: it was never written."""
    model = half_model(torch.float16, use_dora=False)
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["v_proj"], use_dora=True, init_lora_weights=False))
    layer = model.get_base_model().get_submodule(LAST)
    with torch.no_grad():
        layer.base_layer.weight[0].fill_(0.5 * torch.finfo(torch.float16).max)
        layer.lora_magnitude_vector["dora"].weight[0] = 4 * layer.variant["dora"].norm(layer, "dora")[0]
    before = snapshot(model)
    with pytest.raises(MergeError, match="merging adapter 'dora'"):
        model.base_model.merge(["default", "dora"], safe_merge=True)
    assert_untouched(model, before)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_safe_merge_that_fits_writes_what_a_plain_merge_writes(use_dora):
    safe, plain = half_model(torch.float16, use_dora), half_model(torch.float16, use_dora)
    plain.load_state_dict(safe.state_dict())
    safe.merge_adapter(safe_merge=True)
    plain.merge_adapter()
    for (n, p), q in zip(safe.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n
    assert all(m.merged_adapters == ["default"] for m in safe.modules() if isinstance(m, LoraLayer))


def test_without_safe_merge_an_overflow_is_written_as_before():
    model = half_model(torch.float16, use_dora=False)
    layer = overflow_last_layer(model, torch.float16)
    model.merge_adapter()
    assert not torch.isfinite(layer.base_layer.weight).all()
    assert all(m.merged_adapters == ["default"] for m in model.modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_4bit_base_is_checked_as_merge_and_unload_dequantizes_it(use_dora):
    """A 4-bit base is merged into its dequantized float16 copy: an overflow there refuses before any layer is
    dequantized, and the model keeps its quantized layers."""
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes")
    from lorakit import quantize

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=use_dora, init_lora_weights=False)
    model = get_peft_model(quantize(tiny_llama(), bits=4), config)
    layer = model.get_base_model().get_submodule(LAST)
    with torch.no_grad():  # ΔW[0, 0] is finite in float32, past float16's largest value
        layer.lora_A["default"].weight[:, 0] = 1.0
        layer.lora_B["default"].weight[0, :] = 2 * 65504 / (layer.scaling["default"] * layer.r["default"])
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(MergeError, match=f"{LAST}: merging adapter 'default'.*float16"):
        model.merge_and_unload(safe_merge=True, dequantize_dtype=torch.float16)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
    assert layer.kind.quantized and type(layer.base_layer).__name__ == "Linear4bit"
    merged = model.merge_and_unload(safe_merge=True)  # in float32 it fits
    assert merged.get_submodule(LAST).weight.dtype == torch.float32


def test_a_merge_into_a_quantized_base_is_refused_before_any_layer_is_written():
    bnb = pytest.importorskip("bitsandbytes")  # noqa: F841
    from lorakit.kbit import quantize

    base = tiny_llama()
    quantize(base, bits=4, skip_modules=["model.layers.0.self_attn.q_proj"])  # layer 0 full precision, layer 1 4-bit
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "layers.0" in n}
    with pytest.raises(MergeError, match="quantized"):
        model.merge_adapter()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert not any(getattr(m, "merged_adapters", None) for m in model.modules())
