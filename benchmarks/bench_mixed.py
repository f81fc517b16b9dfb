"""Batches that mix adapters, lorakit vs PEFT 0.21.2 in one process (issue 7's measurements).

SmolLM2-135M-Instruct, 8 LoRA adapters of rank 8 on q,k,v,o,gate,up,down (random weights, B ≠ 0), greedy
generation of 32 rows x ``--new-tokens`` new tokens from 16-token prompts, KV cache on, fp32, 2 threads.
Tokens/s for: one adapter for every row (the reference), 8 adapters mixed in the batch (4 rows each, in
lorakit and in PEFT), and the time of ``set_adapter`` and of ``load_adapter`` from disk in both libraries.
Variants interleaved; medians; the two libraries' generated tokens are checked to be identical.

Reproduce (about 10 minutes)::

    python benchmarks/bench_mixed.py --json benchmarks/results/bench_mixed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_lora import interleaved, summary
from models import load_smollm2

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-foreign", type=float, default=0.15)
    ap.add_argument("--many", type=int, default=32, help="adapters loaded for the second set_adapter timing")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load_before = time.perf_counter(), os.getloadavg()
    import peft

    import lorakit

    base, _ = load_smollm2()
    names = [f"task{i}" for i in range(args.adapters)]
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-mixed-"))
    for i, name in enumerate(names):  # adapters on disk, written by PEFT, read by both
        torch.manual_seed(100 + i)
        m = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        )
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.mul_(0.05)
        m.save_pretrained(tmp / name)
        del m
    models = {}
    for lib, mod in (("peft", peft), ("lorakit", lorakit)):
        model = mod.PeftModel.from_pretrained(copy.deepcopy(base), tmp / names[0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(tmp / name, adapter_name=name)
        models[lib] = model.eval()

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, base.config.vocab_size, (args.rows, 16), generator=gen)
    mask = torch.ones_like(ids)
    rows = [names[i % len(names)] for i in range(args.rows)]
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def run(lib, mixed):
        model = models[lib]

        def go():
            with torch.inference_mode():
                if mixed:
                    return model.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, **kw)
                model.set_adapter(names[0])
                return model.generate(input_ids=ids, attention_mask=mask, **kw)

        return go

    with torch.inference_mode():
        same = {
            "mixed": torch.equal(run("peft", True)(), run("lorakit", True)()),
            "single": torch.equal(run("peft", False)(), run("lorakit", False)()),
        }
    print(f"identical tokens lorakit vs peft: {same}")
    fns = {
        "lorakit_single": run("lorakit", False),
        "lorakit_mixed": run("lorakit", True),
        "peft_mixed": run("peft", True),
        "peft_single": run("peft", False),
    }
    print(f"generation, {args.rows} rows x {args.new_tokens} new tokens, interleaved")
    samples, noise = interleaved(fns, 0, args.repeats, 1, args.max_foreign, args.repeats)
    tokens = args.rows * args.new_tokens
    tok_s = {n: tokens / statistics.median(v) for n, v in samples.items()}

    def switch(lib):
        model = models[lib]
        cycle = iter(list(model.peft_config) * 1000)  # every adapter loaded, in turn
        return lambda: [model.set_adapter(next(cycle)) for _ in range(100)]

    sw, _ = interleaved({lib: switch(lib) for lib in models}, 1, 5, 1)

    def load(lib):
        model = models[lib]
        counter = iter(range(10**6))

        def go():
            name = f"extra{next(counter)}"
            model.load_adapter(tmp / names[1], adapter_name=name)
            model.delete_adapter(name)

        return go

    ld, _ = interleaved({lib: load(lib) for lib in models}, 1, 5, 1)

    for model in models.values():  # dozens of adapters: does switching slow down as more are loaded?
        for i in range(args.adapters, args.many):
            model.load_adapter(tmp / names[i % len(names)], adapter_name=f"task{i}")
    sw_many, _ = interleaved({lib: switch(lib) for lib in models}, 1, 5, 1)
    ratios = {
        "tokens/s mixed / single adapter (lorakit)": tok_s["lorakit_mixed"] / tok_s["lorakit_single"],
        "tokens/s mixed / single adapter (peft)": tok_s["peft_mixed"] / tok_s["peft_single"],
        "tokens/s mixed lorakit / mixed peft": tok_s["lorakit_mixed"] / tok_s["peft_mixed"],
        "set_adapter lorakit / peft": statistics.median(sw["lorakit"]) / statistics.median(sw["peft"]),
        f"set_adapter lorakit / peft, {args.many} adapters loaded": statistics.median(sw_many["lorakit"])
        / statistics.median(sw_many["peft"]),
        f"set_adapter lorakit, {args.many} / {args.adapters} adapters loaded": statistics.median(sw_many["lorakit"])
        / statistics.median(sw["lorakit"]),
        "load_adapter+delete lorakit / peft": statistics.median(ld["lorakit"]) / statistics.median(ld["peft"]),
    }
    print()
    for n, v in tok_s.items():
        print(f"tokens/s {n:<24}{v:9.1f}")
    us = {lib: statistics.median(sw[lib]) / 100 * 1e6 for lib in models}
    ms = {lib: statistics.median(ld[lib]) * 1e3 for lib in models}
    print(f"set_adapter: lorakit {us['lorakit']:.1f} us, peft {us['peft']:.0f} us ({args.adapters} adapters loaded)")
    us_many = {lib: statistics.median(sw_many[lib]) / 100 * 1e6 for lib in models}
    print(f"set_adapter: lorakit {us_many['lorakit']:.1f} us, peft {us_many['peft']:.0f} us ({args.many} loaded)")
    print(f"load_adapter + delete_adapter: lorakit {ms['lorakit']:.1f} ms, peft {ms['peft']:.1f} ms")
    for n, v in ratios.items():
        print(f"{n:<56}{v:10.3g}")
    if args.json:
        result = {
            "command": " ".join(["python", *sys.argv]),
            "config": vars(args) | {"json": str(args.json), "targets": TARGETS, "rank": 8},
            "env": {
                "torch": torch.__version__,
                "peft": peft.__version__,
                "python": platform.python_version(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            },
            "identical_tokens": same,
            "generate_s": {n: summary(v) for n, v in samples.items()},
            "tokens_per_s": tok_s,
            "set_adapter_s_per_100": {n: summary(v) for n, v in sw.items()},
            f"set_adapter_s_per_100_with_{args.many}_adapters": {n: summary(v) for n, v in sw_many.items()},
            "load_and_delete_adapter_s": {n: summary(v) for n, v in ld.items()},
            "noise": noise,
            "ratios": ratios,
            "wall_s": time.perf_counter() - t0,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
