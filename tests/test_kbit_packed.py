"""4-bit layers after bitsandbytes' CPU repacking: what lorakit reads from them is the weight they compute with.

On a CPU with AVX512-BF16, bitsandbytes (>= 0.49) repacks a ``Linear4bit`` at its first no-grad eval forward
for its bf16 CPU kernel: the codes are reordered and the block scales are kept as bf16 (lorakit.layers.quantized
describes both layouts). The reference for every test is closed form, from the bytes in bitsandbytes' reference
layout captured before the repacking: weight = code[c] · bf16(scale of c's block).

Every test runs on any CPU: the ``kernel`` fixture makes bitsandbytes believe the CPU has AVX512-BF16
when it builds each layer, and where this CPU cannot run the packed kernel, :func:`eval_forward` calls the
repacking function the forward would call instead of running the forward.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit
from conftest import input_ids, tiny_llama
from lorakit import LoraConfig, get_peft_model, prepare_model_for_kbit_training, quantize
from lorakit.layers import kind_for
from lorakit.layers.quantized import dequantize_4bit_weight, is_bnb_layer, is_cpu_packed
from lorakit.tuners.lora.layer import LoraLayer
from test_kbit import pretend_avx512bf16

bnbf = pytest.importorskip("bitsandbytes.functional", reason="QLoRA tests need bitsandbytes (CI installs it)")


@pytest.fixture(autouse=True)
def kernel(monkeypatch) -> bool:
    """Every test as on a CPU with AVX512-BF16; True where this CPU can run bitsandbytes' packed kernel."""
    return pretend_avx512bf16(monkeypatch)


TARGETS = ["q_proj", "v_proj", "down_proj"]
BF16 = torch.bfloat16


def wide_llama(**kw) -> nn.Module:
    """The issue's model: a tiny LLaMA 128 wide, every linear a shape bitsandbytes' CPU kernel takes."""
    return tiny_llama(hidden_size=128, intermediate_size=256, **kw)


def linears_4bit(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_bnb_layer(m, "Linear4bit")}


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, object]]:
    """The reference-layout bytes and state of every 4-bit layer (the repacking rewrites both in place)."""
    return {n: (m.weight.data.clone(), copy.deepcopy(m.weight.quant_state)) for n, m in linears_4bit(model).items()}


def closed_form(data: torch.Tensor, state, bf16_scales: bool = True) -> torch.Tensor:
    """``(out, in)`` in fp32 from reference-layout bytes: two codes per byte (high nibble first) in row-major
    order, times the scale of their block of ``blocksize``, rounded to bf16 as the repacking keeps it."""
    scales = state.absmax
    if state.nested:  # double quantization: 8-bit codes of (scale - offset), QLoRA paper §3
        scales = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    scales = scales.float().to(BF16).float() if bf16_scales else scales.float()
    flat = data.view(torch.uint8).reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1).long()
    return (state.code.float()[codes].reshape(-1, state.blocksize) * scales[:, None]).reshape(state.shape)


def eval_forward(model: nn.Module, run, kernel: bool) -> torch.Tensor | None:
    """``run(model)`` in eval mode under no_grad where this CPU runs bitsandbytes' packed kernel; elsewhere only
    the repacking that forward does, by bitsandbytes' own function, on the layers it would repack."""
    model.eval()
    if kernel:
        with torch.no_grad():
            return run(model)
    for m in linears_4bit(model).values():
        if m.support_avx512bf16_for_cpu and not is_cpu_packed(m.weight.quant_state):
            m.weight.data, m.weight.quant_state = bnbf._convert_weight_packed_for_cpu(
                m.weight.data, m.weight.quant_state
            )
    return None


def logits(ids: torch.Tensor):
    return lambda model: model(input_ids=ids).logits


