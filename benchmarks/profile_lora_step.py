"""Where does lorakit's training step spend time beyond the frozen-model floor, and which LoRA forward is fastest?

Reproduce (all parts, about 12-15 minutes on 2 CPU cores)::

    python benchmarks/profile_lora_step.py --json profile_lora_step.json
    # the runs reported: the profiler + per-layer microbenchmark, then the step-level comparison
    python benchmarks/profile_lora_step.py --no-variants --forward-formulations ''
    python benchmarks/profile_lora_step.py --no-micro --no-profile --repeats 21 \
        --step-formulations shipped,generic,autograd_T,delta_function_T

Same setup as ``bench_lora.py`` (SmolLM2-135M-Instruct, fp32, LoRA r=8 / alpha 16 on all 7 projections,
batch 8 x 64, AdamW lr 1e-4, 2 threads). ``src/`` is never edited: the formulations are swapped in at run
time by replacing ``LoraLayer.forward`` with a dispatcher and restored afterwards.

1. ``--profile``: ``torch.profiler`` self CPU time per op for floor, lorakit and PEFT (mean of
   ``--profile-steps`` interleaved steps), and the per-op differences lorakit - floor, peft - floor, lorakit - peft.
2. ``--micro``: forward + backward of one adapted projection of each SmolLM2 shape, per formulation, against the
   frozen ``nn.Linear`` alone; short interleaved blocks, so it resolves differences the multi-second model steps
   drown in noise. The sum over the 210 projections estimates each formulation's LoRA overhead per step.
3. ``--variants``: full training steps, the floor and each formulation interleaved per repeat on one lorakit
   model (same weights, same batch), median over ``--repeats``; each formulation is first checked against the
   shipped one (same loss, same LoRA gradients). Minor page faults per step are recorded too.
4. ``--forward-formulations``: unmerged eval forward under ``inference_mode``, base model vs formulations.

Formulations (see each function): ``shipped`` (lorakit as installed: the fused kernel of
``lorakit.tuners.lora.fused`` where it applies, which is ``fused_layer_T``), ``generic`` (lorakit's unfused path),
``peft_style``, ``inplace_addmm``,
``delta_function``, ``fused_layer`` and the ``*_T`` versions, which lay the skinny GEMMs out as (r, N) so that
MKL takes its fast path.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_lora import (  # noqa: E402
    BATCH,
    SEQ,
    _cpu_snapshot,
    _foreign_share,
    build_floor,
    build_lorakit,
    build_peft,
    make_batch,
    make_step,
)
from models import load_smollm2  # noqa: E402

from lorakit.tuners.lora.fused import LoraLinearFunction  # noqa: E402
from lorakit.tuners.lora.layer import LoraLayer  # noqa: E402

SHIPPED_FORWARD = LoraLayer.forward
BATCH_TOKENS = BATCH * SEQ


# -- formulations of LoraLayer.forward (nn.Linear base, one active unmerged adapter) ------------------------


def _single(layer: LoraLayer) -> str | None:
    """The one active, unmerged adapter on a plain linear layer, else None (fall back to the shipped code)."""
    if layer.disable_adapters or layer.kind.name != "linear" or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter in layer.merged_adapters or not isinstance(layer.lora_dropout[adapter], nn.Identity):
        return None
    return adapter


def fw_peft_style(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """PEFT's formulation: result + lora_B(lora_A(dropout(x))) * scaling (out of place)."""
    result = layer.base_layer(x)
    for adapter in layer.active_adapters:
        if adapter not in layer.merged_adapters:
            a, b = layer.lora_A[adapter], layer.lora_B[adapter]
            result = result + b(a(layer.lora_dropout[adapter](x))) * layer.scaling[adapter]
    return result


