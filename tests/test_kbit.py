"""QLoRA: 4-bit (and 8-bit) bitsandbytes base layers under lorakit's LoRA and DoRA, on CPU.

The reference for a quantized layer is a plain ``nn.Linear`` holding the weight bitsandbytes dequantizes to:
LoRA on the 4-bit layer must equal LoRA on that fp32 layer up to the kernel's rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from conftest import input_ids, tiny_gpt2, tiny_llama
from lorakit import LoraConfig, get_peft_model, prepare_model_for_kbit_training, quantize
from lorakit.errors import ConfigError, MergeError
from lorakit.layers import kind_for
from lorakit.tuners.lora.layer import LoraLayer

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need bitsandbytes (CI installs it)")

TARGETS = ["q_proj", "v_proj", "down_proj"]
# The 16 NF4 levels (QLoRA paper, appendix E); the widest gap is between the two most negative, -1 and -0.696.
NF4_HALF_STEP = (1.0 - 0.6961928009986877) / 2


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every bitsandbytes layer replaced by an fp32 nn.Linear of its dequantized weight."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, LoraLayer):
            module.dequantize()
            continue
        kind = kind_for(module)
        if kind is not None and kind.quantized:
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, kind.dequantize(module))
    return plain


def quantized_llama(**kw) -> nn.Module:
    return quantize(tiny_llama(**kw), bits=4)


def pretend_avx512bf16(monkeypatch: pytest.MonkeyPatch) -> bool:
    """Make every ``Linear4bit`` built from now on believe its CPU has AVX512-BF16, which bitsandbytes checks
    once per layer when it builds one (``support_avx512bf16_for_cpu``): an eval forward then repacks the weight
    for bitsandbytes' CPU kernel (lorakit.layers.quantized), whatever this CPU is.

    Returns:
        whether this CPU can also run that kernel (where it cannot, tests repack without calling it).
    """
    import bitsandbytes.functional as bnbf

    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: True)
    return bool(bnbf.has_avx512bf16())


@pytest.fixture(params=["this", "avx512bf16"])
def any_cpu(request, monkeypatch) -> str:
    """Run the test as this CPU is, and again as on a CPU with AVX512-BF16 (:func:`pretend_avx512bf16`)."""
    if request.param == "avx512bf16":
        pretend_avx512bf16(monkeypatch)
    return request.param


def guard_repacking(model: nn.Module) -> nn.Module:
    """``model`` with bitsandbytes' CPU repacking turned off where it does not suit a layer, as lorakit does for
    the 4-bit layers it makes or wraps (lorakit.layers.quantized.cpu_repacking_fits). A model plain transformers
    loads keeps it on: on an AVX512-BF16 CPU its 32-wide layers fail at the first eval forward (``shape '[32, 0]'
    is invalid``) with no lorakit involved."""
    from lorakit.layers.quantized import guard_cpu_repacking, is_bnb_layer

    for module in model.modules():
        if is_bnb_layer(module, "Linear4bit"):
            guard_cpu_repacking(module)
    return model


def test_quantize_replaces_every_linear_but_the_head():
    model = quantized_llama()
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("_proj",))}
    assert kinds == {"Linear4bit"}
    assert type(model.lm_head) is nn.Linear
    gpt2 = quantize(tiny_gpt2(), bits=4)  # transformers' Conv1D is converted too (transposed to (out, in))
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(gpt2(ids).logits, tiny_gpt2()(ids).logits, rtol=0, atol=0.25)


def test_nf4_round_trip_is_within_half_a_step_of_each_block():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    holder = nn.Sequential(linear)
    quantize(holder, bits=4, double_quant=False)
    q = holder[0]
    w = linear.weight.detach().reshape(-1, 64)  # bitsandbytes' blocks: 64 consecutive weights
    err = (kind_for(q).dequantized_weight(q).reshape(-1, 64) - w).abs()
    bound = NF4_HALF_STEP * w.abs().amax(dim=1, keepdim=True)
    assert (err <= bound * (1 + 1e-3) + 1e-7).all()
    assert err.max() > 0  # it is quantized


def test_double_quant_adds_little_error():
    torch.manual_seed(0)
    errors = {}
    for dq in (False, True):
        linear = nn.Linear(256, 256)
        holder = nn.Sequential(copy.deepcopy(linear))
        quantize(holder, bits=4, double_quant=dq)
        errors[dq] = (kind_for(holder[0]).dequantized_weight(holder[0]) - linear.weight).norm() / linear.weight.norm()
    assert errors[True] < errors[False] * 1.05


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_4bit_equals_lora_on_the_dequantized_layer(use_dora):
    ids = input_ids()
    model = quantized_llama()
    plain = dequantized_copy(model)
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora)
    torch.manual_seed(1)
    q = get_peft_model(model, LoraConfig(**cfg))
    p = get_peft_model(plain, LoraConfig(**cfg))
    p.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    with torch.no_grad():
        got, want = q(input_ids=ids).logits, p(input_ids=ids).logits
    assert not torch.allclose(got, dequantized_copy(quantized_llama())(input_ids=ids).logits.detach())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_8bit_layers_take_adapters_too():
    ids = input_ids()
    model = quantize(tiny_llama(), bits=8)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    plain = dequantized_copy(model)
    cfg = dict(r=4, target_modules=TARGETS, init_lora_weights=False)
    q = get_peft_model(model, LoraConfig(**cfg))
    p = get_peft_model(plain, LoraConfig(**cfg))
    p.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(q(input_ids=ids).logits, p(input_ids=ids).logits, rtol=0, atol=0.05)


def test_training_follows_lora_on_the_dequantized_model_and_leaves_the_base_alone():
    """QLoRA's loss curve equals LoRA's on the dequantized fp32 weights (the same function), and it falls."""
    ids = input_ids(batch=4, seq=12)
    quantized = prepare_model_for_kbit_training(quantized_llama())
    curves, frozen_after = [], {}
    for model in (quantized, dequantized_copy(quantized)):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        peft_model.train()
        losses = []
        for _ in range(20):
            loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
        frozen_after = {n: p for n, p in peft_model.named_parameters() if n in frozen}
        assert all(torch.equal(frozen_after[n].detach(), frozen[n]) for n in frozen)
    qlora, lora = curves
    assert qlora[-1] < 0.92 * qlora[0], qlora
    torch.testing.assert_close(torch.tensor(qlora), torch.tensor(lora), rtol=1e-3, atol=1e-3)


def test_saved_adapter_is_plain_lora_that_loads_on_the_unquantized_base(tmp_path):
    ids = input_ids()
    model = quantized_llama()
    plain = dequantized_copy(model)
    q = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    q.save_pretrained(tmp_path / "qlora")
    reference = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    reference.save_pretrained(tmp_path / "fp32")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "qlora" / "adapter_model.safetensors").keys() == (
        load_file(tmp_path / "fp32" / "adapter_model.safetensors").keys()
    )
    loaded = lorakit.PeftModel.from_pretrained(plain, tmp_path / "qlora")  # on the dequantized fp32 weights
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, q(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_merge_refuses_to_requantize_and_merge_and_unload_dequantizes(tmp_path):
    ids = input_ids()
    q = get_peft_model(quantized_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        expected = q(input_ids=ids).logits
    before = {n: t.clone() for n, t in q.state_dict().items()}
    with pytest.raises(MergeError, match="requantize"):
        q.merge_adapter()
    for name, tensor in q.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    merged = q.merge_and_unload()
    assert not any(lorakit.kbit.is_quantized_layer(m) or isinstance(m, LoraLayer) for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")  # plain transformers reloads it
    again = type(merged).from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_and_unload_in_bf16():
    q = get_peft_model(quantized_llama(), LoraConfig(r=4, target_modules=TARGETS))
    merged = q.merge_and_unload(dequantize_dtype=torch.bfloat16)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_prepare_model_for_kbit_training_upcasts_and_checkpoints():
    model = quantize(tiny_llama().to(torch.bfloat16), bits=4)
    assert model.model.norm.weight.dtype == torch.bfloat16
    prepare_model_for_kbit_training(model)
    assert model.model.norm.weight.dtype == torch.float32
    assert all(not p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="bits=3 is not supported"):
        quantize(tiny_llama(), bits=3)
    with pytest.raises(ConfigError, match="quant_type='int4' is not supported; accepted: nf4, fp4"):
        quantize(tiny_llama(), quant_type="int4")
    merged = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    merged.merge_adapter()
    with pytest.raises(ConfigError, match="unmerge them before quantizing"):
        quantize(merged)
    with pytest.raises(ConfigError, match="loftq_bits=2 is not supported"):
        get_peft_model(tiny_llama(), LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2}))
    with pytest.raises(ConfigError, match="needs loftq_config"):
        LoraConfig(init_lora_weights="loftq")


def test_quantizing_an_adapted_model_quantizes_only_the_base_layers():
    ids = input_ids()
    adapted = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    quantize(adapted)
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer) and layer.kind.name == "linear4bit"
    assert type(layer.lora_A["default"]) is nn.Linear  # the adapter stays in full precision
    assert type(adapted.base_model.model.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"
    reference = dequantized_copy(adapted)
    assert not any(lorakit.kbit.is_quantized_layer(m) for m in reference.modules())
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-2)


def test_loftq_factors_are_the_best_rank_r_fix_of_the_quantization_error():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.05
    from lorakit.tuners.lora.loftq import loftq_factors, nf4_round_trip

    q, a, b = loftq_factors(w, r=4, scaling=2.0, iters=1)
    torch.testing.assert_close(q, nf4_round_trip(w))
    sigma = torch.linalg.svdvals(w - q)
    residual = torch.linalg.norm(w - q - 2.0 * b @ a)
    torch.testing.assert_close(residual, sigma[4:].square().sum().sqrt(), rtol=1e-4, atol=1e-6)  # Eckart-Young
    assert residual < torch.linalg.norm(w - q)
    q5, a5, b5 = loftq_factors(w, r=4, scaling=2.0, iters=5)
    assert torch.linalg.norm(w - q5 - 2.0 * b5 @ a5) <= residual * 1.01  # more alternations do not hurt


def test_loftq_then_quantize_starts_closer_to_the_full_precision_model():
    ids = input_ids()
    original = tiny_llama(initializer_range=0.2)  # larger weights: a visible quantization error
    with torch.no_grad():
        expected = original(input_ids=ids).logits
    cfg = dict(r=8, lora_alpha=16, target_modules="all-linear")
    loftq = get_peft_model(
        tiny_llama(initializer_range=0.2),
        LoraConfig(**cfg, init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2}),
    )
    q_weight = loftq.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.detach().clone()
    quantize(loftq)
    layer = loftq.base_model.model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(layer.kind.dequantized_weight(layer.base_layer), q_weight, rtol=0, atol=1e-3)
    plain = get_peft_model(quantize(tiny_llama(initializer_range=0.2)), LoraConfig(**cfg))  # B = 0: just Q
    with torch.no_grad():
        loftq_gap = (loftq(input_ids=ids).logits - expected).abs().mean()
        plain_gap = (plain(input_ids=ids).logits - expected).abs().mean()
    assert loftq_gap < 0.8 * plain_gap, (loftq_gap, plain_gap)


def test_transformers_4bit_load_trains_and_merges_into_a_plain_model(tmp_path, any_cpu):
    """The other way in: from_pretrained(quantization_config=BitsAndBytesConfig(...)), on CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ids = input_ids()
    tiny_llama().save_pretrained(tmp_path / "base")
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config, device_map="cpu")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = get_peft_model(
        prepare_model_for_kbit_training(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    )
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, full precision
    assert getattr(again.config, "quantization_config", None) is None
    assert type(again.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(64, 128), (1536, 576), (100, 36)])
