"""The model card (README.md) save_pretrained writes: its metadata, its body, updates that keep the user's text,
atomicity with the adapter, and PEFT reading and writing the same folder."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

import lorakit.io as lkio
from conftest import input_ids, tiny_llama
from lorakit import BottleneckConfig, IA3Config, LoraConfig, PeftModel, get_peft_model
from lorakit.model_card import BEGIN, END, split_front_matter


def lora_model(base_name: str | None = "org/tiny-llama", r: int = 4) -> PeftModel:
    base = tiny_llama()
    base.name_or_path = base.config._name_or_path = base_name
    config = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def card(folder) -> tuple[dict, str]:
    meta, body = split_front_matter((folder / "README.md").read_text())
    assert meta is not None, "the card has no front matter"
    return meta, body


def test_the_front_matter_parses_as_yaml_with_the_hub_fields(tmp_path):
    model = lora_model()
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "peft"  # PEFT's files: the hub shows PEFT's snippet and the adapter tree
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"lorakit", "lora", "transformers", "base_model:adapter:org/tiny-llama"} <= set(meta["tags"])


def test_the_body_says_method_ranks_targets_parameters_and_how_to_load(tmp_path):
    model = lora_model()
    model.save_pretrained(tmp_path, repo_id="me/tiny-lora")
    _, body = card(tmp_path)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 896
    row = next(line for line in body.splitlines() if line.startswith("| `default`"))
    assert "LoRA" in row and "r=4" in row and "lora_alpha=8" in row and "`q_proj`, `v_proj`" in row
    assert f"{trainable:,} ({100 * trainable / total:.4f}% of {total:,})" in row
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny-llama")' in body
    assert 'PeftModel.from_pretrained(base, "me/tiny-lora", adapter_name="default")' in body
    assert "from peft import PeftModel" in body and f"lorakit {lorakit_version()}" in body


def lorakit_version() -> str:
    from importlib.metadata import version

    return version("lorakit")


def test_a_second_save_keeps_the_users_text_and_metadata_and_updates_its_own(tmp_path):
    lora_model(r=4).save_pretrained(tmp_path)
    meta, body = card(tmp_path)
    meta.update(license="apache-2.0", tags=[*meta["tags"], "dates"], pipeline_tag="text2text-generation")
    start, end = body.index(BEGIN), body.index(END) + len(END)
    body = body[:start] + "Trained on the dates task.\n\n" + body[start:end] + "\n\n## Limits\n\nMine.\n"
    (tmp_path / "README.md").write_text(f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{body}")

    lora_model(r=8).save_pretrained(tmp_path)
    meta2, body2 = card(tmp_path)
    assert meta2["license"] == "apache-2.0" and "dates" in meta2["tags"]
    assert meta2["pipeline_tag"] == "text2text-generation"  # the user's choice stands (as in PEFT)
    assert "Trained on the dates task." in body2 and body2.rstrip().endswith("## Limits\n\nMine.")
    assert body2.count(BEGIN) == 1 and "r=8" in body2 and "r=4" not in body2
    before = (tmp_path / "README.md").read_bytes()
    lora_model(r=8).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_bytes() == before  # an unchanged adapter leaves the card unchanged


def test_a_local_base_model_is_named_in_the_body_only(tmp_path):
    """The hub refuses a commit whose base_model is not a repo id (transformers #33922)."""
    local = tmp_path / "models" / "tiny"
    local.mkdir(parents=True)
    lora_model(base_name=str(local)).save_pretrained(tmp_path / "a")
    meta, body = card(tmp_path / "a")
    assert "base_model" not in meta and not any(t.startswith("base_model:") for t in meta["tags"])
    assert f"`{local}`" in body


def test_a_readme_that_is_not_a_model_card_is_left_alone(tmp_path):
    (tmp_path / "README.md").write_text("my notes\n")
    with pytest.warns(UserWarning, match="not a model card.*left unchanged"):
        lora_model().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes\n"
    assert (tmp_path / "adapter_model.safetensors").is_file()
    (tmp_path / "README.md").write_text("---\n[unclosed\n---\nbody\n")
    with pytest.warns(UserWarning, match="left unchanged.*does not parse"):
        lora_model().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "---\n[unclosed\n---\nbody\n"


def test_several_adapters_one_card_at_the_root(tmp_path):
    model = lora_model()
    model.add_adapter("ia", LoraConfig(r=2, target_modules=["k_proj"], task_type="CAUSAL_LM", use_dora=True))
    model.save_pretrained(tmp_path, repo_id="me/two")
    assert not (tmp_path / "ia" / "README.md").exists()
    meta, body = card(tmp_path)
    assert "dora" in meta["tags"]
    assert "| `ia` | `ia/` |" in body
    assert 'model.load_adapter("me/two", adapter_name="ia", subfolder="ia")' in body
    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["ia"])  # no root adapter: the card is written alone
    assert sorted(os.listdir(only)) == ["README.md", "ia"]
    assert 'subfolder="ia", adapter_name="ia")' in card(only)[1]


def test_method_tags_and_a_method_peft_lacks(tmp_path):
    base = tiny_llama()
    ia3 = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(base, ia3).save_pretrained(tmp_path / "ia3")
    meta, _ = card(tmp_path / "ia3")
    assert meta["library_name"] == "peft" and "ia3" in meta["tags"] and "pipeline_tag" not in meta
    get_peft_model(tiny_llama(), BottleneckConfig.pfeiffer()).save_pretrained(tmp_path / "bn")
    meta, body = card(tmp_path / "bn")
    assert meta["library_name"] == "lorakit" and "bottleneck" in meta["tags"]
    assert "PEFT cannot load it" in body


def test_the_card_changes_with_the_adapter_as_one_unit(tmp_path, monkeypatch):
    lora_model(r=4).save_pretrained(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    seen: list[str] = []

    def crash(label: str) -> None:
        seen.append(label)
        if label == "staged README.md":
            raise KeyboardInterrupt

    monkeypatch.setattr(lkio, "crash_point", crash)
    with pytest.raises(KeyboardInterrupt):
        lora_model(r=8).save_pretrained(tmp_path)
    assert "staged adapter_config.json" in seen  # the card is staged in the same unit as the adapter files
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def test_peft_loads_the_folder_and_each_library_keeps_the_others_card(tmp_path):
    peft = pytest.importorskip("peft")
    model = lora_model(base_name=None)  # (a hub id would send PEFT's save looking for it online)
    ids = input_ids()
    model.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits)
    theirs.save_pretrained(tmp_path / "ours")  # PEFT updates our card: our section survives (PEFT resets the tags)
    meta, body = card(tmp_path / "ours")
    assert body.count(BEGIN) == 1 and "PEFT " + peft.__version__ in body and "lora" in meta["tags"]
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").save_pretrained(tmp_path / "ours")
    meta2, body2 = card(tmp_path / "ours")
    assert body2.count(BEGIN) == 1 and body2.count("PEFT " + peft.__version__) == 1  # PEFT's line kept, once
    assert "lorakit" in meta2["tags"]
    assert "base_model" not in meta2 and "base_model:adapter:" not in meta2["tags"]  # PEFT's '' would be refused

    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    peft_text = (tmp_path / "peft" / "README.md").read_text()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    loaded.save_pretrained(tmp_path / "peft")
    meta3, body3 = card(tmp_path / "peft")
    assert split_front_matter(peft_text)[1].rstrip() in body3  # PEFT's whole body kept, ours appended
    assert {"lorakit", "lora"} <= set(meta3["tags"]) and meta3["library_name"] == "peft"
