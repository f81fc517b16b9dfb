"""EVA (arXiv 2410.07170): the data-driven start against PEFT 0.21.2 on the same model and batches, the incremental
PCA against a closed-form PCA, and EVA adapters saved by either library loading in the other."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.config import EvaConfig as PeftEvaConfig
from peft.tuners.lora.eva import get_eva_state_dict as peft_get_eva_state_dict
from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_initialize
from peft.tuners.tuners_utils import _find_minimal_target_modules

import lorakit
from conftest import input_ids, tiny_gpt2, tiny_llama
from lorakit import ConfigError, EvaConfig, LoraConfig, get_eva_state_dict, get_peft_model, initialize_lora_eva_weights
from lorakit.errors import DataError
from lorakit.tuners.lora.eva import _distinguishing_suffixes
from lorakit.tuners.lora.ipca import IncrementalPCA

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    yield


def batches(n: int = 6, batch: int = 4, seq: int = 16, labels: bool = False, vocab: int = 96) -> list[dict]:
    """Random token batches; with ``labels``, the first half of each row is prompt (-100)."""
    out = []
    for i in range(n):
        ids = input_ids(batch, seq, vocab=vocab, seed=i)
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if labels:
            item["labels"] = ids.clone()
            item["labels"][:, : seq // 2] = -100
        out.append(item)
    return out


def configs(targets=TARGETS, **eva):
    common = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva")
    return (
        LoraConfig(**common, eva_config=EvaConfig(**eva)),
        peft.LoraConfig(**common, eva_config=PeftEvaConfig(**eva)),
    )


def both(targets=TARGETS, data=None, factory=tiny_llama, **eva):
    """The same base with an EVA adapter initialised by lorakit and by PEFT on the same batches."""
    ours_config, peft_config = configs(targets, **eva)
    ours = get_peft_model(factory(), ours_config)
    theirs = peft.get_peft_model(factory(), peft_config)
    initialize_lora_eva_weights(ours, data or batches(), show_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_initialize(theirs, data or batches(), show_progress_bar=False)
    return ours, theirs


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def assert_same_factors(ours, theirs, atol: float = 1e-6) -> None:
    a, b = lora_state(ours), lora_state(theirs)
    assert a.keys() == b.keys()
    for key in a:
        # components are sign-normalised by both libraries; compare up to sign anyway (the paper's A is a basis)
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key].abs(), b[key].abs(), atol=atol), key


# -- the incremental PCA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lowrank", [False, True])
def test_incremental_pca_equals_pca_of_all_rows_for_low_rank_data(lowrank):
    # data of rank 3 (plus a mean): a rank-k incremental PCA with k ≥ 3 loses nothing, so it equals the PCA of all
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 3, generator=g))[0].T  # (3, 12) orthonormal rows
    rows = torch.randn(200, 3, generator=g) * torch.tensor([5.0, 2.0, 0.5]) @ basis + torch.randn(12, generator=g)
    pca = IncrementalPCA(4, lowrank=lowrank)
    for chunk in rows.split(40):
        pca.partial_fit(chunk)
    centred = (rows - rows.mean(0)).double()
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    cos = (pca.components_[:3].double() * vh[:3]).sum(1).abs()
    assert torch.allclose(cos, torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(pca.singular_values_[:3].double(), s[:3], rtol=1e-5)
    ratio = s[:3] ** 2 / (centred**2).sum()
    assert torch.allclose(pca.explained_variance_ratio_[:3].double(), ratio, rtol=1e-5)
    assert torch.allclose(pca.mean_, rows.double().mean(0), atol=1e-6)


def test_incremental_pca_keeps_the_global_rng():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    IncrementalPCA(2).partial_fit(torch.randn(20, 6, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.rand(3), expected)


# -- against PEFT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "eva,labels",
    [
        ({}, False),
        ({}, True),
        ({"rho": 1.0}, False),
        ({"rho": 3.0, "tau": 0.9}, True),
        ({"use_label_mask": False}, True),
    ],
)
def test_same_components_and_ranks_as_peft(eva, labels):
    data = batches(labels=labels)
    ours_config, peft_config = configs(**eva)
    ours = get_eva_state_dict(tiny_llama(), data, ours_config, show_progress_bar=False)
    theirs = peft_get_eva_state_dict(tiny_llama(), data, peft_config, show_progress_bar=False)
    assert {k: v.shape[0] for k, v in ours.items()} == {k: v.shape[0] for k, v in theirs.items()}
    for key in theirs:
        assert torch.allclose(ours[key].abs(), theirs[key].abs(), atol=1e-6), key


def test_initialised_model_matches_peft_and_starts_at_the_base():
    ours, theirs = both()
    assert_same_factors(ours, theirs)
    ours_config, theirs_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert ours_config.rank_pattern == theirs_config.rank_pattern
    assert ours_config.rank_pattern  # the redistribution changed ranks (else the test proves little)
    assert ours_config.alpha_pattern == theirs_config.alpha_pattern
    assert sorted(ours_config.target_modules) == sorted(theirs_config.target_modules)
    ids = input_ids()
    with ours.disable_adapter():
        base = ours(ids).logits
    assert torch.equal(ours(ids).logits, base)  # B = 0: the model starts exactly at the base
    for name, layer in ours.base_model.lora_layers():
        assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad, name


def test_adjust_scaling_factors_off_keeps_alpha():
    ours, theirs = both(adjust_scaling_factors=False)
    assert ours.peft_config["default"].alpha_pattern == theirs.peft_config["default"].alpha_pattern == {}
    for _, layer in ours.base_model.lora_layers():
        assert layer.scaling["default"] == pytest.approx(8 / layer.r["default"])


def test_whiten_matches_peft_on_layers_with_their_own_input():
    ours, theirs = both(targets=["o_proj", "down_proj"], whiten=True)
    assert_same_factors(ours, theirs)


def test_whiten_divides_each_component_once_on_layers_that_share_an_input():
    # q, k and v share one PCA. PEFT 0.21.2 divides the shared components in place once per layer (three times
    # for q/k/v); lorakit divides each layer's copy once, as the paper's whitening says.
    ours_config, _ = configs(targets=["q_proj", "k_proj", "v_proj"], whiten=True)
    plain_config, _ = configs(targets=["q_proj", "k_proj", "v_proj"])
    white = get_eva_state_dict(tiny_llama(), batches(), ours_config, show_progress_bar=False)
    plain = get_eva_state_dict(tiny_llama(), batches(), plain_config, show_progress_bar=False)
    for key, u in plain.items():
        assert torch.allclose(white[key] / white[key].norm(dim=1, keepdim=True), u, atol=1e-6), key
        assert not torch.allclose(white[key], u)


def test_conv1d_layers_match_peft():
    ours, theirs = both(targets=["c_attn", "c_fc"], data=batches(), factory=tiny_gpt2)
    assert_same_factors(ours, theirs)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern


def test_given_state_dict_with_a_zero_rank_removes_the_adapter_there_as_peft():
    state = get_eva_state_dict(tiny_llama(), batches(), configs()[0], show_progress_bar=False)
    state["model.layers.1.mlp.down_proj"] = torch.zeros(0, 64)
    ours_config, peft_config = configs()
    ours = get_peft_model(tiny_llama(), ours_config)
    theirs = peft.get_peft_model(tiny_llama(), peft_config)
    initialize_lora_eva_weights(ours, eva_state_dict=dict(state))  # keys of the base model: lorakit accepts them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_initialize(theirs, eva_state_dict={f"base_model.model.{k}": v for k, v in state.items()})
    assert_same_factors(ours, theirs)
    assert isinstance(ours.base_model.model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    config = ours.peft_config["default"]
    assert "model.layers.1.mlp.down_proj" not in config.target_modules
    assert config.rank_pattern == theirs.peft_config["default"].rank_pattern


def test_long_target_lists_are_shortened_as_peft_shortens_them():
    ours, theirs = both(factory=lambda: tiny_llama(num_hidden_layers=3))  # 21 targets
    ours_targets, theirs_targets = (
        ours.peft_config["default"].target_modules,
        theirs.peft_config["default"].target_modules,
    )
    assert sorted(ours_targets) == sorted(theirs_targets)
    assert len(ours_targets) < 21


def test_distinguishing_suffixes_equal_peft():
    g = torch.Generator().manual_seed(0)
    names = [f"m.layers.{i}.{p}.{leaf}" for i in range(6) for p in ("attn", "mlp") for leaf in ("q", "k", "up", "x")]
    for _ in range(20):
        chosen = torch.rand(len(names), generator=g) < 0.5
        targets = [n for n, c in zip(names, chosen) if c]
        others = [n for n, c in zip(names, chosen) if not c] + ["m", "m.layers"]
        if targets:
            assert set(_distinguishing_suffixes(targets, others)) == _find_minimal_target_modules(targets, others)


# -- saved EVA adapters, both directions -------------------------------------------------------------------


def trained(model, seed: int) -> None:
    """Stand-in for training: non-zero B everywhere (A stays EVA's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def test_peft_saved_eva_adapter_loads_in_lorakit(tmp_path):
    _, theirs = both()
    trained(theirs, 1)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    ours = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids = input_ids()
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
    assert ours.peft_config["default"].init_lora_weights == "eva"
    assert isinstance(ours.peft_config["default"].eva_config, EvaConfig)


def test_lorakit_saved_eva_adapter_loads_in_peft(tmp_path):
    ours, _ = both()
    trained(ours, 2)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["eva_config"] == {
        "rho": 2.0,
        "tau": 0.99,
        "use_label_mask": True,
        "label_mask_value": -100,
        "whiten": False,
        "adjust_scaling_factors": True,
    }
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids = input_ids()
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
    # and back into lorakit: same logits, merged and unmerged
    again = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(again(ids).logits, ours(ids).logits, atol=1e-6)
    again.merge_adapter()
    assert torch.allclose(again(ids).logits, ours(ids).logits, atol=1e-5)


# -- config and errors -------------------------------------------------------------------------------------


def test_config_defaults_and_dicts_as_peft():
    with pytest.warns(UserWarning, match="default EvaConfig"):
        config = LoraConfig(init_lora_weights="eva")
    assert config.eva_config == EvaConfig()
    assert LoraConfig(init_lora_weights="eva", eva_config={"rho": 1.5}).eva_config == EvaConfig(rho=1.5)
    with pytest.warns(UserWarning, match="eva_config is ignored"):
        LoraConfig(eva_config=EvaConfig())
    with pytest.raises(ConfigError, match="rho"):
        EvaConfig(rho=0.5)
    with pytest.raises(ConfigError, match="tau"):
        EvaConfig(tau=1.5)
    with pytest.raises(ConfigError, match="eva_config"):
        LoraConfig(init_lora_weights="eva", eva_config=[1])
    assert LoraConfig(init_lora_weights="eva", eva_config=EvaConfig()).to_dict()["eva_config"]["tau"] == 0.99


def test_wrong_uses_are_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="init_lora_weights='eva'"):
        initialize_lora_eva_weights(model, batches())
    with pytest.raises(ConfigError, match="lorakit model"):
        initialize_lora_eva_weights(tiny_llama(), batches())
    eva_model = get_peft_model(tiny_llama(), configs(["q_proj"])[0])
    with pytest.raises(ConfigError, match="dataloader or an eva_state_dict"):
        initialize_lora_eva_weights(eva_model)
    with pytest.raises(DataError, match="empty"):
        initialize_lora_eva_weights(eva_model, [])
    with pytest.raises(ConfigError, match="not layers EVA initialises"):
        get_eva_state_dict(eva_model, batches(), prepare_layer_inputs_fn={"nope": lambda *a: a[0]})
    with pytest.raises(ConfigError, match="needs peft_config"):
        get_eva_state_dict(tiny_llama(), batches())


def test_too_few_tokens_per_batch_is_an_error_not_a_hang():
    # every batch has 6 tokens that count, fewer than the 8 components a layer needs: PEFT would loop forever
    data = batches(n=2, batch=1, seq=12, labels=True)
    model = get_peft_model(tiny_llama(), configs(["q_proj"])[0])
    model.train()
    with pytest.raises(DataError, match="rows its PCA needs"):
        initialize_lora_eva_weights(model, data, show_progress_bar=False)
    assert model.training  # the mode is restored, and no hook is left behind
    assert not any(m._forward_hooks for m in model.modules())
