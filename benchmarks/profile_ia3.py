"""Where IA³'s training step and eval forward spend time beyond the frozen model, in lorakit and in PEFT.

Reproduce (about 5-10 minutes on 2 CPU cores)::

    python benchmarks/profile_ia3.py --json benchmarks/results/profile_ia3.json
    python benchmarks/profile_ia3.py --no-profile --rounds 41        # the per-layer part alone, tighter

Same setup as ``bench_methods.py --vs-peft --methods ia3`` (SmolLM2-135M-Instruct, fp32, PEFT's default IA³
targets for LLaMA: k_proj and v_proj scaled at the output, down_proj at the input; batch 8 x 64; 2 threads).

1. ``--micro``: one IA³ layer of each SmolLM2 shape, forward + backward (the input a non-leaf that needs its
   gradient, as inside the model) and eval forward under ``inference_mode``: the frozen ``nn.Linear`` alone,
   PEFT's ``ia3.Linear`` and lorakit's ``IA3Layer`` on the same weights, short blocks interleaved over
   ``--rounds`` rounds. The sum over the model's 90 IA³ layers of (layer - frozen linear) is each library's IA³
   cost per step; set against the floor's step it bounds what any IA³ implementation can gain over PEFT.
2. ``--profile``: ``torch.profiler`` self CPU time per op of one training step (mean of ``--profile-steps``) for
   the floor, lorakit and PEFT, and the per-op differences.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_lora import BATCH, SEQ, _cpu_snapshot, _foreign_share, build_floor, make_batch  # noqa: E402
from bench_methods import METHODS, build_pair, make_train_step  # noqa: E402
from models import load_smollm2  # noqa: E402
from profile_lora_step import print_diff, print_top, profile_step  # noqa: E402

#: SmolLM2-135M's IA³ layers: (in, out, feedforward, how many in the model).
SHAPES = {
    "k_proj/v_proj": (576, 192, False, 60),
    "down_proj": (1536, 576, True, 30),
}


#: Other ``IA3Layer`` classes to time next to the installed one (``--compare-layer``), by name.
OTHER_LAYERS: dict[str, type] = {}


def load_layer_file(path: Path) -> type:
    """``IA3Layer`` from another copy of ``tuners/ia3/layer.py`` (e.g. ``git show HEAD:src/lorakit/...``)."""
    spec = importlib.util.spec_from_file_location(f"ia3_layer_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.IA3Layer


def _layers(fan_in: int, fan_out: int, feedforward: bool, gen: torch.Generator) -> dict[str, nn.Module]:
    import peft
    from peft.tuners.ia3.layer import Linear as PeftLinear

    from lorakit.layers.kinds import kind_for
    from lorakit.tuners.ia3.layer import IA3Layer

    base = nn.Linear(fan_in, fan_out, bias=False).requires_grad_(False)
    pf = PeftLinear(copy.deepcopy(base), "default", peft.IA3Config(init_ia3_weights=False), is_feedforward=feedforward)
    with torch.no_grad():
        pf.ia3_l["default"].copy_(1 + 0.1 * torch.randn(pf.ia3_l["default"].shape, generator=gen))
    layers = {"linear": base, "peft": pf}
    for name, cls in {"lorakit": IA3Layer, **OTHER_LAYERS}.items():
        layer = cls(copy.deepcopy(base), kind_for(base))
        layer.add("default", feedforward)
        layer.set_active(["default"])
        with torch.no_grad():
            layer.ia3_l["default"].copy_(pf.ia3_l["default"])
        layers[name] = layer
    return layers


def _timed_rounds(
    fns: dict[str, Callable[[], Any]], rounds: int, inner: int, max_foreign: float, clock: str
) -> dict[str, Any]:
    """Per function, ``rounds`` figures (ms per call, mean of ``inner`` calls), interleaved; loud rounds redone.

    ``clock="cpu"``: this thread's CPU time (with one intra-op thread, all of the work; time spent waiting for
    the cores while other processes hold them does not count), else wall time."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    redone = 0
    while len(samples[next(iter(fns))]) < rounds:
        got, share = {}, 0.0
        for n, fn in fns.items():
            a, t0 = _cpu_snapshot(), time.thread_time()
            for _ in range(inner):
                fn()
            b, t1 = _cpu_snapshot(), time.thread_time()
            got[n] = ((t1 - t0) if clock == "cpu" else (b[0] - a[0])) / inner * 1e3
            share = max(share, _foreign_share(a, b))
        if clock == "wall" and share > max_foreign and redone < 4 * rounds:
            redone += 1
            continue
        for n, v in got.items():
            samples[n].append(v)
    return {"samples_ms": samples, "redone": redone}


