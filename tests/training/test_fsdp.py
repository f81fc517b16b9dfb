"""``lorakit train --fsdp``: FSDP2 ``fully_shard`` of a frozen base with its adapters, adapter-only gathered saves,
resume; 2 CPU processes on gloo under torchrun (as the DDP test), and the plan in-process on a 1-process group."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError
from lorakit.training import fsdp as fsdp_utils
from lorakit.training.checkpoint import list_checkpoints
from lorakit.training.config import TrainConfig
from lorakit.training.distributed import World
from lorakit.training.optim import build_optimizer
from lorakit.training.trainer import train
from lorakit.tuners.lora.dora import DoraMagnitude
from training.runs import adapter, config, subprocess_env, write_data, write_model

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
EVAL = ["--eval-limit", "2", "--max-new-tokens", "4"]


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone: fully_shard runs (all collectives over one rank)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _dora_model(dtype: torch.dtype = torch.float32):
    model = tiny_llama().to(dtype)
    config = LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"
    )
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft


def test_sharding_plan_gathered_saves_and_placing(tmp_path, one_process_group):
    """Each decoder block and the base model (root) get ``fully_shard``; every parameter becomes a DTensor sharded
    on dim 0 (a bf16 base, fp32 adapters); DoRA's norm cache is off; a step runs under autocast; a save inside
    ``whole_adapters`` writes the unsharded model's adapter; optimizer state and placing round-trip."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    model = _dora_model(torch.bfloat16)
    reference = copy.deepcopy(model)
    reference.save_pretrained(tmp_path / "reference")
    units = fsdp_utils.shard(model, World(device=torch.device("cpu")))
    base = model.get_base_model()
    assert units == ["model.layers.0", "model.layers.1", ""]
    assert isinstance(base, FSDPModule) and all(isinstance(b, FSDPModule) for b in base.model.layers)
    assert not isinstance(base.model.layers[0].self_attn.q_proj, FSDPModule)  # adapters ride in their block's unit
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params.values())
    assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in params.values() if not p.requires_grad} == {torch.bfloat16}
    state = model.state_dict()  # what accelerate's get_state_dict calls: sharded tensors have no storage to compare
    assert set(state) == set(reference.state_dict()) and all(isinstance(t, DTensor) for t in state.values())
    magnitudes = [m for m in model.modules() if isinstance(m, DoraMagnitude)]
    assert len(magnitudes) == 6 and not any(m.cache_norm for m in magnitudes)

    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(isinstance(p.grad, DTensor) for p in trained)
    assert all(p.grad is None for p in params.values() if not p.requires_grad)
    optimizer.step()

    with fsdp_utils.whole_adapters(model):
        assert not any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)
        model.save_pretrained(tmp_path / "sharded")
    assert all(isinstance(p, DTensor) for p in model.parameters())  # the shards are back
    saved, ref = adapter(tmp_path / "sharded"), adapter(tmp_path / "reference")
    assert saved.keys() == ref.keys() and {t.dtype for t in saved.values()} == {torch.float32}
    assert any(not torch.equal(saved[k], ref[k]) for k in ref)  # the step moved them
    state = fsdp_utils.GatheredOptimizer(optimizer).state_dict()["state"]
    assert not any(isinstance(v, DTensor) for entry in state.values() for v in entry.values())
    first = trained[0]
    torch.testing.assert_close(fsdp_utils.place_like(first, fsdp_utils.full(first)).to_local(), first.to_local())


def test_fused_adamw_steps_refresh_doras_cached_norm():
    """torch's fused AdamW writes parameters without moving their version counters; DoRA's cache counts optimizer
    steps, so its cached ‖W + s·BA‖ follows every step of lorakit train's optimizer (a run equals one with the
    cache off)."""
    losses = {}
    for cache in (True, False):
        model = _dora_model()
        for module in model.modules():
            if isinstance(module, DoraMagnitude):
                module.cache_norm = cache
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer("adamw", trained, lr=1e-2, weight_decay=0.0)
        assert optimizer.defaults["fused"]
        ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
        losses[cache] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[cache].append(loss.item())
    assert losses[True] == losses[False]


def test_transformer_blocks_without_no_split_modules():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.heads = nn.ModuleList([nn.Linear(4, 2)])

    stack = Stack()
    assert fsdp_utils.transformer_blocks(stack) == list(stack.blocks)  # the longest ModuleList


