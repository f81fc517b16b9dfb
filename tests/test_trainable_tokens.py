"""Trainable token rows (LoRA's ``trainable_token_indices``, the standalone ``TrainableTokensConfig``) and
``ensure_weight_tying``, with PEFT 0.21.2 as the oracle for behaviour and file format."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import input_ids, tiny_llama
from lorakit import ConfigError, LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from lorakit.tuners.trainable_tokens.layer import TrainableTokensLayer, TrainableTokensWrapper

PREFIX = "base_model.model."
EMB = PREFIX + "model.embed_tokens."
HEAD = PREFIX + "lm_head."


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=".*embedding layer is adapted.*")
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
        yield


def batch(vocab: int = 96) -> torch.Tensor:
    ids = input_ids(vocab=vocab)
    ids[0, :4] = torch.tensor([1, 5, 7, 9])  # the tokens the tests train, so that they matter
    return ids


def configs(kind: str, lib, **extra):
    """The same adapter in PEFT's and lorakit's classes: LoRA with token rows, or the standalone method."""
    if kind == "lora":
        return lib.LoraConfig(
            target_modules=["q_proj"], trainable_token_indices=[1, 5], init_lora_weights=False, **extra
        )
    return lib.TrainableTokensConfig(token_indices=[1, 5], **extra)


def perturb(model, match: str = "trainable_tokens_delta", seed: int = 3) -> None:
    """Move the token rows (and any LoRA factor) away from their start, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if match in name or "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.5)


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(batch() if ids is None else ids).logits


def file(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# -- files, both ways ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kind", ["lora", "standalone"])
def test_peft_files_load_with_equal_logits_and_lorakit_writes_the_same_file(tmp_path, kind, tie):
    oracle = peft.get_peft_model(tiny_llama(tie=tie), configs(kind, peft)).eval()
    perturb(oracle)
    oracle.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(tiny_llama(tie=tie), tmp_path / "peft")
    torch.testing.assert_close(logits(ours), logits(oracle), atol=2e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    theirs, mine = file(tmp_path / "peft"), file(tmp_path / "ours")
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    key = EMB + ("token_adapter." if kind == "lora" else "") + "trainable_tokens_delta"
    assert mine[key].shape == (2, 32)  # the chosen rows only
    # LoRA's file holds the tied head's rows once (under the embedding); the standalone method repeats them (PEFT)
    assert any(k.startswith(HEAD) for k in mine) == (tie and kind == "standalone")
    back = peft.PeftModel.from_pretrained(tiny_llama(tie=tie), tmp_path / "ours")
    torch.testing.assert_close(logits(back), logits(oracle), atol=0, rtol=0)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in theirs_config.items() if k in config} == {
        k: config[k] for k in theirs_config if k in config
    }


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kind", ["lora", "standalone"])
def test_lorakit_adapters_load_in_peft_with_equal_logits(tmp_path, kind, tie):
    ours = get_peft_model(tiny_llama(tie=tie), configs(kind, lorakit)).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(tie=tie), tmp_path)
    torch.testing.assert_close(logits(theirs), logits(ours), atol=2e-5, rtol=0)
    again = PeftModel.from_pretrained(tiny_llama(tie=tie), tmp_path)  # and the round trip
    torch.testing.assert_close(logits(again), logits(ours), atol=0, rtol=0)


def test_tied_head_reads_the_embedding_rows():
    model = get_peft_model(tiny_llama(tie=True), configs("lora", lorakit)).eval()
    perturb(model)
    embed, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    assert isinstance(embed, TrainableTokensWrapper) and isinstance(head, TrainableTokensWrapper)
    assert head.tied and head.adapter_parameters("default") == [] and head.adapter_state("default") == {}
    rows = embed.token_adapter.trainable_tokens_delta["default"]
    hidden = torch.randn(2, 3, 32)
    with torch.no_grad():
        out = head(hidden)
        torch.testing.assert_close(out[..., [1, 5]], hidden @ rows.t())
        untouched = [i for i in range(96) if i not in (1, 5)]
        torch.testing.assert_close(out[..., untouched], (hidden @ head.base_layer.weight.t())[..., untouched])
    assert head.base_layer.weight is embed.base_layer.weight  # the base stays tied and unchanged


# -- training -----------------------------------------------------------------------------------------