def _train_call(layer: nn.Module, leaf: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer(leaf * 1.0).backward(g)  # a non-leaf input that needs its gradient, as inside the model
        leaf.grad = None
        for p in layer.parameters():
            p.grad = None

    return run


def _eval_call(layer: nn.Module, leaf: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            layer(leaf)

    return run


def micro(rounds: int, inner: int, max_foreign: float, clock: str, tokens: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"clock": clock, "threads": torch.get_num_threads(), "tokens": tokens}
    names = ["peft", "lorakit", *OTHER_LAYERS]
    totals = {mode: dict.fromkeys(names, 0.0) for mode in ("train", "eval")}
    print(
        f"per-layer: {tokens} tokens, {rounds} rounds x {inner} calls, {clock} clock, {torch.get_num_threads()} "
        "thread(s); ms per call of the frozen linear, and each IA³ layer's cost over it (paired medians)"
    )
    for label, (fan_in, fan_out, feedforward, count) in SHAPES.items():
        layers = _layers(fan_in, fan_out, feedforward, gen)
        leaf = torch.randn(tokens, fan_in, generator=gen, requires_grad=True)
        g = torch.randn(tokens, fan_out, generator=gen)

        out[label] = {"in": fan_in, "out": fan_out, "feedforward": feedforward, "count": count}
        for mode in ("train", "eval"):
            fns = {n: _train_call(m, leaf, g) if mode == "train" else _eval_call(m, leaf) for n, m in layers.items()}
            got = _timed_rounds(fns, rounds, inner, max_foreign, clock)
            med = {n: statistics.median(v) for n, v in got["samples_ms"].items()}
            paired = {
                n: statistics.median(a - b for a, b in zip(got["samples_ms"][n], got["samples_ms"]["linear"]))
                for n in names
            }
            out[label][mode] = got | {"median_ms": med, "paired_overhead_ms": paired}
            for n in paired:
                totals[mode][n] += paired[n] * count
            costs = ", ".join(f"{n} {paired[n]:+.3f}" for n in names)
            print(f"  {label:<14} {mode:<5} linear {med['linear']:.3f}; IA³ cost: {costs} (redone {got['redone']})")
    for mode, t in totals.items():
        print(
            f"  IA³ cost per model {mode} call (sum over the 90 layers): "
            + ", ".join(f"{n} {v:.1f} ms" for n, v in t.items())
        )
    out["model_ms"] = totals
    return out


def profile(steps: int, top: int) -> dict[str, Any]:
    base, _ = load_smollm2()
    x = make_batch(base.config.vocab_size)
    lk, pf = build_pair(base, METHODS["ia3"])
    models = {"floor": build_floor(base), "lorakit": lk.train(), "peft": pf.train()}
    del base
    fns = {n: make_train_step(m, x) for n, m in models.items()}
    for fn in fns.values():
        fn()
    tables: dict[str, Any] = {n: None for n in fns}
    for _ in range(steps):
        for n, fn in fns.items():
            tables[n] = profile_step(fn, tables[n], 1.0 / steps)
    for n, t in tables.items():
        print_top(n, t, top)
    print_diff("lorakit", tables["lorakit"], "floor", tables["floor"], top)
    print_diff("peft", tables["peft"], "floor", tables["floor"], top)
    print_diff("lorakit", tables["lorakit"], "peft", tables["peft"], top)
    del fns, models
    gc.collect()
    return {n: {k: dict(v) for k, v in t.items()} for n, t in tables.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-micro", dest="micro", action="store_false")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--inner", type=int, default=10, help="calls per timed block (10)")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (the cpu clock uses 1)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="per-layer part: wall or CPU time")
    ap.add_argument("--tokens", type=int, default=BATCH * SEQ, help=f"per-layer part: rows (default {BATCH * SEQ})")
    ap.add_argument(
        "--compare-layer",
        nargs="*",
        type=Path,
        default=[],
        metavar="LAYER_PY",
        help="per-layer part: also time the IA3Layer of these copies of tuners/ia3/layer.py",
    )
    ap.add_argument("--max-foreign", type=float, default=0.15)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1 if args.clock == "cpu" else args.threads)
    for path in args.compare_layer:
        OTHER_LAYERS[path.stem] = load_layer_file(path)
    from lorakit.training.allocator import keep_freed_memory

    keep_freed_memory()
    result: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv])}
    if args.micro:
        result["micro"] = micro(args.rounds, args.inner, args.max_foreign, args.clock, args.tokens)
    if args.profile:
        torch.set_num_threads(args.threads)
        result["profile"] = profile(args.profile_steps, args.top)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
