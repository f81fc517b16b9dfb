"""PiSSA, OLoRA and the orthogonal start (``init_lora_weights=...``), against their closed forms and PEFT 0.21.

Closed forms: PiSSA's factors are the top-r singular triplets of W split as ``√(S/s)``, OLoRA's the first r
columns of Q and rows of R, the orthogonal start's product is zero; every start leaves the model's output as it
was (``W_res + s·BA = W``). PEFT built from the same seed holds the same factors and residual weights; an adapter
trained from a start loads (the start re-run on the original base) with equal logits in both libraries, and
``save_pretrained(path_initial_model_for_weight_conversion=...)`` gives a plain rank-2r adapter for the original base.
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import input_ids, tiny_gpt2, tiny_llama
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import AdapterFileError, ConfigError, ShapeMismatchError
from lorakit.tuners.lora.starts import olora_factors, pissa_factors

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

STARTS = ["pissa", "pissa_niter_2", "olora", "orthogonal"]
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v for k, v in model.state_dict().items()}


def both(init: str, factory=tiny_llama, **kw) -> tuple[nn.Module, nn.Module]:
    """The same config in PEFT and lorakit, each on a fresh base built from the same seed."""
    settings = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **kw)
    return peft.get_peft_model(factory(), peft.LoraConfig(**settings)), get_peft_model(
        factory(), LoraConfig(**settings)
    )


def train_a_little(*models: nn.Module, seed: int = 5) -> None:
    """The same random step on every LoRA tensor of each model (as if trained)."""
    gen = torch.Generator().manual_seed(seed)
    per_model = [sorted((n, p) for n, p in m.named_parameters() if "lora_" in n) for m in models]
    with torch.no_grad():
        for params in zip(*per_model):
            step = torch.randn(params[0][1].shape, generator=gen) * 0.05
            for _, p in params:
                p.add_(step)


# -- creation: the closed forms, and PEFT's factors ----------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("init", STARTS)
def test_start_equals_peft_and_keeps_the_output(init, use_dora):
    p, k = both(init, use_dora=use_dora)
    ps, ks = states(p), states(k)
    assert ps.keys() == ks.keys()
    for key in ps:  # factors, residual weights, untouched weights; DoRA's norms to float rounding
        torch.testing.assert_close(ks[key], ps[key], rtol=0, atol=0 if "magnitude" not in key else 1e-6, msg=key)
    base = logits(tiny_llama())
    torch.testing.assert_close(logits(k), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(k), logits(p), rtol=1e-6, atol=1e-6)
    q = k.base_model.model.model.layers[0].self_attn.q_proj
    if init == "orthogonal":  # the base is untouched
        assert torch.equal(q.base_layer.weight, tiny_llama().model.layers[0].self_attn.q_proj.weight)
    emb = k.base_model.model.model.embed_tokens  # embeddings get LoRA's usual start, as in PEFT
    assert not emb.lora_embedding_A["default"].any() and emb.lora_embedding_B["default"].std() > 0.5


def test_pissa_factors_are_the_top_singular_triplets():
    w = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().clone()
    k = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa")
    )
    layer = k.base_model.model.model.layers[0].self_attn.q_proj
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    v, sigma, uh = torch.linalg.svd(w, full_matrices=False)
    root = (sigma[:4] / s).sqrt()
    torch.testing.assert_close(a, root[:, None] * uh[:4])
    torch.testing.assert_close(b, v[:, :4] * root)
    torch.testing.assert_close(s * b @ a, (v[:, :4] * sigma[:4]) @ uh[:4])  # W's best rank-4 approximation
    torch.testing.assert_close(layer.base_layer.weight + s * b @ a, w)
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight)[:4], sigma[4:8])  # the rest of W


def test_pissa_niter_approximates_the_full_svd():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    spectrum = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0]), torch.logspace(-1, -3, 28)])  # a gap after r = 4
    w = (u[:, :32] * spectrum) @ v.T
    a, b = pissa_factors(w, 4, 2.0)
    fa, fb = pissa_factors(w, 4, 2.0, niter=4)
    torch.testing.assert_close(2.0 * fb @ fa, 2.0 * b @ a, rtol=1e-4, atol=1e-4)
    assert not torch.equal(fa, a)  # another algorithm, signs and rounding aside


def test_olora_factors_are_the_qr_decomposition():
    w = tiny_llama().model.layers[0].mlp.down_proj.weight.detach().clone()  # (32, 64)
    k = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], init_lora_weights="olora")
    )
    layer = k.base_model.model.model.layers[0].mlp.down_proj
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal columns
    assert torch.equal(a[:, :4], torch.triu(a[:, :4]))  # R's first rows: upper trapezoidal
    torch.testing.assert_close(a, b.T @ w, rtol=1e-5, atol=1e-5)  # R = Qᵀ W
    torch.testing.assert_close(layer.base_layer.weight + s * b @ a, w)
    a2, b2 = olora_factors(w, 4)
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_orthogonal_factors_multiply_to_zero():
    k = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["v_proj"], init_lora_weights="orthogonal"))
    layer = k.base_model.model.model.layers[1].self_attn.v_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.linalg.norm(b @ a) < 1e-6 * torch.linalg.norm(a) * torch.linalg.norm(b)
    assert torch.linalg.matrix_rank(a) == torch.linalg.matrix_rank(b) == 4  # each on half of the basis
    assert torch.linalg.norm(a) > 0.1 and torch.linalg.norm(b) > 0.1


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3"])
def test_pissa_on_gpt2_conv1d_equals_peft(init):
    settings = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=init)
    p = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**settings))
    k = get_peft_model(tiny_gpt2(), LoraConfig(**settings))
    ps, ks = states(p), states(k)
    assert all(torch.equal(ks[key], ps[key]) for key in ps)
    torch.testing.assert_close(logits(k), logits(tiny_gpt2()), rtol=1e-5, atol=1e-5)


def test_olora_on_gpt2_conv1d_factors_the_out_in_matrix():
    # PEFT 0.21 factors Conv1D's stored (in, out) weight and fails at the first forward; lorakit uses (out, in)
    k = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="olora"))
    torch.testing.assert_close(logits(k), logits(tiny_gpt2()), rtol=1e-5, atol=1e-5)
    layer = k.base_model.model.transformer.h[0].attn.c_attn
    w = tiny_gpt2().transformer.h[0].attn.c_attn.weight.detach().T  # (96, 32)
    a, b = olora_factors(w, 4)
    assert torch.equal(layer.lora_A["default"].weight, a) and torch.equal(layer.lora_B["default"].weight, b)


# -- refusals, checked before anything changes -----------------------------------------------------------------------


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.conv = nn.Conv2d(3, 8, 3)


@pytest.mark.parametrize(
    ("init", "settings", "match"),
    [
        ("pissa", dict(target_modules=["lin", "conv"]), r"initialises linear layers .* not 'conv'"),
        ("olora", dict(target_modules=["lin"], r=9), r"top r=9 directions of 'lin'.* use r <= 8"),
        ("orthogonal", dict(target_modules=["lin"], r=3), r"even rank .* 'lin' has r=3"),
    ],
)
def test_impossible_starts_are_refused_and_nothing_changes(init, settings, match):
    model = Convs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        get_peft_model(model, LoraConfig(init_lora_weights=init, **settings))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert type(model.lin) is nn.Linear


def test_a_failed_injection_gives_the_base_weights_back(monkeypatch):
    from lorakit.tuners.lora import layer as layer_mod

    model, calls = tiny_llama(), []
    original = {k: v.clone() for k, v in model.state_dict().items()}
    real = layer_mod.run_start

    def failing_later(*args, **kwargs):  # the third layer fails after two were rewritten
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_mod, "run_start", failing_later)
    with pytest.raises(RuntimeError, match="out of memory"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)


def test_adding_a_start_next_to_another_adapter_warns():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="changes what the model's other adapters apply to"):
        model.add_adapter("pissa", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))


def test_adalora_keeps_its_own_start_as_in_peft():
    settings = dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"], init_lora_weights="pissa")
    k = get_peft_model(tiny_llama(), lorakit.AdaLoraConfig(**settings))
    torch.testing.assert_close(logits(k), logits(tiny_llama()), rtol=0, atol=0)
    w = k.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(w, tiny_llama().model.layers[0].self_attn.q_proj.weight)


# -- loading: the start runs again on the original base (PEFT's semantics) ------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "orthogonal"])
def test_trained_adapter_loads_both_ways_with_equal_logits(init, tmp_path):
    p, k = both(init)
    train_a_little(p, k)
    expected = logits(k)
    torch.testing.assert_close(logits(p), expected, rtol=1e-6, atol=1e-6)
    k.save_pretrained(tmp_path / "lorakit")
    p.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "lorakit" / "adapter_config.json").read_text())["init_lora_weights"] == init
    # loading re-runs the start on a fresh original base (pissa_niter draws the same RNG state: tiny_llama seeds)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")), expected)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lorakit")), expected)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "lorakit")), expected)


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_a_refused_file_gives_the_base_weights_back_after_the_start_rewrote_them(how, tmp_path):
    """Loading re-runs PiSSA, which writes the residual into the base; when the file's tensors are then refused (a
    key that matches no module), every base weight comes back bit for bit."""
    from safetensors.torch import save_file

    k = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"]))
    k.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    state["base_model.model.model.layers.0.mlp.no_such_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(state, tmp_path / "adapter_model.safetensors")
    base = tiny_llama()
    before = {n: t.clone() for n, t in base.state_dict().items()}
    with pytest.raises(AdapterFileError, match="no_such_proj"):
        if how == "from_pretrained":
            PeftModel.from_pretrained(base, tmp_path)
        else:
            host = get_peft_model(base, LoraConfig(r=2, target_modules=["k_proj"]))
            host.load_adapter(tmp_path, "pissa")
    if how == "load_adapter":  # the host model is still there: its own adapter only
        base = host.unload()
    after = base.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_a_pissa_file_on_a_quantized_base_is_refused_as_in_peft(tmp_path):
    pytest.importorskip("bitsandbytes")
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")).save_pretrained(
        tmp_path
    )
    base = lorakit.quantize(tiny_llama(), bits=4)
    with pytest.raises(ConfigError, match="needs a float base weight.*quantized"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, lorakit.tuners.lora.layer.LoraLayer) for m in base.modules())


# -- conversion to plain LoRA on the original base ------------------------------------------------------------------


def convert_both(tmp_path, init: str, **kw) -> tuple[torch.Tensor, nn.Module, nn.Module]:
    """Trained logits, and lorakit's converted adapter loaded by lorakit and PEFT on the original base."""
    k = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **kw)
    )
    k.save_pretrained(tmp_path / "initial")
    train_a_little(k)
    k.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    return (
        logits(k),
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "converted"),
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "converted"),
    )


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_gives_the_trained_model_on_the_original_base(init, tmp_path):
    expected, ours, theirs = convert_both(tmp_path, init)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    first, last = load_file(tmp_path / "initial" / "adapter_model.safetensors"), ours.base_model
    a = last.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(a[4:], first["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    b = last.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(b[:, 4:], -first["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_conversion_writes_what_peft_writes(tmp_path):
    p, k = both("pissa")
    k.save_pretrained(tmp_path / "k0")
    p.save_pretrained(tmp_path / "p0")
    train_a_little(p, k)
    k.save_pretrained(tmp_path / "k", path_initial_model_for_weight_conversion=str(tmp_path / "k0"))
    p.save_pretrained(tmp_path / "p", path_initial_model_for_weight_conversion=str(tmp_path / "p0"))
    ours = load_file(tmp_path / "k" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "p" / "adapter_model.safetensors")
    # PEFT keeps only keys holding "lora_A"/"lora_B": it drops the embedding's factors (lora_embedding_A/B), which
    # lorakit converts like the others, and every other tensor (see below)
    lora = {key: t for key, t in ours.items() if ".lora_A" in key or ".lora_B" in key}
    assert lora.keys() == theirs.keys() and all(torch.equal(lora[key], theirs[key]) for key in theirs)
    assert ours["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (8, 96)
    mine, its = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("k", "p"))
    for field in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert mine[field] == its[field], field


def test_conversion_keeps_dora_magnitudes_and_modules_to_save(tmp_path):
    # PEFT keeps only lora_A/lora_B, so its converted DoRA adapter loses the trained magnitudes; lorakit's does not:
    # DoRA normalises W + s'·B'A' = W_res + s·BA, the same matrix, so they still apply
    expected, ours, theirs = convert_both(tmp_path, "pissa", use_dora=True, modules_to_save=["lm_head"])
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


def test_conversion_with_rslora_and_patterns(tmp_path):
    # PEFT refuses this combination (it would double alpha_pattern where rsLoRA needs √2); lorakit converts it
    kw = dict(use_rslora=True, rank_pattern={"v_proj": 6}, alpha_pattern={"down_proj": 3.0})
    expected, ours, theirs = convert_both(tmp_path, "olora", **kw)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 12} and config["lora_alpha"] == pytest.approx(8 * math.sqrt(2))
    assert config["alpha_pattern"] == {"down_proj": pytest.approx(3 * math.sqrt(2))}


def test_conversion_refuses_an_initial_adapter_that_does_not_fit(tmp_path):
    k = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "r2")
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "q")
    with pytest.raises(ShapeMismatchError, match=r"lora_A.weight' is \(4, 32\) in the adapter but \(2, 32\)"):
        k.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "r2")
    with pytest.raises(AdapterFileError, match="has no .*v_proj.lora_A.weight"):
        k.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "q")
    with pytest.raises(AdapterFileError):
        k.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "missing")
    assert not (tmp_path / "out").exists()  # nothing written
    ada = get_peft_model(
        tiny_llama(), lorakit.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"])
    )
    with pytest.raises(ConfigError, match="converts LoRA adapters .* AdaLoraConfig"):
        ada.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "q")


