"""``lorakit train --trainable-token-indices``: LoRA plus chosen embedding rows, trained and saved as those rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import PeftModel
from lorakit.cli import main
from lorakit.errors import ConfigError
from training.runs import ROWS, adapter, cli_args, config

KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def test_train_flag_trains_and_saves_only_those_rows(tmp_path, model_dir, data_files):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = sorted(set(tokenizer(ROWS[0]["completion"])["input_ids"]))[:2]  # tokens the data holds
    out = tmp_path / "run"
    args = cli_args(model_dir, data_files, out, max_steps=3, lora_dropout=0.0)
    assert main([*args, "--trainable-token-indices", *map(str, ids)]) == 0
    saved = adapter(out)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    start = base.model.embed_tokens.weight.detach()[ids]
    assert saved[KEY].shape == (2, start.shape[1]) and not torch.allclose(saved[KEY], start)
    assert not any("base_layer" in k for k in saved)
    loaded = PeftModel.from_pretrained(base, out)
    embed = loaded.base_model.model.model.embed_tokens
    assert embed.token_indices_of("default") == ids
    changed = (embed.weight != embed.base_layer.weight).any(dim=1).nonzero().flatten().tolist()
    assert changed == ids


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(method="ia3", trainable_token_indices=[3]), "method 'ia3' has no such option"),
        (dict(trainable_token_indices=[]), "must be a non-empty list of token ids"),
        (dict(trainable_token_indices=[3, -1]), "must be a non-empty list of token ids"),
    ],
)
def test_bad_token_settings_are_refused(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, (tmp_path, tmp_path), tmp_path, **kw)
