"""The HF Trainer drives a lorakit model like a PEFT one."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from conftest import tiny_bert, tiny_llama
from lorakit import LoraConfig, TaskType, get_peft_model


def pattern_data(n: int = 64, length: int = 16):
    ids = (torch.arange(length) * 3) % 11 + 4  # a fixed periodic sequence: learnable in a few steps
    return [{"input_ids": ids.clone(), "labels": ids.clone(), "attention_mask": torch.ones_like(ids)} for _ in range(n)]


def test_trainer_loss_falls_and_base_stays_frozen(tmp_path):
    # initializer_range 0.5: with the default 0.02 the frozen random lm_head's logits are too small for any
    # adapter to push the loss far below log(vocab), for PEFT exactly as for lorakit.
    model = get_peft_model(
        tiny_llama(initializer_range=0.5),
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear"),
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        num_train_epochs=4,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        seed=0,
        activation_checkpointing=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=pattern_data())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 4
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_trainer_keeps_token_type_ids_column(tmp_path):
    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no")
    trainer = Trainer(model=model, args=args)
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "token_type_ids", "labels"} <= set(trainer._signature_columns)
    assert trainer.label_names == ["labels"]


def test_trainer_checkpoints_and_resumes_a_tied_embedding_model(tmp_path):
    """Trainer saves `state_dict()` to safetensors for models it does not know; tied weights must not break it."""

    def make():
        return get_peft_model(
            tiny_llama(tie=True, initializer_range=0.5),
            LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"]),
        )

    def args(**kw):
        return TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            max_steps=6,
            save_steps=3,
            report_to=[],
            seed=0,
            disable_tqdm=True,
            **kw,
        )

    full = make()
    Trainer(model=full, args=args(), train_dataset=pattern_data(48)).train()
    assert (tmp_path / "checkpoint-3").is_dir() and (tmp_path / "checkpoint-6").is_dir()
    resumed = make()
    Trainer(model=resumed, args=args(), train_dataset=pattern_data(48)).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-3")
    )
    ids = pattern_data(1)[0]["input_ids"][None]
    torch.testing.assert_close(resumed(ids).logits, full(ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.equal(resumed(ids).logits, make()(ids).logits)


def test_trainer_trains_an_ia3_model(tmp_path):
    """IA³ under the HF Trainer: the vectors learn (loss falls), nothing else changes, the result saves and
    reloads to the same outputs."""
    from lorakit import IA3Config, PeftModel

    model = get_peft_model(
        tiny_llama(initializer_range=0.5),
        IA3Config(task_type=TaskType.CAUSAL_LM, target_modules="all-linear", feedforward_modules=["down_proj"]),
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        num_train_epochs=4,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=pattern_data())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(initializer_range=0.5), tmp_path / "adapter")
    ids = pattern_data(1)[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
