"""Optional dependencies are imported only where they are used: a plain fp32 model never loads bitsandbytes
(whose CPU backend prints a warning about its missing ``kernels`` package), nor PEFT, matplotlib or pyarrow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lorakit.training.config import SCHEDULERS
from lorakit.training.schedules import get_scheduler
from training.runs import write_data, write_model

#: Packages that must stay unimported unless a feature needs them (quantized layers, PEFT, the loss plot, parquet).
OPTIONAL = ("bitsandbytes", "peft", "matplotlib", "pyarrow")


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    """One new Python process: ``import lorakit``, ``get_peft_model`` on a plain tiny model and a forward, then
    the training API (what ``lorakit train`` runs) for one step on a tiny fp32 model. Returns its stderr and the
    optional packages imported after each stage."""
    root = tmp_path_factory.mktemp("quiet")
    model, (train_file, _) = write_model(root / "model"), write_data(root / "data")
    code = f"""
        import json, sys
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        import lorakit

        def loaded():
            print(json.dumps(sorted(m for m in {OPTIONAL!r} if m in sys.modules)), flush=True)

        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        model = lorakit.get_peft_model(LlamaForCausalLM(config), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
        model(torch.tensor([[1, 2, 3]]))
        loaded()

        from lorakit.training.config import TrainConfig
        from lorakit.training.trainer import train
        cfg = TrainConfig(model={str(model)!r}, data={str(train_file)!r}, output={str(root / "out")!r},
                          r=2, batch_size=2, max_steps=1, skip_eval=True)
        train(cfg, log=lambda line: None, progress=False)
        loaded()
    """
    # progress bars off, as with --no-progress (transformers' own loading bar obeys HF_HUB_DISABLE_PROGRESS_BARS)
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert (root / "out" / "adapter_model.safetensors").is_file()
    after_model, after_training = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    return result.stderr, after_model, after_training


def test_import_and_get_peft_model_on_a_plain_model_import_no_optional_package(fresh_process):
    _, after_model, _ = fresh_process
    assert after_model == []


def test_a_tiny_training_run_prints_no_third_party_noise(fresh_process):
    stderr, _, after_training = fresh_process
    assert stderr == ""  # before: bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community"
    assert after_training == ["matplotlib"]  # the loss plot; not transformers.optimization -> PEFT -> bitsandbytes


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_equal_transformers_step_by_step_with_the_same_state_dict(name, warmup):
    from transformers import get_scheduler as theirs_for

    def build(factory):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return optimizer, factory(name, optimizer, warmup, 10)

    ours_opt, ours = build(get_scheduler)
    theirs_opt, theirs = build(theirs_for)
    for _ in range(12):  # past the end, where linear and cosine floor at 0
        assert ours.get_last_lr() == theirs.get_last_lr()  # bit for bit
        assert ours.state_dict() == theirs.state_dict()  # a checkpoint written by either resumes with the other
        ours_opt.step(), theirs_opt.step(), ours.step(), theirs.step()
