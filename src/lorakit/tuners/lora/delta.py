"""The low-rank update itself: the one place ΔW and the scaling factor are computed.

Every adapter layer, whatever its base type, reduces its factors to two matrices ``A: (r, k)`` and
``B: (d, r)`` and calls :func:`lora_delta`; merge, unmerge and export all go through it.
"""

from __future__ import annotations

import math

import torch


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor s applied to BA.

    LoRA paper §4.1: s = α/r, so that changing r needs no retuning of the learning rate when α is fixed.
    rsLoRA (arXiv 2312.03732, Theorem 3.2): s = α/√r keeps the update's scale stable as r grows.
    """
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def lora_delta(lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """ΔW = s · B A (LoRA paper §4.1, eq. 3).

    Args:
        lora_B: ``(d, r)``, the up-projection.
        lora_A: ``(r, k)``, the down-projection.
        scaling: s, from :func:`lora_scaling` (a 0-d tensor on a layer prepared for compiled hot-swapping).

    Returns:
        ``(d, k)`` tensor in the factors' dtype. Callers reshape it into their base weight's layout.
    """
    return (lora_B @ lora_A) * scaling


def add_lora_delta(
    weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float | torch.Tensor
) -> torch.Tensor:
    """``weight + s · B A``: :func:`lora_delta` added to a weight in one fused multiply-add (``addmm``, or
    ``baddbmm`` for a stack), so no separate ΔW the size of the weight is made: a whole stack of MoE experts.

    Args:
        weight: ``(d, k)``, or ``(E, d, k)`` for E matrices at once (one per expert).
        lora_B: ``(d, r)`` / ``(E, d, r)``, in ``weight``'s dtype.
        lora_A: ``(r, k)`` / ``(E, r, k)``, in ``weight``'s dtype.
        scaling: s (a 0-d tensor on a layer prepared for compiled hot-swapping).

    Returns:
        A new tensor shaped as ``weight`` (``weight`` is not changed).
    """
    if isinstance(scaling, torch.Tensor):  # ``alpha=`` takes numbers only
        lora_B, scaling = lora_B * scaling.to(lora_B.dtype), 1.0
    fused = torch.baddbmm if weight.dim() == 3 else torch.addmm
    return fused(weight, lora_B, lora_A, alpha=scaling)
