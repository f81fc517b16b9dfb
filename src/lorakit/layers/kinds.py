"""How LoRA attaches to each kind of base layer.

A *kind* is a stateless strategy that knows one base layer type's geometry: how many features go in and
out, which factor modules to create, how the factors flatten to the matrices of :func:`lora_delta`, how ΔW
maps back onto the base weight's layout, and how the adapter's output is added in the forward pass.
:class:`~lorakit.tuners.lora.layer.LoraLayer` holds a kind and never branches on the base type itself.

Layouts (PyTorch conventions):

=====================  ===========================  =====================  ========================
base layer             base weight                  lora A                 lora B
=====================  ===========================  =====================  ========================
``nn.Linear``          ``(out, in)``                ``Linear(in, r)``      ``Linear(r, out)``
transformers Conv1D    ``(in, out)`` (fan-in first)  ``Linear(in, r)``      ``Linear(r, out)``
``nn.Embedding``       ``(num, dim)``               ``Parameter(r, num)``  ``Parameter(dim, r)``
``nn.ConvNd``          ``(out, in, *kernel)``       ``ConvNd(in, r, k)``   ``ConvNd(r, out, 1)``
=====================  ===========================  =====================  ========================
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import UnsupportedModuleError
from lorakit.tuners.lora.fused import DoraLinearFunction, LoraLinearFunction

if TYPE_CHECKING:
    from lorakit.tuners.lora.layer import LoraLayer

try:  # transformers is a dependency, but keep the layers importable without it
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover
    HFConv1D = None


def _add_scaled(result: torch.Tensor, update: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result + scaling * update``, cast to ``result``'s dtype."""
    if update.dtype != result.dtype:
        update = update.to(result.dtype)
    return torch.add(result, update, alpha=scaling)


