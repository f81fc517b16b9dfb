"""LoftQ initialisation (Li et al. 2023, arXiv 2310.08659, Algorithm 1): Q and B, A with Q + s·BA ≈ W.

Plain QLoRA starts from the quantized weight Q = q(W) with ΔW = 0, so training begins at a model that
already lost what quantization took. LoftQ picks the adapter's start to give that back::

    Q_t      = q(W − s·B_{t−1} A_{t−1})          (B_0 A_0 = 0)
    s·B_t A_t = SVD_r(W − Q_t)                    (the best rank-r approximation of the residual)

for ``loftq_iter`` steps. The layer's weight becomes Q (stored in full precision until the model is
quantized with :func:`lorakit.quantize`, which then reproduces Q), and ‖W − (Q + s·BA)‖ < ‖W − Q‖.
Only the NF4 4-bit code is offered (what QLoRA trains on), through bitsandbytes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from lorakit.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from lorakit.tuners.lora.layer import LoraLayer


def nf4_round_trip(weight: torch.Tensor, double_quant: bool = True) -> torch.Tensor:
    """``weight`` quantized to NF4 (blocks of 64, as ``lorakit.quantize`` does) and dequantized, in float32."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:
        raise MissingDependencyError("LoftQ needs bitsandbytes: pip install 'bitsandbytes>=0.49'") from exc
    packed, state = bnbf.quantize_4bit(
        weight.detach().float().contiguous(), blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )
    return bnbf.dequantize_4bit(packed, state).float()


def loftq_factors(
    weight: torch.Tensor, r: int, scaling: float, iters: int = 1, double_quant: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternating quantization and SVD for one weight matrix.

    Args:
        weight: W ``(d, k)``.
        r: the adapter's rank; scaling: s; iters: T, the number of alternations (the paper uses 1 to 5).

    Returns:
        ``(Q (d, k), A (r, k), B (d, r))`` in float32 with s·BA the rank-r SVD of W − Q (singular values split
        evenly between A and B).
    """
    w = weight.detach().float()
    low_rank = torch.zeros_like(w)
    for _ in range(iters):
        q = nf4_round_trip(w - low_rank, double_quant)
        a, b = residual_factors(w - q, r, scaling)
        low_rank = scaling * (b @ a)
    return q, a, b


def residual_factors(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, k), B (d, r))`` with s·BA the best rank-r approximation of ``residual`` ``(d, k)`` (its truncated
    SVD, Eckart–Young), the singular values split evenly between A and B."""
    u, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
    root = sigma[:r].sqrt() / math.sqrt(scaling)
    return root[:, None] * vh[:r], u[:, :r] * root


def loftq_initialize(layer: LoraLayer, adapter: str, loftq_bits: int = 4, loftq_iter: int = 1) -> dict[str, float]:
    """Write Q into the layer's base weight and LoftQ's A, B into ``adapter``; returns the residual norms.

    Returns:
        ``{"quantization_error": ‖W − Q‖, "loftq_error": ‖W − (Q + s·BA)‖}`` (Frobenius) for this layer.

    Raises:
        ConfigError: ``loftq_bits`` other than 4, or a layer kind LoftQ does not handle (quantized already,
            embeddings, convolutions).
    """
    if loftq_bits != 4:
        raise ConfigError(f"loftq_bits={loftq_bits!r} is not supported; accepted: 4 (NF4, what QLoRA trains on)")
    if not isinstance(loftq_iter, int) or loftq_iter < 1:
        raise ConfigError(f"loftq_iter={loftq_iter!r} is invalid; accepted: a positive integer (1 to 5 is usual)")
    kind, base = layer.kind, layer.base_layer
    if kind.quantized or kind.name not in ("linear", "conv1d_hf"):
        raise ConfigError(
            f"LoftQ initialises full-precision linear layers, not {type(base).__name__}; "
            "apply it to the full-precision model, then quantize it with lorakit.quantize"
        )
    weight = kind.base_weight(base)
    w = kind.weight_matrix(base).detach().float()  # (d, k)
    s = layer.scaling[adapter]
    q, a, b = loftq_factors(w, layer.r[adapter], s, loftq_iter)
    a_param, b_param = kind.factor_params(layer, adapter)
    with torch.no_grad():
        weight.copy_(kind.to_weight_layout(q, base).to(weight.dtype))
        a_param.copy_(a.to(a_param.dtype))
        b_param.copy_(b.to(b_param.dtype))
    return {
        "quantization_error": torch.linalg.norm(w - q).item(),
        "loftq_error": torch.linalg.norm(w - q - s * (b @ a)).item(),
    }


def loftq_fit_quantized(layer: LoraLayer, adapter: str, weight: torch.Tensor) -> dict[str, float]:
    """LoftQ with one alternation on a layer whose base is quantized already: Q is the stored base, and A, B
    become the rank-r SVD of W − Q (what PEFT's ``replace_lora_weights_loftq`` does). The base is untouched,
    so the adapter stays valid on any base quantized the same way from the same W.

    Args:
        weight: the original full-precision W in the base layer's layout (``(out, in)`` for a linear).

    Returns:
        ``{"quantization_error": ‖W − Q‖, "loftq_error": ‖W − (Q + s·BA)‖}`` for this layer.

    Raises:
        ConfigError: the base is not quantized, or ``weight`` does not have its shape.
    """
    kind, base = layer.kind, layer.base_layer
    if not kind.quantized:
        raise ConfigError(
            f"{type(base).__name__} is not quantized; fit LoftQ on a 4-bit base (lorakit.quantize first), or use "
            "init_lora_weights='loftq' on the full-precision model"
        )
    q = kind.dequantized_weight(base).float()
    w = weight.detach().to(device=q.device, dtype=torch.float32)
    if w.shape != q.shape:
        raise ConfigError(f"the original weight has shape {tuple(w.shape)}; the quantized layer holds {tuple(q.shape)}")
    s = layer.scaling[adapter]
    a, b = residual_factors(w - q, layer.r[adapter], s)
    a_param, b_param = kind.factor_params(layer, adapter)
    with torch.no_grad():
        a_param.copy_(a.to(a_param.dtype))
        b_param.copy_(b.to(b_param.dtype))
    return {
        "quantization_error": torch.linalg.norm(w - q).item(),
        "loftq_error": torch.linalg.norm(w - q - s * (b @ a)).item(),
    }
