"""CorDA (arXiv 2406.05223): the decomposition in closed form, the start against PEFT 0.21.2 on the same model and
sample data, the cache/covariance files in both formats, and CorDA adapters saved by either library loading in the
other."""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import warnings

import peft
import pytest
import torch

import lorakit
from conftest import input_ids, tiny_gpt2, tiny_llama
from lorakit import AdapterFileError, ConfigError, CordaConfig, LoraConfig, get_peft_model, preprocess_corda
from lorakit.errors import DataError
from lorakit.tuners.lora.corda import decompose

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    yield


@pytest.fixture(scope="module")
def peft_corda():
    """PEFT's corda module. It imports ``attr.dataclass`` (the attrs package, not a dependency of PEFT's): where
    attrs is missing, the standard dataclass stands in while the module is imported."""
    with pytest.MonkeyPatch.context() as patch:
        try:
            import attr  # noqa: F401
        except ImportError:
            patch.setitem(sys.modules, "attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
        import peft.tuners.lora.corda as module
    return module


def runner(model, samples: int = 6, seq: int = 16):
    """``run_model``: one sample per call (PEFT's CorDA reads a batch of one)."""

    def run() -> None:
        with torch.no_grad():
            for s in range(samples):
                model(input_ids(1, seq, seed=s))

    return run


def configs(targets=TARGETS, method: str = "ipm", **files):
    common = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda")
    return (
        LoraConfig(**common, corda_config=CordaConfig(corda_method=method, **files)),
        peft.LoraConfig(**common, corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method, **files)),
    )


def ours_model(config, factory=tiny_llama, **kwargs):
    model = factory()
    preprocess_corda(model, config, run_model=runner(model, **kwargs))
    return get_peft_model(model, config)


def peft_model(peft_corda, config, factory=tiny_llama):
    model = factory()
    peft_corda.preprocess_corda(model, config, run_model=runner(model))
    return peft.get_peft_model(model, config)


