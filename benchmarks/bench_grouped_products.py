"""Would one rank-r product for the projections that share an input (q/k/v, gate/up) save time? (Not shipped.)

Per SmolLM2-135M layer at 512 tokens, r = 8: the products that read the shared input ``x`` ``(N, 576)`` —
forward ``A xᵀ``, backward ``∇A = g_h x`` and the input-gradient update ``∇x += g_hᵀ A`` — once per projection
(what lorakit runs) against once for the stacked factors of the group (24 rows for q/k/v, 16 for gate/up),
plus the additions of the group's input gradients that one node would fold away. Medians of ``--rounds``.

Reproduce (about a minute)::

    python benchmarks/bench_grouped_products.py --json benchmarks/results/bench_grouped_products.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from bench_allocator import time_us, write_json

import lorakit  # noqa: F401  (MKL's branch, as in every lorakit process)

TOKENS, RANK, HIDDEN, LAYERS = 512, 8, 576, 30
GROUPS = {"qkv": 3, "gate_up": 2}


def _us(fn) -> float:
    return time_us(fn, 50, warmup=5)


def measure(k: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x, gx = torch.randn(TOKENS, HIDDEN, generator=gen), torch.randn(TOKENS, HIDDEN, generator=gen)
    a_each = [torch.randn(RANK, HIDDEN, generator=gen) for _ in range(k)]
    gh_each = [torch.randn(RANK, TOKENS, generator=gen) for _ in range(k)]
    a_all, gh_all = torch.cat(a_each), torch.cat(gh_each)
    return {
        "forward_each": _us(lambda: [torch.mm(a, x.t()) for a in a_each]),
        "forward_grouped": _us(lambda: torch.mm(a_all, x.t())),
        "grad_a_each": _us(lambda: [torch.mm(gh, x) for gh in gh_each]),
        "grad_a_grouped": _us(lambda: torch.mm(gh_all, x)),
        "grad_x_each": _us(lambda: [gx.addmm_(gh.t(), a) for gh, a in zip(gh_each, a_each)]),
        "grad_x_grouped": _us(lambda: gx.addmm_(gh_all.t(), a_all)),
        "input_grad_additions": _us(lambda: [gx.add(gx) for _ in range(k - 1)]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    samples = {g: [measure(k) for _ in range(args.rounds)] for g, k in GROUPS.items()}
    med = {g: {key: statistics.median(s[key] for s in rows) for key in rows[0]} for g, rows in samples.items()}
    saving = {
        g: sum(m[f"{p}_each"] - m[f"{p}_grouped"] for p in ("forward", "grad_a", "grad_x")) + m["input_grad_additions"]
        for g, m in med.items()
    }
    per_layer = sum(saving.values())
    for g, m in med.items():
        print(g, "  ".join(f"{k} {v:.0f}us" for k, v in m.items()), f"-> saving {saving[g]:.0f}us")
    print(f"saving per layer {per_layer:.0f} us; x {LAYERS} layers = {per_layer * LAYERS / 1e3:.1f} ms per step")
    if args.json:
        write_json(
            args.json,
            {
                "median_us": med,
                "saving_us": saving,
                "saving_ms_per_step": per_layer * LAYERS / 1e3,
                "samples_us": samples,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
