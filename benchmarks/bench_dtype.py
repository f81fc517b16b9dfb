"""``lorakit train --dtype bf16`` vs fp32 on the CPU: one LoRA training step on SmolLM2-135M-Instruct, interleaved.

Reproduce (about 3-5 minutes on 2 CPU cores)::

    python benchmarks/bench_dtype.py --json benchmarks/results/bench_dtype.json

Setup, as ``lorakit train`` runs a step: LoRA r=8, lora_alpha=16, q,k,v,o,gate,up,down (all 30 layers), batch 8 x 64
random token ids (fixed seed), labels = input_ids, ``AdamW(lr=1e-4)`` with the fused kernel
(``lorakit.training.optim.build_optimizer``), ``keep_freed_memory()``, ``torch.set_num_threads(2)``.

* ``fp32``: the base in fp32, fp32 adapters, no autocast (lorakit's fused LoRA kernels run);
* ``bf16``: the base loaded in bf16, fp32 adapters, forward under ``torch.autocast("cpu", torch.bfloat16)``
  (the fused kernels step aside: autocast runs the products in bf16).

Measured: median seconds per step over ``--repeats`` repeats of ``--steps`` steps, variants interleaved (``interleaved``
from ``bench_lora.py``: a repeat during which other processes used more than ``--max-foreign`` of the CPUs is run
again, up to ``--max-rejects`` times); the first step's loss of each (the same batch and adapter: they differ by
precision alone); the bytes of the base weights. And, for ``--dtype fp16``'s refusal on the CPU, one
``(512, 576) x (576, 1536)`` product (SmolLM2's MLP shape) in fp32, bf16 and fp16, interleaved the same way.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_lora import LORA, interleaved, make_batch, summary  # noqa: E402
from models import load_smollm2  # noqa: E402


def build(base: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import lorakit

    torch.manual_seed(0)
    model = lorakit.get_peft_model(copy.deepcopy(base).to(dtype), lorakit.LoraConfig(**LORA))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    return model.train()


def make_step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype):
    from lorakit.training.optim import build_optimizer
    from lorakit.training.precision import Precision

    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    precision = Precision(name, "cpu")
    opt = build_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], 1e-4, 0.0)

    def step() -> float:
        with precision.autocast():
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def gemm_fns() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    fns = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a, b = x.to(dtype), w.to(dtype)

        def fn(a=a, b=b) -> None:
            for _ in range(10):
                torch.nn.functional.linear(a, b)

        fns[name] = fn
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per repeat")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-foreign", type=float, default=0.15)
    ap.add_argument("--max-rejects", type=int, default=None, help="default: --repeats")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import transformers

    import lorakit
    from lorakit.training.allocator import keep_freed_memory

    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    rejects = args.repeats if args.max_rejects is None else args.max_rejects
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, lorakit {lorakit.__version__}")
    print(f"threads {torch.get_num_threads()}; keep_freed_memory {kept}; load avg {load_before}", flush=True)

    print("GEMM (512 x 576) x (576 x 1536), 10 products per sample:", flush=True)
    gemm, gemm_noise = interleaved(gemm_fns(), 2, args.repeats, 1, args.max_foreign, rejects)

    base, _ = load_smollm2()
    x = make_batch(base.config.vocab_size)
    models = {"fp32": build(base, torch.float32), "bf16": build(base, torch.bfloat16)}
    base_bytes = {
        name: sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)
        for name, m in models.items()
    }
    del base
    steps = {name: make_step(m, x, {"fp32": torch.float32, "bf16": torch.bfloat16}[name]) for name, m in models.items()}
    first_loss = {name: step() for name, step in steps.items()}  # the first step: the same adapter, before updates
    print(f"first-step loss: {first_loss}", flush=True)
    print("training step:", flush=True)
    samples, noise = interleaved(steps, args.warmup, args.repeats, args.steps, args.max_foreign, rejects)

    result = {
        "setup": {
            "model": "SmolLM2-135M-Instruct",
            "lora": LORA,
            "batch": list(x.shape),
            "optimizer": "AdamW(lr=1e-4, fused=True) via lorakit.training.optim.build_optimizer",
            "bf16": "base loaded in bf16, fp32 adapters, torch.autocast('cpu', torch.bfloat16)",
            "threads": torch.get_num_threads(),
            "keep_freed_memory": kept,
            "repeats": args.repeats,
            "steps_per_repeat": args.steps,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
            "seconds": time.perf_counter() - t_start,
        },
        "step": {name: summary(v) for name, v in samples.items()},
        "step_noise": noise,
        "bf16_over_fp32_step": summary(samples["bf16"])["median_s"] / summary(samples["fp32"])["median_s"],
        "first_step_loss": first_loss,
        "first_step_loss_rel_diff": abs(first_loss["bf16"] - first_loss["fp32"]) / first_loss["fp32"],
        "base_weight_bytes": base_bytes,
        "gemm_10_products": {name: summary(v) for name, v in gemm.items()},
        "gemm_noise": gemm_noise,
        "gemm_fp16_over_fp32": summary(gemm["fp16"])["median_s"] / summary(gemm["fp32"])["median_s"],
        "gemm_fp16_over_bf16": summary(gemm["fp16"])["median_s"] / summary(gemm["bf16"])["median_s"],
    }
    print(
        f"step: fp32 {result['step']['fp32']['median_s']:.3f} s, bf16 {result['step']['bf16']['median_s']:.3f} s "
        f"(x{result['bf16_over_fp32_step']:.2f}); first-step loss {first_loss['fp32']:.4f} vs "
        f"{first_loss['bf16']:.4f}; base weights {base_bytes['fp32'] / 2**20:.0f} vs "
        f"{base_bytes['bf16'] / 2**20:.0f} MiB"
    )
    print(
        f"GEMM: fp16 x{result['gemm_fp16_over_fp32']:.2f} of fp32, x{result['gemm_fp16_over_bf16']:.2f} of bf16",
        flush=True,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
