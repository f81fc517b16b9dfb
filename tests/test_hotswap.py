"""Hot-swapping LoRA adapters in place (lorakit.tuners.lora.hotswap): against a direct load, against PEFT's
``peft.utils.hotswap`` on the same files, and under ``torch.compile`` with compilations counted."""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter
from torch import nn

import lorakit
from conftest import Counting, input_ids, tiny_gpt2, tiny_llama
from lorakit import (
    LoraConfig,
    LoraLayer,
    PeftModel,
    get_peft_model,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)
from lorakit.errors import AdapterNotFoundError, ConfigError, MergeError, ShapeMismatchError
from lorakit.layers.kinds import kind_for
from lorakit.layers.routing import RowRouting, routed

pytestmark = [
    pytest.mark.usefixtures("fresh_dynamo"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # PEFT's notices (fan_in_fan_out fixed up)
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "llama1": lambda: tiny_llama(num_hidden_layers=1)}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "attn.c_proj"], "llama1": ["q_proj", "v_proj"]}
# name -> (base, seed, config): adapter files written once per module by lorakit (PEFT's format).
ADAPTERS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "llama-r4": ("llama", 1, {"r": 4, "lora_alpha": 8}),
    "llama-r2-a16": ("llama", 2, {"r": 2, "lora_alpha": 16}),
    "llama-q-only": ("llama", 3, {"r": 2, "lora_alpha": 3, "target_modules": ["q_proj"]}),
    "llama-qkv": ("llama", 4, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"]}),
    "llama-r8": ("llama", 5, {"r": 8, "lora_alpha": 8}),
    "llama-dora": ("llama", 6, {"r": 4, "lora_alpha": 8, "use_dora": True}),
    "llama-dropout": ("llama", 7, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}),
    "llama-patterns": (
        "llama",
        8,
        {"r": 4, "lora_alpha": 4, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 32}},
    ),
    "llama-rslora": ("llama", 9, {"r": 4, "lora_alpha": 8, "use_rslora": True}),
    "gpt2-r4": ("gpt2", 1, {"r": 4, "lora_alpha": 8}),
    "gpt2-r2-a16": ("gpt2", 2, {"r": 2, "lora_alpha": 16}),
    "llama1-r4": ("llama1", 1, {"r": 4, "lora_alpha": 8}),
    "llama1-r8-a32": ("llama1", 2, {"r": 8, "lora_alpha": 32}),
    "llama1-r4-a4-q": ("llama1", 3, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}),
    "llama1-r4-a2": ("llama1", 4, {"r": 4, "lora_alpha": 2}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Adapter name -> folder; random A and B (init_lora_weights=False) so every adapter changes the output."""
    root, out = tmp_path_factory.mktemp("adapters"), {}
    for name, (base, seed, cfg) in ADAPTERS.items():
        torch.manual_seed(seed)
        cfg = {"target_modules": TARGETS[base], "init_lora_weights": False, **cfg}
        get_peft_model(BASES[base](), LoraConfig(**cfg)).save_pretrained(root / name)
        out[name] = root / name
    return out


def load(files, name: str) -> PeftModel:
    return PeftModel.from_pretrained(BASES[ADAPTERS[name][0]](), files[name]).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=input_ids()).logits


def snapshot(model) -> dict[str, Any]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scalings = {n: dict(m.scaling) for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    return {"state": state, "scalings": copy.deepcopy(scalings), "config": copy.deepcopy(model.peft_config)}


def assert_same(model, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["scalings"] == before["scalings"] and after["config"] == before["config"]


# -- eager: equal to a direct load and to PEFT ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_swap_equals_direct_load_and_peft(files, arch):
    """A smaller rank and another alpha, copied into the same tensors: the direct load's and PEFT's outputs."""
    first, second = f"{arch}-r4", f"{arch}-r2-a16"
    model = load(files, first)
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters() if "lora_" in n}  # A, B of 4 layers
    hotswap_adapter(model, files[second], adapter_name="default")
    expected = logits(load(files, second))
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(logits(load(files, first)), expected, atol=1e-3)  # the swap changed something
    after = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert all(after[n] is p and p.data_ptr() == ptr for n, (p, ptr) in params.items())

    reference = peft.PeftModel.from_pretrained(BASES[arch](), files[first]).eval()
    peft_hotswap_adapter(reference, str(files[second]), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-6)

    saved = files[first].parent / f"{arch}-swapped"  # the in-memory config is kept true: a save reloads to it
    model.save_pretrained(saved)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(BASES[arch](), saved)), logits(model))


def test_state_dict_form_of_peft(files):
    """hotswap_adapter_from_state_dict also takes the model's own state-dict keys (with the adapter name)."""
    source = load(files, "llama-r2-a16")
    state = {k: v for k, v in source.state_dict().items() if ".lora_" in k}
    assert all(".default." in k for k in state)
    model = load(files, "llama-r4")
    hotswap_adapter_from_state_dict(model, state, "default", source.peft_config["default"])
    torch.testing.assert_close(logits(model), logits(source), rtol=0, atol=1e-6)


def test_fewer_targets_are_zeroed_as_in_peft(files):
    """An adapter of q_proj only into one of q_proj and v_proj: v_proj's factors become zero (PEFT's behaviour)."""
    model = load(files, "llama-r4")
    hotswap_adapter(model, files["llama-q-only"], "default")
    torch.testing.assert_close(logits(model), logits(load(files, "llama-q-only")), rtol=0, atol=1e-6)
    v_proj = model.base_model.model.model.layers[0].self_attn.v_proj
    assert not v_proj.lora_A["default"].weight.any() and not v_proj.lora_B["default"].weight.any()

    reference = peft.PeftModel.from_pretrained(tiny_llama(), files["llama-r4"]).eval()
    peft_hotswap_adapter(reference, str(files["llama-q-only"]), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-6)


@pytest.mark.parametrize("second", ["llama-patterns", "llama-rslora"])
def test_per_module_scaling(files, second):
    """rank_pattern / alpha_pattern (matched on module names, as a load does) and rsLoRA's α/√r set each layer's
    scaling; the model's config is rewritten to match, so a save reloads to the swapped model."""
    model = load(files, "llama-r4")
    hotswap_adapter(model, files[second], "default")
    torch.testing.assert_close(logits(model), logits(load(files, second)), rtol=0, atol=1e-6)
    saved = files["llama-r4"].parent / f"{second}-swapped"
    model.save_pretrained(saved)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), saved)), logits(model))