def train_steps(model, ids, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_training_moves_only_the_chosen_rows(tie):
    base = tiny_llama(tie=tie)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 5]))
    embed = model.base_model.model.model.embed_tokens
    start = embed.token_adapter.trainable_tokens_delta["default"].detach().clone()
    torch.testing.assert_close(start, embed.base_layer.weight[[1, 5]])  # rows start as the base rows
    train_steps(model, batch())
    rows = embed.token_adapter.trainable_tokens_delta["default"]
    assert not torch.allclose(rows, start) and embed.base_layer.weight.grad is None
    after = model.get_base_model().state_dict()
    for key, value in before.items():  # every base weight unchanged until merge
        name = key.replace("q_proj.", "q_proj.base_layer.").replace("embed_tokens.", "embed_tokens.token_adapter.")
        name = name.replace("lm_head.", "lm_head.token_adapter.base_layer.") if tie else name
        name = name.replace("token_adapter.weight", "token_adapter.base_layer.weight")
        assert torch.equal(after[name], value), key
    weight = embed.weight  # PEFT's: the weight the active rows make
    changed = (weight != embed.base_layer.weight).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 5]
    if tie:  # the head's logits of those tokens use the trained rows
        hidden = torch.randn(1, 2, 32)
        with torch.no_grad():
            torch.testing.assert_close(model.base_model.model.lm_head(hidden)[..., [1, 5]], hidden @ rows.t())


def test_merge_unmerge_and_merge_and_unload_match_the_unmerged_model():
    model = get_peft_model(tiny_llama(tie=True), configs("lora", lorakit)).eval()
    perturb(model)
    embed = model.base_model.model.model.embed_tokens
    base = embed.base_layer.weight.detach().clone()
    want = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), want, atol=2e-5, rtol=0)
    merged = embed.base_layer.weight
    assert torch.equal(merged[[1, 5]], embed.token_adapter.trainable_tokens_delta["default"].detach())
    assert torch.equal(merged[2:5], base[2:5])
    with pytest.raises(lorakit.MergeError, match="unmerge"):
        with model.disable_adapter():
            pass
    model.unmerge_adapter()
    assert torch.equal(embed.base_layer.weight, base)
    torch.testing.assert_close(logits(model), want, atol=2e-5, rtol=0)  # (q_proj's LoRA unmerges within float error)
    plain = model.merge_and_unload()
    assert type(plain.model.embed_tokens) is torch.nn.Embedding and type(plain.lm_head) is torch.nn.Linear
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # still tied
    torch.testing.assert_close(logits(plain), want, atol=2e-5, rtol=0)


def test_standalone_merge_matches_peft_and_safe_merge_refuses_nan():
    ours = get_peft_model(tiny_llama(tie=True), TrainableTokensConfig(token_indices=[1, 5])).eval()
    perturb(ours)
    want = logits(ours)
    plain = ours.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(logits(plain), want, atol=2e-5, rtol=0)
    bad = get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=[3])).eval()
    with torch.no_grad():
        bad.base_model.model.model.embed_tokens.trainable_tokens_delta["default"][0, 0] = float("nan")
    base = bad.base_model.model.model.embed_tokens.base_layer.weight.detach().clone()
    with pytest.raises(lorakit.MergeError, match="NaN"):
        bad.merge_adapter(safe_merge=True)
    assert torch.equal(bad.base_model.model.model.embed_tokens.base_layer.weight, base)


# -- several adapters ---------------------------------------------------------------------------------


def test_several_adapters_with_different_token_sets(tmp_path):
    model = get_peft_model(tiny_llama(tie=True), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 5]))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], trainable_token_indices=[7, 9]))
    embed = model.base_model.model.model.embed_tokens
    assert embed.token_indices_of("default") == [1, 5] and embed.token_indices_of("other") == [7, 9]
    perturb(model)
    model.eval()
    outputs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outputs[name] = logits(model)
        changed = (embed.weight != embed.base_layer.weight).any(dim=1).nonzero().flatten().tolist()
        assert changed == embed.token_indices_of(name)
    assert not torch.allclose(outputs["default"], outputs["other"])
    with torch.no_grad():  # a batch that mixes them, row by row
        mixed = model(batch(), adapter_names=["default", "other"]).logits
    torch.testing.assert_close(mixed[0], outputs["default"][0], atol=2e-5, rtol=0)
    torch.testing.assert_close(mixed[1], outputs["other"][1], atol=2e-5, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(tie=True), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    for name in ("default", "other"):
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded), outputs[name], atol=0, rtol=0)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(tie=True), tmp_path)
    peft_model.load_adapter(tmp_path / "other", "other")
    peft_model.set_adapter("other")
    torch.testing.assert_close(logits(peft_model), outputs["other"], atol=2e-5, rtol=0)
    loaded.delete_adapter("default")
    assert loaded.base_model.model.lm_head.adapter_names() == ["other"]
    loaded.delete_adapter("other")
    assert type(loaded.base_model.model.lm_head) is torch.nn.Linear  # the tied head is unwrapped with the last


