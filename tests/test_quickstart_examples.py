"""PEFT's quick-start code as tutorials write it (model, LoraConfig, Trainer, save, load, several task adapters),
run as written with `peft` replaced by `lorakit`.

Differences from such a tutorial, all forced by this machine: a tiny local LLaMA saved to a temporary folder
stands in for meta-llama/Llama-2-7b-hf (no hub access), `fp16=True` is dropped from TrainingArguments (fp16
mixed precision needs a GPU), the training set is a small synthetic dataset, and `input_ids` is defined.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_llama


@pytest.fixture
def model_name(tmp_path):
    path = tmp_path / "llama"
    tiny_llama().save_pretrained(path)
    return str(path)


def dataset(n: int = 16):
    ids = torch.arange(12) % 7 + 5
    return [{"input_ids": ids.clone(), "labels": ids.clone(), "attention_mask": torch.ones_like(ids)} for _ in range(n)]


def test_section_7_2_to_7_4(model_name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_dataset = dataset()

    # §7.2 -----------------------------------------------------------------------------------------------
    from lorakit import LoraConfig, TaskType, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_name, torch_dtype=torch.float16, device_map="auto")
    lora_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.1,
        bias="none",
    )
    model = get_peft_model(model, lora_config)
    print(f"Обучаемых параметров: {model.num_parameters(trainable=True):,}")
    print(f"Всего параметров: {model.num_parameters():,}")

    from transformers import Trainer, TrainingArguments

    training_args = TrainingArguments(
        output_dir="./results",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        learning_rate=2e-4,
        num_train_epochs=3,
        report_to=[],
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset)
    result = trainer.train()
    assert result.training_loss > 0

    out = capsys.readouterr().out
    # r(d+k) per projection: q,o 8*(32+32), k,v 8*(32+16), gate,up,down 8*(32+64); 2 layers
    expected = 2 * (2 * 512 + 2 * 384 + 3 * 768)
    assert f"Обучаемых параметров: {expected:,}" in out

    # §7.3 -----------------------------------------------------------------------------------------------
    model.save_pretrained("./lora_weights")
    base_model = AutoModelForCausalLM.from_pretrained(model_name, torch_dtype=torch.float16, device_map="auto")
    from lorakit import PeftModel

    reloaded = PeftModel.from_pretrained(base_model, "./lora_weights")
    input_ids = torch.tensor([[5, 6, 7, 8]])
    reloaded.eval()
    with torch.no_grad():
        outputs = reloaded.generate(input_ids, max_length=10)
    assert outputs.shape[0] == 1 and outputs.shape[1] <= 10
    model.eval()  # the trained model: dropout off, then it must agree with the reloaded one
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits)

    # §7.4 -----------------------------------------------------------------------------------------------
    base_model = AutoModelForCausalLM.from_pretrained(model_name)
    task1_lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    task2_lora = LoraConfig(r=16, target_modules=["gate_proj", "up_proj"])
    model_task1 = get_peft_model(base_model, task1_lora)
    with pytest.warns(UserWarning, match="add_adapter"):
        model_task2 = get_peft_model(base_model, task2_lora)
    assert model_task1.get_base_model() is model_task2.get_base_model() is base_model


def test_section_7_4_the_recommended_way(model_name):
    """Several task adapters on one base through add_adapter / set_adapter."""
    from lorakit import LoraConfig, get_peft_model

    base_model = AutoModelForCausalLM.from_pretrained(model_name)
    model = get_peft_model(
        base_model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), adapter_name="task1"
    )
    model.add_adapter("task2", LoraConfig(r=16, target_modules=["gate_proj", "up_proj"], init_lora_weights=False))
    ids = torch.tensor([[5, 6, 7, 8]])
    out1 = model(ids).logits
    model.set_adapter("task2")
    out2 = model(ids).logits
    assert not torch.allclose(out1, out2)
    model.set_adapter("task1")
    torch.testing.assert_close(model(ids).logits, out1)
