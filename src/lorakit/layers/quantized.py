"""LoRA and DoRA on bitsandbytes' quantized linears: ``Linear4bit`` (NF4/FP4, QLoRA) and ``Linear8bitLt``.

The adapter layer wraps a quantized linear exactly as it wraps ``nn.Linear``; only what "the weight" means
changes, and that is this module's kinds. The forward is the quantized layer's own (bitsandbytes multiplies
in its compute dtype) plus ``s · B A x`` in the adapter's dtype (QLoRA paper §3, eq. 5).

* Merging into a quantized weight would requantize it, a lossy step; :meth:`LoraLayer.merge` refuses, and
  ``merge_and_unload()`` first turns the layer into a plain ``nn.Linear`` holding the dequantized weight
  (:meth:`QuantizedLinearKind.dequantize`), then merges exactly.
* DoRA needs ``A Wᵀ``: it comes from the layer's own forward on the rows of A (no dequantized copy of W
  kept by lorakit); ‖W_i‖² comes from one dequantization, cached while the weight is unchanged.

bitsandbytes is imported only when one of its layers is met (it is an optional dependency). Layers are
recognised by class name and module so that ``import lorakit`` never imports bitsandbytes.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.layers.kinds import LinearKind, register_kind


def is_bnb_layer(module: nn.Module, class_name: str) -> bool:
    """Whether ``module`` is (a subclass of) bitsandbytes' ``class_name``, without importing bitsandbytes."""
    return any(c.__name__ == class_name and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


class QuantizedLinearKind(LinearKind):
    """Shared geometry of bitsandbytes linears: ``(out, in)`` weights stored quantized, inputs like nn.Linear."""

    has_fused_forward = False  # their forward is their own (dequantize + matmul)
    quantized = True

    def features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    def dequantized_weight(self, base: nn.Module) -> torch.Tensor:
        """The weight ``(out, in)`` as bitsandbytes reconstructs it, in its compute dtype (a new tensor)."""
        raise NotImplementedError

    def weight_matrix(self, base: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.dequantized_weight(base) if weight is None else weight

    def project_rows(self, base: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """``A Wᵀ`` through the quantized layer's own forward on the r rows of A, minus its bias."""
        out = base(a.to(self.compute_dtype(base)))
        return out - base.bias if base.bias is not None else out

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        return torch.float32

    def dequantize(self, base: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (in ``dtype``, default the compute dtype)."""
        weight = self.dequantized_weight(base)
        dtype = dtype or weight.dtype
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        return linear


class Linear4bitKind(QuantizedLinearKind):
    """``bitsandbytes.nn.Linear4bit``: NF4 or FP4 blocks of 64 (QLoRA), absmax optionally quantized again."""

    name = "linear4bit"

    def matches(self, module: nn.Module) -> bool:
        return is_bnb_layer(module, "Linear4bit")

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        return base.compute_dtype or torch.float32

    def dequantized_weight(self, base: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        w = base.weight
        return bnbf.dequantize_4bit(w.data, w.quant_state).to(self.compute_dtype(base))


class Linear8bitKind(QuantizedLinearKind):
    """``bitsandbytes.nn.Linear8bitLt``: int8 rows with one absmax scale per row (LLM.int8())."""

    name = "linear8bit"

    def matches(self, module: nn.Module) -> bool:
        return is_bnb_layer(module, "Linear8bitLt")

    def dequantized_weight(self, base: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        w = base.weight
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = base.state.SCB
        return bnbf.int8_vectorwise_dequant(w.data, scb).to(torch.float32)


# Linear4bit and Linear8bitLt subclass nn.Linear: they must be matched before LinearKind.
register_kind(Linear8bitKind())
register_kind(Linear4bitKind())