def test_refusals(tmp_path, model_dir, data_files):
    with pytest.raises(ConfigError, match="method 'full' trains every weight"):
        TrainConfig(fsdp=True, method="full")
    with pytest.raises(ConfigError, match="not supported for --method adalora: its rank allocation"):
        TrainConfig(fsdp=True, method="adalora")
    with pytest.raises(ConfigError, match="quantized base .* quant_storage"):
        TrainConfig(fsdp=True, bits=4)
    with pytest.raises(ConfigError, match="optim 'adamw8bit' is not supported"):
        TrainConfig(fsdp=True, optim="adamw8bit")
    with pytest.raises(ConfigError, match="--dtype fp16 is not supported: loss scaling"):
        TrainConfig(fsdp=True, dtype="fp16", device="cuda")
    with pytest.raises(ConfigError, match="launch it with torchrun --nproc_per_node N"):
        train(config(model_dir, data_files, tmp_path / "one", fsdp=True), log=lambda s: None, progress=False)
    prompt = get_peft_model(tiny_llama(), _prompt_config())
    with pytest.raises(ConfigError, match="trains 1 parameters outside it .*prompt_encoder"):
        fsdp_utils.check_supported(prompt)


def _prompt_config():
    from lorakit import PromptTuningConfig

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)


def _fsdp_args(folder, out, *extra: str) -> list[str]:
    """torchrun, 2 processes, ``lorakit train --fsdp`` on the tiny model: DoRA, 4 steps of 2 micro-batches of 1 per
    process (global batch 4), exact-match eval of 2 rows before and after (every process takes part)."""
    args = ["--model", str(folder / "model"), "--data", str(folder / "train.jsonl"), "--max-steps", "4"]
    args += ["--eval-data", str(folder / "eval.jsonl"), *EVAL, "--no-progress", "--rank", "4", "--alpha", "8"]
    args += ["--lr", "1e-2", "--dora", "--save-every", "2", "--keep-checkpoints", "10", "--batch-size", "1"]
    args += ["--grad-accum", "2", "--fsdp", "-o", str(out)]
    return [*TORCHRUN, "-m", "lorakit", "train", *args, *extra]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One FSDP run (2 gloo processes) and the one-process run at the same global batch, for this module."""
    folder = tmp_path_factory.mktemp("fsdp")
    write_model(folder / "model")
    data = write_data(folder)
    done = subprocess.run(_fsdp_args(folder, folder / "fsdp"), env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    kw = dict(use_dora=True, lora_dropout=0.0, max_steps=4, save_every=2, batch_size=2, grad_accum=2)
    kw.update(skip_eval=False, eval_limit=2, max_new_tokens=4)
    train(config(folder / "model", data, folder / "one", **kw), log=lambda s: None, progress=False)
    return folder, done.stdout + done.stderr


def test_torchrun_fsdp_equals_one_process(fsdp_run):
    """FSDP over 2 gloo processes (2 micro-batches of 1 each) gives one process's DoRA adapter at the same global
    batch (DoRA's norm is recomputed from the refilled shards each step), and the same generations; rank 0 writes
    checkpoints of whole tensors."""
    folder, log = fsdp_run
    assert "FSDP: 3 fully_shard units over 2 processes (2 blocks + root)" in log
    a, b = adapter(folder / "one"), adapter(folder / "fsdp")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    m1 = json.loads((folder / "one" / "metrics.json").read_text())
    m2 = json.loads((folder / "fsdp" / "metrics.json").read_text())
    assert (m2["world_size"], m2["global_batch"], m2["config"]["fsdp"]) == (2, 4, True)
    for when in ("eval_before", "eval_after"):  # generation under FSDP: every process ran it, rank 0 reports
        assert [s["output"] for s in m2[when]["samples"]] == [s["output"] for s in m1[when]["samples"]]
    for h1, h2 in zip(m1["history"], m2["history"]):
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-5)
    assert [s for s, _ in list_checkpoints(folder / "fsdp")] == [2]
    step2 = adapter(folder / "fsdp" / "checkpoints" / "step-00000002")
    assert {k: t.shape for k, t in step2.items()} == {k: t.shape for k, t in a.items()}


@pytest.mark.slow
def test_torchrun_fsdp_resume_reaches_the_uninterrupted_result(fsdp_run, tmp_path):
    """A 2-process FSDP run resumed from the step-2 checkpoint (optimizer state sharded back) ends bit-identical
    to the run that never stopped."""
    folder, _ = fsdp_run
    resumed = tmp_path / "resumed"
    shutil.copytree(folder / "fsdp" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    done = subprocess.run(_fsdp_args(folder, resumed, "--resume"), env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    b, c = adapter(folder / "fsdp"), adapter(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b)
