"""lorakit models under the real HF Trainer: the forward signature the Trainer reads, adapter-folder checkpoints,
exact resume, load_best_model_at_end, and PEFT loading our checkpoints (PEFT is the oracle)."""

from __future__ import annotations

import inspect
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
    T5Config,
    T5ForConditionalGeneration,
    TrainingArguments,
)

from conftest import tiny_bert, tiny_llama
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ShapeMismatchError
from lorakit.integrations import Trainer, load_adapters_in_place
from test_trainer import pattern_data


@pytest.fixture(autouse=True)
def _one_thread(one_thread_per_module):
    pass


def tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )


WRAPPERS = {  # task type -> (base model, LoRA targets)
    None: (lambda: tiny_llama(), ["q_proj", "v_proj"]),
    "CAUSAL_LM": (lambda: tiny_llama(), ["q_proj", "v_proj"]),
    "SEQ_CLS": (lambda: tiny_bert(), ["query", "value"]),
    "TOKEN_CLS": (lambda: BertForTokenClassification(tiny_bert_config()), ["query", "value"]),
    "QUESTION_ANS": (lambda: BertForQuestionAnswering(tiny_bert_config()), ["query", "value"]),
    "FEATURE_EXTRACTION": (lambda: BertModel(tiny_bert_config()), ["query", "value"]),
    "SEQ_2_SEQ_LM": (
        lambda: T5ForConditionalGeneration(
            T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
        ),
        ["q", "v"],
    ),
}


