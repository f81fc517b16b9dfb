"""LoRA and DoRA on bitsandbytes' quantized linears: ``Linear4bit`` (NF4/FP4, QLoRA) and ``Linear8bitLt``.

The adapter layer wraps a quantized linear exactly as it wraps ``nn.Linear``; only what "the weight" means
changes, and that is this module's kinds. The forward is the quantized layer's own (bitsandbytes multiplies
in its compute dtype) plus ``s · B A x`` in the adapter's dtype (QLoRA paper §3, eq. 5).

* Merging into a quantized weight would requantize it, a lossy step; :meth:`LoraLayer.merge` refuses, and
  ``merge_and_unload()`` first turns the layer into a plain ``nn.Linear`` holding the dequantized weight
  (:meth:`QuantizedLinearKind.dequantize`), then merges exactly.
* DoRA needs ``A Wᵀ``: it comes from the layer's own forward on the rows of A (no dequantized copy of W
  kept by lorakit); ‖W_i‖² comes from one dequantization, cached while the weight is unchanged.
* A 4-bit weight has two layouts. bitsandbytes (>= 0.49) on a CPU with AVX512-BF16 (Intel AMX Xeons, AMD
  Zen 4) repacks a ``Linear4bit`` at its first no-grad eval forward for its CPU kernel. Every lorakit reader
  of 4-bit bytes (dequantize, merge, LoftQ, DoRA's norms, saving) goes through :func:`reference_4bit`, which
  reads both; :func:`guard_cpu_repacking` lets the repacking happen only where it suits the layer and makes
  saving exact.

bitsandbytes is imported only when one of its layers is met (it is an optional dependency). Layers are
recognised by class name and module so that ``import lorakit`` never imports bitsandbytes.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from lorakit.layers.kinds import LinearKind, register_kind


def is_bnb_layer(module: nn.Module, class_name: str) -> bool:
    """Whether ``module`` is (a subclass of) bitsandbytes' ``class_name``, without importing bitsandbytes.

    A bitsandbytes layer exists only once bitsandbytes has been imported, so until then the answer is no at
    once (layer kinds ask this of every module of a model).
    """
    if "bitsandbytes" not in sys.modules:
        return False
    return any(c.__name__ == class_name and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


# -- the two layouts of a 4-bit weight ----------------------------------------------------------------
#
# bitsandbytes' reference layout (what quantize_4bit returns, what checkpoints hold): ``data`` packs two 4-bit
# codes per byte in row-major order of the (out, in) weight, ``quant_state.absmax`` holds one scale per block
# of ``blocksize`` consecutive weights (fp32, or 8-bit codes of them with double quantization).
#
# bitsandbytes' CPU layout: on a CPU with AVX512-BF16, Linear4bit.forward (eval mode, input without grad)
# calls ``functional._convert_weight_packed_for_cpu`` once and keeps the result: ``data`` becomes
# ``(out, in/2)`` with the nibbles reordered into tiles of 32 rows, double-quantized scales are expanded,
# rounded to bf16 and transposed to ``(in/blocksize, out)``, ``quant_state.dtype`` becomes bf16 and
# ``quant_state.packing_format_for_cpu`` is set. ``dequantize_4bit`` on those bytes returns garbage (no error).


def is_cpu_packed(state: Any) -> bool:
    """Whether a 4-bit ``QuantState`` describes bitsandbytes' CPU layout (see the comment above)."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def reference_4bit(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """A 4-bit weight in bitsandbytes' reference layout, whichever layout it is stored in; nothing is modified.

    Args:
        data: the packed codes, ``(out·in/2, 1)`` in the reference layout or ``(out, in/2)`` in the CPU layout.
        state: its ``QuantState``.

    Returns:
        ``(data, state)`` themselves for the reference layout. For the CPU layout, new ones: the codes in
        reference order (exactly the bytes before the repacking) and a single-quantized state whose fp32
        absmax holds the block scales the repacking kept (the bf16 roundings of the original scales), so that
        ``dequantize_4bit`` gives exactly the weight the CPU kernel multiplies by. The scales are not quantized
        again (bitsandbytes' own inverse does, which changes the weight once more, and it leaves single-quantized
        scales transposed).
    """
    if not is_cpu_packed(state):
        return data, state
    import bitsandbytes.functional as bnbf

    scratch = copy.copy(state)  # bitsandbytes' inverse writes into the state it is given
    scratch.original_nested = False  # only its reordering of the codes is used here
    codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(data, scratch)
    out_features, in_features = state.shape
    absmax = state.absmax.t().reshape(out_features * in_features // state.blocksize)  # (in/bs, out) -> blocks
    reference = bnbf.QuantState(
        absmax=absmax.to(torch.float32),
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.original_dtype,
    )
    return codes, reference


def dequantize_4bit_weight(base: nn.Module) -> torch.Tensor:
    """``(out, in)``: a ``Linear4bit``'s weight as bitsandbytes dequantizes it, in either layout (a new tensor,
    in the dtype the layer was quantized from)."""
    import bitsandbytes.functional as bnbf

    w = base.weight
    state = w.quant_state if w.quant_state is not None else base.quant_state
    return bnbf.dequantize_4bit(*reference_4bit(w.data, state))


def restore_reference_layout(base: nn.Module) -> None:
    """Put a ``Linear4bit``'s weight back into the reference layout, in place (nothing to do if it is there).

    The weight is unchanged (see :func:`reference_4bit`); bitsandbytes repacks it at the next eval forward
    if the layer still allows it.
    """
    w = base.weight
    if is_cpu_packed(w.quant_state):
        w.data, w.quant_state = reference_4bit(w.data, w.quant_state)
        base.quant_state = w.quant_state


def cpu_repacking_fits(base: nn.Module) -> bool:
    """Whether bitsandbytes' CPU repacking suits this ``Linear4bit``.

    * Its kernel computes in bf16 (inputs, scales, outputs), so the layer's compute dtype must be bf16:
      otherwise an eval forward would silently compute in less precision than the layer was given (and than
      its training forward and a merged model do).
    * Its tiles are 32 rows and it reshapes the scales to ``(out, in/blocksize)``, so ``out`` must be a multiple
      of 32 and ``in`` of the block size (a 32-wide input fails with ``shape '[32, 0]' is invalid``).
    """
    state = base.weight.quant_state
    blocksize = state.blocksize if state is not None else getattr(base.weight, "blocksize", 64)
    return base.compute_dtype == torch.bfloat16 and base.out_features % 32 == 0 and base.in_features % blocksize == 0


def guard_cpu_repacking(base: nn.Module, allow: bool = True) -> None:
    """Make bitsandbytes' CPU repacking of a ``Linear4bit`` safe for lorakit (idempotent).

    bitsandbytes decides per layer (``support_avx512bf16_for_cpu``, from the CPU) whether an eval forward
    repacks the weight. This turns that off where the repacking does not suit the layer
    (:func:`cpu_repacking_fits`), or everywhere with ``allow=False``, putting an already repacked weight back
    in the reference layout; and it makes the layer's ``state_dict`` (hence ``save_pretrained``) see the
    reference layout holding exactly the weight the layer computes with, instead of letting bitsandbytes'
    own inverse quantize the scales again (see :func:`reference_4bit`).
    """
    if not (allow and cpu_repacking_fits(base)):
        base.support_avx512bf16_for_cpu = False
        restore_reference_layout(base)
    if _save_in_reference_layout not in base._state_dict_pre_hooks.values():
        base.register_state_dict_pre_hook(_save_in_reference_layout)
    if _reference_layout_under_grad not in base._forward_pre_hooks.values():
        base.register_forward_pre_hook(_reference_layout_under_grad)


def guard_model_repacking(model: nn.Module) -> None:
    """:func:`guard_cpu_repacking` on every ``Linear4bit`` of ``model``, wrapped by lorakit or not (a model
    transformers loaded in 4 bits has many frozen ones that gradients must still flow through)."""
    for module in model.modules():
        if is_bnb_layer(module, "Linear4bit"):
            guard_cpu_repacking(module)


def _reference_layout_under_grad(module: nn.Module, args: Any) -> None:
    # The packed CPU kernel has no backward: a forward that records gradients (training, even through a frozen
    # layer, for the adapters before it) must run the reference kernel. A check of one flag when nothing is packed.
    if torch.is_grad_enabled():
        restore_reference_layout(module)


def _save_in_reference_layout(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    # Runs before Linear4bit._save_to_state_dict, which would otherwise undo the CPU layout itself.
    restore_reference_layout(module)


class QuantizedLinearKind(LinearKind):
    """Shared geometry of bitsandbytes linears: ``(out, in)`` weights stored quantized, inputs like nn.Linear."""

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
        return dequantize_4bit_weight(base).to(self.compute_dtype(base))


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
