"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al. 2020, arXiv 2005.00247): the
formula, the adapter API and lorakit's own file format. Equality with the adapters library itself is in
tests/test_bottleneck_oracle.py."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, OPTConfig, OPTForCausalLM, Trainer, TrainingArguments

import lorakit
from conftest import MODEL_FACTORIES, input_ids, tiny_gpt2, tiny_llama
from lorakit import BottleneckConfig
from lorakit.errors import AdapterExistsError, ConfigError, MergeError, TargetNotFoundError
from lorakit.tuners.bottleneck import DEFAULT_PLACEMENTS
from lorakit.tuners.bottleneck.layer import BottleneckLayer

ARCHS = ["llama", "gpt2", "bert"]
PRESETS = {"pfeiffer": BottleneckConfig.pfeiffer, "houlsby": BottleneckConfig.houlsby}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


def randomize(model: nn.Module, seed: int = 3) -> nn.Module:
    """Random adapter weights, far from the near-identity start."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".bottleneck_" in name:
                around_one = (".bottleneck_norm" in name and name.endswith(".weight")) or ".bottleneck_scale" in name
                param.copy_(0.3 * torch.randn(param.shape, generator=gen) + (1.0 if around_one else 0.0))
    return model


def adapted(arch: str = "llama", config: BottleneckConfig | None = None, seed: int = 3) -> lorakit.PeftModel:
    return randomize(
        lorakit.get_peft_model(MODEL_FACTORIES[arch](), config or BottleneckConfig.pfeiffer()), seed
    ).eval()


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def layers(model: nn.Module) -> dict[str, BottleneckLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}


# -- the formula --------------------------------------------------------------------------------------------


def test_one_adapter_computes_the_papers_formulas():
    """Pfeiffer on a pre-LN model: a = h + W_up relu(W_down (h + r) + b_down) + b_up; Houlsby: the same on h."""
    k = adapted("llama", BottleneckConfig.pfeiffer())
    layer = k.base_model.model.model.layers[0].mlp.down_proj
    h, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]
    with torch.no_grad():
        expected = h + up(F.relu(down(h + r)))
        torch.testing.assert_close(layer._adapt("default", h, r), expected, rtol=0, atol=1e-6)
        k.add_adapter("hb", BottleneckConfig.houlsby())
        randomize(k, seed=4)
        down, up = layer.bottleneck_down["hb"], layer.bottleneck_up["hb"]
        torch.testing.assert_close(layer._adapt("hb", h, None), h + up(F.silu(down(h))), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", PRESETS)
def test_placement_bottleneck_size_and_parameter_count(arch, preset, capsys):
    k = lorakit.get_peft_model(MODEL_FACTORIES[arch](), PRESETS[preset]())
    placement = DEFAULT_PLACEMENTS[arch]
    sublayers = ["attention", "feedforward"] if preset == "houlsby" else ["feedforward"]
    prefix = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer"}[arch]
    expected = {f"{prefix}.{i}.{placement[s]['output']}" for i in (0, 1) for s in sublayers}
    assert set(layers(k.get_base_model())) == expected
    assert all(layer.bottleneck_down["default"].out_features == 32 // 16 for layer in layers(k).values())
    per_site = 2 * 32 * 2 + 2 + 32  # W_down, W_up, b_down, b_up
    trainable, total = k.get_nb_trainable_parameters()
    assert trainable == per_site * len(expected)
    assert {n for n, p in k.named_parameters() if p.requires_grad} == {
        n for n, _ in k.named_parameters() if ".bottleneck_" in n
    }
    k.print_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out


@pytest.mark.parametrize("init", ["bert", "houlsby", "mam_adapter"])
def test_the_start_is_near_the_identity(init):
    base = logits(tiny_llama())
    out = logits(lorakit.get_peft_model(tiny_llama(), BottleneckConfig.houlsby(init_weights=init)))
    if init == "mam_adapter":  # a zero up-projection: exactly the base model
        torch.testing.assert_close(out, base, rtol=0, atol=0)
    else:
        assert 0 < (out - base).abs().max() < 0.05 * base.abs().max()


# -- several adapters, switching, disabling -------------------------------------------------------------------


def test_several_adapters_switch_and_stack():
    k = adapted("llama")
    k.add_adapter("hb", BottleneckConfig.houlsby(reduction_factor=8))
    randomize(k, seed=5)
    only_default = logits(k)
    k.set_adapter("hb")
    only_hb = logits(k)
    assert k.active_adapters == ["hb"] and not torch.allclose(only_default, only_hb)
    assert {n for n, p in k.named_parameters() if p.requires_grad} == {
        n for n, _ in k.named_parameters() if ".bottleneck_" in n and ".hb" in n
    }
    k.base_model.set_adapter(["default", "hb"])  # one after the other, as the adapters library's Stack
    stacked = logits(k)
    assert not torch.allclose(stacked, only_default) and not torch.allclose(stacked, only_hb)
    k.delete_adapter("hb")
    assert k.active_adapters == ["default"]
    torch.testing.assert_close(logits(k), only_default, rtol=0, atol=0)
    assert all(layer.adapter_names() == ["default"] for layer in layers(k).values())
    assert "self_attn" not in " ".join(layers(k))  # Houlsby's attention sites left with the adapter


def test_disable_adapter_runs_the_base_model():
    k = adapted("gpt2")
    with k.disable_adapter():
        torch.testing.assert_close(logits(k), logits(tiny_gpt2()), rtol=0, atol=0)
    assert not torch.allclose(logits(k), logits(tiny_gpt2()))


def test_a_batch_can_mix_adapters_row_by_row():
    k = adapted("llama")
    k.add_adapter("hb", BottleneckConfig.houlsby())
    randomize(k, seed=6)
    ids = input_ids(batch=3)
    with torch.no_grad():
        mixed = k(input_ids=ids, adapter_names=["hb", "__base__", "default"]).logits
    k.set_adapter("hb")
    torch.testing.assert_close(mixed[0], logits(k, ids)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], logits(tiny_llama(), ids)[1], rtol=1e-5, atol=1e-6)
    k.set_adapter("default")
    torch.testing.assert_close(mixed[2], logits(k, ids)[2], rtol=1e-5, atol=1e-6)


def test_generation_with_the_kv_cache_uses_the_adapters():
    k = adapted("llama")
    ids = input_ids(batch=1, seq=4)
    with torch.no_grad():
        cached = k.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = k.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False)
        with k.disable_adapter():
            base = k.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(base, tiny_llama().generate(input_ids=ids, max_new_tokens=4, do_sample=False))


def test_threads_each_read_their_own_residual_stream():
    k = adapted("gpt2")
    inputs = [input_ids(batch=1, seq=6 + i, seed=i) for i in range(4)]
    expected = [logits(k, ids) for ids in inputs]
    errors = []

    def run(i: int) -> None:
        for _ in range(10):
            if not torch.equal(logits(k, inputs[i]), expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_a_deep_copy_computes_the_same():
    k = adapted("bert")
    twin = copy.deepcopy(k)
    torch.testing.assert_close(logits(twin), logits(k), rtol=0, atol=0)


def test_a_half_precision_base_gets_fp32_adapters():
    k = lorakit.get_peft_model(tiny_llama().to(torch.bfloat16), BottleneckConfig.pfeiffer())
    assert {p.dtype for n, p in k.named_parameters() if ".bottleneck_" in n} == {torch.float32}
    assert logits(k).dtype == torch.bfloat16


# -- merging and unloading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_merging_is_refused_with_the_reason_and_changes_nothing(how):
    k = adapted("llama", BottleneckConfig.houlsby())
    before = {n: t.clone() for n, t in k.state_dict().items()}
    expected = logits(k)
    with pytest.raises(MergeError, match=r"'swish'.*not linear.*unload\(\)"):
        getattr(k, how)()
    assert all(torch.equal(t, before[n]) for n, t in k.state_dict().items())
    torch.testing.assert_close(logits(k), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_unload_gives_back_the_base_model_byte_for_byte(arch):
    fresh = MODEL_FACTORIES[arch]()
    k = adapted(arch, BottleneckConfig.houlsby())
    base = k.unload()
    assert type(base) is type(fresh) and not layers(base)
    assert base.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(t, fresh.state_dict()[n]) for n, t in base.state_dict().items())
    assert not any(m._forward_pre_hooks for m in base.modules())  # the residual taps are gone too
    torch.testing.assert_close(logits(base), logits(fresh), rtol=0, atol=0)


# -- files ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_in_lorakit_s_format(arch, tmp_path):
    config = BottleneckConfig.houlsby(ln_after=True, scaling="learned", task_type="SEQ_CLS" if arch == "bert" else None)
    k = adapted(arch, config)
    k.add_adapter("other", BottleneckConfig.pfeiffer(reduction_factor=8))
    randomize(k, seed=9)
    k.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
    assert "library_name: lorakit" in (tmp_path / "README.md").read_text()  # PEFT cannot load this method
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["placement"] == DEFAULT_PLACEMENTS[arch]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    site = {"llama": "model.layers.0.mlp.down_proj", "gpt2": "transformer.h.0.mlp.dropout"}.get(
        arch, "bert.encoder.layer.0.output.dropout"
    )
    for part in ("bottleneck_down.weight", "bottleneck_up.bias", "bottleneck_norm_after.weight", "bottleneck_scale"):
        assert f"base_model.model.{site}.{part}" in keys
    loaded = lorakit.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    expected = logits(k)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    loaded.set_adapter("other")
    k.set_adapter("other")
    torch.testing.assert_close(logits(loaded), logits(k), rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")
    for name in ("adapter_model.safetensors", "other/adapter_model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / name).read_bytes()
    assert type(lorakit.PeftConfig.from_pretrained(tmp_path)) is BottleneckConfig


def test_the_hf_trainer_trains_it(tmp_path):
    ids = (torch.arange(16) * 3) % 11 + 4
    data = [{"input_ids": ids.clone(), "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}] * 32
    config = BottleneckConfig.pfeiffer(reduction_factor=2, task_type="CAUSAL_LM")
    k = lorakit.get_peft_model(tiny_llama(initializer_range=0.5), config)
    frozen = {n: p.detach().clone() for n, p in k.named_parameters() if not p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        num_train_epochs=4,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        seed=0,
        activation_checkpointing=True,  # blocks run again in backward: the residual taps too
    )
    trainer = Trainer(model=k, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in k.named_parameters() if n in frozen)


# -- other architectures and refusals ---------------------------------------------------------------------------


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)  # fmt: skip
    return OPTForCausalLM(cfg).eval()


OPT_PLACEMENT = {
    "blocks": "layers",
    "attention": {"output": "self_attn.out_proj", "residual": "self_attn_layer_norm"},
    "feedforward": {"output": "fc2", "residual": "final_layer_norm"},
}


def test_an_architecture_without_a_known_placement_names_what_is_accepted():
    model = tiny_opt()
    with pytest.raises(ConfigError, match=r"model_type in \['bert', .*'llama'.*not 'opt'.*placement="):
        lorakit.get_peft_model(model, BottleneckConfig.pfeiffer())
    assert not layers(model)
    k = randomize(lorakit.get_peft_model(model, BottleneckConfig.houlsby(placement=OPT_PLACEMENT)))
    assert set(layers(k.get_base_model())) == {
        f"model.decoder.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.out_proj", "fc2")
    }
    assert not torch.allclose(logits(k), logits(tiny_opt()))
    torch.testing.assert_close(logits(k.unload()), logits(tiny_opt()), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", sorted(DEFAULT_PLACEMENTS))
def test_every_default_placement_fits_its_architecture(model_type):
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)
    if model_type == "gpt2":
        sizes = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96)
    elif DEFAULT_PLACEMENTS[model_type] is DEFAULT_PLACEMENTS["llama"]:
        sizes["num_key_value_heads"] = 2
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, max_position_embeddings=64, **sizes)).eval()
    ids = input_ids(batch=2, seq=7)
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
        k = randomize(lorakit.get_peft_model(model, BottleneckConfig.houlsby(original_ln_before=True)))
        assert len(layers(k)) == 4
        assert not torch.allclose(k(input_ids=ids).last_hidden_state, base)
        torch.testing.assert_close(k.unload()(input_ids=ids).last_hidden_state, base, rtol=0, atol=0)


def test_an_explicit_placement_equal_to_the_default_computes_the_same():
    explicit = adapted("llama", BottleneckConfig.pfeiffer(placement=copy.deepcopy(DEFAULT_PLACEMENTS["llama"])))
    torch.testing.assert_close(logits(explicit), logits(adapted("llama")), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"non_linearity": "softsign"}, r"non_linearity='softsign' is not known; accepted: .*relu.*swish"),
        ({"reduction_factor": 0.5}, r"reduction_factor=0.5 is invalid; accepted: a number ≥ 1"),
        ({"reduction_factor": {"0": 8}}, r"needs string keys .* and a 'default'"),
        ({"mh_adapter": False, "output_adapter": False}, "would sit nowhere"),
        ({"original_ln_after": False}, "original_ln_after=False is not supported"),
        ({"residual_before_ln": "pre"}, "accepted: true, false or 'post_add'"),
        ({"original_ln_before": False, "residual_before_ln": "post_add"}, "only exists with original_ln_before"),
        ({"init_weights": "xavier"}, "accepted: bert, mam_adapter, houlsby"),
        ({"scaling": "per-token"}, "accepted: a number such as 1.0, 'learned' or 'channel'"),
        ({"dropout": 1.5}, r"dropout=1.5 is invalid"),
        ({"leave_out": [-1]}, "leave_out=.* is invalid"),
        ({"ln_before": "yes"}, "ln_before='yes' is invalid"),
        ({"placement": {"blocks": "layers", "mlp": {"output": "fc2"}}}, "placement=.* is invalid"),
    ],
)
def test_bad_config_fields_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        BottleneckConfig(**fields)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (BottleneckConfig.pfeiffer(reduction_factor=3), r"reduction_factor=3 does not divide hidden_size=32"),
        (BottleneckConfig.pfeiffer(reduction_factor={"1": 5, "default": 16}), r"reduction_factor=5 .*block 1"),
        (BottleneckConfig.pfeiffer(residual_before_ln="post_add"), "this model's feedforward block has none"),
        (
            BottleneckConfig.pfeiffer(placement={"blocks": "layers", "feedforward": {"output": "mlp.down_proj"}}),
            "names no 'residual' module",
        ),  # fmt: skip
        (
            BottleneckConfig.houlsby(placement={"blocks": "layers", "feedforward": {"output": "mlp.down_proj"}}),
            "has no 'attention'",
        ),  # fmt: skip
    ],
)
def test_configs_that_do_not_fit_the_model_are_refused_before_any_change(config, message):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=message):
        lorakit.get_peft_model(model, config)
    assert not layers(model) and not any(m._forward_pre_hooks for m in model.modules())


def test_placements_naming_missing_modules_are_refused():
    with pytest.raises(TargetNotFoundError, match="blocks='blocks' matched no block"):
        lorakit.get_peft_model(tiny_llama(), BottleneckConfig.houlsby(placement={**OPT_PLACEMENT, "blocks": "blocks"}))
    with pytest.raises(TargetNotFoundError, match=r"'model.layers.0.self_attn.out_proj', which LlamaForCausalLM"):
        lorakit.get_peft_model(tiny_llama(), BottleneckConfig.houlsby(placement=OPT_PLACEMENT))


def test_leave_out_and_adapter_names_already_taken():
    k = lorakit.get_peft_model(tiny_llama(), BottleneckConfig.houlsby(leave_out=[0]))
    assert all(".layers.1." in n for n in layers(k))
    with pytest.raises(AdapterExistsError):
        k.add_adapter("default", BottleneckConfig.houlsby())


def test_another_method_cannot_join():
    k = lorakit.get_peft_model(tiny_llama(), BottleneckConfig.pfeiffer())
    with pytest.raises(ConfigError, match="holds bottleneck adapters; a LORA adapter cannot join"):
        k.add_adapter("lora", lorakit.LoraConfig(target_modules=["q_proj"]))