def lora_delta(layer: LoraLayer) -> torch.Tensor:
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (layer.scaling["default"] * b @ a).detach().float()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reading_a_repacked_weight_gives_its_codes_times_the_bf16_scales(kernel, quant_type, double_quant):
    torch.manual_seed(0)
    holder = quantize(
        nn.Sequential(nn.Linear(256, 96)), quant_type=quant_type, double_quant=double_quant, compute_dtype=BF16
    )
    (data, state), layer = snapshot(holder)["0"], holder[0]
    eval_forward(holder, lambda m: m(torch.randn(3, 256)), kernel)
    assert is_cpu_packed(layer.weight.quant_state)
    packed = layer.weight.data.clone()

    got = dequantize_4bit_weight(layer)
    torch.testing.assert_close(got, closed_form(data, state), rtol=0, atol=0)
    unrounded = closed_form(data, state, bf16_scales=False)  # 8 significant bits: within 2^-8 of each weight
    assert ((got - unrounded).abs() <= unrounded.abs() * 2**-8).all()
    assert is_cpu_packed(layer.weight.quant_state) and torch.equal(layer.weight.data, packed)  # read, not undone
    torch.testing.assert_close(kind_for(layer).dequantized_weight(layer), got.to(BF16), rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("compute_dtype", [BF16, torch.float32])
def test_merge_after_eval_forward_matches_unpacked_reference(kernel, compute_dtype, use_dora):
    """merge_and_unload after one eval forward: each weight is the reference weight with bf16 block scales.
    Reading the repacked bytes as the reference layout put the merged logits 1.15 off on a scale of 0.79; the
    scales' rounding moves them by 0.005. An fp32 layer is not repacked by lorakit's choice; it is forced
    here, as bitsandbytes alone would."""
    ids = input_ids()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora)
    model = get_peft_model(quantize(wide_llama(), compute_dtype=compute_dtype), cfg)
    reference = copy.deepcopy(model)
    for m in linears_4bit(model).values():
        m.support_avx512bf16_for_cpu = True
    before = snapshot(model)
    eval_forward(model, logits(ids), kernel)
    assert all(is_cpu_packed(m.weight.quant_state) for m in linears_4bit(model).values())

    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    deltas = {n: lora_delta(m) for n, m in layers.items()}
    magnitudes = {n: m.lora_magnitude_vector["default"].weight.detach().float() for n, m in layers.items() if use_dora}
    merged = model.merge_and_unload(dequantize_dtype=torch.float32)
    for name, (data, state) in before.items():
        module = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        w = closed_form(data, state).to(compute_dtype).float()  # dequantized in the compute dtype, then fp32
        if module in deltas:
            w = w + deltas[module]
            if use_dora:  # DoRA (arXiv 2402.09353, eq. 5): m · (W + ΔW) / ‖W + ΔW‖ per output row
                w = magnitudes[module][:, None] * w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
        torch.testing.assert_close(merged.get_submodule(module).weight, w, msg=module)
    with torch.no_grad():
        want = reference.merge_and_unload(dequantize_dtype=torch.float32)(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)  # the scales' bf16 rounding, nothing more


def test_dora_norms_of_a_repacked_weight_match_the_reference(kernel):
    """DoRA's ‖W_i‖² (one dequantization) and ‖W + s·BA‖ per row on repacked bases, against the closed form."""
    ids = input_ids()
    cfg = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, use_dora=True)
    model = get_peft_model(quantize(wide_llama(), compute_dtype=BF16), cfg)
    reference = copy.deepcopy(model)
    for m in linears_4bit(reference).values():
        m.support_avx512bf16_for_cpu = False  # stays in the reference layout
    before = snapshot(model)
    got = eval_forward(model, logits(ids), kernel)
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        assert is_cpu_packed(layer.base_layer.weight.quant_state), name
        w = closed_form(*before[f"base_model.model.{name}.base_layer"]).to(BF16).float()  # in the compute dtype
        want = torch.linalg.vector_norm(w, dim=1).square()
        torch.testing.assert_close(layer.kind.row_sq_norms(layer.base_layer, torch.float32), want, msg=name)
        if got is not None:  # A Wᵀ comes from the layer's own forward: the packed kernel, in bf16
            with torch.no_grad():
                norm = layer.variant["default"].norm(layer, "default")
            want = torch.linalg.vector_norm(w + lora_delta(layer), dim=1)
            torch.testing.assert_close(norm, want, rtol=2e-3, atol=0, msg=name)
    if got is not None:
        with torch.no_grad():
            torch.testing.assert_close(got, reference.eval()(input_ids=ids).logits, rtol=0, atol=1e-2)


