"""``lorakit train --method`` for every adapter method beyond LoRA, on a tiny local model: the run trains, the
log names the method, the adapter file is the method's, and it loads back onto the base."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit import PeftModel
from lorakit.errors import ConfigError
from lorakit.training.config import TrainConfig
from lorakit.training.methods import METHODS, TRAIN_METHODS
from lorakit.training.trainer import train
from training.test_trainer_loop import adapter, config

#: method -> (peft_type in the file, a line the log starts with, learning rate)
RUNS = {
    "prompt-tuning": ("PROMPT_TUNING", "prompt tuning, 20 virtual tokens (from sampled vocabulary)", 3e-2),
    "p-tuning": ("P_TUNING", "P-tuning, 20 virtual tokens from an MLP prompt encoder", 1e-2),
    "prefix-tuning": ("PREFIX_TUNING", "prefix tuning, 20 virtual keys and values per layer", 1e-1),
    "houlsby": ("BOTTLENECK", "Houlsby bottleneck adapters, reduction factor 16", 1e-2),
    "pfeiffer": ("BOTTLENECK", "Pfeiffer bottleneck adapters, reduction factor 16", 1e-2),
}


@pytest.mark.parametrize("method", sorted(RUNS))
def test_a_run_trains_saves_and_reloads_the_method(method, tmp_path, model_dir, data_files, tiny_model):
    peft_type, logged_as, lr = RUNS[method]
    out = tmp_path / method
    cfg = config(model_dir, data_files, out, method=method, save_every=0, max_steps=4, learning_rate=lr,
                 eval_limit=4, samples=0)  # fmt: skip
    logged: list[str] = []
    result = train(cfg, log=logged.append, progress=False)
    assert any(line.startswith(logged_as) for line in logged), logged
    history = result.metrics["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert result.metrics["eval_after"] is not None  # generation through the adapted model ran
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type
    tensors = adapter(out)
    assert tensors and all(t.abs().sum() > 0 for t in tensors.values())
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    loaded = PeftModel.from_pretrained(tiny_model, out)
    with torch.no_grad():
        adapted = loaded(input_ids=ids).logits[:, -ids.shape[1] :]  # after any virtual tokens
        with loaded.disable_adapter():
            base = loaded(input_ids=ids).logits
    assert not torch.allclose(adapted, base)


def test_every_adapter_method_has_a_test_run():
    assert set(TRAIN_METHODS) - {"lora", "adalora", "ia3"} == set(RUNS)
    assert METHODS[-1] == "full"


def test_bottleneck_methods_refuse_targets():
    with pytest.raises(ConfigError, match="--targets does not apply to --method pfeiffer"):
        TRAIN_METHODS["pfeiffer"].build(TrainConfig(method="pfeiffer", target_modules=["q_proj"]), None, 10)