def test_overlapping_token_sets_cannot_run_together():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 5]))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], trainable_token_indices=[5, 6]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ConfigError, match="'default' and 'other' both train token 5"):
        logits(model)


# -- the typical use: new special tokens ----------------------------------------------------------------


def test_resized_vocabulary_trains_only_the_new_tokens(tmp_path):
    def resized(seed: int):
        model = tiny_llama(tie=True)
        torch.manual_seed(seed)  # the new rows are drawn at random: a different draw on each load
        model.resize_token_embeddings(100)
        return model

    model = get_peft_model(resized(0), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[96, 97, 98, 99]))
    embed = model.base_model.model.model.embed_tokens
    start = embed.weight.detach().clone()
    ids = torch.tensor([[96, 3, 97, 4, 98, 99, 5, 96]])
    train_steps(model, ids, steps=4)
    changed = (embed.weight != start).any(dim=1).nonzero().flatten().tolist()
    assert changed == [96, 97, 98, 99]
    model.save_pretrained(tmp_path)
    saved = file(tmp_path)
    assert saved[EMB + "token_adapter.trainable_tokens_delta"].shape == (4, 32)
    assert not any("base_layer" in k for k in saved)  # rows, not the 100 x 32 embedding
    other = resized(1)
    assert not torch.equal(other.model.embed_tokens.weight[96:], start[96:])
    loaded = PeftModel.from_pretrained(other, tmp_path)  # the rows' values replace whatever was drawn there
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)
    theirs = peft.PeftModel.from_pretrained(resized(2), tmp_path)
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=2e-5, rtol=0)


# -- clear errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 96]),
            r"trainable token index 96 is out of range for 'model.embed_tokens', whose vocabulary has 96 tokens",
        ),
        (
            LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokenz": [1]}),
            r"trainable_token_indices key 'embed_tokenz' matched no module.*did you mean 'embed_tokens'",
        ),
        (
            LoraConfig(
                target_modules=["q_proj"],
                modules_to_save=["embed_tokens"],
                trainable_token_indices={"embed_tokens": [1]},
            ),
            r"'embed_tokens' is in modules_to_save .* and in trainable_token_indices",
        ),
        (
            LoraConfig(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[1]),
            r"names 'model.embed_tokens', which already holds a LoraLayer",
        ),
        (
            LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 4, 3]),
            r"trainable token ids \[3\] are listed more than once",
        ),
        (
            LoraConfig(target_modules=["q_proj"], trainable_token_indices={"model.norm": [1]}),
            r"trainable token rows need an embedding .* 'model.norm' is a .*LlamaRMSNorm",
        ),
        (
            TrainableTokensConfig(token_indices=[200]),
            r"trainable token index 200 is out of range .* vocabulary has 96 tokens",
        ),
    ],
)
def test_bad_token_settings_are_refused_and_leave_the_model_as_it_was(config, message):
    model = tiny_llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        get_peft_model(model, config)
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_standalone_config_fields_are_checked():
    with pytest.raises(ConfigError, match=r"token_indices holds \[-2\]"):
        TrainableTokensConfig(token_indices=[1, -2])
    with pytest.raises(ConfigError, match="token_indices=\\[\\] is invalid"):
        TrainableTokensConfig()
    with pytest.raises(ConfigError, match="modules_to_save=.* is not a field of the trainable-tokens method"):
        TrainableTokensConfig(token_indices=[1], modules_to_save=["lm_head"])
    config = lorakit.PeftConfig.from_dict(
        {"peft_type": "TRAINABLE_TOKENS", "token_indices": [4], "init_weights": False}
    )
    assert type(config) is TrainableTokensConfig and config.token_indices == [4] and not config.init_weights


# -- tied embeddings: trainable tokens, modules_to_save, LoRA targets -----------------------------------


