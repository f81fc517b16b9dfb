"""torch's AdamW step on LoRA's parameters: the CPU default (a Python loop), ``foreach=True`` and ``fused=True``.

The parameters are those of LoRA r=8 on SmolLM2-135M's 7 projections in all 30 layers (420 tensors, 2.4 M
values), each with a gradient; the implementations run in turn, ``--rounds`` times, ``--steps`` steps each;
medians per step and ratios to the default. ``lorakit train`` uses ``fused=True`` where torch has the kernel.

Reproduce (under a minute)::

    python benchmarks/bench_optimizer.py --json benchmarks/results/bench_optimizer.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_allocator import write_json

RANK, LAYERS = 8, 30
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
VARIANTS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def lora_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(LAYERS):
        for out, inp in SHAPES:
            for shape in ((RANK, inp), (out, RANK)):
                p = torch.nn.Parameter(torch.randn(*shape, generator=gen) * 0.01)
                p.grad = torch.randn(*shape, generator=gen)
                params.append(p)
    return params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = {}
    for name, kw in VARIANTS.items():
        params = lora_params()
        opts[name] = torch.optim.AdamW(params, lr=1e-4, **kw)
        opts[name].step()  # creates the state
    samples: dict[str, list[float]] = {n: [] for n in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            samples[name].append((time.perf_counter() - t0) / args.steps)
    med = {n: statistics.median(v) for n, v in samples.items()}
    n_params = len(opts["default"].param_groups[0]["params"])
    n_values = sum(p.numel() for p in opts["default"].param_groups[0]["params"])
    print(f"{n_params} tensors, {n_values:,} values, {args.threads} threads")
    for name, v in med.items():
        print(f"{name:<8} {v * 1e3:8.2f} ms per step   {v / med['default']:.3f}x default")
    if args.json:
        out = {
            "tensors": n_params,
            "values": n_values,
            "median_step_ms": {n: v * 1e3 for n, v in med.items()},
            "ratio_to_default": {n: v / med["default"] for n, v in med.items()},
            "samples_s": samples,
        }
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
