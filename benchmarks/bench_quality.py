"""LoRA vs full fine-tuning on the bundled task, same data and same budget: does LoRA reach 95-99% of full FT?

The seed document claims LoRA reaches 95-99% of full fine-tuning's quality. This script checks that on the
task ``lorakit train`` ships (English dates -> ISO 8601, exact match on the held-out split), with
SmolLM2-135M-Instruct on CPU:

* the same training examples in the same order (same seed), the same number of optimizer steps, the same
  global batch, the same scheduler (cosine) — only the trainable parameters and the learning rate differ;
* LoRA: r=8, alpha=16 on q,k,v,o,gate,up,down (lorakit's defaults), lr ``--lora-lr``;
* full fine-tuning: every weight trains (``method="full"``), AdamW, for each lr in ``--full-lrs``; the
  best one is reported (tuning the baseline's lr is what makes the comparison fair);
* metric: exact-match accuracy on the eval split (``--eval-limit`` rows), greedy decoding.

Reproduce (about 25-40 minutes on 2 CPU cores with the defaults)::

    python benchmarks/bench_quality.py --json benchmarks/results/bench_quality.json

Printed and written: accuracy per run, LoRA / best-full ratio, trainable parameters, training seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorakit.training.config import TrainConfig
from lorakit.training.trainer import train


def run_one(name: str, out_root: Path, **kw) -> dict:
    cfg = TrainConfig(output=str(out_root / name), overwrite=True, save_every=0, samples=0, **kw)
    t0 = time.perf_counter()
    result = train(cfg, log=lambda s: print(f"  [{name}] {s}", flush=True), progress=False)
    m = result.metrics
    return {
        "name": name,
        "method": cfg.method,
        "learning_rate": cfg.learning_rate,
        "steps": m["total_steps"],
        "global_batch": m["global_batch"],
        "trainable_parameters": m["trainable_parameters"],
        "accuracy_before": m["eval_before"]["accuracy"] if m.get("eval_before") else None,
        "accuracy": m["eval_after"]["accuracy"],
        "correct": m["eval_after"]["correct"],
        "total": m["eval_after"]["total"],
        "final_loss": m["final_loss_mean_last_10pct"],
        "train_seconds": m["train_seconds_this_process"],
        "wall_seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (default: one epoch)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--full-lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4])
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    common = dict(batch_size=args.batch_size, max_steps=args.max_steps, eval_limit=args.eval_limit, seed=args.seed)
    runs = []
    with tempfile.TemporaryDirectory(prefix="lorakit-quality-") as tmp:
        runs.append(run_one("lora", Path(tmp), method="lora", learning_rate=args.lora_lr, **common))
        for lr in args.full_lrs:
            runs.append(run_one(f"full_lr{lr:g}", Path(tmp), method="full", learning_rate=lr, **common))

    lora = runs[0]
    best_full = max(runs[1:], key=lambda r: r["accuracy"])
    ratio = lora["accuracy"] / best_full["accuracy"] if best_full["accuracy"] else float("nan")
    print("\nrun               method  lr        trainable      exact match   final loss   train s")
    for r in runs:
        print(
            f"{r['name']:<17} {r['method']:<7} {r['learning_rate']:<9.0e} {r['trainable_parameters']:>12,}   "
            f"{r['correct']:>3}/{r['total']:<3} {r['accuracy']:6.1%}   {r['final_loss']:10.4f}   "
            f"{r['train_seconds']:7.0f}"
        )
    print(f"\nLoRA / best full fine-tuning exact match: {ratio:.3f} (seed's claim: 0.95-0.99)")
    print(f"LoRA trains {lora['trainable_parameters'] / best_full['trainable_parameters']:.2%} of the parameters")
    if args.json:
        write_json(args, {"runs": runs, "lora_over_best_full": ratio, "best_full": best_full["name"]})
    return 0


def write_json(args: argparse.Namespace, results: dict) -> None:
    """``results`` plus the settings and the machine, to ``args.json``."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = results | {
        "settings": vars(args) | {"json": str(args.json)},
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()},
    }
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