def test_tied_token_ids_must_agree_when_ensure_weight_tying():
    ids = {"embed_tokens": [1, 5], "lm_head": [2, 5]}
    with pytest.raises(ConfigError, match="different token ids .*embed_tokens: \\[1, 5\\], lm_head: \\[2, 5\\]"):
        get_peft_model(
            tiny_llama(tie=True),
            LoraConfig(target_modules=["q_proj"], trainable_token_indices=ids, ensure_weight_tying=True),
        )
    untied = get_peft_model(tiny_llama(tie=True), LoraConfig(target_modules=["q_proj"], trainable_token_indices=ids))
    head = untied.base_model.model.lm_head  # without ensure_weight_tying: two independent sets (PEFT's)
    assert not head.tied and head.token_indices_of("default") == [2, 5]
    same = {"embed_tokens": [1, 5], "lm_head": [1, 5]}
    tied = get_peft_model(tiny_llama(tie=True), LoraConfig(target_modules=["q_proj"], trainable_token_indices=same))
    assert tied.base_model.model.lm_head.tied  # equal ids: one set of rows, tied


TIED_CASES = [
    dict(modules_to_save=["lm_head"]),
    dict(modules_to_save=["embed_tokens"]),
    dict(target_modules=["q_proj", "embed_tokens"]),
    dict(target_modules=["q_proj", "lm_head"]),
]


@pytest.mark.parametrize("case", TIED_CASES, ids=lambda c: json.dumps(c))
def test_ensure_weight_tying_matches_peft_both_ways(tmp_path, case):
    kwargs = {"target_modules": ["q_proj"], "init_lora_weights": False, "ensure_weight_tying": True, **case}
    oracle = peft.get_peft_model(tiny_llama(tie=True), peft.LoraConfig(**json.loads(json.dumps(kwargs)))).eval()
    ours = get_peft_model(tiny_llama(tie=True), LoraConfig(**kwargs)).eval()
    names = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad and "q_proj" not in n)  # noqa: E731
    assert names(ours) == names(oracle)
    perturb(oracle)
    oracle.save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny_llama(tie=True), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), logits(oracle), atol=2e-5, rtol=0)
    perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(tie=True), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs), logits(ours), atol=2e-5, rtol=0)
    if "modules_to_save" in case:  # one trainable weight serves both (PEFT's file holds it under both names)
        assert set(file(tmp_path / "ours")) == set(file(tmp_path / "peft"))
        head, embed = ours.base_model.model.lm_head, ours.base_model.model.model.embed_tokens
        assert head.modules_to_save["default"].weight is embed.modules_to_save["default"].weight
    else:  # the head's ΔW is the embedding's, in the same (vocab, dim) layout, and stays so as they train
        train_steps(ours, batch(), steps=2)
        head, embed = ours.base_model.model.lm_head, ours.base_model.model.model.embed_tokens
        torch.testing.assert_close(head.delta_weight("default"), embed.delta_weight("default"))


def test_ensure_weight_tying_warnings_follow_peft():
    def warned(model, **kwargs) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            get_peft_model(model, LoraConfig(target_modules=["q_proj"], **kwargs))
        return [str(w.message) for w in caught if "gradient_checkpointing" not in str(w.message)]

    untied_copy = warned(tiny_llama(tie=True), modules_to_save=["embed_tokens"])
    assert len(untied_copy) == 1 and "tied input and output embeddings" in untied_copy[0]
    assert "ensure_weight_tying=True" in untied_copy[0]
    nothing = warned(tiny_llama(tie=False), modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    assert len(nothing) == 1 and "embeddings are not tied" in nothing[0]
    assert warned(tiny_llama(tie=True), trainable_token_indices=[1]) == []
    assert warned(tiny_llama(tie=False), modules_to_save=["embed_tokens"]) == []
    model = tiny_llama(tie=True)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    assert type(peft_model.base_model.model.lm_head) is torch.nn.Linear  # without it, the head keeps the base weight


def test_trainable_tokens_count_and_layer_status():
    model = get_peft_model(tiny_llama(tie=True), TrainableTokensConfig(token_indices=[1, 5, 7]))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 3 * 32  # the tied head adds nothing
    assert isinstance(model.base_model.model.lm_head, TrainableTokensLayer)
    status = {s.name: s for s in model.get_layer_status()}
    assert status["model.model.embed_tokens"].available_adapters == ["default"]