def assert_same_state(a, b, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.allclose(sa[key], sb[key], atol=atol), key


# -- the decomposition -------------------------------------------------------------------------------------


def test_decomposition_reconstructs_w_and_orients_by_the_covariance():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    x = torch.randn(50, 10, generator=g) * torch.linspace(0.1, 3, 10)
    cov = x.t() @ x / 50
    u, s, v = decompose(w, cov)
    assert u.shape == (6, 6) and s.shape == (6,) and v.shape == (10, 6)
    assert torch.allclose(u @ torch.diag(s) @ v.t(), w, atol=1e-4)  # W = U S Vᵀ exactly (V carries C'⁻¹)
    damped = cov + torch.eye(10) * cov.diag().mean() * 0.01
    _, s_wc, _ = torch.linalg.svd(w @ damped)
    assert torch.allclose(s, s_wc, rtol=1e-5)  # S are the singular values of W C', not of W
    assert not torch.allclose(s, torch.linalg.svdvals(w), rtol=1e-2)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_start_matches_peft_and_keeps_the_output(peft_corda, method):
    ours_config, peft_config = configs(method=method)
    ours, theirs = ours_model(ours_config), peft_model(peft_corda, peft_config)
    assert_same_state(ours, theirs, atol=1e-6)  # factors and residual base weights
    ids = input_ids()
    base = tiny_llama()(ids).logits
    assert torch.allclose(ours(ids).logits, base, atol=1e-5)
    original = tiny_llama().model.layers[0].self_attn.q_proj.weight
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    residual = layer.base_layer.weight
    assert not torch.allclose(residual, original, atol=1e-3)  # the base now holds W_res
    assert torch.allclose(residual + layer.delta_weight("default"), original, atol=1e-5)  # W_res + s·BA = W
    ours.merge_adapter()
    assert torch.allclose(residual, original, atol=1e-5)
    assert torch.allclose(ours(ids).logits, base, atol=1e-5)


def test_ipm_takes_the_largest_components_and_kpm_the_smallest():
    s = {}
    for method in ("ipm", "kpm"):
        model = tiny_llama()
        preprocess_corda(model, configs(["o_proj"], method)[0], run_model=runner(model))
        s[method] = model.model.layers[0].self_attn.o_proj.eigens.S_WC
    assert s["ipm"].min() > s["kpm"].max()
    assert torch.all(s["ipm"][:-1] >= s["ipm"][1:])


def test_conv1d_layers_match_peft(peft_corda):
    ours_config, peft_config = configs(["c_attn", "c_fc"])
    ours, theirs = ours_model(ours_config, factory=tiny_gpt2), peft_model(peft_corda, peft_config, factory=tiny_gpt2)
    assert_same_state(ours, theirs, atol=1e-6)
    ids = input_ids()
    assert torch.allclose(ours(ids).logits, tiny_gpt2()(ids).logits, atol=1e-5)


def test_a_batch_counts_as_its_samples_one_by_one():
    one, batched = tiny_llama(), tiny_llama()
    config = configs(["o_proj"])[0]
    preprocess_corda(one, config, run_model=runner(one))

    def run_batched() -> None:
        with torch.no_grad():
            batched(torch.cat([input_ids(1, 16, seed=s) for s in range(6)]))

    preprocess_corda(batched, config, run_model=run_batched)
    for a, b in zip(one.modules(), batched.modules()):
        if hasattr(a, "eigens"):
            assert torch.allclose(a.eigens.S_WC, b.eigens.S_WC, rtol=1e-5)


def test_hooked_model_supplies_the_inputs():
    model, other = tiny_llama(), tiny_llama()
    config = configs(["o_proj"])[0]
    preprocess_corda(model, config, run_model=runner(other), hooked_model=other)
    reference = tiny_llama()
    preprocess_corda(reference, config, run_model=runner(reference))
    assert torch.equal(
        model.model.layers[1].self_attn.o_proj.eigens.S_WC, reference.model.layers[1].self_attn.o_proj.eigens.S_WC
    )


# -- files -------------------------------------------------------------------------------------------------


def test_peft_cache_and_covariance_files_read_in_lorakit(peft_corda, tmp_path):
    cache, cov = str(tmp_path / "c" / "cache.pt"), str(tmp_path / "c" / "cov.pt")
    _, peft_config = configs(cache_file=cache, covariance_file=cov)
    theirs = peft_model(peft_corda, peft_config)
    for files in ({"cache_file": cache}, {"covariance_file": cov}):
        model = tiny_llama()
        config = configs(**files)[0]
        preprocess_corda(model, config)  # no run_model: the file has what is needed
        assert_same_state(get_peft_model(model, config), theirs, atol=1e-6)


@pytest.mark.parametrize("name", ["cache.pt", "cache.safetensors"])
def test_lorakit_cache_file_round_trip_and_peft_reads_the_torch_form(peft_corda, tmp_path, name):
    path = str(tmp_path / name)
    config = configs(cache_file=path)[0]
    first = ours_model(config)
    with open(path, "rb") as f:
        assert (f.read(2) == b"PK") == name.endswith(".pt")
    model = tiny_llama()
    preprocess_corda(model, config)
    assert_same_state(get_peft_model(model, config), first)
    if name.endswith(".pt"):
        _, peft_config = configs(cache_file=path)
        model = tiny_llama()
        peft_corda.preprocess_corda(model, peft_config)
        assert_same_state(peft.get_peft_model(model, peft_config), first, atol=1e-6)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_cache_file_with_code_is_refused(tmp_path):
    path = str(tmp_path / "cache.pt")
    torch.save({"x": _Payload()}, path)
    with pytest.raises(AdapterFileError, match="cannot read CorDA file"):
        preprocess_corda(tiny_llama(), configs(cache_file=path)[0])


def test_a_cache_of_another_model_or_rank_is_refused(tmp_path):
    path = str(tmp_path / "cache.safetensors")
    ours_model(configs(["o_proj"], cache_file=path)[0])
    with pytest.raises(AdapterFileError, match="no decomposition of"):
        preprocess_corda(tiny_llama(), configs(["q_proj"], cache_file=path)[0])
    config = dataclasses.replace(configs(["o_proj"], cache_file=path)[0], r=2)
    model = tiny_llama()
    preprocess_corda(model, config)
    with pytest.raises(ConfigError, match="another model or rank"):
        get_peft_model(model, config)


# -- saved CorDA adapters, both directions -----------------------------------------------------------------


def trained(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)


def test_peft_saved_corda_adapter_loads_in_lorakit_after_preprocessing(peft_corda, tmp_path):
    theirs = peft_model(peft_corda, configs()[1])
    trained(theirs, 1)
    theirs.save_pretrained(tmp_path)
    base = tiny_llama()
    config = lorakit.PeftConfig.from_pretrained(tmp_path)
    assert config.init_lora_weights == "corda" and isinstance(config.corda_config, CordaConfig)
    preprocess_corda(base, config, run_model=runner(base))  # as in PEFT: the start runs again on load
    ours = lorakit.PeftModel.from_pretrained(base, tmp_path)
    ids = input_ids()
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


def test_lorakit_saved_corda_adapter_loads_in_peft_after_preprocessing(peft_corda, tmp_path):
    ours = ours_model(configs()[0])
    trained(ours, 2)
    ours.save_pretrained(tmp_path)
    base = tiny_llama()
    config = peft.PeftConfig.from_pretrained(tmp_path)
    peft_corda.preprocess_corda(base, config, run_model=runner(base))
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    ids = input_ids()
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


def test_loading_without_preprocessing_is_refused_and_leaves_the_model(tmp_path):
    ours = ours_model(configs()[0])
    ours.save_pretrained(tmp_path)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match="preprocess_corda"):
        lorakit.PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not any(isinstance(m, lorakit.LoraLayer) for m in base.modules())


