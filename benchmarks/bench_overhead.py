"""The fixed cost per adapted layer of a LoRA training step: Python, autograd and op dispatch, with no arithmetic.

One lorakit ``LoraLayer`` on a 16 x 16 ``nn.Linear`` (r = 8, 4 tokens: every product is a few hundred flops)
against the frozen ``nn.Linear`` alone, forward + backward with the input requiring grad, as in a frozen-base
step. Both run in turn, ``--rounds`` times, ``--calls`` calls each; medians. The difference is what each adapted
layer adds beyond its arithmetic (the fused kernel's Python forward and backward, its six extra products'
dispatch, the two gradient accumulations); times the 210 adapted projections of SmolLM2-135M it estimates
that cost per training step.

Reproduce (under a minute)::

    python benchmarks/bench_overhead.py --json benchmarks/results/bench_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_allocator import write_json
from torch import nn

import lorakit

LAYERS = 210  # SmolLM2-135M: 30 layers x q, k, v, o, gate, up, down


class _One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = _One()
    frozen = copy.deepcopy(base.proj).requires_grad_(False)
    lora = lorakit.get_peft_model(base, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    layer = lora.base_model.model.proj
    x = torch.randn(1, 4, 16, requires_grad=True)
    variants = {"frozen_linear": frozen, "lora_layer": layer}
    samples: dict[str, list[float]] = {n: [] for n in variants}
    for i in range(args.rounds + 1):
        for name, module in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                module(x).sum().backward()
            if i:  # the first round warms up
                samples[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    med = {n: statistics.median(v) for n, v in samples.items()}
    extra = med["lora_layer"] - med["frozen_linear"]
    print(
        f"forward + backward per call: frozen nn.Linear {med['frozen_linear']:.1f} us, "
        f"LoraLayer {med['lora_layer']:.1f} us"
    )
    print(f"extra per adapted layer {extra:.1f} us; x {LAYERS} layers = {extra * LAYERS / 1e3:.1f} ms per step")
    if args.json:
        write_json(
            args.json,
            {
                "median_us_per_call": med,
                "extra_us_per_layer": extra,
                "extra_ms_per_step_210_layers": extra * LAYERS / 1e3,
                "samples_us": samples,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
