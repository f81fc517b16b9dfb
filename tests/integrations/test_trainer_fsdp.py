"""A lorakit model under the HF Trainer with accelerate's FSDP2: 2 CPU processes on gloo under torchrun
(tests/integrations/fsdp_trainer_run.py says how accelerate is let take its FSDP branch on CPU).

``save_model`` writes the adapter folder from the gathered adapter tensors (PEFT and lorakit load it and give the
sharded model's logits), checkpoints hold it beside the Trainer's FSDP state, resuming from a checkpoint reaches
the uninterrupted run's adapter, and FSDP1 is refused with a message that says what to set.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from lorakit import PeftModel
from lorakit.errors import ConfigError
from test_trainer import pattern_data
from training.runs import subprocess_env

SCRIPT = os.path.join(os.path.dirname(__file__), "fsdp_trainer_run.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(out, state_dict_type="SHARDED_STATE_DICT", resume=None) -> subprocess.CompletedProcess:
    args = [*TORCHRUN, SCRIPT, str(out), state_dict_type, *([str(resume)] if resume else [])]
    return subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An FSDP2 run with sharded checkpoints (DCP), one with full-state checkpoints, and one resumed from the
    first's step-2 checkpoint."""
    root = tmp_path_factory.mktemp("trainer_fsdp")
    for name, kind in (("sharded", "SHARDED_STATE_DICT"), ("full", "FULL_STATE_DICT")):
        done = run(root / name, state_dict_type=kind)
        assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    done = run(root / "resumed", resume=root / "sharded" / "checkpoint-2")
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return root


def test_save_model_writes_the_adapter_folder_that_peft_and_lorakit_load(runs):
    from peft import PeftModel as RealPeftModel

    final = runs / "sharded" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(final))
    assert not {f for f in os.listdir(final) if f.startswith(("model", "pytorch_model"))}  # no full state dict
    state = adapter(final)
    assert len(state) == 2 * 3 * 2 and all(t.shape[0] == 4 or t.shape[1] == 4 for t in state.values())  # whole
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in state.items())  # trained
    ids = pattern_data(1)[0]["input_ids"][None]
    expected = torch.load(runs / "sharded" / "logits.pt")  # the sharded model's own output after training
    with torch.no_grad():
        ours = PeftModel.from_pretrained(tiny_llama(initializer_range=0.5), final)(input_ids=ids).logits
        theirs = RealPeftModel.from_pretrained(tiny_llama(initializer_range=0.5), str(final))(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)


def test_checkpoints_hold_the_adapter_beside_the_trainers_fsdp_state(runs):
    sharded, full = set(os.listdir(runs / "sharded" / "checkpoint-2")), set(os.listdir(runs / "full" / "checkpoint-2"))
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= sharded & full
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= sharded  # DCP shards: the base is never gathered whole
    assert {"pytorch_model_fsdp.bin", "optimizer.bin"} <= full
    a, b = adapter(runs / "sharded" / "checkpoint-2"), adapter(runs / "full" / "checkpoint-2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same run, either kind of state


def test_resume_from_a_checkpoint_reaches_the_uninterrupted_adapter(runs):
    straight, resumed = adapter(runs / "sharded" / "final"), adapter(runs / "resumed" / "final")
    step2 = adapter(runs / "sharded" / "checkpoint-2")
    assert not all(torch.equal(straight[k], step2[k]) for k in straight)  # steps 3-4 changed it
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-6, atol=1e-7, msg=key)


def test_fsdp1_is_refused_naming_what_to_set(tmp_path):
    """accelerate cannot build FSDP1 on CPU at all (its plugin asks for an accelerator), so the check the mixin runs
    on a GPU is run here on the Trainer's state as accelerate leaves it."""
    from types import SimpleNamespace

    from lorakit.integrations.trainer import check_fsdp_version

    def state(version):
        plugin = SimpleNamespace(fsdp_version=version)
        return SimpleNamespace(
            is_fsdp_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
        )

    with pytest.raises(ConfigError, match=r"needs FSDP2 \(PyTorch's fully_shard\): set fsdp_version: 2"):
        check_fsdp_version(state(1))
    check_fsdp_version(state(2))
    check_fsdp_version(SimpleNamespace(is_fsdp_enabled=False))
