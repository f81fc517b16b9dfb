"""``lorakit inspect``, ``merge`` and ``generate`` on a tiny local model; ``--help`` of every command."""

from __future__ import annotations

import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import IA3Config, LoraConfig, PeftModel, get_peft_model
from lorakit.cli import COMMANDS, main


@pytest.fixture
def adapter_dir(tmp_path, model_dir):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("command", [c.__name__.rsplit(".", 1)[-1] for c in COMMANDS])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_no_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_inspect(adapter_dir, capsys):
    folder, trainable = adapter_dir
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "down_proj" in out and f"{trainable:,} in the adapter's tensors" in out
    assert "r=4  lora_alpha=8  scaling=2  LoRA" in out
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapter_parameters"] == trainable
    assert info["modules_adapted"] == 3 * 2
    assert info["by_module"]["v_proj"] == {"count": 2, "ranks": [4], "layers": "0-1"}
    assert info["file_bytes"] == (folder / "adapter_model.safetensors").stat().st_size


def test_dora_adapter_inspects_and_merges(tmp_path, model_dir, capsys):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False, use_dora=True)
    model = get_peft_model(base, config)
    with torch.no_grad():  # magnitudes away from ‖W + s·BA‖, so the rescale shows in the logits
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)
    model.save_pretrained(tmp_path / "dora")
    assert main(["inspect", str(tmp_path / "dora")]) == 0
    out = capsys.readouterr().out
    trainable = model.get_nb_trainable_parameters()[0]
    assert "DoRA (magnitude + direction)" in out and f"{trainable:,} in the adapter's tensors" in out
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "dora"), "-o", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_an_ia3_adapter_inspects_by_module_without_ranks(tmp_path, model_dir, capsys):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, IA3Config(task_type="CAUSAL_LM"))  # k_proj, v_proj, down_proj (feedforward)
    model.save_pretrained(tmp_path / "ia3")
    assert main(["inspect", str(tmp_path / "ia3"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    trainable = model.get_nb_trainable_parameters()[0]
    assert info["peft_type"] == "IA3" and info["method"] == "IA³"
    assert info["adapter_parameters"] == trainable and info["other_tensors"] == {}
    assert set(info["by_module"]) == {"k_proj", "v_proj", "down_proj"}
    assert all(t["ranks"] == [] and t["layers"] == "0-1" for t in info["by_module"].values())
    assert main(["inspect", str(tmp_path / "ia3")]) == 0
    out = capsys.readouterr().out
    assert "IA³: learned vectors" in out and f"{trainable:,} in the adapter's tensors" in out
    assert "rank" not in out.split("targets", 1)[1]


def test_prompt_and_bottleneck_adapters_inspect(tmp_path, model_dir, capsys):
    from lorakit import BottleneckConfig, PromptEncoderConfig

    for name, config in {
        "p": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        "b": BottleneckConfig.pfeiffer(),
    }.items():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
        model.save_pretrained(tmp_path / name)
    assert main(["inspect", str(tmp_path / "p"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "P-tuning" and info["modules"] == {"(model input)": {"params": 8 * 32, "rank": None}}
    assert main(["inspect", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "8 virtual tokens" in out and "targets" not in out and "256 in the adapter's tensors" in out
    assert main(["inspect", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "(placed by the method)  -> 2 modules" in out and "down_proj" in out and "layers 0-1" in out


def test_inspect_bad_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "adapter_config.json" in capsys.readouterr().err


def test_merge_gives_a_plain_model_with_the_adapters_logits(tmp_path, model_dir, adapter_dir, capsys):
    folder, _ = adapter_dir
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(folder), "--output", str(out)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no lorakit
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder)
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())
    # an existing folder is not replaced without --overwrite, and is intact afterwards
    before = sorted(p.name for p in out.iterdir())
    assert main(["merge", "--model", str(model_dir), "--adapter", str(folder), "--output", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_generate_once_and_chat(model_dir, adapter_dir, capsys, monkeypatch):
    folder, _ = adapter_dir
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "3"]
    assert main([*args, "--prompt", "hello"]) == 0
    assert main([*args, "--adapter", str(folder), "--prompt", "hello"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hello\n/reset\nhello\n/quit\n"))
    assert main([*args, "--chat"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2
    assert main([*args]) == 1  # neither --prompt nor --chat
    assert "exactly one of --prompt" in capsys.readouterr().err


def test_generate_and_merge_default_to_the_adapters_recorded_base(tmp_path, model_dir, adapter_dir, capsys):
    folder, _ = adapter_dir  # its adapter_config.json records model_dir as base_model_name_or_path
    assert main(["generate", "--adapter", str(folder), "--prompt", "hello", "--max-new-tokens", "2"]) == 0
    assert main(["merge", "--adapter", str(folder), "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()


def test_merge_of_a_qlora_adapter_onto_the_4bit_base(tmp_path, model_dir, capsys):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (CI installs it)")
    from lorakit import quantize

    ids = torch.tensor([[5, 9, 17, 33, 2]])
    base = quantize(AutoModelForCausalLM.from_pretrained(model_dir), bits=4)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(ids).logits
    args = ["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter")]
    assert main([*args, "--bits", "4", "-o", str(tmp_path / "merged")]) == 0
    assert "max |diff|" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, fp32
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert main([*args, "-o", str(tmp_path / "onto_fp32")]) == 0  # onto the original weights: a different model
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "onto_fp32")
    with torch.no_grad():
        assert not torch.allclose(other(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_requantize_saves_a_4bit_model_and_reports_the_drift(tmp_path, model_dir, adapter_dir, capsys):
    """--requantize: never silent; the drift it prints is the drift of what it wrote, which plain transformers
    loads back into bitsandbytes layers."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (CI installs it)")
    from lorakit.cli.merge import logit_drift

    folder, _ = adapter_dir
    probe = "The quick brown fox"
    out = tmp_path / "nf4"
    args = ["merge", "--model", str(model_dir), "--adapter", str(folder), "--probe", probe, "--no-verify"]
    assert main([*args, "--requantize", "4", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "requantized to 4-bit nf4" in printed and "linear layers in 4 bit" in printed
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no lorakit: the config says how
    # On an AVX512-BF16 CPU, bitsandbytes' own eval kernel fails on this tiny model's 32-wide layers (a
    # bitsandbytes limit, not lorakit's: real models' widths are multiples of 64); compute with its reference one.
    for module in reloaded.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(reloaded.lm_head) is torch.nn.Linear

    from lorakit.hub import load_model

    _, tokenizer = load_model(str(model_dir))
    ids = tokenizer(probe, return_tensors="pt")["input_ids"]
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder).eval()
    with torch.no_grad():
        reference, got = unmerged(ids).logits, reloaded(ids).logits
    drift = logit_drift(reference, got)
    assert drift["max_abs"] > 0  # 4 bits lose something, and it is reported ...
    line = next(s for s in printed.splitlines() if "vs the unmerged adapter model" in s)
    assert f"max |diff| {drift['max_abs']:.3f}" in line  # ... as measured on what was written
    assert f"same top-1 token at {drift['top1_agreement']:.0%}" in line


def test_logit_drift_is_measured_per_position():
    from lorakit.cli.merge import logit_drift

    ref = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]])
    got = torch.tensor([[[0.0, 1.0, 0.5], [0.0, 3.0, 0.0]]])
    d = logit_drift(ref, got)
    assert d == {"max_abs": 3.0, "mean_abs": pytest.approx(5.5 / 6), "top1_agreement": 0.5}


def test_generate_batch_mixes_adapters_row_by_row(tmp_path, model_dir, adapter_dir, capsys):
    """--batch: every prompt through its own adapter in one mixed batch = that prompt alone with that adapter."""
    folder, _ = adapter_dir
    other = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=2, target_modules=["v_proj", "up_proj"], init_lora_weights=False),
    )
    other.save_pretrained(tmp_path / "other")
    rows = [
        {"prompt": "hello there", "adapter": "b"},
        {"prompt": "a much longer prompt than the others here", "adapter": "a"},
        {"prompt": "base row", "adapter": "__base__"},
        {"prompt": "no adapter named: the first one"},
    ]
    batch = tmp_path / "prompts.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["generate", "--model", str(model_dir), "--raw", "--max-new-tokens", "4"]
    adapters = ["--adapter", f"a={folder}", "--adapter", f"b={tmp_path / 'other'}"]
    assert (
        main([*common, *adapters, "--batch", str(batch), "--batch-size", "3", "-o", str(tmp_path / "out.jsonl")]) == 0
    )
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["adapter"] for o in out] == ["b", "a", "__base__", "a"]
    capsys.readouterr()
    singles = {"a": ["--adapter", str(folder)], "b": ["--adapter", str(tmp_path / "other")], "__base__": []}
    for o in out:
        assert main([*common, *singles[o["adapter"]], "--prompt", o["prompt"]]) == 0
        assert capsys.readouterr().out.strip() == o["completion"], o

    batch.write_text('{"prompt": "x", "adapter": "c"}\n')
    assert main([*common, *adapters, "--batch", str(batch)]) == 1
    assert "line 1: adapter 'c' is not loaded; known: ['a', 'b', '__base__']" in capsys.readouterr().err