def fw_inplace_addmm(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """Shipped math, but ``addmm_`` into the base output in place (nn.Linear does not save its output)."""
    adapter = _single(layer)
    if adapter is None or type(layer.base_layer) is not nn.Linear:
        return SHIPPED_FORWARD(layer, x)
    result = layer.base_layer(x)
    a = layer.lora_A[adapter].weight
    b = layer.lora_B[adapter].weight
    h = F.linear(x, a)
    result.view(-1, result.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=layer.scaling[adapter])
    return result


class _LoraDelta(torch.autograd.Function):
    """``result + s (x Aᵀ) Bᵀ`` written into ``result`` in place, with a hand-written backward.

    ``result`` is the first argument: when it is a view (``F.linear`` with a bias on 3-D input returns one),
    autograd's CopySlices takes the first gradient as the one for the modified tensor.
    """

    @staticmethod
    def forward(ctx, result, x, a, b, s):  # noqa: D401
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.t()
        result.view(-1, result.shape[-1]).addmm_(h, b.t(), alpha=s)
        ctx.mark_dirty(result)
        ctx.save_for_backward(x2, a, b, h)
        ctx.s, ctx.x_shape = s, x.shape
        return result

    @staticmethod
    def backward(ctx, g):
        x2, a, b, h = ctx.saved_tensors
        s = ctx.s
        g2 = g.reshape(-1, g.shape[-1])
        gh = torch.mm(g2, b).mul_(s)  # (N, r)
        gx = torch.mm(gh, a).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        ga = torch.mm(gh.t(), x2) if ctx.needs_input_grad[2] else None
        gb = torch.mm(g2.t(), h).mul_(s) if ctx.needs_input_grad[3] else None
        return g, gx, ga, gb, None


def fw_delta_function(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """Base layer as is; the LoRA branch as one autograd.Function (one node instead of ~6)."""
    adapter = _single(layer)
    if adapter is None or type(layer.base_layer) is not nn.Linear:
        return SHIPPED_FORWARD(layer, x)
    result = layer.base_layer(x)
    return _LoraDelta.apply(
        result, x, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter]
    )


class _LoraLinear(torch.autograd.Function):
    """The whole layer, ``x Wᵀ + bias + s (x Aᵀ) Bᵀ``, as one node; backward fuses grad_x = g W + (s g B) A."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, s):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.t()  # (N, r)
        y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        y.addmm_(h, b.t(), alpha=s)
        ctx.save_for_backward(x2, w, a, b, h)
        ctx.s, ctx.x_shape, ctx.has_bias = s, x.shape, bias is not None
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, w, a, b, h = ctx.saved_tensors
        s = ctx.s
        g2 = g.reshape(-1, g.shape[-1])
        gh = torch.mm(g2, b).mul_(s)  # (N, r) = s g B
        gx = gw = gbias = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g2, w).addmm_(gh, a).view(ctx.x_shape)  # one output buffer for both branches
        if ctx.needs_input_grad[1]:
            gw = torch.mm(g2.t(), x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gbias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            ga = torch.mm(gh.t(), x2)
        if ctx.needs_input_grad[4]:
            gb = torch.mm(g2.t(), h).mul_(s)
        return gx, gw, gbias, ga, gb, None


def fw_fused_layer(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """Base linear + LoRA as one autograd.Function (no autograd-side grad accumulation for x)."""
    adapter = _single(layer)
    if adapter is None or type(layer.base_layer) is not nn.Linear or not torch.is_grad_enabled():
        return SHIPPED_FORWARD(layer, x)
    base = layer.base_layer
    return _LoraLinear.apply(
        x, base.weight, base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter]
    )


# Skinny GEMMs: MKL is 3-5x slower at an (N, r) row-major output (a tall, 8-column result) than at the same
# product computed as its (r, N) transpose. Autograd's mm backward picks its formula from the operands'
# layouts, so laying the operands out right makes every LoRA product land on the fast form:
#   forward   hT = A xᵀ (r, N)            instead of h = x Aᵀ (N, r)
#   backward  grad hT = Bᵀ gᵀ (r, N)      instead of g B (N, r)
#             grad Bᵀ = hT g (r, out)     instead of gᵀ h (out, r)
# (x2.t() and hT.t() are column-major, bT is row-major; see mm_mat1_backward / mm_mat2_backward.)


def fw_autograd_t(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """Shipped math, plain autograd, operands laid out so that every skinny GEMM takes MKL's fast path."""
    adapter = _single(layer)
    if adapter is None:
        return SHIPPED_FORWARD(layer, x)
    result = layer.base_layer(x)
    a = layer.lora_A[adapter].weight  # (r, in)
    b = layer.lora_B[adapter].weight  # (out, r)
    if x.dtype != a.dtype or result.dtype != a.dtype:
        return SHIPPED_FORWARD(layer, x)
    h_t = torch.mm(a, x.reshape(-1, x.shape[-1]).t())  # (r, N)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h_t.t(), b.t().contiguous(), alpha=layer.scaling[adapter])
    return out.view(result.shape)


def fw_autograd_t_inplace(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """``fw_autograd_t`` with the update ``addmm_``-ed into nn.Linear's output in place."""
    adapter = _single(layer)
    if adapter is None or type(layer.base_layer) is not nn.Linear:
        return SHIPPED_FORWARD(layer, x)
    result = layer.base_layer(x)
    a = layer.lora_A[adapter].weight
    b = layer.lora_B[adapter].weight
    h_t = torch.mm(a, x.reshape(-1, x.shape[-1]).t())
    result.view(-1, result.shape[-1]).addmm_(h_t.t(), b.t().contiguous(), alpha=layer.scaling[adapter])
    return result


class _LoraDeltaT(torch.autograd.Function):
    """``_LoraDelta`` with the fast layouts: in-place update, one node, every GEMM on its fast form."""

    @staticmethod
    def forward(ctx, result, x, a, b, s):
        x2 = x.reshape(-1, x.shape[-1])
        h_t = torch.mm(a, x2.t())  # (r, N)
        result.view(-1, result.shape[-1]).addmm_(h_t.t(), b.t(), alpha=s)
        ctx.mark_dirty(result)
        ctx.save_for_backward(x2, a, b, h_t)
        ctx.s, ctx.x_shape = s, x.shape
        return result

    @staticmethod
    def backward(ctx, g):
        x2, a, b, h_t = ctx.saved_tensors
        s = ctx.s
        g2 = g.reshape(-1, g.shape[-1])
        gh_t = torch.mm(b.t(), g2.t()).mul_(s)  # (r, N)
        gx = torch.mm(gh_t.t(), a).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        ga = torch.mm(gh_t, x2) if ctx.needs_input_grad[2] else None
        gb = torch.mm(h_t, g2).mul_(s).t() if ctx.needs_input_grad[3] else None
        return g, gx, ga, gb, None


def fw_delta_function_t(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    adapter = _single(layer)
    if adapter is None or type(layer.base_layer) is not nn.Linear:
        return SHIPPED_FORWARD(layer, x)
    result = layer.base_layer(x)
    return _LoraDeltaT.apply(
        result, x, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter]
    )


def fw_fused_layer_t(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    adapter = _single(layer)
    if adapter is None or type(layer.base_layer) is not nn.Linear or not torch.is_grad_enabled():
        return SHIPPED_FORWARD(layer, x)
    base = layer.base_layer
    return LoraLinearFunction.apply(  # what lorakit ships (lorakit.tuners.lora.fused)
        x, base.weight, base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter]
    )


def fw_generic(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """lorakit's generic (unfused) path: base layer, then the kind's fused up-projection + add."""
    result = layer.base_layer(x)
    for adapter in layer.active_adapters:
        result = layer.kind.add_output(layer, adapter, x, result)
    return result


FORMULATIONS: dict[str, Callable[[LoraLayer, torch.Tensor], torch.Tensor]] = {
    "shipped": lambda layer, x: SHIPPED_FORWARD(layer, x),
    "generic": fw_generic,
    "peft_style": fw_peft_style,
    "inplace_addmm": fw_inplace_addmm,
    "delta_function": fw_delta_function,
    "fused_layer": fw_fused_layer,
    "autograd_T": fw_autograd_t,
    "autograd_T_inplace": fw_autograd_t_inplace,
    "delta_function_T": fw_delta_function_t,
    "fused_layer_T": fw_fused_layer_t,
}
CURRENT = {"name": "shipped"}


def _dispatch(self: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs:
        return SHIPPED_FORWARD(self, x, *args, **kwargs)
    return FORMULATIONS[CURRENT["name"]](self, x)


# -- part 1: profiler -------------------------------------------------------------------------------------


def profile_step(step: Callable[[], Any], table: dict | None = None, weight: float = 1.0, by_shape: bool = False):
    """Add one profiled step's self CPU time per op (scaled by ``weight``) into ``table``.

    ``by_shape``: key by op name and input shapes (``aten::mm [[512, 1536], [1536, 8]]``).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        step()
    if table is None:
        table = defaultdict(lambda: {"self_ms": 0.0, "count": 0})
    for e in prof.key_averages(group_by_input_shape=by_shape):
        key = f"{e.key} {e.input_shapes}" if by_shape else e.key
        table[key]["self_ms"] += weight * e.self_cpu_time_total / 1e3
        table[key]["count"] += weight * e.count
    return table


def print_top(name: str, table: dict[str, dict[str, float]], n: int) -> None:
    total = sum(v["self_ms"] for v in table.values())
    print(f"\n[{name}] total self CPU {total:.0f} ms; top {n} by self CPU time")
    for key, v in sorted(table.items(), key=lambda kv: -kv[1]["self_ms"])[:n]:
        print(f"  {v['self_ms']:9.1f} ms {v['count']:6.0f}x  {key}")


def print_diff(a_name: str, a: dict, b_name: str, b: dict, n: int) -> None:
    keys = set(a) | set(b)
    rows = [
        (
            k,
            a.get(k, {}).get("self_ms", 0.0) - b.get(k, {}).get("self_ms", 0.0),
            a.get(k, {}).get("count", 0) - b.get(k, {}).get("count", 0),
        )
        for k in keys
    ]
    total = sum(r[1] for r in rows)
    print(f"\n[{a_name} - {b_name}] self CPU difference {total:+.0f} ms; largest {n}")
    for k, d, c in sorted(rows, key=lambda r: -abs(r[1]))[:n]:
        print(f"  {d:+9.1f} ms {c:+6.0f}x  {k}")


# -- part 3: per-layer microbenchmark ---------------------------------------------------------------------

#: SmolLM2-135M projections (in, out) and how many of each the model has per decoder layer.
SMOLLM2_SHAPES = {
    "q_proj/o_proj": (576, 576, 2),
    "k_proj/v_proj": (576, 192, 2),
    "gate_proj/up_proj": (576, 1536, 2),
    "down_proj": (1536, 576, 1),
}
N_LAYERS = 30


def _micro_shape(names, fan_in, fan_out, rounds, inner, max_foreign, gen) -> dict[str, list[float]]:
    from lorakit.layers.kinds import LinearKind

    base = nn.Linear(fan_in, fan_out, bias=False)
    base.weight.requires_grad_(False)
    layer = LoraLayer(base, LinearKind())
    layer.add("default", r=8, lora_alpha=16)
    layer.set_active(["default"])
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02, generator=gen)
    params = [p for p in layer.parameters() if p.requires_grad]
    leaf = torch.randn(BATCH, SEQ, fan_in, generator=gen, requires_grad=True)
    g = torch.randn(BATCH, SEQ, fan_out, generator=gen)

    def run_input_only():  # the non-leaf input and its backward alone, to isolate the linear's cost
        x = leaf * 1.0
        x.backward(torch.ones_like(x))
        leaf.grad = None

    def run_base():
        x = leaf * 1.0  # non-leaf input, as inside the model
        base(x).backward(g)
        leaf.grad = None

    def run_form(name):
        def run():
            CURRENT["name"] = name
            x = leaf * 1.0
            layer(x).backward(g)
            leaf.grad = None
            for p in params:
                p.grad = None

        return run

    fns = {"base": run_base, **{n: run_form(n) for n in names}, "_input_only": run_input_only}
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    while len(samples["base"]) < rounds:
        got, share = {}, 0.0
        for n, fn in fns.items():
            a = _cpu_snapshot()
            for _ in range(inner):
                fn()
            b = _cpu_snapshot()
            got[n] = (b[0] - a[0]) / inner * 1e3
            share = max(share, _foreign_share(a, b))
        if share > max_foreign:
            continue
        for n, v in got.items():
            samples[n].append(v)
    CURRENT["name"] = "shipped"
    return samples


def micro(names: list[str], rounds: int, inner: int, max_foreign: float) -> dict[str, Any]:
    """Forward + backward of one adapted projection, per formulation, vs the frozen nn.Linear alone.

    Short blocks (tens of ms) interleaved over many rounds average out the host's slow drifts far better than
    multi-second model steps. The LoRA overhead per step is then sum over projections of (t - t_base) x 30.
    """
    print(f"\nper-layer microbenchmark: batch {BATCH_TOKENS} tokens, r=8, fwd+bwd, {rounds} rounds x {inner} calls")
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"shapes": {}, "model_overhead_ms": {}}
    totals = defaultdict(float)
    for label, (fan_in, fan_out, count) in SMOLLM2_SHAPES.items():
        samples = _micro_shape(names, fan_in, fan_out, rounds, inner, max_foreign, gen)
        med = {n: statistics.median(v) for n, v in samples.items()}
        line = "  ".join(f"{n} {med[n] - med['base']:+.3f}" for n in names)
        print(
            f"  {label:<18} ({fan_in}->{fan_out}) base {med['base'] - med['_input_only']:.3f} ms; "
            f"LoRA overhead ms: {line}",
            flush=True,
        )
        out["shapes"][label] = {
            "in": fan_in,
            "out": fan_out,
            "per_decoder_layer": count,
            "median_ms": med,
            "samples_ms": samples,
        }
        for n in names:
            totals[n] += (med[n] - med["base"]) * count * N_LAYERS
    print("  estimated LoRA overhead per training step (sum over 210 projections), forward + backward:")
    for n in names:
        print(f"    {n:<16} {totals[n]:7.1f} ms")
    out["model_overhead_ms"] = dict(totals)
    return out


# -- part 2: formulations ---------------------------------------------------------------------------------


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_formulations(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    ref_loss = ref_grads = None
    for name in names:
        CURRENT["name"] = name
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        grads = lora_grads(model)
        if ref_loss is None:
            ref_loss, ref_grads = loss.item(), grads
        worst = max(((grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for k, g in ref_grads.items())
        out[name] = {
            "loss": loss.item(),
            "loss_diff": abs(loss.item() - ref_loss),
            "max_rel_grad_diff": worst,
            "n_grads": len(grads),
        }
        print(f"  {name:<16} loss {loss.item():.6f}  max relative LoRA-grad difference vs {names[0]} {worst:.2e}")
    model.zero_grad(set_to_none=True)
    CURRENT["name"] = "shipped"
    return out


def time_formulations(floor_step, lk_model, x, names, warmup, repeats, max_foreign, max_rejects):
    lk_step = make_step(lk_model, x)

    def variant(name):
        def run():
            CURRENT["name"] = name
            return lk_step()

        return run

    fns = {"floor": floor_step, **{n: variant(n) for n in names}}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    faults: dict[str, list[int]] = {n: [] for n in fns}
    rejected = 0
    while len(samples["floor"]) < repeats:
        got, flt, share = {}, {}, 0.0
        for n, fn in fns.items():
            gc.collect()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            a = _cpu_snapshot()
            fn()
            b = _cpu_snapshot()
            flt[n] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            got[n] = b[0] - a[0]
            share = max(share, _foreign_share(a, b))
        line = "  ".join(f"{n} {v:.3f}" for n, v in got.items())
        if share > max_foreign and rejected < max_rejects:
            rejected += 1
            print(f"    rejected (foreign CPU {share:.0%}): {line}", flush=True)
            continue
        for n in fns:
            samples[n].append(got[n])
            faults[n].append(flt[n])
        print(f"    repeat {len(samples['floor'])}/{repeats}: {line}  (foreign CPU {share:.0%})", flush=True)
    CURRENT["name"] = "shipped"
    return samples, faults, rejected


def time_forward(base, x, names, warmup, repeats, max_foreign) -> dict[str, Any]:
    """Unmerged eval forward under inference_mode: the plain base model vs lorakit per formulation."""
    LoraLayer.forward = _dispatch
    try:
        lk = build_lorakit(base)
        with torch.no_grad():
            for n, p in lk.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        lk.eval()
        outs = {}

        def run(model, name):
            def f():
                CURRENT["name"] = name
                with torch.inference_mode():
                    outs.setdefault(name, model(input_ids=x, use_cache=False).logits)

            return f

        fns = {"base": run(base, "base"), **{n: run(lk, n) for n in names}}
        for _ in range(max(1, warmup)):  # also records each variant's logits for the check below
            for fn in fns.values():
                fn()
        diffs = {n: (outs[n] - outs[names[0]]).abs().max().item() for n in names}
        print(f"\nunmerged forward (inference_mode), {repeats} repeats x 2 calls; max |logits - {names[0]}|: {diffs}")
        samples: dict[str, list[float]] = {n: [] for n in fns}
        while len(samples["base"]) < repeats:
            got, share = {}, 0.0
            for n, fn in fns.items():
                a = _cpu_snapshot()
                fn()
                fn()
                b = _cpu_snapshot()
                got[n] = (b[0] - a[0]) / 2
                share = max(share, _foreign_share(a, b))
            if share > max_foreign:
                continue
            for n, v in got.items():
                samples[n].append(v)
    finally:
        LoraLayer.forward = SHIPPED_FORWARD
        CURRENT["name"] = "shipped"
    med = {n: statistics.median(v) for n, v in samples.items()}
    for n in fns:
        print(f"  {n:<20} {med[n]:.3f} s   / base {med[n] / med['base']:.3f}")
    return {"median_s": med, "samples_s": samples, "max_abs_logit_diff": diffs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-profile", action="store_true", help="skip part 1 (torch.profiler)")
    ap.add_argument("--no-variants", action="store_true", help="skip part 3 (full-step comparison of formulations)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--profile-steps", type=int, default=3, help="profiled steps per variant, averaged")
    ap.add_argument("--by-shape", action="store_true", help="profiler tables per op and input shapes")
    ap.add_argument(
        "--micro",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-layer forward+backward microbenchmark of the formulations (default on)",
    )
    ap.add_argument("--micro-rounds", type=int, default=25)
    ap.add_argument("--micro-inner", type=int, default=10, help="fwd+bwd calls per timed block")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-foreign", type=float, default=0.15)
    ap.add_argument("--formulations", default=",".join(FORMULATIONS), help="for the microbenchmark (default all)")
    ap.add_argument(
        "--step-formulations",
        default="shipped,generic,peft_style,autograd_T,delta_function_T",
        help="for the full-step comparison",
    )
    ap.add_argument(
        "--forward-formulations",
        default="shipped,autograd_T_inplace",
        help="formulations for the unmerged inference-forward comparison ('' to skip)",
    )
    ap.add_argument("--forward-repeats", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    base, _ = load_smollm2()
    base.eval()
    x = make_batch(base.config.vocab_size)
    result: dict[str, Any] = {"loadavg_before": os.getloadavg()}

    floor = build_floor(base)
    floor_step = make_step(floor, x)

    if not args.no_profile:
        # Per-op self CPU time, averaged over --profile-steps steps per variant, the variants interleaved.
        models = {"floor": floor, "lorakit": build_lorakit(base), "peft": build_peft(base)}
        steps = {"floor": floor_step, **{n: make_step(models[n], x) for n in ("lorakit", "peft")}}
        for fn in steps.values():
            fn()  # warm-up
        tables: dict[str, Any] = {n: None for n in steps}
        redone = 0
        for _ in range(args.profile_steps):
            for n, fn in steps.items():
                for attempt in range(6):  # redo a step during which other processes took the CPUs
                    a = _cpu_snapshot()
                    one = profile_step(fn, None, 1.0 / args.profile_steps, args.by_shape)
                    share = _foreign_share(a, _cpu_snapshot())
                    if share <= args.max_foreign or attempt == 5:
                        break
                    redone += 1
                    print(f"    profiled {n} step redone (foreign CPU {share:.0%})", flush=True)
                tables[n] = tables[n] or defaultdict(lambda: {"self_ms": 0.0, "count": 0})
                for key, v in one.items():
                    tables[n][key]["self_ms"] += v["self_ms"]
                    tables[n][key]["count"] += v["count"]
        result["profile_steps_redone"] = redone
        tables = {n: dict(t) for n, t in tables.items()}
        for n in steps:
            print_top(f"{n}, mean of {args.profile_steps} steps", tables[n], args.top)
        print_diff("lorakit", tables["lorakit"], "floor", tables["floor"], args.top)
        print_diff("peft", tables["peft"], "floor", tables["floor"], args.top)
        print_diff("lorakit", tables["lorakit"], "peft", tables["peft"], args.top)
        result["profile_self_cpu_ms"] = tables
        del models, steps
        gc.collect()

    if args.micro:
        LoraLayer.forward = _dispatch
        try:
            result["micro"] = micro(
                [n for n in args.formulations.split(",") if n], args.micro_rounds, args.micro_inner, args.max_foreign
            )
        finally:
            LoraLayer.forward = SHIPPED_FORWARD

    if not args.no_variants:
        names = [n for n in args.step_formulations.split(",") if n]
        LoraLayer.forward = _dispatch
        try:
            lk = build_lorakit(base)
            # Non-zero B so that every branch of the check is exercised (B starts at zero).
            with torch.no_grad():
                for n, p in lk.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.02)
            print("\nformulation check (one batch, same weights):")
            result["formulation_check"] = check_formulations(lk, x, names)
            print(
                f"\nformulations: training step (forward + backward + AdamW), interleaved with the floor, "
                f"{args.repeats} repeats"
            )
            samples, faults, rejected = time_formulations(
                floor_step, lk, x, names, args.warmup, args.repeats, args.max_foreign, args.repeats
            )
        finally:
            LoraLayer.forward = SHIPPED_FORWARD
        med = {n: statistics.median(s) for n, s in samples.items()}
        print(
            f"\n{'variant':<16}{'median s':>10}{'/ floor':>9}{'/ shipped':>11}{'minflt/step':>13}"
            f"{'per-repeat / floor':>24}"
        )
        for n, s in samples.items():
            per = [v / f for v, f in zip(s, samples["floor"])]
            print(
                f"{n:<16}{med[n]:>10.3f}{med[n] / med['floor']:>9.3f}{med[n] / med.get('shipped', med[n]):>11.3f}"
                f"{statistics.median(faults[n]):>13.0f}{min(per):>12.3f}..{max(per):.3f}"
            )
        result["formulations"] = {
            n: {
                "median_s": med[n],
                "ratio_floor": med[n] / med["floor"],
                "ratio_shipped": med[n] / med["shipped"] if "shipped" in med else None,
                "samples_s": samples[n],
                "minflt_per_step": faults[n],
            }
            for n in samples
        }
        result["rejected_repeats"] = rejected

    fnames = [n for n in args.forward_formulations.split(",") if n]
    if fnames:
        result["forward"] = time_forward(base, x, fnames, args.warmup, args.forward_repeats, args.max_foreign)
    result["loadavg_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
