"""TRL's SFTTrainer and DPOTrainer with lorakit models, checked against the same trainers running real PEFT models
on identical weights (the oracle), on a tiny random LLaMA from a real config."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (trl brings datasets)
from trl import DPOConfig, SFTConfig  # noqa: E402

from conftest import tiny_llama  # noqa: E402
from lorakit import LoraConfig, PeftModel, PeftModelForCausalLM, get_peft_model  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402
from lorakit.integrations import AdapterReference, DPOTrainer, SFTTrainer  # noqa: E402
from training.conftest import make_tokenizer  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, one_thread_per_module):
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the hub when a trainer is built
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def base(tok):
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    return tiny_llama(vocab_size=len(tok), max_position_embeddings=128, initializer_range=0.2, **ids)


def lora(tok, **kw) -> PeftModel:
    return get_peft_model(base(tok), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS, **kw))


def peft_twin(tok, model: PeftModel, folder) -> torch.nn.Module:
    """Real PEFT on the same base, holding the same (trainable) adapter weights."""
    from peft import PeftModel as RealPeftModel

    model.save_pretrained(folder)
    return RealPeftModel.from_pretrained(base(tok), str(folder), is_trainable=True)


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {
        n.replace("base_model.model.", ""): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }


def settings(out, config=SFTConfig, **kw):
    fields = dict(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        max_length=32,
        bf16=False,  # TRL's default on a bf16-capable CPU: autocast, whose rounding differs between implementations
        optim="sgd",  # linear in the gradient: Adam's g/sqrt(v) turns float noise in a near-zero gradient into ±lr
    )
    return config(**{**fields, **kw})


SFT_ROWS = Dataset.from_list(
    [{"prompt": "Convert to YYYY-MM-DD: March 5, 2021", "completion": " 2021-03-05"}] * 4
    + [{"prompt": "What is the capital of France?", "completion": " Paris."}] * 4
)
DPO_ROWS = Dataset.from_list(
    [{"prompt": "Say hello.", "chosen": " hello world", "rejected": " Paris."}] * 4
    + [{"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " hello"}] * 4
)


def test_sft_trains_a_lorakit_model_as_trl_trains_the_same_peft_model(tok, tmp_path):
    import trl

    ours = lora(tok)
    theirs = peft_twin(tok, ours, tmp_path / "start")
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    args = dict(save_strategy="steps", save_steps=2)
    SFTTrainer(
        model=ours, args=settings(tmp_path / "ours", **args), train_dataset=SFT_ROWS, processing_class=tok
    ).train()
    trl.SFTTrainer(model=theirs, args=settings(tmp_path / "peft"), train_dataset=SFT_ROWS, processing_class=tok).train()
    got, expected = adapter_weights(ours), adapter_weights(theirs)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if n in frozen)
    # the checkpoint is an adapter folder, which both libraries load to the trained model's outputs
    checkpoint = tmp_path / "ours" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= set(os.listdir(checkpoint))
    assert "model.safetensors" not in os.listdir(checkpoint)
    ids = torch.tensor([tok("Convert to YYYY-MM-DD: March 5, 2021")["input_ids"]])
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base(tok), checkpoint)
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours.eval()(input_ids=ids).logits)


def test_sft_takes_a_lorakit_config(tok, tmp_path):
    trainer = SFTTrainer(
        model=base(tok),
        peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS),
        args=settings(tmp_path, max_steps=1),
        train_dataset=SFT_ROWS,
        processing_class=tok,
    )
    assert isinstance(trainer.model, PeftModelForCausalLM)
    trainer.train()
    assert trainer.state.global_step == 1


def test_dpo_trains_a_lorakit_model_as_trl_trains_the_same_peft_model(tok, tmp_path):
    """TRL gives a PEFT model passed in a frozen copy of its adapter ("ref") as the reference; so do we, without a
    second base model."""
    import trl

    ours = lora(tok)
    theirs = peft_twin(tok, ours, tmp_path / "start")
    args = dict(beta=0.5, save_strategy="steps", save_steps=2)
    trainer = DPOTrainer(
        model=ours, args=settings(tmp_path / "ours", DPOConfig, **args), train_dataset=DPO_ROWS, processing_class=tok
    )
    reference = trainer.ref_model
    assert isinstance(reference, AdapterReference) and reference.adapter_name == "ref"
    assert list(reference.parameters()) == []  # the base model is held once
    trainer.train()
    oracle = trl.DPOTrainer(
        model=theirs,
        args=settings(tmp_path / "peft", DPOConfig, beta=0.5),
        train_dataset=DPO_ROWS,
        processing_class=tok,
    )
    oracle.train()
    got, expected = adapter_weights(ours), adapter_weights(theirs)
    assert got.keys() == expected.keys() and len(got) == 8
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6)
    ours_log, theirs_log = trainer.state.log_history[-1], oracle.state.log_history[-1]
    assert ours_log["train_loss"] == pytest.approx(theirs_log["train_loss"], rel=1e-5)
    assert ours.active_adapters == ["default"] and ours.peft_config["ref"].inference_mode
    checkpoint = tmp_path / "ours" / "checkpoint-2"
    assert {"adapter_model.safetensors", "ref"} <= set(os.listdir(checkpoint))  # TRL+PEFT's layout, "ref" included
    assert "model.safetensors" not in os.listdir(checkpoint)


def test_dpo_with_a_lorakit_config_references_the_base_model(tok, tmp_path):
    trainer = DPOTrainer(
        model=base(tok),
        peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS),
        args=settings(tmp_path, DPOConfig, beta=0.5),
        train_dataset=DPO_ROWS,
        processing_class=tok,
    )
    model = trainer.model
    assert isinstance(trainer.ref_model, AdapterReference) and trainer.ref_model.adapter_name is None
    trainer.train()
    rewards = trainer.state.log_history[-1]["rewards/margins"]
    assert rewards != 0.0  # the policy moved away from its reference
    ids = torch.tensor([tok("Say hello. hello world")["input_ids"]])
    labels = ids.clone()
    with torch.no_grad():
        ref = trainer.ref_model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        with model.disable_adapter():
            expected = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        policy = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert torch.equal(ref, expected)
    assert not torch.allclose(ref, policy)
    assert model.active_adapters == ["default"]


@pytest.mark.parametrize(
    "case",
    ["lm_head adapter", "precompute", "model id", "two configs"],
)
def test_refusals_name_the_problem(tok, tmp_path, case):
    kwargs = dict(args=settings(tmp_path, DPOConfig), train_dataset=DPO_ROWS, processing_class=tok)
    if case == "lm_head adapter":
        kwargs["model"] = get_peft_model(base(tok), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["lm_head"]))
        match = "LM head"
    elif case == "precompute":
        kwargs["model"], kwargs["args"] = lora(tok), settings(tmp_path, DPOConfig, precompute_ref_log_probs=True)
        match = "precompute_ref_log_probs"
    elif case == "model id":
        kwargs["model"], kwargs["peft_config"] = "some/model", LoraConfig(r=2, target_modules=TARGETS)
        match = "'some/model'"
    else:
        kwargs["model"], kwargs["peft_config"] = lora(tok), LoraConfig(r=2, target_modules=TARGETS)
        match = "is a PeftModelForCausalLM"
    with pytest.raises(ConfigError, match=match):
        DPOTrainer(**kwargs)


def test_dpo_resumes_to_the_same_adapter_as_an_uninterrupted_run(tok, tmp_path):
    """4 steps straight == 2 steps, then 2 more from checkpoint-2 (its "ref" adapter included), bit for bit."""
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2, optim="adamw_torch")
    straight = lora(tok)
    DPOTrainer(
        model=straight, args=settings(tmp_path, DPOConfig, **args), train_dataset=DPO_ROWS, processing_class=tok
    ).train()
    resumed = lora(tok)
    trainer = DPOTrainer(
        model=resumed, args=settings(tmp_path, DPOConfig, **args), train_dataset=DPO_ROWS, processing_class=tok
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 4
    expected = adapter_weights(straight)
    assert all(torch.equal(p, expected[n]) for n, p in adapter_weights(resumed).items())
