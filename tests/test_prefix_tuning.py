"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190) against real PEFT on identical weights, through transformers'
own cache classes; and against a closed form: a prefix equal to real tokens' keys and values gives the logits
of the sequence that starts with those tokens."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import input_ids, tiny_gpt2, tiny_llama
from lorakit.errors import ConfigError
from prompt_oracle import (
    FACTORIES,
    build,
    config_fields_match_peft,
    greedy_without_cache,
    padded,
    peft_prefix_on_bert,
    run,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

ARCHS = ["llama", "gpt2", "bert"]
METHOD = "PrefixTuningConfig"
PROJECTION = {"plain": {}, "projected": {"prefix_projection": True, "encoder_hidden_size": 24}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


@pytest.fixture(autouse=True)
def _peft_runs_on_bert():
    """PEFT 0.21.2 refuses prefix tuning on BERT under transformers 5 (see prompt_oracle.peft_prefix_on_bert)."""
    with peft_prefix_on_bert():
        yield


def test_config_has_peft_fields_and_defaults():
    config_fields_match_peft(lorakit.PrefixTuningConfig, peft.PrefixTuningConfig)


@pytest.mark.parametrize("arch", ARCHS)
def test_sizes_filled_from_the_model_as_peft(arch):
    p, k = build(METHOD, arch)
    keys = ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules", "encoder_hidden_size")
    assert {key: getattr(k.peft_config["default"], key) for key in keys} == {
        key: getattr(p.peft_config["default"], key) for key in keys
    }
    if arch == "llama":  # grouped-query attention: as wide as one layer's keys, 2 key/value heads of 8
        assert (k.peft_config["default"].token_dim, k.peft_config["default"].num_attention_heads) == (16, 2)


@pytest.mark.parametrize("projection", PROJECTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_loss_equal_peft(arch, projection):
    p, k = build(METHOD, arch, **PROJECTION[projection])
    ids, mask = padded()
    labels = torch.tensor([2, 0]) if arch == "bert" else ids
    theirs = run(p, input_ids=ids, attention_mask=mask, labels=labels)
    ours = run(k, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    assert ours.logits.shape == ((2, 3) if arch == "bert" else (2, 10, 96))  # a prefix adds no position
    base = run(FACTORIES[arch](), input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ours.logits, base, atol=1e-3)


def test_position_ids_move_past_the_prefix_as_in_peft():
    p, k = build(METHOD, "gpt2")
    ids, mask = padded()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    theirs = run(p, input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(
        run(k, input_ids=ids, attention_mask=mask, position_ids=positions).logits, theirs, rtol=0, atol=0
    )
    ids = input_ids()  # no padding: the default positions are those after the prefix
    torch.testing.assert_close(
        run(k, input_ids=ids, position_ids=torch.arange(10).expand(2, -1)).logits, run(k, input_ids=ids).logits
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prefix_of_real_keys_and_values_acts_as_those_tokens(arch):
    """Closed form: the prefix holds the cache of 4 real tokens, so the model computes the logits it computes on
    the sequence that starts with them (§4.2: the activations attend to the prefix as to earlier tokens)."""
    base = FACTORIES[arch]()
    k = lorakit.get_peft_model(
        FACTORIES[arch](), lorakit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    first, ids = input_ids(1, 4, seed=5), input_ids(1, 6, seed=6)
    cache = run(base, input_ids=first, use_cache=True).cache
    rows = []  # PEFT's layout: per token, layer by layer, keys then values, heads then head_dim
    for layer in cache.layers:
        rows += [layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)]  # (tokens, heads, head_dim)
    with torch.no_grad():
        k.prompt_encoder["default"].embedding.weight.copy_(torch.stack(rows, 1).reshape(4, -1))
    expected = run(base, input_ids=torch.cat([first, ids], 1)).logits[:, 4:]
    torch.testing.assert_close(run(k, input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_the_prefix_is_a_cache_of_the_installed_transformers():
    _, k = build(METHOD, "llama")
    cache = k.get_prompt(batch_size=3)
    assert isinstance(cache, transformers.DynamicCache) and cache.get_seq_length() == 4
    assert tuple(cache.layers[1].keys.shape) == (3, 2, 4, 8)  # (batch, key/value heads, tokens, head_dim)
    assert k.base_model.cache_name == "cache"  # transformers 5's name (past_key_values is deprecated)


# -- files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", PROJECTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_files_load_both_ways_with_equal_logits(arch, projection, tmp_path):
    p, k = build(METHOD, arch, **PROJECTION[projection])
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "lorakit"))
    assert set(ours) == set(theirs) and all(torch.equal(ours[key], theirs[key]) for key in ours)
    config = k.peft_config["default"]
    assert tuple(ours["prompt_embeddings"].shape) == (4, config.num_layers * 2 * config.token_dim)
    ids, mask = padded()
    expected = run(p, input_ids=ids, attention_mask=mask).logits
    loaded = lorakit.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "peft")
    assert not hasattr(loaded.prompt_encoder["default"], "transform")  # inference: the prefix itself, as in PEFT
    torch.testing.assert_close(run(loaded, input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    in_peft = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "lorakit")
    torch.testing.assert_close(run(in_peft, input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_config_json_matches_peft(arch, tmp_path):
    p, k = build(METHOD, arch, **PROJECTION["projected"])
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    ours = json.loads((tmp_path / "lorakit/adapter_config.json").read_text())
    assert set(ours) | {"peft_version", "auto_mapping"} == set(theirs)
    for key, value in ours.items():
        if key == "modules_to_save" and value:  # PEFT's SEQ_CLS class adds its heads twice
            assert value == list(dict.fromkeys(theirs[key]))
        else:
            assert value == theirs[key], (key, value, theirs[key])


def test_trainable_loads(tmp_path):
    _, plain = build(METHOD, "llama")
    plain.save_pretrained(tmp_path / "plain")
    again = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain", is_trainable=True)
    weight = again.prompt_encoder["default"].embedding.weight
    assert weight.requires_grad and torch.equal(weight, plain.prompt_encoder["default"].embedding.weight)
    _, projected = build(METHOD, "llama", **PROJECTION["projected"])
    projected.save_pretrained(tmp_path / "projected")
    with pytest.raises(ConfigError, match="is_trainable=False"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "projected", is_trainable=True)


# -- generation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", PROJECTION)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_the_cache_equals_greedy_decoding_through_peft(arch, projection):
    """PEFT 0.21.2's own generate ignores the prefix under transformers 5 (it passes past_key_values next to
    generate's cache), so the reference is greedy decoding by full forwards of PEFT's model."""
    p, k = build(METHOD, arch, scale=2.0, **PROJECTION[projection])
    ids, mask = padded(batch=3, seq=6)
    expected = greedy_without_cache(p, ids, mask, steps=8, prefix=True)
    ours = k.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, expected)
    assert not torch.equal(
        ours, FACTORIES[arch]().generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    )


def test_beams_and_samples_with_and_without_the_cache_agree():
    _, k = build(METHOD, "llama", scale=2.0)
    ids, mask = padded(seq=6)
    beams = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(k.generate(**beams), k.generate(**beams, use_cache=False))
    samples = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, num_return_sequences=2)
    torch.manual_seed(0)
    first = k.generate(**samples)
    torch.manual_seed(0)
    assert first.shape == (4, 12) and torch.equal(first, k.generate(**samples, use_cache=False))


def test_mixed_batch_of_prefixes():
    _, k = build(METHOD, "gpt2", scale=2.0)
    k.add_adapter(
        "other", lorakit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True)
    )
    k.eval()
    ids, mask = padded(batch=3, seq=6)
    rows = ["other", "default", "other"]
    generated = k.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, max_new_tokens=5, do_sample=False)
    for i, name in enumerate(rows):
        k.set_adapter(name)
        alone = k.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], max_new_tokens=5, do_sample=False)
        assert torch.equal(generated[i : i + 1], alone)


def test_seq2seq_equals_peft_and_generates_with_the_cache():
    p, k = build(METHOD, "t5", scale=2.0)
    ids, mask = padded()
    labels = padded(seed=3)[0][:, :5].contiguous()
    theirs, ours = (
        run(p, input_ids=ids, attention_mask=mask, labels=labels),
        run(k, input_ids=ids, attention_mask=mask, labels=labels),
    )
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    decoded = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(5):  # greedy by full forwards of PEFT's model
        step = run(p, input_ids=ids, attention_mask=mask, decoder_input_ids=decoded, use_cache=False).logits
        decoded = torch.cat([decoded, step[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(k.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), decoded)


# -- training and refusals --------------------------------------------------------------------------------


def test_only_the_prefix_gets_gradients():
    model = lorakit.get_peft_model(
        tiny_gpt2(), lorakit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **PROJECTION["projected"])
    )
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, t in model.named_parameters() if t.grad is not None}
    assert with_grad == {n for n, t in model.named_parameters() if "prompt_encoder" in n}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def test_zero_init_as_peft():
    for fields in ({}, PROJECTION["projected"]):
        p, k = (
            lib.get_peft_model(
                tiny_gpt2(),
                lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero", **fields),
            )
            for lib in (peft, lorakit)
        )
        zeros = {n for n, t in p.prompt_encoder["default"].named_parameters() if not t.any()}
        assert zeros == {n for n, t in k.prompt_encoder["default"].named_parameters() if not t.any()} != set()


def test_activation_checkpointing_is_refused_as_in_peft():
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="checkpointing"):
        lorakit.get_peft_model(model, lorakit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_without_a_cache_is_refused():
    class NoCache(nn.Module):
        config = tiny_llama().config

        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ConfigError, match="takes no key/value cache"):
        lorakit.get_peft_model(NoCache(), lorakit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"init_weights": "ones"}, "init_weights"),
        ({"prefix_projection": "yes"}, "prefix_projection"),
        ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
        ({"token_dim": 30, "num_attention_heads": 4}, "multiple"),
        ({"num_virtual_tokens": None}, "num_virtual_tokens"),
    ],
)
def test_bad_config_values_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        lorakit.PrefixTuningConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, **fields})
