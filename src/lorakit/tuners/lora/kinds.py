"""How LoRA attaches to each kind of base layer: the factors it creates and how they enter the output.

The geometry of a base layer (features, which weight a merge writes, its ``(out, in)`` view M) is shared by
every method (:mod:`lorakit.layers.kinds`). This module adds LoRA's side per kind: which factor modules to
create, how they are initialised, how they flatten to the matrices of :func:`~lorakit.tuners.lora.delta.lora_delta`,
how ΔW maps back onto the base weight's layout, and how the adapter's output is added (and, for ``nn.Linear``,
fused with the base GEMM). :func:`lora_kind` combines the two for a layer.

=====================  =====================  ===============================
base layer             lora A                 lora B
=====================  =====================  ===============================
``nn.Linear``          ``Linear(in, r)``      ``Linear(r, out)``
transformers Conv1D    ``Linear(in, r)``      ``Linear(r, out)``
``nn.Embedding``       ``Parameter(r, num)``  ``Parameter(dim, r)``
``nn.ConvNd``          ``ConvNd(in, r, k)``   ``ConvNd(r, out, 1, groups=g)``
=====================  =====================  ===============================

``lora_bias=True`` (PEFT's option) gives B a bias b_B on the kinds whose B is a module (linear, Conv1D,
convolutions): the update becomes ``s·(B A x + b_B)`` and merging adds ``s·b_B`` to the base layer's bias.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError, MergeError, UnsupportedModuleError
from lorakit.layers.kinds import ConvKind, EmbeddingKind, HFConv1DKind, LayerKind, LinearKind
from lorakit.layers.quantized import QuantizedLinearKind, guard_cpu_repacking, is_bnb_layer
from lorakit.tuners.lora.fused import DoraLinearFunction, LoraLinearFunction

if TYPE_CHECKING:
    from lorakit.tuners.lora.layer import LoraLayer


def _add_scaled(result: torch.Tensor, update: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """``result + scaling * update``, cast to ``result``'s dtype."""
    if update.dtype != result.dtype:
        update = update.to(result.dtype)
    if isinstance(scaling, torch.Tensor):
        return result + update * scaling
    return torch.add(result, update, alpha=scaling)


