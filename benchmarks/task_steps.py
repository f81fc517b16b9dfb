"""Training steps on the bundled task as ``lorakit train`` takes them, outside the trainer: for timing and memory.

``lorakit.training.trainer.train`` runs a whole job (load, eval, steps, files) and times its steps one after the
other; a benchmark that compares methods wants the same step *interleaved* with the others and with the frozen
base model, on the same batches. This module rebuilds that step from the trainer's own parts:

* the model: ``lorakit.training.methods.adapter_config`` (what ``--method`` builds) on a copy of the base;
* the batches: the bundled task's examples (``build_dataset``, ``collate``), the first ``steps`` batches of the
  run's epoch-0 order (``randperm`` seeded with ``seed``, as ``Trainer._global_indices`` draws them);
* the loss: the completion-only cross-entropy summed over supervised tokens, with logits only at those positions
  (``logits_to_keep``, as ``Trainer._loss_sum``), divided by their number;
* the update: gradient clipping at ``max_grad_norm``, ``build_optimizer`` (torch's fused AdamW), ``zero_grad``.

The *floor* is the frozen base model's forward + backward of the same loss (``bench_lora.build_floor``: every
base parameter frozen, backward through every layer), the least any adapter's step can cost.

Peak memory of a step runs in a fresh process per variant (this file, ``--memory-child``), as in
``bench_lora.py``: the high-water mark of the resident set over ``--steps`` steps minus the resident set just
before them, and torch's allocator peak during one more step.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_lora import (  # noqa: E402
    _proc_status_kb,
    _profiler_peak_bytes,
    _reset_peak_rss,
    _return_freed_memory,
    build_floor,
)
from models import load_smollm2  # noqa: E402

FLOOR = "floor"  # the variant name of the frozen base model


def task_config(train: dict[str, Any], steps: int) -> Any:
    """The :class:`TrainConfig` of a run with these fields (``train``) and ``steps`` optimizer steps."""
    from lorakit.training.config import TrainConfig

    return TrainConfig(max_steps=steps, save_every=0, samples=0, **train)


def task_batches(tokenizer: Any, cfg: Any, steps: int) -> list[dict[str, torch.Tensor]]:
    """The first ``steps`` micro-batches a run of ``cfg`` trains on (one process, no accumulation)."""
    from lorakit.training.data import build_dataset, collate, resolve_data

    examples, _ = build_dataset(resolve_data(cfg.data, "train"), tokenizer, cfg.max_length, cfg.overflow)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()  # epoch 0
    size = cfg.batch_size
    if steps * size > len(examples):
        raise SystemExit(f"{steps} steps of {size} need more than the task's {len(examples)} examples")
    return [
        collate([examples[i] for i in order[k * size : (k + 1) * size]], tokenizer.pad_token_id) for k in range(steps)
    ]


def task_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the supervised next-token targets, logits only where a target is supervised."""
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)  # (B, T)
    keep[:, :-1] = targets != -100
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False
    ).logits  # (K, V)
    return F.cross_entropy(logits.float(), targets[keep[:, :-1]])


def build_variant(base: torch.nn.Module, train: dict[str, Any] | None, total_steps: int) -> torch.nn.Module:
    """The floor (``train`` None) or a copy of ``base`` adapted as ``lorakit train`` would adapt it, in train mode."""
    if train is None:
        return build_floor(base)
    from lorakit.tasks import get_peft_model
    from lorakit.training.methods import adapter_config

    cfg = task_config(train, total_steps)
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base)
    model = get_peft_model(model, adapter_config(cfg, model, total_steps))
    model.train()
    return model


def make_task_step(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], train: dict[str, Any] | None
) -> Callable[[], float]:
    """One training step per call, on the next of ``batches`` (cycling); returns the loss. The floor
    (``train`` None) stops after backward: it has nothing to update."""
    from lorakit.training.trainer import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    cfg = task_config(train, len(batches)) if train is not None else None
    opt = build_optimizer(cfg.optim, params, cfg.learning_rate, cfg.weight_decay) if cfg is not None else None
    calls = [0]

    def step() -> float:
        batch = batches[calls[0] % len(batches)]
        calls[0] += 1
        loss = task_loss(model, batch)
        loss.backward()
        if opt is not None:
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# -- peak memory, one fresh process per variant ----------------------------------------------------------


def memory_child(train: dict[str, Any] | None, steps: int, total_steps: int, threads: int) -> dict[str, Any]:
    """In a fresh process: build the variant for a run of ``total_steps``, then measure its first ``steps`` training
    steps (RSS) and one more (torch's allocator). Freed memory is kept between steps, as ``lorakit train`` does on
    CPU."""
    from lorakit.training.allocator import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()
    loaded, tokenizer = load_smollm2()
    cfg = task_config(train or {}, steps)
    batches = task_batches(tokenizer, cfg, steps)
    model = build_variant(loaded, train, total_steps)
    del loaded
    step = make_task_step(model, batches, train)
    gc.collect()
    _return_freed_memory()  # the model loaded first (then copied) does not count as resident
    rss_before = _proc_status_kb("VmRSS")
    reset = _reset_peak_rss()
    for _ in range(steps):
        step()
    hwm = _proc_status_kb("VmHWM")
    return {
        "hwm_reset": reset,
        "rss_before_mib": rss_before / 1024,
        "peak_rss_mib": hwm / 1024,
        "step_peak_mib": (hwm - rss_before) / 1024 if reset else None,
        "profiler_step_peak_mib": _profiler_peak_bytes(step) / 2**20,
        "steps": steps,
    }


def measure_task_memory(
    variants: dict[str, dict[str, Any] | None], steps: int, total_steps: int, threads: int
) -> dict[str, Any]:
    """``memory_child`` for each variant (name -> TrainConfig fields, None for the floor), each in its own process."""
    results = {}
    for name, train in variants.items():
        cmd = [sys.executable, __file__, "--memory-child", json.dumps(train), "--steps", str(steps)]
        cmd += ["--total-steps", str(total_steps), "--threads", str(threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child for {name} failed:\n{proc.stderr[-4000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_JSON ")][-1]
        results[name] = json.loads(line[len("MEMORY_JSON ") :])
        got = results[name]
        print(
            f"    {name}: step peak {got['step_peak_mib']:.0f} MiB (RSS), {got['profiler_step_peak_mib']:.0f} MiB "
            f"(torch allocator)  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="peak memory of training steps on the bundled task (one variant)")
    ap.add_argument("--memory-child", required=True, help="TrainConfig fields as JSON, or null for the floor")
    ap.add_argument("--steps", type=int, default=2, help="measured steps (default 2)")
    ap.add_argument("--total-steps", type=int, default=60, help="the run the adapter is built for (AdaLoRA's schedule)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    result = memory_child(json.loads(args.memory_child), args.steps, args.total_steps, args.threads)
    print("MEMORY_JSON " + json.dumps(result))
