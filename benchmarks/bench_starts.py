"""LoRA's starts and LoRA+ on the bundled dates task: how fast each reaches 90 % exact match, and where it ends.

Reproduce (2 CPU cores; about 4 minutes per run on a quiet machine, 18 runs; ``--resume`` goes on from a stopped run)::

    python benchmarks/bench_starts.py --json benchmarks/results/bench_starts.json
    python benchmarks/bench_starts.py --methods pissa olora --json benchmarks/results/bench_starts_pissa.json
    python benchmarks/bench_starts.py --report benchmarks/results/bench_starts*.json     # one table from several files

Every run is ``lorakit train`` on SmolLM2-135M-Instruct (fp32) through :func:`lorakit.training.trainer.train`:
the same data, order (``--seed``), steps (``--steps``, default 60 as ``make demo``), batch, learning rate, rank
and targets (r = 8, α = 16, the seven projections); only the start (``init_lora_weights``) or the optimizer's
parameter groups (LoRA+: B at 16× the learning rate, Hayou et al. 2024 §4) differ. EVA and CorDA take their
data-driven step on the run's own training batches, as ``lorakit train --init eva|corda`` does.

A checkpoint is written every 2 steps; after the run the checkpoints at ``--eval-at`` and the final adapter are
loaded onto a freshly loaded base model and scored by greedy exact match on the first ``--eval-limit`` rows of the
bundled eval split (what ``lorakit train`` reports at the end, on fewer rows). *Steps to 90 %* is the first
of those at or above 90 % (plain LoRA is at 92 % by step 10 here, hence the dense early grid); as 50 rows are
noisy (a curve can dip back below), the JSON also keeps the first checkpoint from which it stays there. Each method runs
with ``--seeds`` (default 0 1 2): the seed sets the data order and the random factors.

What the papers claim, for the table: PiSSA (Meng et al. 2024, arXiv 2404.02948 §5) converges faster than LoRA
and ends higher; OLoRA (Büyükakyüz 2024, arXiv 2406.01775) converges faster; EVA (Paischer et al. 2024, arXiv
2410.07170) converges faster and ends higher; CorDA (Yang et al. 2024, arXiv 2406.05223) in its instruction-
previewed mode (IPM) fine-tunes better than LoRA/PiSSA; LoRA+ (Hayou et al. 2024, arXiv 2402.12354) up to ~2×
faster fine-tuning and 1-2 % better.
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from models import load_smollm2  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lorakit import LoraConfig, PeftModel, set_peft_model_state_dict  # noqa: E402
from lorakit.training.checkpoint import list_checkpoints  # noqa: E402
from lorakit.training.config import TrainConfig  # noqa: E402
from lorakit.training.data import build_dataset, bundled_path, eval_pairs, resolve_data  # noqa: E402
from lorakit.training.evaluate import exact_match  # noqa: E402
from lorakit.training.starts import create_adapter  # noqa: E402
from lorakit.training.trainer import train  # noqa: E402

#: label, TrainConfig fields, the paper's claim
METHODS: dict[str, tuple[str, dict[str, Any], str]] = {
    "lora": ("LoRA (Kaiming A, B = 0)", {}, "baseline"),
    "pissa": ("PiSSA", {"init_lora_weights": "pissa"}, "faster convergence, higher final accuracy"),
    "olora": ("OLoRA", {"init_lora_weights": "olora"}, "faster convergence"),
    "eva": ("EVA", {"init_lora_weights": "eva"}, "faster convergence, higher final accuracy"),
    "corda": ("CorDA (IPM)", {"init_lora_weights": "corda"}, "better fine-tuning than LoRA and PiSSA"),
    "loraplus": ("LoRA+ (ratio 16)", {"loraplus_ratio": 16.0}, "up to ~2x faster fine-tuning, 1-2 % better"),
}
TARGET = 0.9


def init_field() -> str:
    """The ``TrainConfig`` field that picks the start (the CLI's ``--init``)."""
    names = TrainConfig.field_names()
    return next(n for n in ("init_lora_weights", "init") if n in names)


def score(folder: Path, pairs: list, args: argparse.Namespace) -> float:
    base, tok = load_smollm2()
    model = PeftModel.from_pretrained(base, folder)
    return _exact_match(model, tok, pairs, args)


def _exact_match(model: Any, tok: Any, pairs: list, args: argparse.Namespace) -> float:
    result = exact_match(model, tok, pairs, args.max_new_tokens, batch_size=args.eval_limit, limit=args.eval_limit)
    return result.accuracy


def score_corda_checkpoints(folders: list[Path], cfg: TrainConfig, pairs: list, args: argparse.Namespace) -> list:
    """A CorDA checkpoint holds the unconverted adapter, which loads only onto a base given CorDA's decomposition
    (of the training data's covariances) again, as a resumed run does: that start is made once, from the same
    rows, and each checkpoint's tensors are set on it in turn."""
    base, tok = load_smollm2()
    rows = build_dataset(resolve_data(cfg.data, "train"), tok, cfg.max_length, cfg.overflow)[0]
    lora = LoraConfig.from_pretrained(folders[0])
    model = create_adapter(base, lora, "corda", rows, tok.pad_token_id, cfg.batch_size)
    scores = []
    for folder in folders:
        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        scores.append(_exact_match(model, tok, pairs, args))
    return scores


def run(method: str, seed: int, out: Path, pairs: list, args: argparse.Namespace) -> dict:
    label, fields, _ = METHODS[method]
    fields = {init_field() if k == "init_lora_weights" else k: v for k, v in fields.items()}
    cfg = TrainConfig(
        output=str(out),
        overwrite=True,
        max_steps=args.steps,
        seed=seed,
        save_every=2,
        keep_checkpoints=args.steps,
        skip_eval=True,
        samples=0,
        **fields,
        **({} if args.learning_rate is None else {"learning_rate": args.learning_rate}),
    )
    t0 = time.perf_counter()
    result = train(cfg, log=lambda s: print(f"  [{method} seed {seed}] {s}", flush=True), progress=False)
    train_s = time.perf_counter() - t0
    kept = [(step, folder) for step, folder in list_checkpoints(out) if step in args.eval_at]
    if method == "corda":
        curve = dict(zip((s for s, _ in kept), score_corda_checkpoints([f for _, f in kept], cfg, pairs, args)))
    else:
        curve = {step: score(folder, pairs, args) for step, folder in kept}
    curve[args.steps] = score(out, pairs, args)  # the final adapter
    points = sorted(curve.items())
    reached = next((step for step, acc in points if acc >= TARGET), None)
    # the first checkpoint from which every later one stays at or above the target (50 rows are noisy)
    stays = next((step for i, (step, _) in enumerate(points) if all(a >= TARGET for _, a in points[i:])), None)
    print(f"  [{method} seed {seed}] exact match by step {curve}; 90 % at {reached}", flush=True)
    return {
        "method": method,
        "label": label,
        "learning_rate": cfg.learning_rate,
        "seed": seed,
        "curve": {str(k): v for k, v in sorted(curve.items())},
        "steps_to_90": reached,
        "stays_90_from": stays,
        "final": curve[args.steps],
        "final_loss": result.metrics["final_loss_mean_last_10pct"],
        "trainable_parameters": result.metrics["trainable_parameters"],
        "train_wall_s": train_s,
    }


def report(runs: list[dict], steps: int) -> str:
    """The README table: per method (and learning rate, when not the default), steps to 90 % (median and each
    seed), the step from which it stays there, and final exact match."""
    lines = [
        "| method | steps to 90 % (median; per seed) | stays ≥ 90 % from (median; per seed) "
        "| final exact match (mean; per seed) | papers' claim |",
        "|---|---:|---:|---:|---|",
    ]
    default_lr = TrainConfig().learning_rate
    for method, (label, _, claim) in METHODS.items():
        mine = [r for r in runs if r["method"] == method]
        for lr in sorted({r.get("learning_rate", default_lr) for r in mine}, reverse=True):
            rows = sorted((r for r in mine if r.get("learning_rate", default_lr) == lr), key=lambda r: r["seed"])
            name = label if lr == default_lr else f"{label}, learning rate {lr:g}"
            finals = ", ".join(f"{r['final']:.0%}" for r in rows)
            mean = statistics.mean(r["final"] for r in rows)
            lines.append(
                f"| {name} | {_steps([r['steps_to_90'] for r in rows], steps)} "
                f"| {_steps([r.get('stays_90_from') for r in rows], steps)} | {mean:.1%} ({finals}) | {claim} |"
            )
    return "\n".join(lines)


def _steps(values: list[int | None], steps: int) -> str:
    """``median (each seed)``; a seed that never got there counts as after the run and shows as –."""
    med = statistics.median(steps + 1 if v is None else v for v in values)
    per_seed = ", ".join("–" if v is None else str(v) for v in values)
    return f"{med:g} ({per_seed})" if med <= steps else f"> {steps} ({per_seed})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-at", nargs="+", type=int, default=[2, 4, 6, 8, 10, 12, 16, 20, 30, 40])
    ap.add_argument("--eval-limit", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --json and do the rest")
    ap.add_argument("--learning-rate", type=float, default=None, help="default: lorakit train's (1e-3)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--report", nargs="+", default=None, help="print the table of these result files and exit")
    args = ap.parse_args(argv)
    if args.report:
        files = [f for pattern in args.report for f in sorted(glob.glob(pattern))]
        runs = [r for f in files for r in json.loads(Path(f).read_text())["runs"]]
        print(report(runs, max(json.loads(Path(f).read_text())["settings"]["steps"] for f in files)))
        return 0
    torch.set_num_threads(args.threads)
    pairs = eval_pairs(bundled_path("dates", "eval"))
    runs: list[dict] = []
    if args.resume and args.json and args.json.exists():  # keep the runs a stopped invocation finished
        runs = json.loads(args.json.read_text())["runs"]
    lr = TrainConfig().learning_rate if args.learning_rate is None else args.learning_rate
    done = {(r["method"], r["seed"], r["learning_rate"]) for r in runs}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorakit-starts-") as tmp:
        for seed in args.seeds:  # seeds outermost: a partial file still compares every method
            for method in args.methods:
                if (method, seed, lr) in done:
                    continue
                runs.append(run(method, seed, Path(tmp) / f"{method}-{seed}", pairs, args))
                if args.json:
                    write_json(args, runs, complete=False, wall_s=time.perf_counter() - t0)
    print(report(runs, args.steps))
    if args.json:
        write_json(args, runs, complete=True, wall_s=time.perf_counter() - t0)
    return 0


def write_json(args: argparse.Namespace, runs: list[dict], complete: bool, wall_s: float) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python " + " ".join(sys.argv),
        "complete": complete,
        "wall_s": wall_s,
        "runs": runs,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()},
    }
    args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