def _fold_scaling(h: torch.Tensor, scaling: float | torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(h, s)``, or ``(s·h, 1)`` for a 0-d tensor s (``alpha=`` takes numbers only).

    A scaling is a tensor after :func:`~lorakit.tuners.lora.hotswap.prepare_model_for_compiled_hotswap`: a
    compiled graph reads its value instead of baking it in, so a swap that changes α or r does not recompile.
    ``h`` is the ``(..., r)`` rank-r activation, the cheapest place for the product.
    """
    if isinstance(scaling, torch.Tensor):
        return h * scaling, 1.0
    return h, scaling


class LoraOps:
    """LoRA's side of a kind (mixed into the geometry kind by :func:`lora_kind`)."""

    #: Names of the ``ModuleDict``/``ParameterDict`` attributes that hold this kind's A and B factors.
    containers: tuple[str, str] = ("lora_A", "lora_B")
    #: Whether the adapter's dropout applies to this kind's input (not to an embedding's token ids).
    drops_input = True
    #: Whether :meth:`fused_forward` can ever return a result (so callers skip preparing its inputs).
    has_fused_forward = False
    #: Whether B can carry a bias (``lora_bias=True``): the kinds whose B is a module, as in PEFT.
    supports_lora_bias = True

    def check_adapter(self, layer: LoraLayer, r: int, variant: str, init: bool | str, lora_bias: bool) -> None:
        """Refuse, before the layer changes, an adapter this kind cannot hold (``variant``: "lora", "dora"...).

        Raises:
            UnsupportedModuleError: ``lora_bias`` on a kind without a B module, or with a variant other than
                plain LoRA (on the same layer too: DoRA's rescale would treat an unmerged and a merged b_B alike).
        """
        if not lora_bias and variant == "lora":
            return
        base = type(layer.base_layer).__name__
        if lora_bias and not self.supports_lora_bias:
            raise UnsupportedModuleError(
                f"lora_bias=True is not supported on {base} (as in PEFT); accepted: nn.Linear, transformers Conv1D "
                "and nn.Conv1d/2d/3d targets. Narrow target_modules or set lora_bias=False"
            )
        forms = {layer.variant[a].name for a in layer.r}
        if (lora_bias and (variant != "lora" or "dora" in forms)) or (
            variant == "dora" and any(self.b_bias(layer, a) is not None for a in layer.r)
        ):
            raise UnsupportedModuleError(
                f"lora_bias=True combines with plain LoRA adapters only; this {base} would hold a {variant!r} adapter "
                f"and a bias on B together (its adapters: {forms or 'none'}). Put them on separate layers or models"
            )

    def b_bias(self, layer: LoraLayer, adapter: str) -> nn.Parameter | None:
        """B's bias b_B (``lora_bias=True``), or None."""
        holder = getattr(layer, self.containers[1])[adapter]
        return None if isinstance(holder, nn.Parameter) else getattr(holder, "bias", None)

    def attach_lora_bias(self, layer: LoraLayer, adapter: str, init: bool | str) -> None:
        """Give B a bias ``(out,)``: zero (the model starts unchanged), or with ``init=False`` torch's default draw
        U(±1/√fan_in) (PEFT leaves B's ``nn.Linear``/``nn.ConvNd`` init in place then)."""
        b = getattr(layer, self.containers[1])[adapter]
        w = b.weight
        bias = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
        if init is False:
            bound = 1.0 / math.sqrt(w[0].numel())
            nn.init.uniform_(bias, -bound, bound)
        b.bias = nn.Parameter(bias)

    def refuse_merge(self, layer: LoraLayer, pending: list[str]) -> None:
        """Raise :class:`MergeError` if merging ``pending`` cannot be expressed in the base layer: a bias on B and no
        base bias to fold it into (PEFT refuses this merge as well). Nothing is changed."""
        if getattr(layer.base_layer, "bias", None) is None:
            with_bias = [a for a in pending if self.b_bias(layer, a) is not None]
            if with_bias:
                raise MergeError(
                    f"adapters {with_bias} have a bias on B (lora_bias=True) but the base "
                    f"{type(layer.base_layer).__name__} has no bias to merge it into; keep them unmerged"
                )

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

    def channel_shape(self, layer: LoraLayer) -> tuple[int, ...]:
        """Shape of a per-output-feature vector that broadcasts against the layer's output."""
        return (layer.out_features,)

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


class LinearOps(LoraOps):
    """``nn.Linear``: A ``Linear(in, r)``, B ``Linear(r, out)``; one fused kernel with the base GEMM."""

    has_fused_forward = True

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
        b_bias = self.b_bias(layer, adapter)
        if b_bias is not None:  # lora_bias: s·(B A x + b_B), PEFT's lora_B(lora_A(x)) * scaling
            return _add_scaled(result, F.linear(F.linear(x, a), b, b_bias), layer.scaling[adapter])
        h, scaling = _fold_scaling(F.linear(x, a), layer.scaling[adapter])  # (..., r)
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
        if self.b_bias(layer, adapter) is not None:  # lora_bias: the generic path (the kernels add no b_B)
            return None
        a = layer.lora_A[adapter].weight
        b = layer.lora_B[adapter].weight
        w = base.weight
        if not (x.dtype == w.dtype == a.dtype == b.dtype) or torch.is_autocast_enabled(x.device.type):
            return None
        if scale is not None and scale.dtype != x.dtype:
            return None
        bias, s = base.bias, layer.scaling[adapter]
        if isinstance(s, torch.Tensor):  # hot-swappable (a 0-d tensor): the generic path, which compiles as well
            return None
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


class QuantizedLinearOps(LinearOps):
    """bitsandbytes linears: their forward is their own (dequantize + matmul), so nothing is fused."""

    has_fused_forward = False

    def create(self, layer: LoraLayer, adapter: str, r: int) -> tuple[nn.Module, nn.Module]:
        if is_bnb_layer(layer.base_layer, "Linear4bit"):
            guard_cpu_repacking(layer.base_layer)  # a layer transformers loaded meets lorakit here first
        return super().create(layer, adapter, r)


class HFConv1DOps(LinearOps):
    """transformers' ``Conv1D``: the factors of a linear, ΔW transposed onto the ``(in, out)`` weight."""

    has_fused_forward = False

    def to_weight_layout(self, delta: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return delta.t()


class EmbeddingOps(LoraOps):
    """``nn.Embedding``: ΔW = (s·B A)ᵀ with A ``(r, num)``.

    As in PEFT, A starts at zero and B normal (a lookup in a zero A gives a zero update) and dropout is not
    applied to token ids.
    """

    containers = ("lora_embedding_A", "lora_embedding_B")
    drops_input = False
    supports_lora_bias = False  # B is a bare parameter (PEFT refuses lora_bias on embeddings too)

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

    def add_output(
        self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor, dropout: bool = True
    ) -> torch.Tensor:
        a, b = self.factor_params(layer, adapter)
        base = layer.base_layer
        h = F.embedding(x, a.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return _add_scaled(result, h @ b.t(), layer.scaling[adapter])


class ConvOps(LoraOps):
    """``nn.Conv1d/2d/3d``: A is a convolution with the base's kernel into r channels, B a 1×…×1 one.

    Grouped convolutions (``groups = g > 1``) follow PEFT 0.21: A stays a full convolution (every input channel
    to the r rank channels) and B is grouped, ``ConvNd(r, out, 1, groups=g)`` with weight ``(out, r/g, 1, …)``,
    so r must be a multiple of g. The update then mixes input channels across groups, which a grouped weight
    ``(out, in/g, k…)`` cannot hold: such adapters run unmerged, and merging them is refused (as in PEFT). As a
    matrix, B is block-diagonal ``(out, r)`` (:meth:`factors`).
    """

    def features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels  # groups allowed: see the class docstring

    def check_adapter(self, layer: LoraLayer, r: int, variant: str, init: bool | str, lora_bias: bool) -> None:
        """Besides LoRA's checks, on a grouped convolution: r a multiple of ``groups``, plain LoRA, a plain start.

        Raises:
            ConfigError: r is not a multiple of ``groups``.
            UnsupportedModuleError: DoRA/AdaLoRA or a start that reads the weight on a grouped convolution.
        """
        super().check_adapter(layer, r, variant, init, lora_bias)
        groups = layer.base_layer.groups
        if groups == 1:
            return
        base = f"{type(layer.base_layer).__name__} with groups={groups}"
        if r % groups:
            raise ConfigError(
                f"rank {r} on a {base}: the rank must be a multiple of groups (B is a grouped 1×1 convolution, as in "
                f"PEFT); accepted: r (or rank_pattern for this layer) in {groups}, {2 * groups}, {3 * groups}, …"
            )
        if variant != "lora" or (not any(init is v for v in (True, False)) and init != "gaussian"):
            raise UnsupportedModuleError(
                f"a {base} takes plain LoRA adapters with init_lora_weights True, False or 'gaussian'; got "
                f"variant {variant!r}, init_lora_weights={init!r}. Narrow target_modules to skip this layer"
            )

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
        b = conv(r, layer.out_features, 1, 1, groups=base.groups, bias=False)
        return a, b

    def factors(self, layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, in·k…), B (out, r))``; a grouped B ``(out, r/g)`` becomes its block-diagonal ``(out, r)``."""
        a, b = self.factor_params(layer, adapter)
        groups = layer.base_layer.groups
        b = b.flatten(1)  # (out, r/g): B's kernel is 1×…×1
        if groups > 1:
            b = torch.block_diag(*b.chunk(groups, dim=0))
        return a.flatten(1), b

    def refuse_merge(self, layer: LoraLayer, pending: list[str]) -> None:
        super().refuse_merge(layer, pending)
        groups = layer.base_layer.groups
        if groups > 1 and pending:
            raise MergeError(
                f"adapters {pending} sit on a {type(layer.base_layer).__name__} with groups={groups}: their update "
                "mixes input channels across groups (A is a full convolution, as in PEFT), which the grouped weight "
                "cannot hold, so they cannot be merged (PEFT refuses too); keep them unmerged"
            )

    def to_weight_layout(self, delta: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if base.groups > 1:
            raise MergeError(
                f"a LoRA update of a {type(base).__name__} with groups={base.groups} has no form in its grouped "
                "weight (the update mixes channels across groups); it runs unmerged only"
            )
        return delta.view(base.weight.shape)

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
        return _add_scaled(result, layer.lora_B[adapter](a(x)), layer.scaling[adapter])  # B's module adds b_B


#: LoRA's side per geometry family, most specific first.
_OPS: list[tuple[type[LayerKind], type[LoraOps]]] = [
    (QuantizedLinearKind, QuantizedLinearOps),
    (HFConv1DKind, HFConv1DOps),
    (LinearKind, LinearOps),
    (EmbeddingKind, EmbeddingOps),
    (ConvKind, ConvOps),
]
_COMBINED: dict[type[LayerKind], LayerKind] = {}


def lora_kind(kind: LayerKind) -> LayerKind:
    """``kind`` with LoRA's side mixed in (one shared instance per geometry type); already combined kinds pass.

    The result is still an instance of the geometry kind's class (``isinstance(k, HFConv1DKind)`` holds).
    """
    if isinstance(kind, LoraOps):
        return kind
    combined = _COMBINED.get(type(kind))
    if combined is None:
        ops = next(o for geometry, o in _OPS if isinstance(kind, geometry))
        combined = type(f"Lora{type(kind).__name__}", (ops, type(kind)), {})()
        _COMBINED[type(kind)] = combined
    return combined
