"""IA³'s add_weighted_adapter against real PEFT on identical vectors, and its refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from conftest import MODEL_FACTORIES, input_ids
from lorakit.errors import AdapterExistsError, AdapterNotFoundError, ConfigError, MergeError
from test_ia3 import OTHER, config

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


def pair(arch: str):
    """PEFT and lorakit models with two IA³ adapters on different targets, identical random vectors."""
    cfg, extra = config(arch), {**config(arch), **OTHER[arch]}
    p = peft.get_peft_model(MODEL_FACTORIES[arch](), peft.IA3Config(**copy.deepcopy(cfg)))
    k = lorakit.get_peft_model(MODEL_FACTORIES[arch](), lorakit.IA3Config(**copy.deepcopy(cfg)))
    p.add_adapter("other", peft.IA3Config(**copy.deepcopy(extra)))
    k.add_adapter("other", lorakit.IA3Config(**copy.deepcopy(extra)))
    k.load_state_dict(p.state_dict())
    return p.eval(), k.eval()


def test_two_sources_training_the_same_head_are_refused_as_in_peft():
    p, k = pair("bert")  # SEQ_CLS: each adapter trains its own copy of the classifier
    with pytest.raises(ValueError, match="modules_to_save"):
        p.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(ConfigError, match="modules_to_save"):
        k.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    assert "mix" not in k.peft_config


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_weighted_combination_equals_peft(arch):
    p, k = pair(arch)
    for model in (p, k):
        model.add_weighted_adapter(["default", "other"], [0.7, -0.4], "mix")
        model.set_adapter("mix")
    assert set(k.peft_config["mix"].target_modules) == set(p.peft_config["mix"].target_modules)
    assert set(k.peft_config["mix"].feedforward_modules) == set(p.peft_config["mix"].feedforward_modules)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(k(input_ids=ids).logits, p(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    mine = {n: t for n, t in k.state_dict().items() if ".mix" in n}
    theirs = {n: t for n, t in p.state_dict().items() if ".mix" in n}
    assert mine.keys() == theirs.keys() and mine
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name])


def test_the_combination_is_frozen_inactive_and_saved_like_any_adapter(tmp_path):
    _, k = pair("llama")
    k.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix")
    assert k.active_adapter == "default"
    assert not any(p.requires_grad for n, p in k.named_parameters() if ".mix" in n)
    k.save_pretrained(tmp_path, selected_adapters=["mix"])
    fresh = lorakit.PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path / "mix")
    k.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=input_ids()).logits, k(input_ids=input_ids()).logits)


def test_one_source_with_weight_one_copies_it():
    _, k = pair("llama")
    k.add_weighted_adapter(["default"], [1.0], "twin")
    state = k.state_dict()
    copied = [name for name in state if ".twin" in name]
    assert copied
    for name in copied:
        torch.testing.assert_close(state[name], state[name.replace(".twin", ".default")])


@pytest.mark.parametrize(
    ("adapters", "weights", "name", "error", "message"),
    [
        (["default"], [1.0], "other", AdapterExistsError, "already exists"),
        (["nope"], [1.0], "mix", AdapterNotFoundError, "unknown adapter 'nope'"),
        (["default", "other"], [1.0], "mix", ConfigError, "one per adapter"),
        (["default"], [float("nan")], "mix", ConfigError, "finite"),
        ([], [], "mix", ConfigError, "non-empty list"),
        (["default"], [1.0], "copy", ConfigError, "attribute of torch's module containers"),
        (["default"], [1.0], "a.b", ConfigError, "holds '.'"),
    ],
)
def test_bad_arguments_are_named_and_change_nothing(adapters, weights, name, error, message):
    _, k = pair("llama")
    before = {n: t.clone() for n, t in k.state_dict().items()}
    with pytest.raises(error, match=message):
        k.add_weighted_adapter(adapters, weights, name)
    assert set(k.peft_config) == {"default", "other"}
    assert k.state_dict().keys() == before.keys()


def test_a_merged_source_is_refused():
    _, k = pair("llama")
    k.merge_adapter(["default"])
    with pytest.raises(MergeError, match="unmerge them first"):
        k.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    assert "mix" not in k.peft_config
