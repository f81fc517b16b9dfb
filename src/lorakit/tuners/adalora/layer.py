"""AdaLoRA's layer side (Zhang et al. 2023, arXiv 2303.10512, §3.1): the update in SVD form, as a variant.

An AdaLoRA adapter is a LoRA adapter whose rank-r update carries a third factor, the "singular values"
``E`` ``(r, 1)``::

    ΔW = s · B (A ⊙ E)        A = Q: (r, in),  E = Λ: (r, 1),  B = P: (out, r),  s = α / (r₀ + 1e-5)

where r₀ is the rank the adapter was created with (``init_r``): the scale stays fixed while triplets are
masked (λ_i = 0) or removed, so cutting a triplet never rescales the others (PEFT's convention). Reducing
(A ⊙ E, B) to the plain (A, B) pair of :func:`~lorakit.tuners.lora.delta.lora_delta` lets merge, unmerge and
export reuse LoRA's code unchanged; this variant only adds E, folds it in, and can drop triplets for good
(:func:`truncate`). The schedule that decides which triplets to keep lives in :mod:`lorakit.tuners.adalora.model`.

Files use PEFT's AdaLoRA keys, ``<module>.lora_A`` / ``lora_B`` / ``lora_E`` (bare tensors, no ``.weight``).
Supported base layers, as in PEFT 0.21: the linear kinds (``nn.Linear``, transformers ``Conv1D``, bitsandbytes
4/8-bit) and ``nn.Conv2d`` with ``groups=1`` (PEFT's ``SVDConv2d``). On a convolution A is the flat matrix
``(r, in·kh·kw)`` and B ``(out, r)`` (PEFT's shapes), and the update is the convolution of the input with
ΔW reshaped to the kernel ``(out, in, kh, kw)``. ``nn.Conv1d``/``Conv3d`` and grouped convolutions are refused
(PEFT refuses the former and cannot reshape ΔW for the latter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import UnsupportedModuleError
from lorakit.tuners.lora.layer import VARIANTS
from lorakit.tuners.lora.variant import LoraVariant

if TYPE_CHECKING:
    from lorakit.tuners.lora.layer import LoraLayer

#: Layer kinds whose adapter acts on the input's last dimension (x Aᵀ Bᵀ), where AdaLoRA applies.
SVD_KINDS = ("linear", "conv1d_hf", "linear4bit", "linear8bit")
#: Added to the rank in the scale's denominator, as PEFT does (its ``ranknum + 1e-5``).
RANK_EPS = 1e-5


def adalora_scaling(lora_alpha: float, r: int) -> float:
    """s = α / (r₀ + 1e-5) (AdaLoRA paper eq. 3 with PEFT's α; r₀ the initial rank)."""
    return lora_alpha / (r + RANK_EPS)


class AdaLoraVariant(LoraVariant):
    """``h = base(x) + s · B (A ⊙ E) dropout(x)``; A and B live where LoRA's do, E in ``layer.lora_E``."""

    name = "adalora"
    #: E (the singular values) and r₀ (the initial rank, frozen, never saved), PEFT's names.
    containers: ClassVar[dict[str, type[nn.Module]]] = {"lora_E": nn.ParameterDict, "ranknum": nn.ParameterDict}

    def attach(self, layer: LoraLayer, adapter: str) -> None:
        if layer.kind.name not in SVD_KINDS and not _svd_conv(layer):
            base = layer.base_layer
            grouped = f" with groups={base.groups}" if isinstance(base, nn.Conv2d) else ""
            raise UnsupportedModuleError(
                f"AdaLoRA adapts linear layers (nn.Linear, transformers Conv1D, bitsandbytes 4/8-bit) and nn.Conv2d "
                f"with groups=1, as PEFT does; not {type(base).__name__}{grouped}. Narrow target_modules to those"
            )
        if _svd_conv(layer):  # PEFT's SVDConv2d: flat A (r, in·kh·kw) and B (out, r), whatever LoRA's kind made
            _set_factors(layer, adapter, layer.r[adapter])
        a, b = layer.kind.factor_params(layer, adapter)
        r = layer.r[adapter]
        layer.scaling[adapter] = adalora_scaling(layer.lora_alpha[adapter], r)
        layer.lora_E[adapter] = nn.Parameter(torch.zeros(r, 1, dtype=a.dtype, device=a.device))
        # r₀ as PEFT keeps it: a frozen one-element parameter (so parameter counts match PEFT's); the scale above
        # already holds it, and truncation leaves it alone
        layer.ranknum[adapter] = nn.Parameter(torch.full((1,), float(r), device=a.device), requires_grad=False)

    def initialize(self, layer: LoraLayer, adapter: str, init: bool | str) -> None:
        """PEFT's start: E = 0 (ΔW = 0) and A, B ~ N(0, 0.02²); ``init=False`` draws all three from N(0, 1)."""
        a, b = layer.kind.factor_params(layer, adapter)
        e = layer.lora_E[adapter]
        with torch.no_grad():
            if init is False:
                for p in (a, b, e):
                    p.normal_()
            else:
                e.zero_()
                a.normal_(0.0, 0.02)
                b.normal_(0.0, 0.02)

    def extra_state(self, layer: LoraLayer, adapter: str) -> dict[str, nn.Parameter]:
        return {"lora_E": layer.lora_E[adapter]}

    def file_key(self, state_key: str) -> str:
        return state_key.removesuffix(".weight")  # PEFT's AdaLoRA stores bare tensors: lora_A, not lora_A.weight

    def param_key(self, layer: LoraLayer, adapter: str, file_key: str) -> str:
        if file_key == "lora_E":
            return f"lora_E.{adapter}"
        return f"{file_key}.{adapter}.weight"

    def factors(self, layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = layer.kind.factors(layer, adapter)
        return a * layer.lora_E[adapter], b

    def add_output(self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        x = layer.lora_dropout[adapter](x)
        if _svd_conv(layer):  # the input convolved with ΔW = s·B (A ⊙ E) in the kernel's shape (PEFT's SVDConv2d)
            delta = layer.delta_weight(adapter)
            update = layer.base_layer._conv_forward(x.to(delta.dtype), delta, None)
            return result + update.to(result.dtype)
        a, b = self.factors(layer, adapter)  # (r, in), (out, r)
        update = F.linear(F.linear(x.to(a.dtype), a), b)
        return torch.add(result, update.to(result.dtype), alpha=layer.scaling[adapter])

    def fast_forward(self, layer: LoraLayer, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        return None


@torch.no_grad()
def truncate(layer: LoraLayer, adapter: str, keep: torch.Tensor) -> None:
    """Keep only the triplets ``keep`` (a bool ``(r,)`` mask) of an AdaLoRA adapter: A, E and B shrink to the
    kept rank for good (parameters are replaced, so an optimizer holding the old ones must be rebuilt).
    The scale s = α/(r₀ + 1e-5) is unchanged, so the layer's output is exactly that of the masked adapter."""
    keep = keep.to(torch.bool).view(-1)
    a, b = layer.kind.factor_params(layer, adapter)
    e = layer.lora_E[adapter]
    if keep.numel() != e.shape[0]:
        raise ValueError(f"mask of {keep.numel()} triplets for an adapter of rank {e.shape[0]}")
    idx = keep.nonzero().view(-1).to(a.device)
    _set_factors(layer, adapter, int(idx.numel()))
    fresh_a, fresh_b = layer.kind.factor_params(layer, adapter)
    fresh_a.copy_(a.index_select(0, idx))
    fresh_b.copy_(b.index_select(1, idx))
    layer.lora_E[adapter] = nn.Parameter(e.index_select(0, idx).clone(), requires_grad=e.requires_grad)
    fresh_a.requires_grad_(a.requires_grad)
    fresh_b.requires_grad_(b.requires_grad)
    layer.r[adapter] = int(idx.numel())
    layer.adapters_stamp += 1


def _svd_conv(layer: LoraLayer) -> bool:
    """Whether ``layer`` is a convolution AdaLoRA adapts (``nn.Conv2d``, groups=1: PEFT's ``SVDConv2d``)."""
    base = layer.base_layer
    return layer.kind.name == "conv" and type(base) is nn.Conv2d and base.groups == 1


def _set_factors(layer: LoraLayer, adapter: str, r: int) -> None:
    """New A and B factor modules of rank ``r`` for ``adapter`` (values to be written by the caller), on the old
    ones' device and dtype: the kind's own, or for a convolution the flat ``Linear(in·kh·kw, r)`` and
    ``Linear(r, out)`` whose weights are PEFT's ``(r, in·kh·kw)`` and ``(out, r)``."""
    a, b = layer.kind.factor_params(layer, adapter)
    if _svd_conv(layer):
        fan_in = layer.base_layer.weight[0].numel()
        new_a, new_b = nn.Linear(fan_in, r, bias=False), nn.Linear(r, layer.out_features, bias=False)
    else:
        new_a, new_b = layer.kind.create(layer, adapter, r)
    a_name, b_name = layer.kind.containers
    getattr(layer, a_name)[adapter] = new_a.to(device=a.device, dtype=a.dtype)
    getattr(layer, b_name)[adapter] = new_b.to(device=b.device, dtype=b.dtype)


VARIANTS["adalora"] = AdaLoraVariant()  # LoRA's layer runs AdaLoRA adapters through this variant