def test_residual_model_with_a_plain_start_loads_anywhere(tmp_path):
    # PEFT's preprocess.py workflow: save the adapter with init_lora_weights=True beside the residual model
    ours = ours_model(configs()[0])
    trained(ours, 3)
    ids = input_ids()
    expected = ours(ids).logits
    ours.peft_config["default"].init_lora_weights = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(tmp_path / "adapter")
    residual = {k: v.clone() for k, v in ours.unload().state_dict().items()}
    for load in (lorakit.PeftModel.from_pretrained, peft.PeftModel.from_pretrained):
        base = tiny_llama()
        base.load_state_dict(residual)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load(base, tmp_path / "adapter")
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_converted_to_plain_lora_loads_on_the_original_base(tmp_path):
    # W_res + s·BA = W + s·(BA − B₀A₀): PEFT's path_initial_model_for_weight_conversion applies to CorDA as well
    ours = ours_model(configs()[0])
    ours.save_pretrained(tmp_path / "start")
    trained(ours, 4)
    ids = input_ids()
    expected = ours(ids).logits
    ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "start")
    for load in (lorakit.PeftModel.from_pretrained, peft.PeftModel.from_pretrained):
        model = load(tiny_llama(), tmp_path / "lora")
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


# -- config and errors -------------------------------------------------------------------------------------


def test_config_defaults_and_dicts_as_peft():
    with pytest.warns(UserWarning, match="default CordaConfig"):
        config = LoraConfig(init_lora_weights="corda")
    assert config.corda_config == CordaConfig()
    assert (
        LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "kpm"}).corda_config.corda_method == "kpm"
    )
    with pytest.raises(ConfigError, match="corda_method"):
        CordaConfig(corda_method="svd")
    assert config.to_dict()["corda_config"]["corda_method"] == "ipm"


def test_wrong_uses_are_refused():
    with pytest.raises(ConfigError, match="needs run_model"):
        preprocess_corda(tiny_llama(), configs()[0])
    with pytest.raises(ConfigError, match="corda_config"):
        preprocess_corda(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model = tiny_llama()
    with pytest.raises(DataError, match="never ran"):
        preprocess_corda(model, configs()[0], run_model=lambda: None)
    big = configs(["o_proj"])[0]
    big.r = 64
    with pytest.raises(ConfigError, match="r <= 32"):
        preprocess_corda(model, big, run_model=runner(model))
    plain = tiny_llama()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ConfigError, match="preprocess_corda"):
        get_peft_model(plain, configs()[0])
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())
    emb = tiny_llama()
    config = configs(["embed_tokens", "q_proj"])[0]
    preprocess_corda(emb, config, run_model=runner(emb))
    with pytest.raises(ConfigError, match="linear layers"):
        get_peft_model(emb, config)
