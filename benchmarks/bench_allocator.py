"""What ``keep_freed_memory()`` (lorakit train's default on CPU) does to a training step.

Same set-up as ``bench_lora.py`` (SmolLM2-135M-Instruct, fp32, LoRA r=8 on the 7 projections, batch 8 x 64,
2 threads). glibc's default cannot be restored inside a process once ``mallopt`` has been called (its mmap
threshold stops adapting), so each repeat runs two fresh processes in turn, one as glibc comes and one that
calls ``keep_freed_memory()`` first; each takes two settling steps, then ``--steps`` timed steps of the
frozen-base floor, lorakit and PEFT, interleaved, with each step's minor page faults. Medians over all timed
steps; ratios kept / plain per variant.

Reproduce (about 8 minutes)::

    python benchmarks/bench_allocator.py --json benchmarks/results/bench_allocator.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_lora import BUILDERS, make_batch, make_step
from models import load_smollm2

from lorakit.training.allocator import keep_freed_memory


def timed_steps(steps_n: int) -> dict[str, dict[str, list]]:
    """Floor, lorakit and PEFT on SmolLM2 (as ``bench_lora.py``): two settling steps each, then ``steps_n``
    interleaved timed steps; ``{"times": {variant: [s]}, "faults": {variant: [minor faults]}}``."""
    base, _ = load_smollm2()
    x = make_batch(base.config.vocab_size)
    steps = {name: make_step(BUILDERS[name](base), x) for name in ("floor", "lorakit", "peft")}
    times: dict[str, list[float]] = {n: [] for n in steps}
    faults: dict[str, list[int]] = {n: [] for n in steps}
    for _ in range(2):
        for step in steps.values():
            step()
    for _ in range(steps_n):
        for name, step in steps.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"times": times, "faults": faults}


def child(mode: str, steps_n: int) -> dict:
    if mode == "kept" and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() did not take effect (not glibc?)")
    torch.set_num_threads(2)
    return timed_steps(steps_n)


def run_pairs(
    script: str,
    modes: tuple[str, ...],
    repeats: int,
    steps: int,
    env: dict[str, dict[str, str | None]] | None = None,
    extra_args: list[str] | None = None,
    extras: dict[str, list[dict]] | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[int]]]]:
    """Run ``script --_child MODE --steps N`` in a fresh process per mode, modes in turn, ``repeats`` times;
    returns per mode and variant all step times and page-fault counts. ``env``: variables per mode (None removes one);
    ``extra_args``: more arguments for every child; ``extras``: per mode, each child's whole JSON is appended."""
    times: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    faults: dict[str, dict[str, list[int]]] = {m: {} for m in modes}
    for r in range(repeats):
        for mode in modes:
            cmd = [sys.executable, script, "--_child", mode, "--steps", str(steps), *(extra_args or [])]
            child_env = {**os.environ, **(env or {}).get(mode, {})}
            child_env = {k: v for k, v in child_env.items() if v is not None}  # None: remove the variable
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=child_env).stdout
            got = json.loads(next(line for line in out.splitlines() if line.startswith("CHILD_JSON "))[11:])
            if extras is not None:
                extras[mode].append(got)
            for name, v in got["times"].items():
                times[mode].setdefault(name, []).extend(v)
                faults[mode].setdefault(name, []).extend(got["faults"][name])
            line = "  ".join(f"{n} {statistics.median(v):.2f}s" for n, v in got["times"].items())
            print(f"repeat {r + 1}/{repeats} {mode}: {line}", flush=True)
    return times, faults


def time_us(fn, calls: int, warmup: int = 0) -> float:
    """Mean microseconds per call of ``fn`` over ``calls`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def write_json(path: Path, result: dict) -> None:
    """Write ``result`` to ``path`` with the command line that produced it first."""
    path.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), **result}, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of processes (plain, kept)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per process")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("CHILD_JSON " + json.dumps(child(args.child, args.steps)))
        return 0
    modes = ("plain", "kept")
    times, faults = run_pairs(__file__, modes, args.repeats, args.steps)
    med = {m: {n: statistics.median(v) for n, v in d.items()} for m, d in times.items()}
    ratios = {f"{n} kept/plain": med["kept"][n] / med["plain"][n] for n in med["plain"]}
    ratios |= {f"lorakit/floor {m}": med[m]["lorakit"] / med[m]["floor"] for m in modes}
    ratios |= {f"lorakit/peft {m}": med[m]["lorakit"] / med[m]["peft"] for m in modes}
    pf = {m: {n: int(statistics.median(v)) for n, v in d.items()} for m, d in faults.items()}
    print(f"median step s: {med}\nminor page faults per step (median): {pf}")
    for k, v in ratios.items():
        print(f"{k:<28}{v:7.3f}")
    if args.json:
        write_json(args.json, {"step_s": times, "median_step_s": med, "minor_page_faults": faults, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
