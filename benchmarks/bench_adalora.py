"""AdaLoRA, lorakit vs PEFT 0.21.2 in one process: the cost of ``update_and_allocate``, of a training step, the
adapter file after the schedule, and eval latency with the cut triplets masked vs removed.

SmolLM2-135M-Instruct, AdaLoRA init_r = 12 -> target_r = 8 on q,k,v,o,gate,up,down (210 matrices), batch
8 x 64, fp32, 2 threads; both libraries hold identical weights. ``update_and_allocate`` is timed on its own
(the gradients of one backward pass in place, every call a masking step of the budget phase) and inside a whole
step (forward + backward + AdamW + update_and_allocate), variants interleaved, medians reported as ratios.

Reproduce (about 10 minutes)::

    python benchmarks/bench_adalora.py --json benchmarks/results/bench_adalora.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_lora import interleaved, make_batch, summary
from models import load_smollm2

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = dict(init_r=12, target_r=8, lora_alpha=16, total_step=1000, tinit=0, tfinal=0, deltaT=1)


def build(base: torch.nn.Module):
    import peft

    import lorakit

    cfg = dict(SETTINGS, target_modules=TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    p = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**cfg))
    k = lorakit.get_peft_model(copy.deepcopy(base), lorakit.AdaLoraConfig(**cfg))
    state = {}
    for name, tensor in p.state_dict().items():
        if ".lora_" not in name and ".ranknum." not in name:
            continue
        factor = ".lora_A." in name or ".lora_B." in name
        state[name + ".weight" if factor else name] = tensor
    missing, unexpected = k.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if ".lora_" in m]
    with torch.no_grad():  # E starts at 0 (ΔW = 0); give it values so the forward does real work
        for model in (p, k):
            gen = torch.Generator().manual_seed(3)
            for name, param in sorted(model.named_parameters()):
                if ".lora_E." in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return p, k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--alloc-calls", type=int, default=5, help="update_and_allocate calls per timed sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-foreign", type=float, default=0.15)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    loadavg_before = os.getloadavg()

    base, _ = load_smollm2()
    x = make_batch(base.config.vocab_size)
    p, k = build(base)
    del base
    models = {"peft": p, "lorakit": k}
    for m in models.values():
        m.train()
    with torch.no_grad():
        p.eval(), k.eval()
        same = (p(input_ids=x).logits - k(input_ids=x).logits).abs().max().item()
    print(f"max |logits lorakit - peft| with identical weights: {same:.2e}")

    # 1. update_and_allocate alone, with one backward's gradients in place
    counters = {name: itertools.count(1) for name in models}
    for m in models.values():
        m.train()
        m(input_ids=x, labels=x).loss.backward()

    def alloc(name):
        model = models[name]
        return lambda: [model.base_model.update_and_allocate(next(counters[name])) for _ in range(args.alloc_calls)]

    print(f"update_and_allocate: {args.alloc_calls} masking calls per sample, interleaved")
    alloc_samples, alloc_noise = interleaved(
        {n: alloc(n) for n in models}, 1, args.repeats, 1, args.max_foreign, args.repeats
    )
    alloc_samples = {n: [s / args.alloc_calls for s in v] for n, v in alloc_samples.items()}

    # 2. a whole training step with the allocation in it
    optimizers = {
        n: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4) for n, m in models.items()
    }

    def step(name):
        model, opt = models[name], optimizers[name]

        def run():
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(next(counters[name]))
            opt.zero_grad()

        return run

    print("training step (forward, backward, AdamW, update_and_allocate), interleaved")
    step_samples, step_noise = interleaved(
        {n: step(n) for n in models}, 1, args.repeats, 1, args.max_foreign, args.repeats
    )

    # 3. the end of the schedule: the final mask, then the files
    for name, m in models.items():
        cfg = m.peft_config["default"]
        m(input_ids=x, labels=x).loss.backward()
        m.base_model.update_and_allocate(cfg.total_step - cfg.tfinal)  # the final cut to target_r on average
        optimizers[name].zero_grad()
    kept = sum(sum(v) for v in k.peft_config["default"].rank_pattern.values())
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            m.save_pretrained(Path(tmp) / name)
            files[name] = (Path(tmp) / name / "adapter_model.safetensors").stat().st_size
        untruncated = sum(
            t.numel() * t.element_size() for n, t in k.state_dict().items() if ".lora_" in n
        )  # what a file of every init_r triplet holds (tensor bytes, without the header)

    # 4. eval forward: masked (both libraries) vs truncated (lorakit)
    truncated = copy.deepcopy(k)
    truncated.base_model.truncate()
    for m in (p, k, truncated):
        m.eval()

    def forward(model):
        def run():
            with torch.inference_mode():
                model(input_ids=x)

        return run

    print("eval forward (inference_mode), interleaved")
    fwd_samples, fwd_noise = interleaved(
        {"peft_masked": forward(p), "lorakit_masked": forward(k), "lorakit_truncated": forward(truncated)},
        1, args.repeats * 2, 2, args.max_foreign, args.repeats,
    )  # fmt: skip
    with torch.inference_mode():
        drift = (truncated(input_ids=x).logits - k(input_ids=x).logits).abs().max().item()

    med = {
        **{f"alloc_{n}": summary(v) for n, v in alloc_samples.items()},
        **{f"step_{n}": summary(v) for n, v in step_samples.items()},
    }
    med.update({f"forward_{n}": summary(v) for n, v in fwd_samples.items()})
    ratios = {
        "update_and_allocate lorakit/peft": med["alloc_lorakit"]["median_s"] / med["alloc_peft"]["median_s"],
        "training step lorakit/peft": med["step_lorakit"]["median_s"] / med["step_peft"]["median_s"],
        "update_and_allocate share of a lorakit step": med["alloc_lorakit"]["median_s"]
        / med["step_lorakit"]["median_s"],
        "update_and_allocate share of a PEFT step": med["alloc_peft"]["median_s"] / med["step_peft"]["median_s"],
        "file bytes lorakit/peft": files["lorakit"] / files["peft"],
        "file bytes lorakit / all init_r triplets": files["lorakit"] / untruncated,
        "eval forward truncated/masked (lorakit)": med["forward_lorakit_truncated"]["median_s"]
        / med["forward_lorakit_masked"]["median_s"],
        "eval forward lorakit masked / peft masked": med["forward_lorakit_masked"]["median_s"]
        / med["forward_peft_masked"]["median_s"],
    }
    print()
    for name, s in med.items():
        print(f"{name:<32}{s['median_s']:>9.4f}s  ({s['min_s']:.4f}..{s['max_s']:.4f})")
    print(f"\nkept triplets {kept} of {12 * 210}; files: lorakit {files['lorakit']:,} B, peft {files['peft']:,} B, "
          f"every init_r triplet {untruncated:,} B; truncated vs masked logits max |diff| {drift:.2e}")  # fmt: skip
    for name, value in ratios.items():
        print(f"{name:<48}{value:8.3f}")
    if args.json:
        import peft

        result = {
            "command": " ".join(["python", *sys.argv]),
            "config": {"adalora": SETTINGS, "targets": TARGETS, "batch": list(x.shape), "threads": args.threads},
            "env": {
                "torch": torch.__version__,
                "peft": peft.__version__,
                "python": platform.python_version(),
                "loadavg_before": loadavg_before,
                "loadavg_after": os.getloadavg(),
            },
            "max_abs_logits_lorakit_vs_peft": same,
            "max_abs_logits_truncated_vs_masked": drift,
            "kept_triplets": kept,
            "file_bytes": {**files, "all_init_r_triplets": untruncated},
            "timings": med,
            "noise": {"alloc": alloc_noise, "step": step_noise, "forward": fwd_noise},
            "ratios": ratios,
            "wall_s": time.perf_counter() - t_start,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
