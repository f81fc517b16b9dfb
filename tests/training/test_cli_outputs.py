"""CLI outputs never swallow inputs or users' files (issue 15, items 7 and 11: the merge and generate half)."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import main


@pytest.fixture
def adapter(tmp_path, model_dir):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_merge_refuses_an_output_that_is_its_adapter(adapter, capsys):
    before = sorted(p.name for p in adapter.iterdir())
    assert main(["merge", "--adapter", str(adapter), "--output", str(adapter), "--overwrite"]) == 1
    assert "is the --adapter input" in capsys.readouterr().err
    assert sorted(p.name for p in adapter.iterdir()) == before


def test_merge_refuses_an_output_that_contains_an_input(tmp_path, adapter, model_dir, capsys):
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path), "--overwrite"]) == 1
    assert "contains the --adapter input" in capsys.readouterr().err
    assert (adapter / "adapter_model.safetensors").is_file()
    outer = model_dir.parent
    assert (
        main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(outer), "--overwrite"])
        == 1
    )
    assert "contains the" in capsys.readouterr().err
    assert (model_dir / "config.json").is_file()


def test_merge_overwrite_replaces_only_an_earlier_merge(tmp_path, adapter, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(out), "--no-verify"]) == 0
    assert main(["merge", "--adapter", str(adapter), "--output", str(out), "--no-verify"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(adapter), "--output", str(out), "--overwrite", "--no-verify"]) == 0

    (out / "notes.txt").write_text("mine")
    assert main(["merge", "--adapter", str(adapter), "--output", str(out), "--overwrite", "--no-verify"]) == 1
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"

    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    assert main(["merge", "--adapter", str(adapter), "--output", str(other), "--overwrite", "--no-verify"]) == 1
    assert (other / "data.bin").read_bytes() == b"x"


def test_generate_loads_two_all_linear_adapters(tmp_path, model_dir, capsys):
    for name in ("a", "b"):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_dir),
            LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
        )
        model.save_pretrained(tmp_path / name)
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "2", "--prompt", "hi"]
    assert main([*args, "--adapter", f"a={tmp_path / 'a'}", "--adapter", f"b={tmp_path / 'b'}", "--use", "b"]) == 0, (
        capsys.readouterr().err
    )
