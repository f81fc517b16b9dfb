"""A fused training kernel for LoRA on a plain ``nn.Linear``: base GEMM and low-rank update in one autograd node.

``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` with x ``(N, in)``, W ``(out, in)``, A ``(r, in)``, B ``(out, r)``.

Autograd over the unfused ops (what PEFT does, and lorakit's generic path) spends its time in three places
on a CPU (see ``benchmarks/profile_lora_step.py``):

* the rank-r products come out in the slow layout: MKL is several times slower producing an ``(N, r)``
  matrix than an ``(r, N)`` one, and autograd's backward of ``F.linear`` picks the former;
* the update is added out of place, so a full ``(N, out)`` copy of the base output is written;
* the input gradient is two ``(N, in)`` products summed into a third buffer.

This function keeps every rank-r intermediate as ``(r, N)`` (``h = A xᵀ`` forward, ``g_h = s · Bᵀ gᵀ``
backward), adds the update into the base output in place (``addmm_``), and accumulates the input
gradient in one buffer. It saves ``x``, ``h`` and the factors — the same tensors autograd would save — so
memory is not higher. Mathematically it is exactly the generic path; only float rounding order differs.

It is used by :class:`~lorakit.layers.kinds.LinearKind` only when it is exactly equivalent: one active,
unmerged adapter, no active dropout, equal dtypes, no autocast, gradients enabled, no hooks on the base layer.
"""

from __future__ import annotations

import torch


class LoraLinearFunction(torch.autograd.Function):
    """``forward(x, weight, bias, lora_a, lora_b, scaling) -> y``; shapes in the module docstring.

    ``x`` may have any leading dimensions (``(..., in)``); ``bias`` may be None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        h_t = torch.mm(lora_a, x2.t())  # (r, N): the fast layout
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())  # (N, out)
        y.addmm_(h_t.t(), lora_b.t(), alpha=scaling)  # y += s · h Bᵀ, in place
        ctx.save_for_backward(x2, weight, lora_a, lora_b, h_t)
        ctx.scaling, ctx.x_shape, ctx.has_bias = scaling, x.shape, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_a, lora_b, h_t = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        gh_t = None
        if need_x or need_a:
            gh_t = torch.mm(lora_b.t(), g2.t()).mul_(s)  # (r, N) = s · Bᵀ gᵀ
        if need_x:
            grad_x = torch.mm(g2, weight).addmm_(gh_t.t(), lora_a).view(ctx.x_shape)  # g W + (s g B) A
        if need_w:
            grad_w = torch.mm(g2.t(), x2)
        if ctx.has_bias and need_bias:
            grad_bias = g2.sum(0)
        if need_a:
            grad_a = torch.mm(gh_t, x2)  # (r, in)
        if need_b:
            grad_b = torch.mm(h_t, g2).mul_(s).t()  # (out, r)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None