def test_save_pretrained_takes_peft_parameters_in_peft_order():
    import inspect

    def names(fn):
        return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]

    theirs = names(peft.PeftModel.save_pretrained)
    assert names(PeftModel.save_pretrained)[: len(theirs)] == theirs
    assert not hasattr(peft, "convert_pissa_to_lora")  # PEFT 0.21 has no such function: nothing to mirror


# -- quantized bases (bitsandbytes on CPU) ---------------------------------------------------------------------------


def test_olora_on_a_4bit_base_equals_peft(tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_qlora_interop import load_base

    lorakit.quantize(tiny_llama(initializer_range=0.2), bits=4).save_pretrained(tmp_path / "nf4")
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="olora")
    p = peft.get_peft_model(load_base(tmp_path / "nf4"), peft.LoraConfig(**settings))
    k = get_peft_model(load_base(tmp_path / "nf4"), LoraConfig(**settings))
    ps, ks = states(p), states(k)
    assert ps.keys() == ks.keys() and all(torch.equal(ks[key], ps[key]) for key in ps)  # the requantized residual too
    torch.testing.assert_close(logits(k), logits(p), rtol=0, atol=0)
    layer = k.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.kind.dequantized_weight(load_base(tmp_path / "nf4").model.layers[0].self_attn.q_proj)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    residual = layer.kind.dequantized_weight(layer.base_layer)
    step = (w - s * b @ a).abs().amax(dim=1, keepdim=True)  # NF4 rounds each weight to within its block's absmax
    assert ((residual - (w - s * b @ a)).abs() <= step).all()
    assert not torch.equal(residual, w)


def test_olora_on_an_8bit_base_equals_peft():
    pytest.importorskip("bitsandbytes")
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="olora")
    p = peft.get_peft_model(lorakit.quantize(tiny_llama(initializer_range=0.2), bits=8), peft.LoraConfig(**settings))
    k = get_peft_model(lorakit.quantize(tiny_llama(initializer_range=0.2), bits=8), LoraConfig(**settings))
    torch.testing.assert_close(logits(k.eval()), logits(p.eval()), rtol=0, atol=0)


def test_a_failed_olora_injection_gives_the_quantized_weights_back(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from lorakit.tuners.lora import layer as layer_mod

    model = lorakit.quantize(tiny_llama(initializer_range=0.2), bits=4)
    original = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    weight = model.model.layers[0].self_attn.q_proj.weight
    real, calls = layer_mod.run_start, []

    def failing_later(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_mod, "run_start", failing_later)
    with pytest.raises(RuntimeError, match="out of memory"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="olora"))
    assert model.model.layers[0].self_attn.q_proj.weight is weight  # the requantized parameter was replaced back
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert after.keys() == original.keys() and all(torch.equal(after[k], original[k]) for k in original)
