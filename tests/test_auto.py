"""AutoPeftModel*: the base model named by the adapter, loaded with the task's Auto class, then the adapter; against
PEFT 0.21's classes on tiny models saved to folders (no downloads)."""

from __future__ import annotations

import json
from typing import Any

import peft
import pytest
import torch
from torch import nn

import lorakit
from conftest import input_ids, tiny_bert, tiny_llama
from lorakit.errors import ConfigError, ModelNotFoundError

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """PEFT's AutoPeftModel asks the hub whether a local adapter folder's name has a tokenizer there: not offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Base models saved as transformers folders, and PEFT adapters on them whose config names those folders."""
    root = tmp_path_factory.mktemp("auto")
    out: dict[str, str] = {}
    for name, factory, task, targets in (
        ("llama", tiny_llama, "CAUSAL_LM", ["q_proj", "v_proj"]),
        ("bert", tiny_bert, "SEQ_CLS", ["query", "value"]),
    ):
        base = root / f"{name}-base"
        factory().save_pretrained(base)
        out[name] = str(base)
        for kind, task_type in (("task", task), ("none", None)):
            cfg = peft.LoraConfig(task_type=task_type, target_modules=targets, init_lora_weights=False)
            model = peft.get_peft_model(factory(), cfg)
            model.peft_config["default"].base_model_name_or_path = str(base)
            if name == "bert" and kind == "task":
                with torch.no_grad():  # a trained head, so that the copy the adapter saves differs from the base's
                    model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
            model.save_pretrained(root / f"{name}-{kind}")
            out[f"{name}-{kind}"] = str(root / f"{name}-{kind}")
    return out


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


@pytest.mark.parametrize(
    ("adapter", "auto"),
    [("llama-task", "AutoPeftModelForCausalLM"), ("bert-task", "AutoPeftModelForSequenceClassification")],
)
def test_loads_the_base_model_and_the_adapter_as_peft(folders, adapter, auto):
    theirs = getattr(peft, auto).from_pretrained(folders[adapter]).eval()
    ours = getattr(lorakit, auto).from_pretrained(folders[adapter])
    assert type(ours).__name__ == type(theirs).__name__
    assert type(ours.get_base_model()) is type(theirs.get_base_model())
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-6)
    trained = getattr(lorakit, auto).from_pretrained(folders[adapter], is_trainable=True, adapter_name="mine")
    assert list(trained.peft_config) == ["mine"] and any(p.requires_grad for p in trained.parameters())


def test_a_task_type_of_another_class_is_refused_naming_both(folders):
    with pytest.raises(ValueError, match="Expected target PEFT class"):  # PEFT refuses too
        peft.AutoPeftModelForSequenceClassification.from_pretrained(folders["llama-task"])
    with pytest.raises(ConfigError, match="'CAUSAL_LM'.*AutoPeftModelForCausalLM.*AutoPeftModelForSequenceClass"):
        lorakit.AutoPeftModelForSequenceClassification.from_pretrained(folders["llama-task"])
    with pytest.raises(ConfigError, match="AutoPeftModelForCausalLM.*AutoPeftModel loads adapters without"):
        lorakit.AutoPeftModel.from_pretrained(folders["llama-task"])
    with pytest.raises(ConfigError, match="from_pretrained"):
        lorakit.AutoPeftModelForCausalLM()


def test_an_adapter_without_task_type_loads_by_its_auto_mapping_as_peft(folders):
    theirs = peft.AutoPeftModel.from_pretrained(folders["llama-none"]).eval()
    ours = lorakit.AutoPeftModel.from_pretrained(folders["llama-none"])
    assert type(ours) is lorakit.PeftModel and type(ours.get_base_model()).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-6)
    # a task class loads it too, with its own Auto class (PEFT would use the auto_mapping; same class here)
    loaded = lorakit.AutoPeftModelForCausalLM.from_pretrained(folders["llama-none"])
    torch.testing.assert_close(logits(loaded), logits(theirs), rtol=1e-5, atol=1e-6)


def test_a_lorakit_adapter_without_task_type_or_auto_mapping(folders, tmp_path):
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = folders["llama"]
    model.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no task_type and no auto_mapping"):
        lorakit.AutoPeftModel.from_pretrained(tmp_path)
    loaded = lorakit.AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def rewrite(folder: str, tmp_path, **changes: Any) -> str:
    """A copy of an adapter folder whose config has ``changes``."""
    import shutil

    target = tmp_path / "changed"
    shutil.copytree(folder, target)
    file = target / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return str(target)


def test_an_auto_mapping_outside_the_allowlist_is_refused(folders, tmp_path):
    path = rewrite(folders["llama-none"], tmp_path, auto_mapping={"base_model_class": "system", "parent_library": "os"})
    with pytest.raises(ValueError, match="allowlist"):
        peft.AutoPeftModel.from_pretrained(path)
    with pytest.raises(ConfigError, match="'os'.*allowlist"):
        lorakit.AutoPeftModel.from_pretrained(path)
    with pytest.raises(ConfigError, match="no from_pretrained"):  # allowed, but not a model class
        lorakit.AutoPeftModel.from_pretrained(path, import_allowlist=["os"])


def test_base_model_problems_are_named(folders, tmp_path):
    with pytest.raises(ConfigError, match="base_model_name_or_path"):
        lorakit.AutoPeftModelForCausalLM.from_pretrained(
            rewrite(folders["llama-task"], tmp_path, base_model_name_or_path=None)
        )
    path = rewrite(folders["llama-task"], tmp_path / "b", base_model_name_or_path=str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        lorakit.AutoPeftModelForCausalLM.from_pretrained(path)
    with pytest.raises(ConfigError, match="trust_remote_code"):
        lorakit.AutoPeftModelForCausalLM.from_pretrained(folders["llama-task"], trust_remote_code=True)


def test_arguments_go_to_the_load_they_belong_to(folders, tmp_path, monkeypatch):
    path = rewrite(folders["llama-task"], tmp_path, revision="v1")
    seen: dict[str, Any] = {}

    class Recorder:
        @classmethod
        def from_pretrained(cls, name, **kwargs):
            seen.update(name=name, **kwargs)
            return tiny_llama().to(kwargs.get("dtype", torch.float32))

    monkeypatch.setattr(lorakit.AutoPeftModelForCausalLM, "_target_class", Recorder)
    model = lorakit.AutoPeftModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, key_mapping={}, autocast_adapter_dtype=False, local_files_only=True
    )
    # the base model at the revision its adapter records, with transformers' and the hub's arguments only
    assert seen == {"name": folders["llama"], "revision": "v1", "dtype": torch.bfloat16, "local_files_only": True}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}


def test_a_larger_tokenizer_saved_with_the_adapter_grows_the_embeddings_as_peft(folders, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    path = rewrite(folders["llama-task"], tmp_path)
    vocab = {f"t{i}": i for i in range(100)}  # 100 tokens for a 96-row embedding: tokens added while training
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tokenizer.save_pretrained(path)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(path)
    ours = lorakit.AutoPeftModelForCausalLM.from_pretrained(path)
    assert ours.get_input_embeddings().weight.shape == theirs.get_input_embeddings().weight.shape == (100, 32)
