"""Peak memory of DPO with TRL: a lorakit model whose reference is itself vs an explicit reference model.

Reproduce (about 3-5 minutes on 2 CPU cores; SmolLM2 is converted on first use, see benchmarks/models.py)::

    python benchmarks/bench_dpo_memory.py --json benchmarks/results/bench_dpo_memory.json

Setup: SmolLM2-135M-Instruct in fp32 (538 MB of weights), LoRA r=8, alpha=16 on q,k,v,o,gate,up,down,
``--steps`` DPO steps of ``trl.DPOTrainer`` defaults (sigmoid loss, beta 0.1, activation checkpointing, AdamW)
except ``bf16=False`` (fp32 throughout), batch ``--batch`` preference pairs (so 2 x batch sequences per forward),
``max_length=64``, on in-memory pairs (``Convert to YYYY-MM-DD: <date>`` -> the right ISO date / a wrong one).

Variants, each in a fresh process (``torch.set_num_threads(--threads)``):

* ``lorakit``: ``lorakit.integrations.DPOTrainer(model=<lorakit model>)``, no ``ref_model``: the reference is the
  trained model with a frozen copy of its starting adapter active (TRL's rule for a model that comes with an
  adapter), so the base weights are held once.
* ``lorakit-config``: ``DPOTrainer(model=<base>, peft_config=lorakit.LoraConfig(...))``: the reference is the
  same model with its adapters disabled.
* ``lorakit+ref-copy``: ``DPOTrainer(model=<lorakit model>, ref_model=<a second SmolLM2>)``: what DPO costs when
  the reference is a model of its own (TRL loads one for any model it does not know as an adapter model).
* ``peft``: ``trl.DPOTrainer(model=<peft.get_peft_model(...)>)``, TRL's own PEFT path, for comparison.

Each base model is a ``copy.deepcopy`` of one loaded SmolLM2 (anonymous memory, every page resident); the loaded
one is then freed and glibc's freed heap returned (``malloc_trim(0)``), as in bench_lora.py.

Measured, Linux ``/proc/self/status``: ``VmRSS`` once the trainer is built (the models, the optimizer not yet),
and the peak resident set (``VmHWM``) during ``trainer.train()``, whose high-water mark is reset just before it by
writing ``5`` to ``/proc/self/clear_refs``. Also the bytes of distinct parameter storages each variant holds, and
each step's DPO loss (the variants must train alike for the comparison to mean anything).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_lora import _proc_status_kb, _reset_peak_rss, _return_freed_memory  # noqa: E402
from models import load_smollm2  # noqa: E402

VARIANTS = ("lorakit", "lorakit-config", "lorakit+ref-copy", "peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
MONTHS = "January February March April May June July August September October November December".split()


def pairs(n: int, seed: int = 0) -> Any:
    """``n`` preference pairs: prompt, the right ISO date, the same date with day and month swapped."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        year, month, day = rng.randint(1900, 2030), rng.randint(1, 12), rng.randint(13, 28)
        rows.append(
            {
                "prompt": f"Convert to YYYY-MM-DD: {MONTHS[month - 1]} {day}, {year}",
                "chosen": f" {year}-{month:02d}-{day:02d}",
                "rejected": f" {year}-{day:02d}-{month:02d}",
            }
        )
    return Dataset.from_list(rows)


def held_parameter_mib(*models: Any) -> float:
    """MiB of distinct parameter storages across ``models`` (a shared tensor counts once)."""
    seen: dict[int, int] = {}
    for model in models:
        if model is None:
            continue
        for p in model.parameters():
            seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values()) / 2**20


def child(variant: str, steps: int, batch: int, threads: int) -> dict[str, Any]:
    """Runs in a fresh process: build ``variant``'s trainer, then train ``steps`` steps."""
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    torch.set_num_threads(threads)
    import trl

    import lorakit
    from lorakit.integrations import DPOTrainer

    loaded, tok = load_smollm2()
    base = copy.deepcopy(loaded)
    ref = copy.deepcopy(loaded) if variant == "lorakit+ref-copy" else None
    del loaded
    gc.collect()
    _return_freed_memory()
    args = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        max_length=64,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    data = pairs(steps * batch)
    if variant == "peft":
        import peft

        model = peft.get_peft_model(base, peft.LoraConfig(**LORA))
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    elif variant == "lorakit-config":
        trainer = DPOTrainer(
            model=base, peft_config=lorakit.LoraConfig(**LORA), args=args, train_dataset=data, processing_class=tok
        )
    else:
        model = lorakit.get_peft_model(base, lorakit.LoraConfig(**LORA))
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    del base, ref
    gc.collect()
    _return_freed_memory()
    held = held_parameter_mib(trainer.model, trainer.ref_model)
    rss_built = _proc_status_kb("VmRSS")
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    hwm = _proc_status_kb("VmHWM")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "variant": variant,
        "reference": type(trainer.ref_model).__name__ if trainer.ref_model is not None else "None (PEFT: adapter)",
        "held_parameters_mib": held,
        "rss_built_mib": rss_built / 1024,
        "peak_rss_train_mib": hwm / 1024,
        "hwm_reset": reset,
        "train_s": seconds,  # wall time beside other processes: a sanity figure, not a timing benchmark
        "losses": losses,  # per step: equal across the lorakit variants (a fresh adapter's reference is the base)
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="DPO steps per variant")
    ap.add_argument("--batch", type=int, default=2, help="preference pairs per step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("CHILD_JSON " + json.dumps(child(args.child, args.steps, args.batch, args.threads)))
        return 0
    results = {}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--_child", variant, "--steps", str(args.steps)]
        cmd += ["--batch", str(args.batch), "--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD_JSON ")][-1]
        r = results[variant] = json.loads(line[len("CHILD_JSON ") :])
        print(
            f"{variant:>17}: built {r['rss_built_mib']:.0f} MiB, peak in training {r['peak_rss_train_mib']:.0f} MiB, "
            f"parameters held {r['held_parameters_mib']:.0f} MiB ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    summary = {}
    if "lorakit" in results and "lorakit+ref-copy" in results:
        ours, copied = results["lorakit"], results["lorakit+ref-copy"]
        summary["peak_saved_mib"] = copied["peak_rss_train_mib"] - ours["peak_rss_train_mib"]
        summary["peak_ratio_lorakit_vs_ref_copy"] = ours["peak_rss_train_mib"] / copied["peak_rss_train_mib"]
    if "lorakit" in results and "peft" in results:
        summary["peak_ratio_lorakit_vs_peft"] = (
            results["lorakit"]["peak_rss_train_mib"] / results["peft"]["peak_rss_train_mib"]
        )
    print(json.dumps(summary, indent=2))
    if args.json:
        import peft
        import transformers
        import trl

        out = {
            "command": " ".join(["python", *sys.argv]),
            "setup": {
                "model": "SmolLM2-135M-Instruct, fp32",
                "lora": LORA,
                "steps": args.steps,
                "pairs_per_step": args.batch,
                "max_length": 64,
                "threads": args.threads,
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "trl": trl.__version__,
                    "peft": peft.__version__,
                },
                "machine": platform.platform(),
            },
            "results": results,
            "summary": summary,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
