"""What ``MKL_CBWR=AUTO`` (set by ``import lorakit`` on AMD CPUs, see ``lorakit/cpu_blas.py``) does to a step.

MKL reads the setting once per process, so each repeat runs two fresh processes in turn: one with MKL as it
comes (``LORAKIT_MKL_CBWR=0``) and one as ``import lorakit`` leaves it. Both call ``keep_freed_memory()`` first
(``lorakit train``'s default on CPU), so only MKL's setting differs. In each process:

1. ``micro``: the 42 rank-8 products of one SmolLM2-135M decoder layer at 512 tokens (for each of the 7
   projections: the 2 of forward and the 4 of backward that ``lorakit.tuners.lora.fused`` runs), the 14 full-size
   GEMMs of that layer (forward and input gradient), and the 7 projections' GEMMs at 1 and 32 rows (what
   generation runs), each summed over the layer, microseconds, median of ``--micro-rounds`` rounds;
2. training steps as in ``bench_lora.py`` (SmolLM2-135M-Instruct, fp32, LoRA r=8 on the 7 projections,
   batch 8 x 64, AdamW, 2 threads): two settling steps, then ``--steps`` timed steps of the frozen-base floor,
   lorakit and PEFT, interleaved. PEFT and the floor run in the same process, so they get the same MKL.

Reproduce (about 8 minutes)::

    python benchmarks/bench_blas.py --json benchmarks/results/bench_blas.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from bench_allocator import run_pairs, time_us, timed_steps, write_json

from lorakit import cpu_blas
from lorakit.training.allocator import keep_freed_memory

TOKENS, RANK = 512, 8
#: SmolLM2-135M's projections as (out, in).
SHAPES = {
    "q": (576, 576),
    "k": (192, 576),
    "v": (192, 576),
    "o": (576, 576),
    "gate": (1536, 576),
    "up": (1536, 576),
    "down": (576, 1536),
}
MODES = ("as_comes", "auto")
# This process imported lorakit, which may have put MKL_CBWR into os.environ: children must not inherit it.
ENV: dict[str, dict[str, str | None]] = {
    "as_comes": {cpu_blas.OPT_OUT: "0", "MKL_CBWR": None},
    "auto": {"MKL_CBWR": None},
}


def micro(rounds: int) -> dict[str, float]:
    """Microseconds per decoder layer: rank-8 products, full GEMMs, generation GEMMs (1 and 32 rows)."""
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, list] = {"rank8_products": [], "full_gemms": [], "gemm_1_row": [], "gemm_32_rows": []}
    for out, inp in SHAPES.values():
        x, g = torch.randn(TOKENS, inp, generator=gen), torch.randn(TOKENS, out, generator=gen)
        a, b, w = (torch.randn(*s, generator=gen) for s in ((RANK, inp), (out, RANK), (out, inp)))
        y, gx = torch.randn(TOKENS, out, generator=gen), torch.randn(TOKENS, inp, generator=gen)
        h_t, gh_t = a @ x.t(), b.t() @ g.t()
        x1, x32 = x[:1].clone(), x[:32].clone()
        groups["rank8_products"] += [
            lambda a=a, x=x: torch.mm(a, x.t()),
            lambda y=y, h_t=h_t, b=b: y.addmm_(h_t.t(), b.t(), alpha=2.0),
            lambda b=b, g=g: torch.mm(b.t(), g.t()),
            lambda gx=gx, gh_t=gh_t, a=a: gx.addmm_(gh_t.t(), a),
            lambda gh_t=gh_t, x=x: torch.mm(gh_t, x),
            lambda h_t=h_t, g=g: torch.mm(h_t, g),
        ]
        groups["full_gemms"] += [lambda x=x, w=w: torch.mm(x, w.t()), lambda g=g, w=w: torch.mm(g, w)]
        groups["gemm_1_row"].append(lambda x1=x1, w=w: torch.mm(x1, w.t()))
        groups["gemm_32_rows"].append(lambda x32=x32, w=w: torch.mm(x32, w.t()))
    inner = {"rank8_products": 20, "full_gemms": 3, "gemm_1_row": 50, "gemm_32_rows": 20}
    samples: dict[str, list[float]] = {k: [] for k in groups}
    for i in range(rounds + 1):
        for name, fns in groups.items():
            total = sum(time_us(fn, inner[name]) for fn in fns)
            if i:  # the first round warms up
                samples[name].append(total)
    return {k: statistics.median(v) for k, v in samples.items()}


def child(mode: str, steps_n: int, rounds: int) -> dict:
    keep_freed_memory()
    torch.set_num_threads(2)
    micro_us = micro(rounds)  # also MKL's first call: the branch is fixed from here on
    if steps_n == 0:
        return {"times": {}, "faults": {}, "micro_us": micro_us, "mkl_branch": cpu_blas.mkl_branch(), "decision": ""}
    measured = timed_steps(steps_n)
    return {
        **measured,
        "micro_us": micro_us,
        "mkl_branch": cpu_blas.mkl_branch(),
        "decision": cpu_blas.decision,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of processes (as_comes, auto)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per process (0: micro only)")
    ap.add_argument("--micro-rounds", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("CHILD_JSON " + json.dumps(child(args.child, args.steps, args.micro_rounds)))
        return 0
    extras: dict[str, list[dict]] = {m: [] for m in MODES}
    times, faults = run_pairs(
        __file__,
        MODES,
        args.repeats,
        args.steps,
        env=ENV,
        extra_args=["--micro-rounds", str(args.micro_rounds)],
        extras=extras,
    )
    branches = {m: sorted({e["mkl_branch"] for e in extras[m]}, key=str) for m in MODES}
    if branches["as_comes"] == branches["auto"]:
        print(f"warning: both modes ran MKL's {branches['auto']} branch; the comparison measures nothing")
    micro_med = {
        m: {k: statistics.median(e["micro_us"][k] for e in extras[m]) for k in extras[m][0]["micro_us"]} for m in MODES
    }
    med = {m: {n: statistics.median(v) for n, v in d.items()} for m, d in times.items()}
    ratios = {f"{n} step auto/as_comes": med["auto"][n] / med["as_comes"][n] for n in med["auto"]}
    paired = [a["micro_us"] for a in extras["auto"]], [c["micro_us"] for c in extras["as_comes"]]
    ratios |= {
        f"{k} auto/as_comes, median of pairs": statistics.median(a[k] / c[k] for a, c in zip(*paired))
        for k in paired[0][0]
    }
    ratios |= {f"{k} auto/as_comes": micro_med["auto"][k] / micro_med["as_comes"][k] for k in micro_med["auto"]}
    if args.steps:
        ratios |= {f"lorakit/floor {m}": med[m]["lorakit"] / med[m]["floor"] for m in MODES}
        ratios |= {f"lorakit/peft {m}": med[m]["lorakit"] / med[m]["peft"] for m in MODES}
        ratios |= {f"peft/floor {m}": med[m]["peft"] / med[m]["floor"] for m in MODES}
    print(f"MKL branch per mode: {branches}\nmicro (us per decoder layer): {micro_med}\nmedian step s: {med}")
    for k, v in ratios.items():
        print(f"{k:<36}{v:7.3f}")
    if args.json:
        out = {
            "cpu_vendor": cpu_blas.cpu_vendor(),
            "mkl_branch": branches,
            "micro_us_per_layer": micro_med,
            "micro_us_per_process": {m: [e["micro_us"] for e in extras[m]] for m in MODES},
            "step_s": times,
            "median_step_s": med,
            "minor_page_faults": faults,
            "ratios": ratios,
        }
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
