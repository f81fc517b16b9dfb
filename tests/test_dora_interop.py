"""DoRA against the real Hugging Face PEFT (``use_dora=True``) on tiny LLaMA, GPT-2 (Conv1D) and BERT models.

Same method as ``test_peft_interop.py``: identical weights in both libraries (PEFT's state dict copied into
lorakit), then outputs, gradients, files, merging and several adapters are compared. The magnitudes are moved
away from their initial value ‖W + s·BA‖ first: at that value DoRA's rescale is the identity and a wrong
rescale would go unseen.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from conftest import input_ids
from test_peft_interop import (
    ARCHS,
    EMBEDDING,
    MERGE_TARGETS,
    MODEL_FACTORIES,
    TARGETS,
    assert_same_adapter_config,
    assert_same_adapter_files,
    assert_state_dicts_equal,
    build,
    config_dict,
    logits,
    trainable,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

# Linear/Conv1D projections everywhere; the input embedding too for LLaMA and BERT (GPT-2's wte is tied).
DORA_TARGETS = {"llama": ["embed_tokens", "q_proj", "v_proj", "down_proj"], **{a: MERGE_TARGETS[a] for a in ("gpt2",)}}
DORA_TARGETS["bert"] = ["word_embeddings", "query", "value", "dense"]


def dora_config(arch: str, **overrides):
    return config_dict(arch, target_modules=DORA_TARGETS[arch], use_dora=True, **overrides)


def build_dora(arch: str, extra=None, **overrides):
    """PEFT and lorakit with the same DoRA adapter, magnitudes randomised (in PEFT, then copied)."""
    p, k = build(arch, dora_config(arch, **overrides), extra=extra)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in p.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.rand(param.shape, generator=gen))
    k.load_state_dict(p.state_dict())
    return p, k


@pytest.mark.parametrize("arch", ARCHS)
def test_same_keys_trainable_and_counts(arch):
    p, k = build(arch, dora_config(arch), sync=False)
    assert set(k.state_dict()) == set(p.state_dict())
    assert any("lora_magnitude_vector" in n for n in trainable(k))
    assert trainable(k) == trainable(p)
    assert k.get_nb_trainable_parameters() == p.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_magnitudes_equal_peft(arch):
    p, k = build(arch, dora_config(arch), sync=False)
    lora = {n: t for n, t in p.state_dict().items() if "lora_A" in n or "lora_B" in n or "lora_embedding" in n}
    k.load_state_dict(lora, strict=False)  # PEFT's A and B; then lorakit initialises m from them
    for _, layer in k.base_model.lora_layers():
        layer.variant["default"].attach(layer, "default")
    p_state = p.state_dict()
    for name, tensor in k.state_dict().items():
        if "lora_magnitude_vector" in name:
            torch.testing.assert_close(tensor, p_state[name], msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_logits_and_gradients(arch):
    ids = input_ids()
    p, k = build_dora(arch, lora_dropout=0.1)
    base = logits(MODEL_FACTORIES[arch](), ids)
    expected = logits(p, ids)
    assert not torch.allclose(expected, base)
    torch.testing.assert_close(logits(k, ids), expected)
    p.train()
    k.train()
    losses = []
    for model in (p, k):
        torch.manual_seed(9)  # the same dropout masks (both libraries draw them in the same order)
        out = model(input_ids=ids).logits
        loss = out.float().square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])
    p_grads = {n: q.grad for n, q in p.named_parameters() if q.requires_grad}
    k_grads = {n: q.grad for n, q in k.named_parameters() if q.requires_grad}
    assert set(k_grads) == set(p_grads)
    for name, grad in p_grads.items():
        torch.testing.assert_close(k_grads[name], grad, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_files_both_ways(arch, tmp_path):
    ids = input_ids()
    p, k = build_dora(arch)
    expected = logits(p, ids)
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    assert_same_adapter_files(tmp_path / "peft", tmp_path / "lorakit")
    assert_same_adapter_config(tmp_path / "peft", tmp_path / "lorakit")
    in_peft = peft.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path / "lorakit").eval()
    in_lorakit = lorakit.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path / "peft")
    torch.testing.assert_close(logits(in_peft, ids), expected)
    torch.testing.assert_close(logits(in_lorakit, ids), expected)
    own = lorakit.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path / "lorakit")
    own.save_pretrained(tmp_path / "again")  # save → load → save: byte-stable
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "lorakit" / name).read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_equal(arch):
    ids = input_ids()
    p, k = build_dora(arch)
    expected = logits(p, ids)
    pm, km = p.merge_and_unload(), k.merge_and_unload()
    assert_state_dicts_equal(km.state_dict(), pm.state_dict())
    torch.testing.assert_close(logits(km, ids), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_round_trip_and_disable(arch):
    ids = input_ids()
    p, k = build_dora(arch)
    before = {key: t.clone() for key, t in k.state_dict().items()}
    expected = logits(p, ids)
    k.merge_adapter()
    torch.testing.assert_close(logits(k, ids), expected, rtol=1e-4, atol=1e-5)
    k.unmerge_adapter()
    for key, tensor in k.state_dict().items():
        torch.testing.assert_close(tensor, before[key], msg=key)
    with k.disable_adapter():
        torch.testing.assert_close(logits(k, ids), logits(MODEL_FACTORIES[arch](), ids))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_and_lora_adapters_active_together(arch):
    """Two adapters, one DoRA and one plain LoRA, applied in sequence: PEFT's semantics, and merging agrees."""
    ids = input_ids()
    other = config_dict(arch, target_modules=TARGETS[arch], r=2)
    p, k = build_dora(arch, extra={"other": other})
    for model in (p, k):
        model.base_model.set_adapter(["default", "other"])
    expected = logits(p, ids)
    got = logits(k, ids)
    torch.testing.assert_close(got, expected)
    k.merge_adapter(["default", "other"])
    torch.testing.assert_close(logits(k, ids), expected, rtol=1e-4, atol=1e-5)


def test_generate_same_tokens():
    ids = input_ids()
    p, k = build_dora("llama", lora_alpha=32)
    with torch.no_grad():
        expected = p.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        got = k.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_undetached_option_round_trips_and_peft_ignores_it(tmp_path):
    ids = input_ids()
    cfg = dora_config("llama", dora_grad_through_norm=True)
    k = lorakit.get_peft_model(MODEL_FACTORIES["llama"](), lorakit.LoraConfig(**copy.deepcopy(cfg)))
    k.save_pretrained(tmp_path)
    again = lorakit.PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path)
    assert again.peft_config["default"].dora_grad_through_norm
    layer = next(layer for _, layer in again.base_model.lora_layers() if "default" in layer.lora_magnitude_vector)
    assert layer.lora_magnitude_vector["default"].grad_through_norm
    in_peft = peft.PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path).eval()
    torch.testing.assert_close(logits(in_peft, ids), logits(k, ids))


def test_embedding_only_dora_adapter_matches_peft():
    ids = input_ids()
    arch = "llama"
    p, k = build(arch, config_dict(arch, target_modules=[EMBEDDING[arch]], use_dora=True))
    torch.testing.assert_close(logits(k, ids), logits(p, ids))


def test_gradient_checkpointing_gives_the_same_gradients():
    """Activation checkpointing runs DoRA's kernel under saved-tensor hooks (its other saving path)."""
    ids = input_ids()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = lorakit.get_peft_model(MODEL_FACTORIES["llama"](), lorakit.LoraConfig(**dora_config("llama")))
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