class LayerKind:
    """Strategy interface; see the module docstring for the layouts."""

    name = "abstract"
    #: Names of the ``ModuleDict``/``ParameterDict`` attributes that hold this kind's A and B factors.
    containers: tuple[str, str] = ("lora_A", "lora_B")
    #: Whether the adapter's dropout applies to this kind's input (not to an embedding's token ids).
    drops_input = True
    #: Whether :meth:`fused_forward` can ever return a result (so callers skip preparing its inputs).
    has_fused_forward = False
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

    def create(self, layer: LoraLayer, adapter: str, r: int) -> tuple[nn.Module | nn.Parameter, ...]:
        """New ``(A, B)`` factor holders for one adapter (not yet registered)."""
        raise NotImplementedError

    def init_factors(self, layer: LoraLayer, adapter: str, mode: bool | str) -> None:
        """Initialise A and B: ``True`` Kaiming-uniform A and zero B, ``"gaussian"`` N(0, 1/r) A and zero B."""
        a, b = self.factor_params(layer, adapter)
        if mode is False:
            return
        if mode == "gaussian":
            nn.init.normal_(a, std=1.0 / layer.r[adapter])
        else:  # the same draw nn.Linear uses for its own weight
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)

    def factor_params(self, layer: LoraLayer, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
        a_name, b_name = self.containers
        return getattr(layer, a_name)[adapter].weight, getattr(layer, b_name)[adapter].weight

    def factors(self, layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` flattened to ``(r, k)`` and ``(d, r)`` for :func:`lora_delta`."""
        a, b = self.factor_params(layer, adapter)
        return a, b

    def to_weight_layout(self, delta: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Map the ``(d, k)`` ΔW onto the base weight's shape."""
        return delta

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

    def channel_shape(self, layer: LoraLayer) -> tuple[int, ...]:
        """Shape of a per-output-feature vector that broadcasts against the layer's output."""
        return (layer.out_features,)

    def bias(self, base: nn.Module) -> torch.Tensor | None:
        """The base layer's bias (added after the weight), or None."""
        return getattr(base, "bias", None)

    def add_output(
        self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor, dropout: bool = True
    ) -> torch.Tensor:
        """``result + s · B A dropout(x)`` for one adapter (``dropout=False``: ``x`` is already dropped)."""
        raise NotImplementedError

    def fused_forward(
        self, layer: LoraLayer, adapter: str, x: torch.Tensor, scale: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``base(x) + s · B A x`` in one fused kernel when that is exactly equivalent, else ``None``.

        With ``scale`` (DoRA's ``m / ‖V‖``, per output feature): ``scale ⊙ (W x + s·B A x) + bias``.
        """
        return None


class LinearKind(LayerKind):
    """``nn.Linear``: y = x Wᵀ + b with W ``(out, in)``."""

    name = "linear"
    has_fused_forward = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    def create(self, layer: LoraLayer, adapter: str, r: int) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(layer.in_features, r, bias=False), nn.Linear(r, layer.out_features, bias=False)

    def add_output(
        self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor, dropout: bool = True
    ) -> torch.Tensor:
        a = layer.lora_A[adapter].weight  # (r, in)
        b = layer.lora_B[adapter].weight  # (out, r)
        if dropout:
            x = layer.lora_dropout[adapter](x)
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        h = F.linear(x, a)  # (..., r)
        scaling = layer.scaling[adapter]
        if result.dtype == h.dtype and result.dim() >= 2:
            # One GEMM that also does the scale and the add: result + s·(h Bᵀ), no (..., out) temporaries.
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling)
            return out.view(result.shape)
        return _add_scaled(result, F.linear(h, b), scaling)

    def fused_forward(
        self, layer: LoraLayer, adapter: str, x: torch.Tensor, scale: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """One fused computation of ``base(x) + s·B A x`` (DoRA: rescaled by ``scale`` before the bias), taken
        only where it equals the generic path.

        With gradients needed: the autograd kernels of :mod:`lorakit.tuners.lora.fused`. Without (inference, or
        nothing requires grad): the base GEMM, then the rank-r update and the rescale applied in place.
        """
        base = layer.base_layer
        if type(base) is not nn.Linear or x.dim() < 2:
            return None  # subclasses (quantized linears) have their own forward
        if base._forward_hooks or base._forward_pre_hooks or _global_hooks_set():
            return None
        dropout = layer.lora_dropout[adapter]
        if dropout.training and not isinstance(dropout, nn.Identity) and dropout.p > 0:
            return None
        a = layer.lora_A[adapter].weight
        b = layer.lora_B[adapter].weight
        w = base.weight
        if not (x.dtype == w.dtype == a.dtype == b.dtype) or torch.is_autocast_enabled(x.device.type):
            return None
        if scale is not None and scale.dtype != x.dtype:
            return None
        bias, s = base.bias, layer.scaling[adapter]
        tensors = [t for t in (x, w, a, b, bias, scale) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            if scale is None:
                return LoraLinearFunction.apply(x, w, bias, a, b, s)
            return DoraLinearFunction.apply(x, w, bias, a, b, s, scale)
        y = F.linear(x, w, bias if scale is None else None)  # (..., out), a fresh tensor: safe to update in place
        h = F.linear(x, a)  # (..., r)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.t(), alpha=s)
        if scale is not None:
            y.mul_(scale)
            if bias is not None:
                y.add_(bias)
        return y


def _global_hooks_set() -> bool:
    """Whether ``nn.modules.module.register_module_forward_(pre_)hook`` hooks exist (they must see the base)."""
    mod = nn.modules.module
    return bool(getattr(mod, "_global_forward_hooks", None) or getattr(mod, "_global_forward_pre_hooks", None))


class HFConv1DKind(LinearKind):
    """transformers' ``Conv1D`` (GPT-2 and relatives): y = x W + b with W stored ``(in, out)``."""

    name = "conv1d_hf"
    has_fused_forward = False

    def matches(self, module: nn.Module) -> bool:
        return HFConv1D is not None and isinstance(module, HFConv1D)

    def features(self, base: nn.Module) -> tuple[int, int]:
        return base.weight.shape[0], base.weight.shape[1]

    def to_weight_layout(self, delta: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return delta.t()

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
    containers = ("lora_embedding_A", "lora_embedding_B")
    drops_input = False

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def features(self, base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim

    def create(self, layer: LoraLayer, adapter: str, r: int) -> tuple[nn.Parameter, nn.Parameter]:
        return nn.Parameter(torch.randn(r, layer.in_features)), nn.Parameter(torch.randn(layer.out_features, r))

    def factor_params(self, layer: LoraLayer, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]

    def init_factors(self, layer: LoraLayer, adapter: str, mode: bool | str) -> None:
        if mode is False:
            return
        a, b = self.factor_params(layer, adapter)
        nn.init.zeros_(a)
        nn.init.normal_(b)

    def to_weight_layout(self, delta: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return delta.t()

    def weight_matrix(self, base: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        # (dim, num): DoRA's magnitude is per embedding dimension, as in PEFT
        return (base.weight if weight is None else weight).t()

    def row_shape(self, base: nn.Module) -> tuple[int, ...]:
        return (1, -1)

    def bias(self, base: nn.Module) -> torch.Tensor | None:
        return None

    def add_output(
        self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor, dropout: bool = True
    ) -> torch.Tensor:
        a, b = self.factor_params(layer, adapter)
        base = layer.base_layer
        h = F.embedding(x, a.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return _add_scaled(result, h @ b.t(), layer.scaling[adapter])


class ConvKind(LayerKind):
    """``nn.Conv1d/2d/3d``: A is a convolution with the base's kernel into r channels, B a 1×…×1 one."""

    name = "conv"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def features(self, base: nn.Module) -> tuple[int, int]:
        if base.groups != 1:
            raise UnsupportedModuleError(
                f"LoRA on a grouped convolution (groups={base.groups}) is not supported; "
                "accepted: convolutions with groups=1"
            )
        return base.in_channels, base.out_channels

    def create(self, layer: LoraLayer, adapter: str, r: int) -> tuple[nn.Module, nn.Module]:
        base = layer.base_layer
        conv = type(base)
        a = conv(
            layer.in_features,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
        )
        b = conv(r, layer.out_features, 1, 1, bias=False)
        return a, b

    def factors(self, layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factor_params(layer, adapter)
        return a.flatten(1), b.flatten(1)  # (r, in·k…), (out, r): B's kernel is 1×…×1

    def to_weight_layout(self, delta: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return delta.view(base.weight.shape)

    def weight_matrix(self, base: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        return (base.weight if weight is None else weight).flatten(1)  # (out, in·k…)

    def row_shape(self, base: nn.Module) -> tuple[int, ...]:
        return (-1,) + (1,) * (base.weight.dim() - 1)

    def channel_shape(self, layer: LoraLayer) -> tuple[int, ...]:
        # (1, out, 1, …): the layout of PEFT's DoRA magnitude for convolutions, channels on dim 1
        return (1, layer.out_features) + (1,) * (layer.base_layer.weight.dim() - 2)

    def add_output(
        self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor, dropout: bool = True
    ) -> torch.Tensor:
        a = layer.lora_A[adapter]
        if dropout:
            x = layer.lora_dropout[adapter](x)
        if x.dtype != a.weight.dtype:
            x = x.to(a.weight.dtype)
        return _add_scaled(result, layer.lora_B[adapter](a(x)), layer.scaling[adapter])


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
