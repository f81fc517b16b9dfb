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
:class:`DoraLinearFunction` is the same kernel followed by DoRA's per-output rescale (:mod:`.dora`).
"""

from __future__ import annotations

import torch


def _forward(x2, weight, bias, lora_a, lora_b, scaling):
    """``(x Wᵀ + b + s·(x Aᵀ) Bᵀ, A xᵀ)`` for x2 ``(N, in)``: outputs ``(N, out)`` and ``(r, N)``."""
    h_t = torch.mm(lora_a, x2.t())  # (r, N): the fast layout
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())  # (N, out)
    y.addmm_(h_t.t(), lora_b.t(), alpha=scaling)  # y += s · h Bᵀ, in place
    return y, h_t


def _backward(g2, x2, weight, lora_a, lora_b, h_t, scaling, needs):
    """Gradients of :func:`_forward` in x2, W, A, B (None where ``needs`` says so) for g2 ``(N, out)``."""
    need_x, need_w, need_a, need_b = needs
    grad_x = grad_w = grad_a = grad_b = None
    gh_t = None
    if need_x or need_a:
        gh_t = torch.mm(lora_b.t(), g2.t()).mul_(scaling)  # (r, N) = s · Bᵀ gᵀ
    if need_x:
        grad_x = torch.mm(g2, weight).addmm_(gh_t.t(), lora_a)  # g W + (s g B) A
    if need_w:
        grad_w = torch.mm(g2.t(), x2)
    if need_a:
        grad_a = torch.mm(gh_t, x2)  # (r, in)
    if need_b:
        grad_b = torch.mm(h_t, g2).mul_(scaling).t()  # (out, r)
    return grad_x, grad_w, grad_a, grad_b


class LoraLinearFunction(torch.autograd.Function):
    """``forward(x, weight, bias, lora_a, lora_b, scaling) -> y``; shapes in the module docstring.

    ``x`` may have any leading dimensions (``(..., in)``); ``bias`` may be None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y, h_t = _forward(x2, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, h_t)
        ctx.scaling, ctx.x_shape, ctx.has_bias = scaling, x.shape, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_a, lora_b, h_t = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x, grad_w, grad_a, grad_b = _backward(
            g2, x2, weight, lora_a, lora_b, h_t, ctx.scaling, (need_x, need_w, need_a, need_b)
        )
        grad_bias = g2.sum(0) if ctx.has_bias and need_bias else None
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


class DoraLinearFunction(torch.autograd.Function):
    """DoRA's training kernel: ``y = scale ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b`` with ``scale = m / ‖W + s·BA‖``.

    ``forward(x, weight, bias, lora_a, lora_b, scaling, scale) -> y``; ``scale`` is ``(out,)`` and carries its
    own graph back to m (and to A and B when the norm is not detached).

    m's gradient needs the unscaled product z ``(N, out)``: ``∂L/∂scale = Σ_n g ⊙ z``. Rather than keep z
    beside y (what autograd over ``z * scale`` does, and PEFT keeps two such tensors), the kernel rescales z
    in place into y and recovers ``z = (y − b) / scale`` in backward. y is usually kept alive by the next op
    anyway (an activation, attention, a product), so this costs no memory there. Two cases recompute z
    exactly instead (one more GEMM): y was modified in place after the forward (its version counter moved),
    or a scale entry is exactly 0. Under saved-tensor hooks (activation checkpointing, offloading), z is
    saved through ``save_for_backward`` like every other tensor, so the hooks see it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, scale):
        x2 = x.reshape(-1, x.shape[-1])
        z, h_t = _forward(x2, weight, None, lora_a, lora_b, scaling)
        ctx.scaling, ctx.x_shape, ctx.has_bias = scaling, x.shape, bias is not None
        if _saved_tensor_hooks_active():
            y = torch.addcmul(bias, z, scale) if bias is not None else z * scale
            ctx.save_for_backward(x2, weight, lora_a, lora_b, h_t, scale, bias, z)
        else:
            y = z.mul_(scale)
            if bias is not None:
                y.add_(bias)
            ctx.save_for_backward(x2, weight, lora_a, lora_b, h_t, scale, bias)
            # Not through save_for_backward: that would refuse an in-place change of y instead of recomputing.
            # A detached alias shares y's storage and version counter and holds no reference to the graph.
            ctx.output, ctx.output_version = y.detach(), y._version
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_a, lora_b, h_t, scale, bias, *kept = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        need_x, need_w, need_bias, need_a, need_b, _, need_scale = ctx.needs_input_grad
        grad_scale = buffer = None
        if need_scale:
            if kept:  # z itself
                buffer = torch.mul(g2, kept[0])
                grad_scale = buffer.sum(0)
            elif ctx.output._version == ctx.output_version and bool(scale.ne(0).all()):
                y = ctx.output.view(-1, g2.shape[-1])  # scale ⊙ z (+ bias)
                buffer = torch.sub(y, bias).mul_(g2) if bias is not None else torch.mul(y, g2)
                grad_scale = buffer.sum(0).div_(scale)
            else:  # y changed in place, or a zero scale hides z: recompute z exactly
                buffer = torch.mm(x2, weight.t()).addmm_(h_t.t(), lora_b.t(), alpha=ctx.scaling).mul_(g2)
                grad_scale = buffer.sum(0)
        g_z = torch.mul(g2, scale, out=buffer) if buffer is not None else g2 * scale  # the gradient in z
        grad_x, grad_w, grad_a, grad_b = _backward(
            g_z, x2, weight, lora_a, lora_b, h_t, ctx.scaling, (need_x, need_w, need_a, need_b)
        )
        grad_bias = g2.sum(0) if ctx.has_bias and need_bias else None
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, grad_scale


def _saved_tensor_hooks_active() -> bool:
    """Whether ``torch.autograd.graph.saved_tensors_hooks`` are in force (activation checkpointing does this).
    Under ``torch.compile``: True, the path that saves ``z`` (dynamo cannot call the C query, and the in-place
    output with its version check is nothing a traced graph keeps)."""
    if torch.compiler.is_compiling():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None  # unknown torch internals: assume hooks, the safe path
