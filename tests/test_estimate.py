"""``lorakit estimate``: exact counts from configs alone, checked against real models and closed-form figures."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from lorakit import AdaLoraConfig, ConfigError, LoraConfig, TargetNotFoundError, get_peft_model
from lorakit.cli import estimate as cli_estimate
from lorakit.errors import LorakitError, ModelNotFoundError
from lorakit.estimate import (
    PRESETS,
    TrainingSetup,
    activation_bytes,
    build_meta_model,
    count_parameters,
    estimate_memory,
    layer_comparison,
    load_model_config,
    nf4_bytes,
    optimizer_bytes,
    preset_config,
    quoted_figures,
)

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- closed-form figures --------------------------------------------------------------------------------


def test_quoted_layer_4096_r8():
    layer = layer_comparison(4096, 4096, 8)
    assert layer["full"] == 16_777_216
    assert layer["lora"] == 65_536
    assert layer["ratio"] == 256


def test_layer_rejects_non_positive_rank():
    with pytest.raises(ConfigError, match="r=0"):
        layer_comparison(4096, 4096, 0)


def test_nf4_bytes_by_hand():
    n = 4096 * 4096  # 262,144 blocks of 64
    data = n // 2  # 4 bits per value
    assert nf4_bytes(n, double_quant=False) == data + 4 * 262_144  # fp32 absmax per block: 0.5 bits/value
    # 8-bit absmax per block + fp32 constant per 256 blocks (1024 of them) + one fp32 offset
    assert nf4_bytes(n) == data + 262_144 + 4 * 1024 + 4 == 8_654_852
    assert (nf4_bytes(n) - data) * 8 / n == pytest.approx(0.127, abs=0.001)
    # a ragged tensor: 100 values = 50 bytes of data, 2 blocks (the last one partial)
    assert nf4_bytes(100, double_quant=False) == 50 + 8
    assert nf4_bytes(100) == 50 + 2 + 4 + 4


def test_optimizer_bytes():
    assert optimizer_bytes([10, 20], "adamw") == 240
    assert optimizer_bytes([10, 20], "sgd") == 0
    # bitsandbytes keeps fp32 states below 4096 values; above, 1 byte per state + fp32 absmax per 256
    assert optimizer_bytes([100], "adamw8bit") == 800
    assert optimizer_bytes([4096], "adamw8bit") == 2 * (4096 + 4 * 16)
    with pytest.raises(ConfigError, match="adam"):
        optimizer_bytes([1], "lion")


# -- counts equal the real model's ----------------------------------------------------------------------

CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=r".*\.1\.(self_attn\.(q|k)_proj|mlp\.down_proj)")),
    ("llama", dict(target_modules="all-linear", rank_pattern={"q_proj": 16, r"layers\.1\.mlp\..*": 2})),
    ("llama", dict(target_modules=SEVEN, layers_to_transform=[1], exclude_modules=["o_proj"])),
    ("llama", dict(target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"])),
    ("llama", dict(target_modules=None, bias="all")),
    ("llama_tied", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules=["c_attn"])),
    ("gpt2", dict(target_modules="all-linear", rank_pattern={"c_fc": 4}, bias="lora_only")),
    ("gpt2", dict(target_modules=["wte", "c_proj"])),
    ("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("bert", dict(target_modules="all-linear", task_type="SEQ_CLS", bias="all")),
    ("bert", dict(target_modules=r".*layer\.0\..*dense")),
    ("llama", dict(target_modules=["q_proj", "embed_tokens", "down_proj"], use_dora=True)),
    ("gpt2", dict(target_modules=["c_attn"], use_dora=True)),
    (
        "llama",
        dict(target_modules="all-linear", alpha_pattern={"v_proj": 64}, rank_pattern={"o_proj": 3}, use_dora=True),
    ),
    ("llama", dict(target_modules=["q_proj", "down_proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4})),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2}, modules_to_save=["ln_f"], bias="all")),
    ("bert", dict(target_modules=["query", "dense"], task_type="SEQ_CLS", use_dora=True, bias="lora_only")),
    ("bert", dict(target_modules=["key"], task_type="SEQ_CLS", modules_to_save=["pooler"], layers_to_transform=[0])),
]
FACTORIES = {"llama": tiny_llama, "llama_tied": lambda: tiny_llama(tie=True), "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.mark.parametrize(("arch", "kwargs"), CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_count_equals_real_peft_model(arch, kwargs):
    real = FACTORIES[arch]()
    total = sum(p.numel() for p in real.parameters())
    if "task_type" in kwargs:  # the task picks the class: BertForSequenceClassification
        meta = build_meta_model(real.config, task_type=kwargs["task_type"])
    else:
        meta = build_meta_model(real.config, architecture=type(real).__name__)
    assert type(meta) is type(real)
    est = count_parameters(meta, LoraConfig(**kwargs))
    peft_model = get_peft_model(real, LoraConfig(**kwargs))
    assert est.trainable == peft_model.get_nb_trainable_parameters()[0]
    assert est.total == total
    assert breakdown(est) == real_breakdown(peft_model)


def breakdown(est) -> list[tuple[str, str, int, int, int]]:
    return [(m.name, m.kind, m.in_features, m.out_features, m.r, m.params) for m in est.modules]


def real_breakdown(peft_model) -> list[tuple[str, str, int, int, int]]:
    """The adapter layers of a real adapted model, with their trainable values (A, B and the variant's own)."""
    return [
        (name, layer.kind.name, *layer.kind.features(layer.base_layer), layer.r["default"], n)
        for name, layer in peft_model.base_model.lora_layers()
        if (n := sum(p.numel() for p in layer.adapter_parameters("default") if p.requires_grad))
    ]


ADALORA = [
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], init_r=6, target_r=2, total_step=10)),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], init_r=4, target_r=2, total_step=10, bias="all")),
    ("bert", dict(target_modules=["query", "value"], init_r=5, target_r=3, total_step=10, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize(("arch", "kwargs"), ADALORA, ids=[a for a, _ in ADALORA])
def test_adalora_count_equals_real_peft_model(arch, kwargs):
    real = FACTORIES[arch]()
    meta = build_meta_model(real.config, architecture=type(real).__name__)
    est = count_parameters(meta, AdaLoraConfig(**kwargs))
    peft_model = get_peft_model(real, AdaLoraConfig(**kwargs))
    assert est.trainable == peft_model.get_nb_trainable_parameters()[0]
    assert breakdown(est) == real_breakdown(peft_model)
    assert all(m.m_size == m.r == kwargs["init_r"] for m in est.modules)  # AdaLoRA's singular values E: (r, 1)


def test_trained_adalora_config_counts_its_kept_ranks():
    kept = [True, False, True, False, False, True]
    names = [n for n, _ in tiny_llama().named_modules() if n.endswith("q_proj")]
    pattern = {f"{n}.lora_E": kept for n in names}
    config = dict(target_modules=["q_proj"], init_r=6, target_r=2, total_step=10, rank_pattern=pattern)
    est = count_parameters(build_meta_model(tiny_llama().config), AdaLoraConfig(**config))
    assert est.trainable == get_peft_model(tiny_llama(), AdaLoraConfig(**config)).get_nb_trainable_parameters()[0]
    assert est.adapter == len(names) * 3 * (32 + 32 + 1)


def test_estimate_follows_the_tuner(monkeypatch):
    """No second set of rules: whatever injection creates is what the estimate counts."""
    from lorakit.tuners.lora.layer import LoraLayer

    meta = build_meta_model(tiny_llama().config)
    config = LoraConfig(r=4, target_modules=["q_proj"])
    plain = count_parameters(meta, config)
    add = LoraLayer.add
    monkeypatch.setattr(LoraLayer, "add", lambda self, name, r, *args, **kw: add(self, name, 2 * r, *args, **kw))
    doubled = count_parameters(meta, config)
    assert [m.r for m in doubled.modules] == [8, 8] and doubled.adapter == 2 * plain.adapter


def test_count_leaves_the_model_and_config_untouched():
    real = tiny_bert()
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in real.named_parameters()}
    loftq = dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    config = LoraConfig(target_modules=["query"], task_type="SEQ_CLS", inference_mode=True, **loftq)
    saved = config.to_dict()
    est = count_parameters(real, config)
    # an estimate is of training: a saved adapter's inference_mode=True counts as False, LoftQ as the default init
    training = LoraConfig(target_modules=["query"], task_type="SEQ_CLS")
    assert est.trainable == get_peft_model(tiny_bert(), training).get_nb_trainable_parameters()[0]
    assert config.to_dict() == saved  # no task head added to modules_to_save, no base_model_name_or_path
    after = dict(real.named_parameters())
    assert after.keys() == before.keys()  # no adapter layer was put into it
    for name, (value, requires_grad) in before.items():
        assert after[name].requires_grad == requires_grad and torch.equal(after[name], value)


def test_tied_embeddings_counted_once():
    real = tiny_llama(tie=True)
    meta = build_meta_model(real.config, architecture="LlamaForCausalLM")
    est = count_parameters(meta, LoraConfig(target_modules=["q_proj"]))
    untied = count_parameters(build_meta_model(tiny_llama().config), LoraConfig(target_modules=["q_proj"]))
    assert untied.total - est.total == 96 * 32  # the output head's (vocab, hidden) weight


def test_target_matching_nothing_lists_module_names():
    meta = build_meta_model(tiny_llama().config)
    with pytest.raises(TargetNotFoundError, match="q_proj"):
        count_parameters(meta, LoraConfig(target_modules=["q_prj"]))


def test_modules_to_save_matching_nothing():
    meta = build_meta_model(tiny_llama().config)
    with pytest.raises(ConfigError, match="lm_haed"):
        count_parameters(meta, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_haed"]))


# -- presets and the quoted LLaMA-7B figures -----------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "total"),
    [
        ("llama-2-7b", 6_738_415_616),
        ("llama-2-13b", 13_015_864_320),
        ("llama-3-8b", 8_030_261_248),
        ("mistral-7b", 7_241_732_096),
        ("smollm2-135m", 134_515_008),
        ("gpt2", 124_439_808),
    ],
)
def test_preset_totals(preset, total):
    est = count_parameters(build_meta_model(preset_config(preset)), LoraConfig(target_modules="all-linear"))
    assert est.total == total


def test_llama2_7b_seven_projections_r8():
    meta = build_meta_model(preset_config("llama-2-7b"))
    assert count_parameters(meta, LoraConfig(r=8, target_modules=SEVEN)).adapter == 19_988_480
    assert count_parameters(meta, LoraConfig(r=8, target_modules="all-linear")).adapter == 19_988_480


def test_quoted_figures():
    s = quoted_figures()
    assert s["layer"]["lora"] == 65_536 and s["layer"]["ratio"] == 256
    assert s["counts"] == {
        "q_proj, v_proj": 4_194_304,
        "q, k, v, o": 8_388_608,
        "q, k, v, o, gate, up, down": 19_988_480,
    }
    assert s["ranks_in_quoted_range"] == [2, 3]  # 4,997,120 and 7,495,680
    assert s["total"] == 6_738_415_616


def test_llama2_7b_memory_by_hand():
    config = preset_config("llama-2-7b")
    est = count_parameters(build_meta_model(config), LoraConfig(r=8, target_modules=SEVEN))
    total, adapter = 6_738_415_616, 19_988_480
    mem = estimate_memory(est, config, TrainingSetup(dtype="bf16"))
    # mixed precision full FT: bf16 weights + bf16 grads + fp32 master + 2 fp32 Adam moments = 16 B/param
    assert mem["full"].model_states == 16 * total
    no_master = estimate_memory(est, config, TrainingSetup(dtype="bf16", master_weights=False))
    assert no_master["full"].model_states == 12 * total
    assert estimate_memory(est, config, TrainingSetup(dtype="fp32"))["full"].model_states == 16 * total
    # LoRA: frozen bf16 base + fp32 adapter weights, grads and Adam moments
    assert mem["lora"].model_states == 2 * total + 16 * adapter
    # QLoRA: per layer 4 attention (4096x4096) and 3 MLP (4096x11008) weights in NF4 + double quant
    attn = 4096 * 4096 // 2 + 262_144 + 4 * 1024 + 4
    mlp_blocks = 4096 * 11008 // 64  # 704,512 -> 2,752 second-level blocks
    mlp = 4096 * 11008 // 2 + mlp_blocks + 4 * 2752 + 4
    quantized = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    weights = 32 * (4 * attn + 3 * mlp) + 2 * (total - quantized)
    assert mem["qlora"].weights == weights + 4 * adapter
    assert weights == quoted_figures()["nf4"]["weights_bytes"] == 3_865_592_704  # the quoted "~4 GB"


def test_activations_are_an_estimate_that_scales():
    config = preset_config("llama-2-7b")
    one = activation_bytes(config, TrainingSetup(batch_size=1, seq_len=512))
    assert activation_bytes(config, TrainingSetup(batch_size=2, seq_len=512)) == 2 * one
    assert activation_bytes(config, TrainingSetup(gradient_checkpointing=True)) < one / 5
    assert activation_bytes(object(), TrainingSetup()) is None


def test_training_setup_validates():
    with pytest.raises(ConfigError, match="dtype"):
        TrainingSetup(dtype="int4")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainingSetup(batch_size=0)


# -- inputs -----------------------------------------------------------------------------------------------


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'llama-2-7b'"):
        load_model_config("llama2-7b")


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model_config(tmp_path / "nope" / "config.json")


def test_config_json_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type"):
        load_model_config(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="model_type"):
        load_model_config(tmp_path)


def test_config_json_and_folder(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json"):
        config, origin = load_model_config(source)
        assert config.model_type == "llama" and str(tmp_path) in origin
    assert set(PRESETS) >= {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "mistral-7b", "smollm2-135m"}


# -- the command line ---------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lorakit")
    cli_estimate.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["estimate", *argv])


def test_cli_table(capsys):
    assert cli_estimate.run(parse("llama-2-7b", "--r", "8")) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "19,988,480" in out
    assert "full FT" in out and "QLoRA" in out and "Assumptions" in out and "rough estimate" in out


def test_cli_json(capsys, tmp_path):
    assert cli_estimate.run(parse("gpt2", "--targets", "c_attn", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["adapter"]["trainable_params"] == 12 * 8 * (768 + 2304)
    assert data["memory"]["full"]["master_weights"] == 4 * 124_439_808
    file = tmp_path / "out.json"
    assert cli_estimate.run(parse("smollm2-135m", "--json", str(file))) == 0
    assert "Training memory" in capsys.readouterr().out
    assert json.loads(file.read_text())["model"]["total_params"] == 134_515_008


def test_cli_layer_and_quoted_figures(capsys):
    assert cli_estimate.run(parse("--layer", "4096x4096", "-r", "8")) == 0
    out = capsys.readouterr().out
    assert "65,536" in out and "16,777,216" in out and "256x fewer" in out
    assert cli_estimate.run(parse("--quoted-figures")) == 0
    out = capsys.readouterr().out
    assert "19,988,480" in out and "4,194,304" in out and "8,388,608" in out and "~4 GB" in out


def test_cli_targets_regex_rank_pattern_and_adapter_config(capsys, tmp_path):
    args = parse("llama-2-7b", "--targets", "q_proj,v_proj", "--rank-pattern", "q_proj=16", "--json")
    cli_estimate.run(args)
    assert json.loads(capsys.readouterr().out)["adapter"]["adapter_params"] == 32 * (16 + 8) * 8192
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    cli_estimate.run(parse("llama-2-7b", "--adapter-config", str(tmp_path), "--r", "2", "--json"))
    assert json.loads(capsys.readouterr().out)["adapter"]["adapter_params"] == 32 * 2 * 8192
    cli_estimate.run(parse("llama-2-7b", "--targets", r".*\.0\.self_attn\.q_proj", "--json"))
    assert json.loads(capsys.readouterr().out)["adapter"]["adapter_params"] == 8 * 8192
    cli_estimate.run(parse("gpt2", "--targets", "c_attn", "--dora", "--json"))  # + a magnitude per output
    assert json.loads(capsys.readouterr().out)["adapter"]["adapter_params"] == 12 * (8 * (768 + 2304) + 2304)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (("does/not/exist.json",), ModelNotFoundError),
        (("llama2-7b",), ConfigError),
        (("llama-2-7b", "--r", "0"), ConfigError),
        (("llama-2-7b", "--targets", "qproj"), TargetNotFoundError),
        (("--layer", "4096x4096", "--r", "-1"), ConfigError),
    ],
)
def test_cli_bad_input(argv, error):
    with pytest.raises(error) as info:
        cli_estimate.run(parse(*argv))
    assert isinstance(info.value, LorakitError)  # the `lorakit` entry point turns these into exit status 1


def test_cli_main_exit_codes(capsys):
    from lorakit.cli import main

    assert main(["estimate", "--layer", "4096x4096"]) == 0
    assert main(["estimate", "llama-2-7b", "--targets", "qproj"]) == 1
    assert "q_proj" in capsys.readouterr().err  # the error names the modules that exist


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as info:
        parse("--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "lorakit estimate llama-2-7b" in out
    with pytest.raises(SystemExit) as info:
        parse("--layer", "4096by4096")
    assert info.value.code == 2


def test_count_conv_and_plain_modules():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 12)
            self.conv = nn.Conv2d(3, 8, kernel_size=(3, 5))
            self.fc = nn.Linear(12, 7)

    config = dict(target_modules=["emb", "conv", "fc"], rank_pattern={"conv": 2})
    est = count_parameters(Net(), LoraConfig(**config))
    assert est.adapter == 8 * (50 + 12) + 2 * 3 * 3 * 5 + 2 * 8 + 8 * (12 + 7)
    assert est.trainable == get_peft_model(Net(), LoraConfig(**config)).get_nb_trainable_parameters()[0]
    dora = dict(config, use_dora=True, bias="all")  # a magnitude per output channel of each layer, and the biases
    est = count_parameters(Net(), LoraConfig(**dora))
    peft_model = get_peft_model(Net(), LoraConfig(**dora))
    assert est.trainable == peft_model.get_nb_trainable_parameters()[0]
    assert breakdown(est) == real_breakdown(peft_model)
    assert [m.m_size for m in est.modules] == [12, 8, 7] and est.bias == 8 + 7


def test_ia3_count_equals_the_real_adapted_model():
    """The estimate reads any method's layers: IA³'s vectors count per module, exactly as get_peft_model trains."""
    from lorakit import IA3Config, get_peft_model

    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    estimate = count_parameters(tiny_llama(), config)
    assert estimate.trainable == get_peft_model(tiny_llama(), config).get_nb_trainable_parameters()[0]
    by_name = {m.name.rsplit(".", 1)[-1]: m.params for m in estimate.modules}
    assert by_name == {"k_proj": 16, "v_proj": 16, "down_proj": 64}  # (out, 1) vectors; (1, in) for feedforward


def test_cli_method_counts_what_that_method_trains(capsys, tmp_path):
    """``--method`` picks the config; the count is the real injection's (SmolLM2: 57,600 IA³ values, as the
    ``lorakit train --method ia3`` log reports)."""
    from lorakit import AdaLoraConfig, IA3Config

    assert cli_estimate.run(parse("smollm2-135m", "--method", "ia3", "--json")) == 0
    data = json.loads(capsys.readouterr().out)["adapter"]
    assert data["method"] == "IA³" and data["trainable_params"] == 30 * (192 + 192 + 1536) == 57_600
    assert cli_estimate.run(parse("smollm2-135m", "--method", "ia3")) == 0
    out = capsys.readouterr().out
    assert "IA³+NF4" in out and "values each" in out and "57,600" in out
    assert (
        cli_estimate.run(parse("llama-2-7b", "--method", "adalora", "--r", "12", "--targets", "q_proj", "--json")) == 0
    )
    data = json.loads(capsys.readouterr().out)["adapter"]
    assert data["adapter_params"] == 32 * (12 * 2 * 4096 + 12)  # A, B and the singular values E at init_r
    IA3Config(target_modules=["q_proj"], feedforward_modules=[]).save_pretrained(tmp_path)
    assert cli_estimate.run(parse("llama-2-7b", "--adapter-config", str(tmp_path), "--json")) == 0
    assert json.loads(capsys.readouterr().out)["adapter"]["adapter_params"] == 32 * 4096
    with pytest.raises(ConfigError, match="--r: not a setting of IA³"):
        cli_estimate.run(parse("llama-2-7b", "--method", "ia3", "--r", "4"))
    with pytest.raises(ConfigError, match="contradicts --adapter-config, which holds a IA³ adapter"):
        cli_estimate.run(parse("llama-2-7b", "--method", "lora", "--adapter-config", str(tmp_path)))
    assert AdaLoraConfig  # the class cli_estimate builds for --method adalora


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning", "houlsby", "pfeiffer"])
def test_every_method_s_count_equals_its_real_adapted_model(method):
    """Prompt encoders (outside the model) count as the adapter, one row per module; bottleneck sites as layers."""
    cls, defaults, _ = cli_estimate._method_configs()[method]
    estimate = count_parameters(tiny_llama(), cls(**defaults))
    real = get_peft_model(tiny_llama(), cls(**defaults))
    assert estimate.trainable == real.get_nb_trainable_parameters()[0] > 0
    assert estimate.bias == 0 and estimate.adapter == estimate.trainable


def test_cli_estimate_of_a_prompt_method(capsys):
    assert cli_estimate.run(parse("smollm2-135m", "--method", "p-tuning", "--virtual-tokens", "10", "--json")) == 0
    data = json.loads(capsys.readouterr().out)["adapter"]
    assert data["config"]["num_virtual_tokens"] == 10 and data["target_modules"] is None
    assert [g["name"] for g in data["groups"]] == ["prompt_encoder"] and data["groups"][0]["kind"] == "own"
    with pytest.raises(ConfigError, match="--reduction-factor: not a setting of prompt tuning"):
        cli_estimate.run(parse("smollm2-135m", "--method", "prompt-tuning", "--reduction-factor", "8"))
