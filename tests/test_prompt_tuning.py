"""Prompt tuning (Lester et al. 2021, arXiv 2104.08691) against real PEFT on identical weights, and what the
shared prompt-learning engine guarantees (several adapters, mixed batches, disabling, unloading, training)."""

from __future__ import annotations

import json
from typing import Any

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import lorakit
from conftest import tiny_bert, tiny_llama
from lorakit.errors import AdapterNotFoundError, ConfigError, MergeError, ShapeMismatchError
from prompt_oracle import (
    FACTORIES,
    build,
    config_fields_match_peft,
    greedy_without_cache,
    padded,
    run,
    write_word_tokenizer,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

ARCHS = ["llama", "gpt2", "bert"]
METHOD = "PromptTuningConfig"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (tests/conftest.py)."""


def labels_for(arch: str, ids: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0, 2]) if arch == "bert" else ids


# -- the same model as PEFT -------------------------------------------------------------------------------


def test_config_has_peft_fields_and_defaults():
    config_fields_match_peft(lorakit.PromptTuningConfig, peft.PromptTuningConfig)
    assert [m.value for m in lorakit.PromptTuningInit] == [m.value for m in peft.PromptTuningInit]


def test_lorakit_exports_peft_names():
    for name in (
        "PromptTuningConfig",
        "PromptTuningInit",
        "PromptEncoderConfig",
        "PromptEncoderReparameterizationType",
        "PrefixTuningConfig",
        "PromptLearningConfig",
        "PromptEmbedding",
        "PromptEncoder",
        "PrefixEncoder",
    ):
        assert name in lorakit.__all__ and hasattr(peft, name), name
        assert getattr(lorakit, name).__name__ == getattr(peft, name).__name__


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_loss_equal_peft(arch):
    p, k = build(METHOD, arch)
    ids, mask = padded()
    theirs = run(p, input_ids=ids, attention_mask=mask, labels=labels_for(arch, ids))
    ours = run(k, input_ids=ids, attention_mask=mask, labels=labels_for(arch, ids))
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    if arch != "bert":  # the virtual tokens have logits, and labels of -100 in front
        assert ours.logits.shape[1] == ids.shape[1] + 4
    base = run(FACTORIES[arch](), input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ours.logits[:, -ids.shape[1] :], base, atol=1e-3)  # the prompt does change the model


def test_inputs_embeds_and_token_type_ids_as_peft():
    p, k = build(METHOD, "bert")
    ids, mask = padded()
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    embeds = p.word_embeddings(ids)
    for kwargs in ({"inputs_embeds": embeds}, {"input_ids": ids, "token_type_ids": types}):
        theirs = run(p, attention_mask=mask, **kwargs).logits
        torch.testing.assert_close(run(k, attention_mask=mask, **kwargs).logits, theirs, rtol=0, atol=0)


def test_position_ids_are_ignored_with_a_warning_as_in_peft():
    p, k = build(METHOD, "llama")
    ids, mask = padded()
    positions = torch.arange(10).expand(2, -1) + 5
    with pytest.warns(UserWarning, match="position_ids"):
        ours = run(k, input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(ours, run(p, input_ids=ids, attention_mask=mask, position_ids=positions).logits)
    torch.testing.assert_close(ours, run(k, input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameters_print_as_peft(arch, capsys):
    p, k = build(METHOD, arch)
    assert k.get_nb_trainable_parameters() == p.get_nb_trainable_parameters()
    p.print_trainable_parameters()
    expected = capsys.readouterr().out
    k.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    trainable = sorted(n for n, t in k.named_parameters() if t.requires_grad)
    assert trainable[-1] == "base_model.prompt_encoder.default.embedding.weight"
    assert len(trainable) == (3 if arch == "bert" else 1)  # BERT: and the classifier copy


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_same_seed_same_initial_prompt_as_peft(init):
    torch.manual_seed(3)
    p = peft.get_peft_model(
        tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init=init)
    )
    torch.manual_seed(3)
    k = lorakit.get_peft_model(
        tiny_llama(), lorakit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init=init)
    )
    ours, theirs = k.prompt_encoder["default"].embedding.weight, p.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if init == "SAMPLE_VOCAB":  # every row is the embedding of some vocabulary token
        vocab = k.get_base_model().get_input_embeddings().weight
        assert all(any(torch.equal(row, v) for v in vocab) for row in ours)


def test_text_init_from_a_local_tokenizer_folder(tmp_path):
    write_word_tokenizer(str(tmp_path / "tok"))
    fields = dict(
        task_type="CAUSAL_LM",
        num_virtual_tokens=7,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="w5 w9 w2",
        tokenizer_name_or_path=str(tmp_path / "tok"),
    )
    p = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(**fields))
    k = lorakit.get_peft_model(tiny_llama(), lorakit.PromptTuningConfig(**fields))
    ours = k.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(ours, p.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    vocab = tiny_llama().get_input_embeddings().weight
    torch.testing.assert_close(ours, vocab[[5, 9, 2, 5, 9, 2, 5]], rtol=0, atol=0)  # repeated to 7 tokens


def test_text_init_refuses_what_it_cannot_load_locally(tmp_path):
    fields = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    missing = lorakit.PromptTuningConfig(**fields, tokenizer_name_or_path=str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="never downloads"):
        lorakit.get_peft_model(tiny_llama(), missing)
    write_word_tokenizer(str(tmp_path / "tok"))
    remote = lorakit.PromptTuningConfig(
        **fields, tokenizer_name_or_path=str(tmp_path / "tok"), tokenizer_kwargs={"trust_remote_code": True}
    )
    model = tiny_llama()
    with pytest.raises(ConfigError, match="trust_remote_code"):
        lorakit.get_peft_model(model, remote)
    assert all(p.requires_grad for p in model.parameters())  # a refused adapter leaves the model as it was


# -- files both ways ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_files_load_both_ways_with_equal_logits(arch, tmp_path):
    p, k = build(METHOD, arch)
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "lorakit"))
    assert set(ours) == set(theirs) and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert "prompt_embeddings" in ours and (arch != "bert" or "base_model.classifier.weight" in ours)
    ids, mask = padded()
    expected = run(p, input_ids=ids, attention_mask=mask).logits
    loaded = lorakit.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "peft")
    torch.testing.assert_close(run(loaded, input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    in_peft = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "lorakit")
    torch.testing.assert_close(run(in_peft, input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference: frozen (PEFT leaves it trainable)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_config_json_matches_peft(arch, tmp_path):
    p, k = build(METHOD, arch)
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "lorakit")
    theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    ours = json.loads((tmp_path / "lorakit/adapter_config.json").read_text())
    assert set(ours) | {"peft_version", "auto_mapping"} == set(theirs)
    for key, value in ours.items():
        if key == "modules_to_save" and value:  # PEFT's SEQ_CLS class adds its heads twice
            assert value == list(dict.fromkeys(theirs[key]))
        else:
            assert value == theirs[key], (key, value, theirs[key])
    assert (ours["token_dim"], ours["num_layers"], ours["num_transformer_submodules"]) == (32, 2, 1)


def test_a_file_that_contradicts_its_config_is_refused_before_anything_changes(tmp_path):
    _, k = build(METHOD, "llama")
    k.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 6}))
    model = tiny_llama()
    with pytest.raises(ShapeMismatchError, match="prompt_embeddings"):
        lorakit.PeftModel.from_pretrained(model, tmp_path)
    assert all(p.requires_grad for p in model.parameters())


def test_a_file_with_a_tensor_of_no_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    _, k = build(METHOD, "bert")
    k.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    for extra in ("base_model.bert.pooler.dense.bias", "base_model.nothing.weight"):  # a base tensor; no tensor
        save_file({**state, extra: torch.zeros(32)}, tmp_path / "adapter_model.safetensors")
        model = tiny_bert()
        before = {n: t.clone() for n, t in model.state_dict().items()}
        with pytest.raises(lorakit.AdapterFileError, match=extra):
            lorakit.PeftModel.from_pretrained(model, tmp_path)
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_a_trainable_load_resumes_the_prompt(tmp_path):
    p, k = build(METHOD, "llama")
    k.save_pretrained(tmp_path)
    again = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    weight = again.prompt_encoder["default"].embedding.weight
    assert weight.requires_grad and torch.equal(weight, k.prompt_encoder["default"].embedding.weight)


# -- several adapters -----------------------------------------------------------------------------------


def two_adapters(arch: str = "llama"):
    p, k = build(METHOD, arch)
    other = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "prompt_tuning_init": "SAMPLE_VOCAB"}
    p.add_adapter("other", peft.PromptTuningConfig(**other))
    k.add_adapter("other", lorakit.PromptTuningConfig(**other))
    with torch.no_grad():
        k.prompt_encoder["other"].embedding.weight.copy_(p.prompt_encoder["other"].embedding.weight)
    return p, k


def test_several_adapters_switch_like_peft():
    p, k = two_adapters()
    ids, mask = padded()
    for name in ("other", "default", "other"):
        p.set_adapter(name)
        k.set_adapter(name)
        torch.testing.assert_close(
            run(k, input_ids=ids, attention_mask=mask).logits,
            run(p, input_ids=ids, attention_mask=mask).logits,
            rtol=0,
            atol=0,
        )
        assert k.active_adapter == name
        grads = {n: t.requires_grad for n, t in k.named_parameters() if "prompt_encoder" in n}
        assert grads == {f"base_model.prompt_encoder.{a}.embedding.weight": a == name for a in ("default", "other")}
    with pytest.raises(ConfigError, match="one adapter at a time"):
        k.base_model.set_adapter(["default", "other"])


def test_delete_adapter_and_disable_adapter():
    _, k = two_adapters()
    ids, mask = padded()
    base = run(tiny_llama(), input_ids=ids, attention_mask=mask).logits
    with k.disable_adapter():
        torch.testing.assert_close(run(k, input_ids=ids, attention_mask=mask).logits, base, rtol=0, atol=0)
        disabled = k.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    plain = tiny_llama().generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(disabled, plain)
    assert run(k, input_ids=ids, attention_mask=mask).logits.shape[1] == 14  # the prompt is back
    k.set_adapter("other")
    k.delete_adapter("other")
    assert k.active_adapter == "default" and list(k.prompt_encoder) == ["default"]
    with pytest.raises(AdapterNotFoundError, match="other"):
        k.set_adapter("other")


def test_disable_adapter_on_a_classifier_runs_the_original_head():
    _, k = build(METHOD, "bert")
    ids, mask = padded()
    with k.disable_adapter():  # PEFT keeps the trained head copy here; lorakit runs the base model itself
        torch.testing.assert_close(
            run(k, input_ids=ids, attention_mask=mask).logits,
            run(tiny_bert(), input_ids=ids, attention_mask=mask).logits,
            rtol=0,
            atol=0,
        )


def test_merging_is_refused_and_unload_gives_back_the_base_model():
    _, k = build(METHOD, "bert")
    for call in (k.merge_adapter, k.merge_and_unload):
        with pytest.raises(MergeError, match="not an update of its weights"):
            call()
    k.unmerge_adapter()  # nothing is merged: nothing to do
    ids, mask = padded()
    base = k.unload()
    assert type(base) is transformers.BertForSequenceClassification
    assert not any("modules_to_save" in n or "prompt" in n for n, _ in base.named_parameters())
    torch.testing.assert_close(
        run(base, input_ids=ids, attention_mask=mask).logits,
        run(tiny_bert(), input_ids=ids, attention_mask=mask).logits,
        rtol=0,
        atol=0,
    )


def test_another_method_cannot_join():
    _, k = build(METHOD, "llama")
    with pytest.raises(ConfigError, match="cannot join"):
        k.add_adapter("p", lorakit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ConfigError, match="cannot join"):
        k.add_adapter("l", lorakit.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    assert list(k.peft_config) == ["default"]


# -- batches that mix adapters ----------------------------------------------------------------------------


def test_each_row_gets_its_own_adapter():
    _, k = two_adapters()
    ids, mask = padded(batch=3)
    rows = ["other", "default", "other"]
    mixed = run(k, input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    for i, name in enumerate(rows):
        k.set_adapter(name)
        alone = run(k, input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    k.set_adapter("default")
    generated = k.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, max_new_tokens=5, do_sample=False)
    for i, name in enumerate(rows):
        k.set_adapter(name)
        alone = k.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], max_new_tokens=5, do_sample=False)
        assert torch.equal(generated[i : i + 1], alone)


def test_mixed_batches_refuse_what_cannot_share_a_batch():
    _, k = two_adapters()
    ids, mask = padded()
    with pytest.raises(ConfigError, match="__base__"):
        run(k, input_ids=ids, adapter_names=["default", "__base__"])
    k.add_adapter("long", lorakit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        run(k, input_ids=ids, adapter_names=["default", "long"])
    with pytest.raises(AdapterNotFoundError):
        run(k, input_ids=ids, adapter_names=["default", "nope"])


# -- generation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_the_cache_equals_greedy_decoding_through_peft(arch):
    """PEFT 0.21.2's own generate is wrong under transformers 5 (it adds the prompt again at every step: the
    cache argument was renamed), so the reference is greedy decoding by full forwards of PEFT's model."""
    p, k = build(METHOD, arch, scale=3.0)
    ids, mask = padded(batch=3, seq=6)
    expected = greedy_without_cache(p, ids, mask, steps=8, prefix=False)
    ours = k.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, expected)
    with k.disable_adapter():
        assert not torch.equal(k.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False), ours)


