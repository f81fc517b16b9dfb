"""The geometry of each kind of base layer, for any method.

A *kind* is a stateless strategy that knows one base layer type: how many features go in and out, which
tensor a merge writes into, how that weight reads as the ``(out, in)`` matrix M a method's update is added to,
how a per-output-feature vector broadcasts against it, its bias. A method's layer holds a kind and never
branches on the base type itself; what a method builds on a kind (LoRA's factors, its fused kernels) lives in
the method's room (:mod:`lorakit.tuners.lora.kinds`).

=====================  ===========================  ==============================
base layer             base weight                  M (the (out, in) view)
=====================  ===========================  ==============================
``nn.Linear``          ``(out, in)``                the weight
transformers Conv1D    ``(in, out)`` (fan-in first)  its transpose
``nn.Embedding``       ``(num, dim)``               its transpose ``(dim, num)``
``nn.ConvNd``          ``(out, in, *kernel)``       flattened ``(out, in·k…)``
=====================  ===========================  ==============================
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import UnsupportedModuleError

try:  # transformers is a dependency, but keep the layers importable without it
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover
    HFConv1D = None


class LayerKind:
    """Strategy interface; see the module docstring for the layouts."""

    name = "abstract"
    #: Whether the base weight is stored quantized (merging into it would requantize; see layers/quantized.py).
    quantized = False

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def features(self, base: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the base layer."""
        raise NotImplementedError

    def base_weight(self, base: nn.Module) -> torch.Tensor:
        """The parameter a merge writes into."""
        return base.weight

    def weight_matrix(self, base: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The base weight (or ``weight``, a tensor in its layout) as the ``(d, k)`` matrix M that ΔW is added
        to: a view, never a copy."""
        return self.base_weight(base) if weight is None else weight

    def project_rows(self, base: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """``A Mᵀ``, ``(r, d)``, for A ``(r, k)``: r×k×d multiply-adds, no ``(d, k)`` temporary.

        Computed in the base weight's dtype. A kind whose weight is not a plain tensor (a quantized layer)
        overrides this with its own forward on the rows of A.
        """
        m = self.weight_matrix(base)
        return a.to(m.dtype) @ m.t()

    def row_sq_norms(self, base: nn.Module, dtype: torch.dtype, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``(d,)``: ‖M_i‖² per row of M (of ``weight`` if given), accumulated in ``dtype`` (a reduction, no
        ``(d, k)`` temporary)."""
        return torch.linalg.vector_norm(self.weight_matrix(base, weight), dim=1, dtype=dtype).square()

    def row_shape(self, base: nn.Module) -> tuple[int, ...]:
        """Shape that makes a ``(d,)`` vector scale the rows of M in the base weight's own layout."""
        return (-1, 1)

    def column_shape(self, base: nn.Module) -> tuple[int, ...]:
        """Shape that makes a ``(k,)`` vector (one value per input feature) scale the base weight's input axis in
        its own layout: the output and input axes of :meth:`row_shape` swapped."""
        shape = self.row_shape(base)
        return (shape[1], shape[0], *shape[2:])

    def bias(self, base: nn.Module) -> torch.Tensor | None:
        """The base layer's bias (added after the weight), or None."""
        return getattr(base, "bias", None)


class LinearKind(LayerKind):
    """``nn.Linear``: y = x Wᵀ + b with W ``(out, in)``."""

    name = "linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features


class HFConv1DKind(LinearKind):
    """transformers' ``Conv1D`` (GPT-2 and relatives): y = x W + b with W stored ``(in, out)``."""

    name = "conv1d_hf"

    def matches(self, module: nn.Module) -> bool:
        return HFConv1D is not None and isinstance(module, HFConv1D)

    def features(self, base: nn.Module) -> tuple[int, int]:
        return base.weight.shape[0], base.weight.shape[1]

    def weight_matrix(self, base: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        return (base.weight if weight is None else weight).t()

    def row_shape(self, base: nn.Module) -> tuple[int, ...]:
        return (1, -1)


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: a lookup of rows of W ``(num, dim)``; ΔW = (s·B A)ᵀ with A ``(r, num)``.

    As in PEFT, A starts at zero and B normal (a lookup in a zero A gives a zero update) and dropout is not
    applied to token ids.
    """

    name = "embedding"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def features(self, base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim

    def weight_matrix(self, base: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        # (dim, num): DoRA's magnitude is per embedding dimension, as in PEFT
        return (base.weight if weight is None else weight).t()

    def row_shape(self, base: nn.Module) -> tuple[int, ...]:
        return (1, -1)

    def bias(self, base: nn.Module) -> torch.Tensor | None:
        return None


class ConvKind(LayerKind):
    """``nn.Conv1d/2d/3d``: A is a convolution with the base's kernel into r channels, B a 1×…×1 one."""

    name = "conv"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def features(self, base: nn.Module) -> tuple[int, int]:
        if base.groups != 1:
            raise UnsupportedModuleError(
                f"an adapter on a grouped convolution (groups={base.groups}) is not supported; "
                "accepted: convolutions with groups=1"
            )
        return base.in_channels, base.out_channels

    def weight_matrix(self, base: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        return (base.weight if weight is None else weight).flatten(1)  # (out, in·k…)

    def row_shape(self, base: nn.Module) -> tuple[int, ...]:
        return (-1,) + (1,) * (base.weight.dim() - 1)


#: Ordered dispatch: the first kind whose ``matches`` accepts a module wraps it. Subclass-specific kinds
#: (quantized layers, say) go before the generic ones.
KINDS: list[LayerKind] = [HFConv1DKind(), LinearKind(), EmbeddingKind(), ConvKind()]


def register_kind(kind: LayerKind) -> None:
    """Add a kind ahead of the generic ones (for subclasses of the types they handle, e.g. quantized linears)."""
    if not any(type(k) is type(kind) for k in KINDS):
        KINDS.insert(0, kind)


def kind_for(module: nn.Module) -> LayerKind | None:
    """The first registered kind that handles ``module``'s type, or None."""
    for kind in KINDS:
        if kind.matches(module):
            return kind
    return None


def supported_type_names() -> str:
    return (
        "torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d/2d/3d, transformers.pytorch_utils.Conv1D, "
        "bitsandbytes.nn.Linear4bit/Linear8bitLt"
    )
