"""P-tuning (Liu et al. 2021, arXiv 2103.10385) against real PEFT on identical weights: the MLP and LSTM prompt
encoders, files both ways (a file holds the encoder's output, loaded without the encoder), generation."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import tiny_llama
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.persistence import load_adapter_state, read_adapter
from prompt_oracle import FACTORIES, build, config_fields_match_peft, greedy_without_cache, padded, run

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

ARCHS = ["llama", "gpt2", "bert"]
METHOD = "PromptEncoderConfig"
ENCODERS = {
    "mlp": {"encoder_hidden_size": 16},
    "lstm": {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8, "encoder_num_layers": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


def test_config_has_peft_fields_and_defaults():
    config_fields_match_peft(lorakit.PromptEncoderConfig, peft.PromptEncoderConfig)
    ours, theirs = lorakit.PromptEncoderReparameterizationType, peft.PromptEncoderReparameterizationType
    assert [m.value for m in ours] == [m.value for m in theirs]


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_loss_equal_peft(arch, encoder):
    p, k = build(METHOD, arch, **ENCODERS[encoder])
    ids, mask = padded()
    labels = torch.tensor([1, 0]) if arch == "bert" else ids
    theirs = run(p, input_ids=ids, attention_mask=mask, labels=labels)
    ours = run(k, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_same_modules_and_trainable_counts_as_peft(encoder, capsys):
    p, k = build(METHOD, "llama", **ENCODERS[encoder])
    ours = {n.split("prompt_encoder.")[1]: t.shape for n, t in k.named_parameters() if t.requires_grad}
    theirs = {n.split("prompt_encoder.")[1]: t.shape for n, t in p.named_parameters() if t.requires_grad}
    assert ours == theirs
    p.print_trainable_parameters()
    expected = capsys.readouterr().out
    k.print_trainable_parameters()
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("encoder", ENCODERS)
def test_same_seed_same_initial_encoder_as_peft(encoder):
    fields = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, **ENCODERS[encoder]}
    torch.manual_seed(5)
    p = peft.get_peft_model(tiny_llama(), peft.PromptEncoderConfig(**fields))
    torch.manual_seed(5)
    k = lorakit.get_peft_model(tiny_llama(), lorakit.PromptEncoderConfig(**fields))
    theirs = dict(p.prompt_encoder["default"].named_parameters())
    for name, param in k.prompt_encoder["default"].named_parameters():
        torch.testing.assert_close(param, theirs[name], rtol=0, atol=0)


def test_the_hidden_size_defaults_to_the_model_width_as_in_peft():
    p = peft.get_peft_model(tiny_llama(), peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    k = lorakit.get_peft_model(tiny_llama(), lorakit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert k.peft_config["default"].encoder_hidden_size == p.peft_config["default"].encoder_hidden_size == 32


def test_the_mlp_ignores_encoder_num_layers_with_a_warning_as_peft():
    with pytest.warns(UserWarning, match="encoder_num_layers=3 is ignored"):
        k = lorakit.get_peft_model(
            tiny_llama(), lorakit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_num_layers=3)
        )
    assert len(k.prompt_encoder["default"].mlp_head) == 5


def test_lstm_dropout_applies_in_training_only():
    _, k = build(METHOD, "llama", encoder_reparameterization_type="LSTM", encoder_dropout=0.5)
    encoder = k.prompt_encoder["default"]
    assert encoder.lstm_head.dropout == 0.5
    k.eval()
    torch.testing.assert_close(encoder.prompt(), encoder.prompt(), rtol=0, atol=0)
    k.train()
    torch.manual_seed(0)
    assert not torch.equal(encoder.prompt(), encoder.prompt())


# -- files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_files_hold_the_encoder_output_and_load_both_ways(arch, encoder, tmp_path):
    p, k = build(METHOD, arch, **ENCODERS[encoder])
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "lorakit"))
    assert set(ours) == set(theirs) and all(torch.equal(ours[key], theirs[key]) for key in ours)
    prompt = k.prompt_encoder["default"].prompt()[0]
    torch.testing.assert_close(ours["prompt_embeddings"], prompt, rtol=0, atol=0)  # f(h), not h
    ids, mask = padded()
    live = run(p, input_ids=ids, attention_mask=mask).logits
    loaded = lorakit.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "peft")
    assert [n for n, _ in loaded.prompt_encoder["default"].named_children()] == ["embedding"]  # no encoder, as PEFT
    in_peft = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "lorakit")
    expected = run(in_peft, input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(run(loaded, input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    # torch's LSTM kernel differs in the last bits with and without autograd (the file's prompt was computed with)
    torch.testing.assert_close(expected, live, rtol=0, atol=0 if encoder == "mlp" else 1e-6)
    loaded.save_pretrained(tmp_path / "again")  # an inference-mode adapter saves its prompt as it is
    again = load_file(tmp_path / "again/adapter_model.safetensors")
    assert all(torch.equal(again[key], ours[key]) for key in ours)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_adapter_config_json_matches_peft(encoder, tmp_path):
    p, k = build(METHOD, "gpt2", **ENCODERS[encoder])
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    ours = json.loads((tmp_path / "lorakit/adapter_config.json").read_text())
    assert set(ours) | {"peft_version", "auto_mapping"} == set(theirs)
    assert {key: theirs[key] for key in ours} == ours
    read_back = lorakit.PeftConfig.from_pretrained(tmp_path / "peft").to_dict()
    assert read_back.pop("auto_mapping") == theirs["auto_mapping"]  # PEFT's own field, written back as read
    assert read_back == ours


def test_a_trainable_load_is_refused_as_in_peft(tmp_path):
    _, k = build(METHOD, "llama")
    k.save_pretrained(tmp_path)
    model = tiny_llama()
    with pytest.raises(ConfigError, match="is_trainable=False"):
        lorakit.PeftModel.from_pretrained(model, tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="is_trainable=False"):
        k.load_adapter(tmp_path, "again", is_trainable=True)
    assert list(k.peft_config) == ["default"]
    _, state = read_adapter(tmp_path)  # the resume path: a file into a training adapter with an encoder
    before = {n: t.clone() for n, t in k.prompt_encoder.named_parameters()}
    with pytest.raises(AdapterFileError, match="for inference"):
        load_adapter_state(k.base_model, "default", state)
    assert all(torch.equal(t, before[n]) for n, t in k.prompt_encoder.named_parameters())


def test_a_loaded_adapter_joins_a_training_one(tmp_path):
    p, k = build(METHOD, "llama")
    k.save_pretrained(tmp_path)
    fresh = lorakit.get_peft_model(
        tiny_llama(), lorakit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    fresh.load_adapter(tmp_path, "loaded")
    fresh.set_adapter("loaded")
    ids, mask = padded()
    expected = run(p, input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(run(fresh, input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    assert not any(t.requires_grad for t in fresh.prompt_encoder["loaded"].parameters())


# -- generation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ENCODERS)
def test_generate_equals_greedy_decoding_through_peft(encoder):
    p, k = build(METHOD, "gpt2", scale=2.0, **ENCODERS[encoder])
    ids, mask = padded(batch=3, seq=6)
    expected = greedy_without_cache(p, ids, mask, steps=6, prefix=False)
    assert torch.equal(k.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)


def test_mixed_batch_of_two_p_tuning_adapters():
    _, k = build(METHOD, "llama", scale=2.0)
    k.add_adapter("lstm", lorakit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **ENCODERS["lstm"]))
    k.eval()
    ids, mask = padded()
    mixed = run(k, input_ids=ids, attention_mask=mask, adapter_names=["lstm", "default"]).logits
    for i, name in enumerate(["lstm", "default"]):
        k.set_adapter(name)
        alone = run(k, input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    k.train()
    with pytest.raises(ConfigError, match="eval mode"):
        run(k, input_ids=ids, adapter_names=["lstm", "default"])


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
        ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
        ({"encoder_num_layers": 1.5}, "encoder_num_layers"),
        ({"encoder_dropout": 1.0}, "encoder_dropout"),
        ({"encoder_dropout": "0.1"}, "encoder_dropout"),
        ({"num_virtual_tokens": -2}, "num_virtual_tokens"),
    ],
)
def test_bad_config_values_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        lorakit.PromptEncoderConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, **fields})


def test_a_file_with_an_unknown_encoder_type_is_refused(tmp_path):
    _, k = build(METHOD, "llama")
    k.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "encoder_reparameterization_type": "GRU"}))
    with pytest.raises(ConfigError, match="'GRU' is not known; accepted: 'MLP', 'LSTM'"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