def test_generate_with_beams_and_without_cache_agree():
    _, k = build(METHOD, "llama", scale=3.0)
    ids, mask = padded(seq=6)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(k.generate(**kwargs), k.generate(**kwargs, use_cache=False))
    assert "prepare_inputs_for_generation" not in k.get_base_model().__dict__  # the hook is given back


# -- other tasks ----------------------------------------------------------------------------------------


def bert_for(head: type) -> Any:
    def make() -> Any:
        torch.manual_seed(0)
        return head(tiny_bert(num_labels=2).config).eval()  # 2: QA's start and end

    return make


@pytest.mark.parametrize(
    "task,head",
    [
        ("TOKEN_CLS", transformers.BertForTokenClassification),
        ("QUESTION_ANS", transformers.BertForQuestionAnswering),
        ("FEATURE_EXTRACTION", transformers.BertModel),
    ],
)
def test_other_bert_tasks_equal_peft(task, head, monkeypatch):
    monkeypatch.setitem(FACTORIES, "head", bert_for(head))
    p, k = build(METHOD, "head", task_type=task)
    ids, mask = padded()
    theirs, ours = run(p, input_ids=ids, attention_mask=mask), run(k, input_ids=ids, attention_mask=mask)
    for key in theirs.keys():
        if isinstance(theirs[key], torch.Tensor):
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_token_classification_labels_skip_the_virtual_tokens():
    """PEFT raises here (labels one prompt shorter than the logits); lorakit puts -100 before them."""
    model = lorakit.get_peft_model(
        bert_for(transformers.BertForTokenClassification)(),
        lorakit.PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=4),
    )
    ids, mask = padded()
    labels = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(0))
    out = run(model, input_ids=ids, attention_mask=mask, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 4:].reshape(-1, 2), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_seq2seq_equals_peft_and_generates():
    p, k = build(METHOD, "t5", scale=2.0)
    ids, mask = padded()
    labels = padded(seed=3)[0][:, :5].contiguous()
    theirs, ours = (
        run(p, input_ids=ids, attention_mask=mask, labels=labels),
        run(k, input_ids=ids, attention_mask=mask, labels=labels),
    )
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(k.generate(**kwargs), p.generate(**kwargs))