REFUSALS = {
    "llama-qkv": (ConfigError, "target_modules"),  # adapts k_proj, which the loaded adapter does not
    "llama-r8": (ShapeMismatchError, "target_rank"),  # rank 8 into rank-4 tensors, not prepared
    "llama-dora": (ConfigError, "use_dora"),
    "llama-dropout": (ConfigError, "lora_dropout"),
}


@pytest.mark.parametrize("second", REFUSALS)
def test_refused_swaps_name_the_field_and_change_nothing(files, second):
    error, field = REFUSALS[second]
    model = load(files, "llama-r4")
    before = snapshot(model)
    with pytest.raises(error, match=field):
        hotswap_adapter(model, files[second], "default")
    assert_same(model, before)


def test_refused_merged_or_unknown_adapter(files):
    model = load(files, "llama-r4")
    with pytest.raises(AdapterNotFoundError):
        hotswap_adapter(model, files["llama-r2-a16"], "other")
    model.merge_adapter()
    before = snapshot(model)
    with pytest.raises(MergeError, match="unmerge"):
        hotswap_adapter(model, files["llama-r2-a16"], "default")
    assert_same(model, before)


# -- prepare_model_for_compiled_hotswap -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prepare_pads_with_zeros_and_keeps_the_output(files, arch):
    """Every A/B zero-padded to target_rank, scalings 0-d tensors: the same output; a save reloads to it in lorakit
    and in PEFT (r and alpha rewritten: rank 4, α 8 is rank 8, α 16)."""
    model = load(files, f"{arch}-r4")
    expected = logits(model)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-6)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape[0] == b.shape[1] == layer.r["default"] == 8
        assert not a[4:].any() and not b[:, 4:].any()
        assert isinstance(layer.scaling["default"], torch.Tensor) and layer.scaling["default"].item() == 2.0
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern) == (8, 16, {}, {})

    hotswap_adapter(model, files[f"{arch}-r2-a16"], "default")  # rank 2 into the padded rank-8 tensors
    torch.testing.assert_close(logits(model), logits(load(files, f"{arch}-r2-a16")), rtol=0, atol=1e-6)
    saved = files[f"{arch}-r4"].parent / f"{arch}-padded"
    model.save_pretrained(saved)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(BASES[arch](), saved)), logits(model))
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(BASES[arch](), saved)), logits(model))


