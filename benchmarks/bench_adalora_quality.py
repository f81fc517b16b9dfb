"""AdaLoRA vs LoRA on the bundled task at the same final parameter budget (average rank r at the end).

Same data, order (seed), steps, global batch, scheduler and learning rate for every run; only the adapter
differs: LoRA at rank r, and AdaLoRA starting at 1.5·r and cut to an average of r (``lorakit train --method
adalora`` defaults: 10% warm-up, 20% final phase, orthogonality weight 0.5), alpha = 2r throughout, on
q,k,v,o,gate,up,down of SmolLM2-135M-Instruct. The AdaLoRA file holds the kept triplets only, so both adapters
end with the same number of rank-one updates. Metric: exact match on the held-out split, greedy decoding.

As in ``bench_dora_quality.py``, ``--max-steps`` keeps the runs short of the ~100% the task saturates at.
The two methods want different learning rates (AdaLoRA starts from λ = 0 with A, B ~ N(0, 0.02²), so its
update grows slowly at LoRA's rate), so each runs over a small grid (``--lora-lrs``, ``--adalora-lrs``) and
is compared at its best learning rate (mean over seeds) — chosen on the same eval split, as the baseline in
``bench_quality.py`` is.

Reproduce (about 25 minutes on 2 CPU cores with the defaults)::

    python benchmarks/bench_adalora_quality.py --seeds 0 1 --json benchmarks/results/bench_adalora_quality.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from bench_quality import run_one, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=12, help="optimizer steps per run (12)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 4], help="final average ranks (8 4)")
    ap.add_argument("--lora-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--adalora-lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    lrs = {"lora": args.lora_lrs, "adalora": args.adalora_lrs}
    variants = [(f"{m}_r{r}_lr{lr:g}", m, r, lr) for r in args.ranks for m in ("lora", "adalora") for lr in lrs[m]]
    runs = []
    with tempfile.TemporaryDirectory(prefix="lorakit-adalora-quality-") as tmp:
        for seed in args.seeds:
            for name, method, r, lr in variants:
                run = run_one(
                    f"{name}_seed{seed}",
                    Path(tmp),
                    method=method,
                    r=r,
                    lora_alpha=2.0 * r,
                    learning_rate=lr,
                    batch_size=args.batch_size,
                    max_steps=args.max_steps,
                    eval_limit=args.eval_limit,
                    eval_before=False,
                    seed=seed,
                )
                folder = Path(tmp) / f"{name}_seed{seed}"
                saved = json.loads((folder / "adapter_config.json").read_text())
                pattern = saved.get("rank_pattern") if method == "adalora" else None
                kept = sum(sum(mask) for mask in pattern.values()) if pattern else None  # LoRA: r per matrix
                size = (folder / "adapter_model.safetensors").stat().st_size
                runs.append(
                    run | {"variant": name, "method": method, "seed": seed, "r": r, "file_bytes": size, "kept": kept}
                )

    mean = {name: statistics.mean(r["accuracy"] for r in runs if r["variant"] == name) for name, *_ in variants}
    print("\nrun                                trained params   file bytes   exact match   final loss   train s")
    for r in runs:
        print(
            f"{r['name']:<34} {r['trainable_parameters']:>14,}   {r['file_bytes']:>10,}   "
            f"{r['correct']:>3}/{r['total']:<3} {r['accuracy']:6.1%}   {r['final_loss']:10.4f}   "
            f"{r['train_seconds']:7.0f}"
        )
    print("\nmean exact match over seeds: " + ", ".join(f"{n} {a:.1%}" for n, a in mean.items()))
    best = {}
    for r in args.ranks:
        for method in ("lora", "adalora"):
            name = max((v for v, m, rr, _ in variants if m == method and rr == r), key=mean.__getitem__)
            best[f"{method}_r{r}"] = {"variant": name, "accuracy": mean[name]}
    gaps = {
        f"adalora_r{r} - lora_r{r}": 100 * (best[f"adalora_r{r}"]["accuracy"] - best[f"lora_r{r}"]["accuracy"])
        for r in args.ranks
    }
    print(
        "best learning rate per method: "
        + ", ".join(f"{k} {v['variant']} {v['accuracy']:.1%}" for k, v in best.items())
    )
    print("points: " + ", ".join(f"{k} {v:+.1f}" for k, v in gaps.items()))
    if args.json:
        write_json(args, {"runs": runs, "mean_accuracy": mean, "best": best, "gaps_in_points": gaps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