def test_estimate_nf4_bytes_equal_what_bitsandbytes_stores(shape, double_quant):
    """``lorakit estimate``'s 4-bit formula against the real storage (code tables aside, as it says)."""
    from lorakit.estimate import nf4_bytes

    holder = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
    quantize(holder, bits=4, double_quant=double_quant)
    weight = holder[0].weight
    stored = weight.numel() * weight.element_size()
    state = weight.quant_state
    while state is not None:
        for name in ("absmax", "offset"):
            t = getattr(state, name, None)
            if isinstance(t, torch.Tensor):
                stored += t.numel() * t.element_size()
        state = getattr(state, "state2", None)
    assert stored == nf4_bytes(shape[0] * shape[1], double_quant=double_quant)


def test_failed_loftq_injection_restores_the_base_weights():
    model = nn.Sequential(nn.Linear(64, 64), nn.Embedding(10, 64))  # LoftQ takes the Linear, refuses the Embedding
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(r=4, target_modules=["0", "1"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.raises(ConfigError, match="LoftQ initialises full-precision linear layers"):
        get_peft_model(model, config)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Embedding
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("make, bits", [(tiny_llama, 4), (tiny_gpt2, 4), (tiny_llama, 8)])
def test_a_quantized_model_saves_pre_quantized_and_plain_transformers_loads_it(tmp_path, make, bits, any_cpu):
    """quantize() records the BitsAndBytesConfig: save_pretrained writes the packed weights and constants, and
    from_pretrained (no lorakit, no quantization arguments) rebuilds the same bitsandbytes layers."""
    from transformers import AutoModelForCausalLM

    ids = input_ids()
    model = quantize(make(), bits=bits).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "q")
    again = guard_repacking(AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval())
    kinds = {type(m).__name__ for m in again.modules()}
    assert ("Linear4bit" if bits == 4 else "Linear8bitLt") in kinds
    assert type(again.get_output_embeddings()) is nn.Linear  # the head stays full precision
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=0, atol=0)
    settings = again.config.quantization_config
    assert (settings.load_in_4bit, settings.load_in_8bit) == (bits == 4, bits == 8)


