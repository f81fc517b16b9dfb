"""The PeftModel API: adapters, switching, merging, unloading, parameter counts, tasks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import input_ids, tiny_bert, tiny_gpt2, tiny_llama
from lorakit import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    LoraConfig,
    LoraLayer,
    MergeError,
    ModulesToSaveWrapper,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForSequenceClassification,
    TaskType,
    get_peft_model,
)

QV = ["q_proj", "v_proj"]


def lora(**kw) -> LoraConfig:
    kw.setdefault("target_modules", QV)
    kw.setdefault("init_lora_weights", False)
    return LoraConfig(r=4, lora_alpha=8, **kw)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_default_init_model_equals_base(ids):
    base = tiny_llama()
    ref = base(ids).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=QV))
    torch.testing.assert_close(model(ids).logits, ref)


def test_only_adapter_parameters_train_and_counts(ids):
    model = get_peft_model(tiny_llama(), lora())
    names = trainable(model)
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    n_train, n_all = model.get_nb_trainable_parameters()
    # 2 layers x (q: 4*(32+32) + v: 4*(32+16))
    assert n_train == 2 * (4 * 64 + 4 * 48)
    assert n_all == sum(p.numel() for p in model.parameters())


def test_print_trainable_parameters(capsys):
    get_peft_model(tiny_llama(), lora()).print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: 896 || all params: ")


def test_task_type_picks_class():
    assert isinstance(get_peft_model(tiny_llama(), lora(task_type=TaskType.CAUSAL_LM)), PeftModelForCausalLM)
    model = get_peft_model(tiny_bert(), lora(task_type="SEQ_CLS", target_modules=["query", "value"]))
    assert isinstance(model, PeftModelForSequenceClassification)
    assert isinstance(model.get_base_model().classifier, ModulesToSaveWrapper)
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    assert any(n.endswith("classifier.modules_to_save.default.weight") for n in trainable(model))


def test_one_step_changes_output_only_through_adapter(ids):
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=QV))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = model(ids).logits.detach()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.allclose(model(ids).logits, before)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_add_set_delete_adapter(ids):
    model = get_peft_model(tiny_llama(), lora())
    out_default = model(ids).logits
    model.add_adapter("other", lora(target_modules=["k_proj"]))
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    torch.testing.assert_close(model(ids).logits, out_default)
    model.set_adapter("other")
    assert model.active_adapter == "other"
    assert all(".other." in n for n in trainable(model))
    out_other = model(ids).logits
    assert not torch.allclose(out_other, out_default)
    with pytest.raises(AdapterExistsError):
        model.add_adapter("other", lora())
    with pytest.raises(AdapterNotFoundError, match="'othr'.*did you mean 'other'"):
        model.set_adapter("othr")
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    k = model.get_base_model().model.layers[0].self_attn.k_proj
    assert isinstance(k, nn.Linear), "a layer left with no adapter is unwrapped"
    torch.testing.assert_close(model(ids).logits, out_default)


def test_switching_inference_adapters_walks_no_layer_and_touches_no_weight(ids, tmp_path, monkeypatch):
    """set_adapter among adapters loaded for inference is one assignment read by every layer (constant time)."""
    model = get_peft_model(tiny_llama(), lora(target_modules=["q_proj", "v_proj", "down_proj"]))
    model.save_pretrained(tmp_path / "a")
    torch.manual_seed(1)
    model.add_adapter("b", lora(target_modules=["k_proj"]))
    model.save_pretrained(tmp_path / "b", selected_adapters=["b"])
    served = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    served.load_adapter(tmp_path / "b" / "b", adapter_name="b")
    expected = {}
    for name in ("a", "b"):
        served.set_adapter(name)
        expected[name] = served(ids).logits
    weights = {n: (p.data_ptr(), p._version) for n, p in served.named_parameters()}
    walked = []
    tuner = type(served.base_model)
    real_list = tuner._adapter_layer_list
    monkeypatch.setattr(tuner, "_adapter_layer_list", lambda self: walked.append(1) or real_list(self))
    for name in ("a", "b", "a", "b"):
        served.set_adapter(name)
        assert served.active_adapter == name
        torch.testing.assert_close(served(ids).logits, expected[name])
    assert walked == []
    assert weights == {n: (p.data_ptr(), p._version) for n, p in served.named_parameters()}
    assert not trainable(served)


def test_a_layer_told_directly_what_to_run_follows_the_model_again_after_set_adapter(ids):
    model = get_peft_model(tiny_llama(), lora())
    model.add_adapter("other", lora())
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    q.set_active(["other"])  # PEFT lets one layer run another adapter
    assert q.active_adapters == ["other"] and model.active_adapter == "default"
    model.set_adapter("other")
    model.set_adapter("default")
    assert q.active_adapters == ["default"]
    model.delete_adapter("default")
    assert q.active_adapters == ["other"] and model.active_adapter == "other"


def test_disable_adapter_context(ids):
    base = tiny_llama()
    ref = copy.deepcopy(base)(ids).logits
    model = get_peft_model(base, lora())
    adapted = model(ids).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, ref)
    torch.testing.assert_close(model(ids).logits, adapted)


def test_disable_adapter_refused_while_merged(ids):
    model = get_peft_model(tiny_llama(), lora())
    model.merge_adapter()
    with pytest.raises(MergeError, match="unmerge_adapter"):
        with model.disable_adapter():
            pass


@pytest.mark.parametrize("factory,targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_merge_unmerge_and_merge_and_unload(factory, targets, ids):
    base = factory()
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, lora(target_modules=targets))
    unmerged = model(ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    plain = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().named_parameters() if "lora_" not in n}
    for n, p in w0.items():
        torch.testing.assert_close(plain[n], p, rtol=0, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert type(merged) is type(base)
    torch.testing.assert_close(merged(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_unload_returns_original_model(ids):
    base = tiny_llama()
    ref = copy.deepcopy(base)(ids).logits
    model = get_peft_model(base, lora(modules_to_save=["lm_head"]))
    plain = model.unload()
    assert plain is base
    assert isinstance(plain.lm_head, nn.Linear)
    torch.testing.assert_close(plain(ids).logits, ref)


def test_safe_merge_nan_leaves_model_unchanged(ids):
    model = get_peft_model(tiny_llama(), lora())
    out = model(ids).logits
    layer = model.get_base_model().model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("inf")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(MergeError):
        model.merge_and_unload(safe_merge=True)
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n
    assert isinstance(layer, LoraLayer) and not layer.merged
    assert out.shape == model(ids).logits.shape


def test_bias_modes():
    all_bias = get_peft_model(tiny_bert(), lora(target_modules=["query"], bias="all"))
    assert {n for n in trainable(all_bias) if n.endswith("bias")} >= {
        "base_model.model.bert.encoder.layer.0.attention.self.key.bias",
        "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias",
    }
    only = get_peft_model(tiny_bert(), lora(target_modules=["query"], bias="lora_only"))
    biases = {n for n in trainable(only) if n.endswith("bias")}
    assert biases == {f"base_model.model.bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in (0, 1)}


def test_second_adapter_with_bias_is_refused():
    model = get_peft_model(tiny_bert(), lora(target_modules=["query"], bias="all"))
    with pytest.raises(ConfigError, match="only one adapter"):
        model.add_adapter("b", lora(target_modules=["value"], bias="all"))
    assert list(model.peft_config) == ["default"]


def test_modules_to_save_trains_a_copy_and_keeps_original(ids):
    model = get_peft_model(tiny_llama(), lora(modules_to_save=["lm_head"]))
    head = model.get_base_model().lm_head
    assert isinstance(head, ModulesToSaveWrapper)
    assert head.modules_to_save["default"].weight.requires_grad
    assert not head.original_module.weight.requires_grad
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    adapted = model(ids).logits
    with model.disable_adapter():
        assert not torch.allclose(model(ids).logits, adapted)


def test_modules_to_save_typo_is_reported():
    with pytest.raises(ConfigError, match="'lm_haed'.*did you mean 'lm_head'"):
        get_peft_model(tiny_llama(), lora(modules_to_save=["lm_haed"]))


def test_forwarded_attributes_for_transformers_code():
    model = get_peft_model(tiny_llama(), lora())
    assert model.config.model_type == "llama"
    assert model.num_parameters(only_trainable=True) == model.get_nb_trainable_parameters()[0]
    assert model.device.type == "cpu"
    assert model.get_base_model() is model.base_model.model


def test_generate_uses_adapter(ids):
    base = tiny_llama()
    model = get_peft_model(base, lora())
    out = model.generate(input_ids=ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with model.disable_adapter():
        out_base = model.generate(input_ids=ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    merged = model.merge_and_unload()
    torch.testing.assert_close(
        merged.generate(input_ids=ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False), out
    )
    assert out_base.shape == out.shape


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_same_gradients(reentrant, ids):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(tiny_llama(), lora())
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert ckpt[n] is not None, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6)


def test_embedding_and_conv_targets_in_a_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.conv = nn.Conv1d(4, 4, 3, padding=1)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            h = self.emb(x).transpose(1, 2)
            return self.out(self.conv(h).transpose(1, 2))

    torch.manual_seed(0)
    net = Net()
    x = torch.randint(0, 10, (2, 5))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["emb", "conv", "out"], init_lora_weights=False))
    out = model(x)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-5)


def test_invalid_adapter_name():
    with pytest.raises(ConfigError, match="adapter name"):
        get_peft_model(tiny_llama(), lora(), adapter_name="a.b")


def test_peft_config_type_is_checked():
    with pytest.raises(ConfigError, match="lorakit.LoraConfig"):
        PeftModel(tiny_llama(), {"r": 8})


def test_input_ids_fixture_shape():
    assert input_ids().shape == (2, 10)


def test_seq2seq_t5_generate_and_merge():
    from transformers import T5Config, T5ForConditionalGeneration

    from lorakit import PeftModelForSeq2SeqLM

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    model = get_peft_model(T5ForConditionalGeneration(cfg).eval(), lora(task_type="SEQ_2_SEQ_LM", target_modules=None))
    assert isinstance(model, PeftModelForSeq2SeqLM)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert names == {"q", "v"}, "T5's default targets"
    src = torch.randint(1, 64, (2, 6))
    labels = torch.randint(1, 64, (2, 4))
    loss = model(input_ids=src, labels=labels).loss
    loss.backward()
    out = model.generate(input_ids=src, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    logits = model(input_ids=src, labels=labels).logits
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=src, labels=labels).logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.generate(input_ids=src, max_new_tokens=3, min_new_tokens=3, do_sample=False), out)


@pytest.mark.parametrize(
    "task,head_cls,head",
    [
        ("TOKEN_CLS", "BertForTokenClassification", "classifier"),
        ("QUESTION_ANS", "BertForQuestionAnswering", "qa_outputs"),
        ("FEATURE_EXTRACTION", "BertModel", None),
    ],
)
def test_other_bert_tasks(task, head_cls, head):
    import transformers

    from lorakit import MODEL_TYPE_TO_PEFT_MODEL

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    base = getattr(transformers, head_cls)(cfg).eval()
    model = get_peft_model(base, lora(task_type=task, target_modules=["query", "value"]))
    assert type(model) is MODEL_TYPE_TO_PEFT_MODEL[TaskType(task)]
    if head:
        assert isinstance(getattr(model.get_base_model(), head), ModulesToSaveWrapper)
    ids = torch.randint(0, 64, (2, 5))
    kwargs = (
        {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([2, 3])} if head == "qa_outputs" else {}
    )
    out = model(input_ids=ids, token_type_ids=torch.zeros_like(ids), **kwargs)
    if kwargs:
        out.loss.backward()
        assert model.get_base_model().qa_outputs.modules_to_save["default"].weight.grad is not None
    assert out is not None