# -- training -------------------------------------------------------------------------------------------


def test_trainer_trains_only_the_prompt(tmp_path):
    model = lorakit.get_peft_model(
        tiny_llama(initializer_range=0.5), lorakit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
    )
    ids = (torch.arange(16) * 3) % 11 + 4
    data = [{"input_ids": ids.clone(), "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}] * 32
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=0.1,
        max_steps=12,
        logging_steps=3,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses
    changed = {n for n, t in model.named_parameters() if not torch.equal(t, before[n])}
    assert changed == {"base_model.prompt_encoder.default.embedding.weight"}


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,match",
    [
        ({}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": True}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 4, "prompt_tuning_init": "WORDS"}, "prompt_tuning_init"),
        (
            {"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"},
            "tokenizer_name_or_path",
        ),
        (
            {"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "t"},
            "prompt_tuning_init_text",
        ),
        ({"num_virtual_tokens": 4, "tokenizer_kwargs": {"use_fast": True}}, "tokenizer_kwargs"),
        ({"num_virtual_tokens": 4, "num_transformer_submodules": 3}, "num_transformer_submodules"),
        ({"num_virtual_tokens": 4, "token_dim": -1}, "token_dim"),
    ],
)
def test_bad_config_values_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        lorakit.PromptTuningConfig(task_type="CAUSAL_LM", **fields)


def test_a_prompt_needs_a_task_type():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="task_type"):
        lorakit.get_peft_model(model, lorakit.PromptTuningConfig(num_virtual_tokens=4))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_logits_to_keep_masks_skip_the_virtual_tokens(method):
    """lorakit's trainer asks for logits of the supervised positions only (a (batch, n) boolean mask over the real
    tokens): the virtual tokens get no logits, the rest are those of the full forward."""
    _, k = build(method, "llama")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(2, 7, dtype=torch.bool)
    keep[0, 2:5], keep[1, 4:] = True, True
    with torch.no_grad():
        full = k(input_ids=ids).logits[:, -7:]
        kept = k(input_ids=ids, logits_to_keep=keep).logits
        last = k(input_ids=ids, logits_to_keep=torch.tensor([6])).logits
    torch.testing.assert_close(kept, full[keep])
    torch.testing.assert_close(last[:, 0], full[:, 6])