@pytest.mark.parametrize("task_type", list(WRAPPERS), ids=lambda t: str(t))
def test_forward_signature_is_the_base_models_plus_adapter_names(task_type):
    make, targets = WRAPPERS[task_type]
    model = get_peft_model(make(), LoraConfig(task_type=task_type, r=2, target_modules=targets))
    base = inspect.signature(model.get_base_model().forward).parameters
    ours = inspect.signature(model.forward).parameters
    assert [n for n in ours if n != "adapter_names"] == list(base)
    assert ours["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    assert [p.kind for n, p in ours.items() if n != "adapter_names"] == [p.kind for p in base.values()]
    # what the Trainer keeps: the base model's columns, as it does for a PEFT model
    trainer = transformers.Trainer(model=model, args=TrainingArguments("unused", report_to=[], use_cpu=True))
    trainer._set_signature_columns_if_needed()
    assert set(base) <= set(trainer._signature_columns)


def args(out, **kw) -> TrainingArguments:
    fields = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_steps=4,
        save_steps=2,
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    return TrainingArguments(**{**fields, **kw})


def lora_model(task_type=None, r=4, dropout=0.1) -> PeftModel:
    config = LoraConfig(task_type=task_type, r=r, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    return get_peft_model(tiny_llama(initializer_range=0.5), config)


def trained(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_plain_trainer_trains_a_model_made_without_task_type(tmp_path):
    """It used to drop every dataset column ("The batch received was empty"): forward was (*args, **kwargs)."""
    model = lora_model(task_type=None)
    before = trained(model)
    trainer = transformers.Trainer(model=model, args=args(tmp_path, max_steps=2, save_strategy="no"))
    trainer.train_dataset = pattern_data(16)
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in trained(model).items())


def test_checkpoints_and_save_model_are_adapter_folders_that_peft_loads(tmp_path):
    from peft import PeftModel as RealPeftModel

    model = lora_model(task_type="CAUSAL_LM")
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=pattern_data(16))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    checkpoint = tmp_path / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= files
    assert {"rng_state.pth", "trainer_state.json", "training_args.bin"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert not set(os.listdir(tmp_path / "final")) & {"model.safetensors", "pytorch_model.bin"}
    ids = pattern_data(1)[0]["input_ids"][None]
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        for folder in (checkpoint, tmp_path / "final"):
            ours = PeftModel.from_pretrained(tiny_llama(initializer_range=0.5), folder)
            theirs = RealPeftModel.from_pretrained(tiny_llama(initializer_range=0.5), str(folder))
            assert torch.equal(ours(input_ids=ids).logits, expected)
            torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_resume_continues_to_the_same_weights_as_an_uninterrupted_run(tmp_path, task_type):
    """4 steps straight == 2 steps, checkpoint, 2 more from the checkpoint, bit for bit (LoRA dropout on: the RNG
    state is restored too)."""
    straight = lora_model(task_type)
    Trainer(model=straight, args=args(tmp_path), train_dataset=pattern_data(48)).train()
    resumed = lora_model(task_type)
    params = [p for p in resumed.parameters() if p.requires_grad]
    trainer = Trainer(model=resumed, args=args(tmp_path), train_dataset=pattern_data(48))
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [p for p in resumed.parameters() if p.requires_grad] == params  # loaded in place: the optimizer's tensors
    assert trainer.state.global_step == 4
    theirs = trained(straight)
    assert all(torch.equal(p, theirs[n]) for n, p in trained(resumed).items())
    assert not all(torch.equal(p, theirs[n]) for n, p in trained(lora_model(task_type)).items())


def test_a_full_state_checkpoint_of_the_plain_trainer_still_resumes(tmp_path):
    straight = lora_model(dropout=0.0)
    transformers.Trainer(model=straight, args=args(tmp_path), train_dataset=pattern_data(48)).train()
    assert "model.safetensors" in os.listdir(tmp_path / "checkpoint-2")
    resumed = lora_model(dropout=0.0)
    Trainer(model=resumed, args=args(tmp_path / "again"), train_dataset=pattern_data(48)).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2")
    )
    theirs = trained(straight)
    for name, p in trained(resumed).items():
        torch.testing.assert_close(p, theirs[name], rtol=1e-5, atol=1e-6)


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    scores = iter([3.0, 1.0, 2.0])  # best at the first evaluation (step 1)

    def metrics(_):
        return {"score": next(scores)}

    model = lora_model(dropout=0.0)
    trainer = Trainer(
        model=model,
        args=args(
            tmp_path,
            max_steps=3,
            eval_strategy="steps",
            eval_steps=1,
            save_steps=1,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
            per_device_eval_batch_size=4,
        ),
        train_dataset=pattern_data(24),
        eval_dataset=pattern_data(4),
        compute_metrics=metrics,
    )
    assert trainer.label_names == ["labels"]  # read from the base model's class, as for PEFT
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    best = load_file(tmp_path / "checkpoint-1" / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoint-3" / "adapter_model.safetensors")
    now = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(now) == len(best) > 0
    for key, value in best.items():
        live = now[key.replace(".weight", ".default.weight")]
        assert torch.equal(live, value)
    assert any(not torch.equal(best[k], last[k]) for k in best)


def test_a_refused_load_leaves_every_adapter_unchanged(tmp_path):
    model = lora_model(dropout=0.0)
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "ckpt")
    # the second adapter's files come from a model of another rank: its check fails after "default" was loaded
    stranger = lora_model(r=8, dropout=0.0)
    stranger.save_pretrained(tmp_path / "ckpt" / "other")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShapeMismatchError):
        load_adapters_in_place(model, tmp_path / "ckpt")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_label_smoothing_shifts_labels_as_for_the_base_model(tmp_path):
    """With B = 0 the adapted model computes the base model, so the smoothed losses must match."""
    batch = {k: v[None] for k, v in pattern_data(1)[0].items()}
    settings = dict(label_smoothing_factor=0.1, save_strategy="no")
    base_trainer = transformers.Trainer(model=tiny_llama(initializer_range=0.5), args=args(tmp_path, **settings))
    ours = Trainer(model=lora_model(dropout=0.0).eval(), args=args(tmp_path, **settings))
    with torch.no_grad():
        expected = base_trainer.compute_loss(base_trainer.model, dict(batch))
        got = ours.compute_loss(ours.model, dict(batch))
    torch.testing.assert_close(got, expected)


def test_enabling_checkpointing_again_adds_no_second_input_hook():
    model = lora_model()
    for _ in range(3):  # TRL re-enables it around every reference forward
        model.gradient_checkpointing_enable()
    assert len(model.get_base_model().get_input_embeddings()._forward_hooks) == 1


def test_any_other_model_is_saved_as_the_trainer_saves_it(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=args(tmp_path, save_strategy="no"))
    trainer.save_model(str(tmp_path / "out"))
    assert "model.safetensors" in os.listdir(tmp_path / "out")
    assert "adapter_config.json" not in os.listdir(tmp_path / "out")