class EmbedConvLinear(nn.Module):
    """One layer of each other kind: nn.Embedding (factors are parameters), nn.Conv2d, nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.conv, self.lin = nn.Embedding(20, 6), nn.Conv2d(6, 5, 3, padding=1), nn.Linear(5, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2).unsqueeze(-1)  # (B, 6, T, 1)
        return self.lin(self.conv(h).squeeze(-1).transpose(1, 2))  # (B, T, 4)


def test_every_layer_kind_pads_and_swaps():
    def adapted(seed: int, r: int, alpha: float) -> PeftModel:
        torch.manual_seed(seed)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["emb", "conv", "lin"], init_lora_weights=False)
        return get_peft_model(EmbedConvLinear(), cfg).eval()

    ids = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    model = adapted(1, 4, 8)
    with torch.no_grad():
        expected = model(ids)
        prepare_model_for_compiled_hotswap(model, target_rank=8)
        torch.testing.assert_close(model(ids), expected)
        assert model.base_model.model.conv.lora_B["default"].in_channels == 8
        source = adapted(2, 2, 5)
        state = {k: v for k, v in source.state_dict().items() if ".lora_" in k}
        hotswap_adapter_from_state_dict(model, state, "default", source.peft_config["default"])
        torch.testing.assert_close(model(ids), source(ids))


def test_prepare_refusals_change_nothing(files):
    model = load(files, "llama-r4")
    before = snapshot(model)
    with pytest.raises(ShapeMismatchError, match="target_rank=2"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)
    with pytest.raises(ConfigError, match="check_compiled"):
        prepare_model_for_compiled_hotswap(model, check_compiled="maybe")
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(ConfigError, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8)
    assert_same(model, before)
    with pytest.warns(UserWarning, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(compiled, check_compiled="warn")

    dora = load(files, "llama-dora")
    before = snapshot(dora)
    with pytest.raises(ConfigError, match="use_dora"):
        prepare_model_for_compiled_hotswap(dora, target_rank=8)
    assert_same(dora, before)


# -- under torch.compile: no recompilation ---------------------------------------------------------------------


def test_compiled_swaps_of_other_ranks_and_alphas_do_not_recompile(files):
    """Rank 4 α 8 → rank 8 α 32 → rank 4 α 4 on q_proj only, under torch.compile with target_rank=8: each output is
    the direct load's, one graph in all (the forward has no graph break), and the scaling tensor is the same
    object throughout, rewritten in place."""
    from torch._dynamo.utils import counters

    model = load(files, "llama1-r4")
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    scaling = layer.scaling["default"]
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(logits(compiled), logits(load(files, "llama1-r4")), rtol=0, atol=1e-6)
    assert backend.graphs == 1 and counters["stats"]["unique_graphs"] == 1
    for second in ("llama1-r8-a32", "llama1-r4-a4-q"):
        hotswap_adapter(compiled, files[second], adapter_name="default")
        torch.testing.assert_close(logits(compiled), logits(load(files, second)), rtol=0, atol=1e-6)
    assert backend.graphs == 1 and counters["stats"]["unique_graphs"] == 1
    assert layer.scaling["default"] is scaling and scaling.item() == 1.0


def test_without_prepare_a_changed_alpha_recompiles(files):
    """The companion: same rank, other α, no prepare: the float scaling is baked into the graph, so the swap
    recompiles (still correct). This is what the test above would see if the scaling were not a tensor."""
    model = load(files, "llama1-r4")
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    logits(compiled)
    assert backend.graphs == 1
    hotswap_adapter(compiled, files["llama1-r4-a2"], adapter_name="default")
    torch.testing.assert_close(logits(compiled), logits(load(files, "llama1-r4-a2")), rtol=0, atol=1e-6)
    assert backend.graphs == 2


def test_compiled_training_forward_is_one_graph(files):
    """With gradients the fused LoRA kernel (an autograd.Function) is traced into the one graph too."""
    model = PeftModel.from_pretrained(tiny_llama(num_hidden_layers=1), files["llama1-r4"], is_trainable=True)
    backend = Counting()
    compiled = torch.compile(model.train(), backend=backend)
    compiled(input_ids=input_ids(), labels=input_ids()).loss.backward()
    assert backend.graphs == 1
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_compiled_layer_still_routes_rows():
    """Layers skip the row-routing context variable while compiling (dynamo cannot trace ContextVar.get) only while
    no routing is open: inside one, the compiled layer recompiles and routes each row to its adapter, as eager."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoraLayer(base, kind_for(base))
    layer.add("a", 4, 8, init_lora_weights=False)
    layer.add("b", 2, 4, init_lora_weights=False)
    layer.set_active(["a"])
    x, routing = torch.randn(2, 5, 16), RowRouting(["b", "a"])
    compiled = torch.compile(layer.eval(), backend=Counting())
    with torch.no_grad():
        plain = layer(x)
        torch.testing.assert_close(compiled(x), plain, rtol=0, atol=0)
        with routed([layer], routing):
            expected = layer(x)
            got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(expected, plain)


@pytest.mark.slow
def test_compiled_mixed_batches_still_route(files):
    """The same through a whole compiled model called with adapter_names (about 15 s: many graph breaks)."""
    model = load(files, "llama1-r4")
    model.load_adapter(files["llama1-r8-a32"], "other")
    rows = ["other", "default"]
    with torch.no_grad():
        expected = model(input_ids=input_ids(), adapter_names=rows).logits
        compiled = torch.compile(model, backend=Counting())
        torch.testing.assert_close(logits(compiled), logits(model), rtol=0, atol=1e-6)
        got = compiled(input_ids=input_ids(), adapter_names=rows).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_exports():
    assert lorakit.hotswap_adapter is hotswap_adapter
    assert "prepare_model_for_compiled_hotswap" in lorakit.__all__