@pytest.mark.parametrize("double_quant", [True, False])
def test_saving_after_eval_forward_keeps_the_weight_the_model_computed_with(tmp_path, kernel, double_quant):
    """save_pretrained after an eval forward writes the reference layout holding exactly the repacked weight
    (bitsandbytes' own inverse quantizes the scales again, or leaves single-quantized ones transposed), the
    model in memory keeps it, plain transformers loads it back, and a second save writes the same tensors."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = input_ids()
    model = quantize(wide_llama(), compute_dtype=BF16, double_quant=double_quant)
    before = snapshot(model)
    expected = eval_forward(model, logits(ids), kernel)
    computed = {name: closed_form(*before[name]) for name in before}
    model.save_pretrained(tmp_path / "a")
    for name, m in linears_4bit(model).items():
        torch.testing.assert_close(dequantize_4bit_weight(m), computed[name], rtol=0, atol=0, msg=name)

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    for name, m in linears_4bit(again).items():
        torch.testing.assert_close(dequantize_4bit_weight(m), computed[name], rtol=0, atol=0, msg=name)
    if expected is not None:
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)
    eval_forward(model, logits(ids), kernel)  # repacked again, saved again: the same bytes
    model.save_pretrained(tmp_path / "b")
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_loftq_on_a_repacked_base_fits_the_weight_the_base_computes_with(kernel):
    ids = input_ids()
    original = wide_llama(initializer_range=0.2)
    model = get_peft_model(
        quantize(copy.deepcopy(original), compute_dtype=BF16), LoraConfig(r=4, target_modules=TARGETS)
    )
    before = snapshot(model)
    eval_forward(model, logits(ids), kernel)
    names = [n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    report = lorakit.replace_lora_weights_loftq(model, weights={n: original.get_submodule(n).weight for n in names})
    for name in names:
        w = original.get_submodule(name).weight.detach()
        q = closed_form(*before[f"base_model.model.{name}.base_layer"]).to(BF16).float()
        sigma = torch.linalg.svdvals(w - q)
        assert report[name]["quantization_error"] == pytest.approx(torch.linalg.norm(w - q).item(), rel=1e-5)
        assert report[name]["loftq_error"] == pytest.approx(sigma[4:].square().sum().sqrt().item(), rel=1e-4)


def test_layers_the_cpu_kernel_cannot_take_are_never_repacked(kernel):
    """The 32-wide test LLaMA: bitsandbytes' repacking fails on an input narrower than a block of 64 (``shape
    '[32, 0]' is invalid``); lorakit leaves those layers in the reference layout and repacks the rest."""
    ids = input_ids()
    model = get_peft_model(quantize(tiny_llama(), compute_dtype=BF16), LoraConfig(r=4, target_modules=TARGETS))
    before = snapshot(model)
    eval_forward(model, logits(ids), kernel)
    for name, m in linears_4bit(model).items():
        packed = is_cpu_packed(m.weight.quant_state)
        assert packed == (m.in_features % 64 == 0), name
        # Unpacked: bitsandbytes' own dequantization is the reference (its AVX512 one differs from the closed
        # form when blocks straddle rows, and the layer computes with it).
        want = closed_form(*before[name]) if packed else bnbf.dequantize_4bit(*before[name])
        torch.testing.assert_close(dequantize_4bit_weight(m), want, rtol=0, atol=0, msg=name)
    assert is_cpu_packed(model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.quant_state)


def test_only_layers_computing_in_bf16_are_left_to_the_repacking():
    """The packed kernel computes in bf16 whatever the layer's compute dtype; lorakit lets it run only where
    that is the compute dtype, and turns it off on every 4-bit layer (wrapped or not) of a model it adapts that
    transformers loaded otherwise."""
    assert all(m.support_avx512bf16_for_cpu for m in linears_4bit(quantize(wide_llama(), compute_dtype=BF16)).values())
    fp32 = quantize(wide_llama())
    assert not any(m.support_avx512bf16_for_cpu for m in linears_4bit(fp32).values())
    for m in linears_4bit(fp32).values():
        m.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on the layers transformers builds
    wrapped = get_peft_model(fp32, LoraConfig(r=4, target_modules=TARGETS))
    for name, m in linears_4bit(wrapped).items():
        assert not m.support_avx512bf16_for_cpu, name


def test_prepare_model_for_kbit_training_puts_repacked_layers_back_so_gradients_flow(kernel):
    """bitsandbytes' packed kernel has no backward: a training forward on a repacked layer loses the gradient
    of everything before it (with a warning). A prepared model is back in the reference layout, and stays."""
    torch.manual_seed(0)
    holder = quantize(nn.Sequential(nn.Linear(128, 64, bias=False)), compute_dtype=BF16)
    (data, state), layer = snapshot(holder)["0"], holder[0]
    x = torch.randn(3, 128)
    eval_forward(holder, lambda m: m(x), kernel)
    assert is_cpu_packed(layer.weight.quant_state)
    prepare_model_for_kbit_training(holder, use_gradient_checkpointing=False)
    assert not is_cpu_packed(layer.weight.quant_state) and not layer.support_avx512bf16_for_cpu
    torch.testing.assert_close(dequantize_4bit_weight(layer), closed_form(data, state), rtol=0, atol=0)
    eval_forward(holder, lambda m: m(x), kernel)
    assert not is_cpu_packed(layer.weight.quant_state)

    holder.train()
    inputs = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "an autograd kernel was not registered" is the lost gradient
        holder(inputs).float().sum().backward()
    w = closed_form(data, state).to(BF16)
    torch.testing.assert_close(inputs.grad, torch.ones(3, 64, dtype=BF16).matmul(w).float(), rtol=1e-2, atol=1e-2)


def test_a_training_forward_after_an_eval_forward_keeps_its_gradients_without_prepare(kernel):
    """A 4-bit model lorakit did not quantize (as transformers loads one) under get_peft_model, with no
    prepare_model_for_kbit_training: an eval forward may repack the frozen layers, and the next training forward
    still gives every adapter before them its gradient (the reference kernel runs whenever grad is recorded)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128, bias=False), nn.Linear(128, 64, bias=False))
    frozen = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=BF16, quant_type="nf4")
    frozen.load_state_dict({"weight": model[1].weight.detach().clone()})
    model[1] = frozen.to("cpu")
    assert is_bnb_layer(model[1], "Linear4bit")
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(3, 128)
    eval_forward(peft, lambda m: m(x), kernel)
    assert not kernel or model[1].support_avx512bf16_for_cpu  # the frozen layer may keep its fast eval kernel
    peft.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft(x).float().sum().backward()
    a = next(p for n, p in peft.named_parameters() if "lora_A" in n)
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    assert not is_cpu_packed(model[1].weight.quant_state)
