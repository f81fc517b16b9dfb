"""4-bit storage and quality on SmolLM2-135M-Instruct: bytes held in 4-bit vs fp32, and perplexity per 4-bit code.

The QLoRA paper (arXiv 2305.14314, §3 and Table 2) argues that NormalFloat4 is the right 4-bit code for
normally distributed weights and keeps a model closest to its 16/32-bit quality. This script checks that on
the default model, on CPU, with bitsandbytes:

* **bytes**: every parameter and buffer (and bitsandbytes' quantization state: block absmax, code tables,
  double-quantization constants) of the fp32 model and of the model after ``lorakit.quantize(bits=4)``, for
  the linear layers that get quantized and for the whole model (the 28 M-parameter embedding, shared with
  the output head and kept in fp32, is a large share of a model this small);
* **perplexity** on held-out English text (the documentation topics that ship with CPython in
  ``pydoc_data.topics``; the model never trained on this copy of them, and the text is the same on every
  machine with the same Python) of: the fp32 model; NF4 and FP4 (bitsandbytes ``Linear4bit``, blocks of 64,
  with and without double quantization); and a plain absmax int4 baseline (symmetric integers -7..7 times
  the block's absmax / 7, blocks of 64, simulated in fp32);
* **LoftQ** (arXiv 2310.08659): over every linear layer that gets quantized, ‖W − Q‖ against
  ‖W − (Q + s·BA)‖ with LoftQ's B, A at r = 8, α = 16 (s = 2), for ``--loftq-iters`` alternations; and the
  perplexity of the LoftQ-initialised 4-bit model (LoRA on q, k, v, o, gate, up, down) before any training,
  next to plain QLoRA's start (B = 0, i.e. the NF4 model itself).

Reproduce (about 5 minutes on 2 CPU cores)::

    python benchmarks/bench_qlora_quality.py --json benchmarks/results/bench_qlora_quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from models import load_smollm2  # noqa: E402

import lorakit  # noqa: E402
from lorakit.kbit import is_quantized_layer  # noqa: E402
from lorakit.tuners.lora.loftq import loftq_factors, nf4_round_trip  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def held_out_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``window`` tokens."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - window + 1, window):
        chunk = ids[start : start + window].unsqueeze(0)
        logits = model(input_ids=chunk, use_cache=False).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += window - 1
    return math.exp(nll / count)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer under ``module``, plus bitsandbytes' quantization state."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        while state is not None:  # QuantState: absmax, code, offset; nested state2 for double quantization
            for name in ("absmax", "code", "offset"):
                extra = getattr(state, name, None)
                if isinstance(extra, torch.Tensor):
                    total += extra.numel() * extra.element_size()
            state = getattr(state, "state2", None)
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def quantizable(model: nn.Module) -> list[nn.Module]:
    head = model.get_output_embeddings()
    return [m for m in model.modules() if (type(m) is nn.Linear or is_quantized_layer(m)) and m is not head]


@torch.no_grad()
def absmax_int4(model: nn.Module, block: int = 64) -> nn.Module:
    """Every linear but the head replaced in place by its symmetric absmax int4 round trip (blocks of ``block``)."""
    for m in quantizable(model):
        w = m.weight.data.reshape(-1, block)
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7
        m.weight.data = (torch.round(w / scale).clamp(-7, 7) * scale).reshape(m.weight.shape)
    return model


def loftq_errors(model: nn.Module, r: int, scaling: float, iters: int) -> dict[str, float]:
    """Frobenius norms over all quantizable layers: W − q(W) (plain NF4) and W − (Q_T + s·BA) (LoftQ, T = iters)."""
    quant, loftq = 0.0, 0.0
    for m in quantizable(model):
        w = m.weight.detach().float()
        q, a, b = loftq_factors(w, r, scaling, iters)
        quant += torch.linalg.norm(w - nf4_round_trip(w)).item() ** 2
        loftq += torch.linalg.norm(w - q - scaling * (b @ a)).item() ** 2
    quant, loftq = math.sqrt(quant), math.sqrt(loftq)
    return {"quantization_error": quant, "loftq_error": loftq, "reduction": 1 - loftq / quant}


def loftq_model(base: nn.Module, iters: int) -> nn.Module:
    config = lorakit.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=TARGETS,
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": 4, "loftq_iter": iters},
    )
    return lorakit.quantize(lorakit.get_peft_model(copy.deepcopy(base), config))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=256, help="tokens per perplexity window (256)")
    ap.add_argument("--windows", type=int, default=24, help="windows evaluated (24)")
    ap.add_argument("--loftq-iters", type=int, nargs="+", default=[1, 5], help="LoftQ alternations to report (1 5)")
    ap.add_argument("--parts", nargs="+", choices=["perplexity", "loftq"], default=["perplexity", "loftq"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base, tokenizer = load_smollm2()
    ids = tokenizer(held_out_text(), return_tensors="pt").input_ids[0][: args.window * args.windows]
    print(f"held-out text: {ids.numel()} tokens ({args.windows} windows of {args.window})")

    linear_params = sum(m.weight.numel() for m in quantizable(base))
    fp32_linear = sum(tensor_bytes(m) for m in quantizable(base))
    variants = {
        "fp32": lambda: copy.deepcopy(base),
        "nf4_double_quant": lambda: lorakit.quantize(copy.deepcopy(base), bits=4, quant_type="nf4"),
        "nf4": lambda: lorakit.quantize(copy.deepcopy(base), bits=4, quant_type="nf4", double_quant=False),
        "fp4_double_quant": lambda: lorakit.quantize(copy.deepcopy(base), bits=4, quant_type="fp4"),
        "absmax_int4": lambda: absmax_int4(copy.deepcopy(base)),
    }
    if "loftq" in args.parts:
        for iters in args.loftq_iters:
            variants[f"nf4_double_quant_loftq{iters}_r8"] = lambda iters=iters: loftq_model(base, iters)
    if "perplexity" not in args.parts:
        variants = {k: v for k, v in variants.items() if k == "fp32" or "loftq" in k}
    results = {}
    for name, build in variants.items():
        t0 = time.perf_counter()
        model = build()
        linear = sum(tensor_bytes(m) for m in quantizable(model))
        whole = tensor_bytes(model)
        ppl = perplexity(model, ids, args.window)
        results[name] = {
            "perplexity": ppl,
            "linear_bytes": linear,
            "linear_bits_per_weight": 8 * linear / linear_params,
            "model_bytes": whole,
            "seconds": time.perf_counter() - t0,
        }
        print(
            f"{name:<18} perplexity {ppl:8.3f}   linear layers {linear / 2**20:7.1f} MiB "
            f"({8 * linear / linear_params:5.2f} bits/weight)   whole model {whole / 2**20:7.1f} MiB",
            flush=True,
        )
        del model

    loftq = {}
    if "loftq" in args.parts:
        for iters in args.loftq_iters:
            loftq[iters] = loftq_errors(base, 8, 2.0, iters)
            e = loftq[iters]
            print(
                f"LoftQ, {iters} alternation(s): ‖W − q(W)‖ = {e['quantization_error']:.3f}, "
                f"‖W − (Q + s·BA)‖ = {e['loftq_error']:.3f} ({e['reduction']:.1%} lower), over all linear layers"
            )
    fp32 = results["fp32"]
    for r in results.values():
        r["perplexity_over_fp32"] = r["perplexity"] / fp32["perplexity"]
        r["linear_bytes_over_fp32"] = r["linear_bytes"] / fp32_linear
        r["model_bytes_over_fp32"] = r["model_bytes"] / fp32["model_bytes"]
    print("\nvariant            perplexity  / fp32   linear bytes / fp32   model bytes / fp32")
    for name, r in results.items():
        print(
            f"{name:<18} {r['perplexity']:10.3f}  {r['perplexity_over_fp32']:6.3f}   "
            f"{r['linear_bytes_over_fp32']:19.3f}   {r['model_bytes_over_fp32']:18.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = vars(args) | {"json": str(args.json)}
        payload = {
            "results": results,
            "loftq_errors": loftq,
            "tokens": ids.numel(),
            "linear_parameters": linear_params,
            "settings": settings,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