def test_replace_lora_weights_loftq_fits_the_residual_of_the_quantized_base(tmp_path):
    """PEFT's replace_lora_weights_loftq: A, B = rank-r SVD of W − Q with Q the stored 4-bit weight, from the
    original safetensors files or from weights in memory; the base is left as quantized."""
    from transformers import AutoModelForCausalLM

    original = tiny_llama(initializer_range=0.2)
    original.save_pretrained(tmp_path / "fp32")
    w = original.model.layers[1].mlp.down_proj.weight.detach().clone()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    model = get_peft_model(quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")), cfg)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    stored = layer.base_layer.weight.detach().clone()
    report = lorakit.replace_lora_weights_loftq(model)  # default: the files the model was loaded from
    assert set(report) == {f"model.layers.{i}.{t}" for i in range(2) for t in
                           ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}  # fmt: skip
    q = layer.kind.dequantized_weight(layer.base_layer).float()
    sigma = torch.linalg.svdvals(w - q)
    fit = report["model.layers.1.mlp.down_proj"]
    assert fit["quantization_error"] == pytest.approx(torch.linalg.norm(w - q).item(), rel=1e-5)
    assert fit["loftq_error"] == pytest.approx(sigma[4:].square().sum().sqrt().item(), rel=1e-4)  # Eckart-Young
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.linalg.norm(w - q - delta).item() == pytest.approx(fit["loftq_error"], rel=1e-4)
    assert torch.equal(layer.base_layer.weight, stored)  # the base is not touched

    in_memory = get_peft_model(quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")), cfg)
    weights = {name: original.get_submodule(name).weight for name in report}
    assert lorakit.replace_lora_weights_loftq(in_memory, weights=weights) == report


def test_replace_lora_weights_loftq_refusals_leave_the_adapters_alone(tmp_path):
    model = get_peft_model(quantized_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    before = {n: t.clone() for n, t in model.state_dict().items() if "lora_" in n}
    with pytest.raises(ConfigError, match="no original weight for 6 adapted layer"):
        lorakit.replace_lora_weights_loftq(model, weights={})
    plain = tiny_llama()
    weights = {
        n: plain.get_submodule(n).weight
        for n, m in model.base_model.model.named_modules()
        if "lora_A" in dict(m.named_children())
    }
    weights["model.layers.1.mlp.down_proj"] = torch.zeros(64, 32)  # the last one fitted: the others are undone
    with pytest.raises(
        ConfigError, match=r"the original weight has shape \(64, 32\); the quantized layer holds \(32, 64\)"
    ):
        lorakit.replace_lora_weights_loftq(model, weights=weights)
    with pytest.raises(ConfigError, match="no safetensors files"):
        lorakit.replace_lora_weights_loftq(model, model_path=tmp_path)
    with pytest.raises(ConfigError, match="not on a quantized base|on a quantized base"):
        lorakit.replace_lora_weights_loftq(get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS)))
    gpt2 = get_peft_model(quantize(tiny_gpt2()), LoraConfig(r=4, target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match=r"Conv1D weights as \(in, out\)"):
        lorakit.replace_lora_weights_loftq(gpt2, model_path=tmp_path)
    for n, t in model.state_dict().items():
        if n in before:
            assert torch.equal(t, before[n]), n
