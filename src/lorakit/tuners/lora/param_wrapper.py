"""LoRA on an ``nn.Parameter`` (``LoraConfig.target_parameters``): the fused expert weights of MoE models.

transformers 5 keeps the experts of a Mixtral or Qwen-MoE layer as two 3-D parameters of one module
(``MixtralExperts``): ``gate_up_proj (E, 2f, h)`` and ``down_proj (E, h, f)``, expert e using its slice as the
``(out, in)`` weight of a linear map. They are not ``nn.Linear`` s, so an adapter that adds ``s·B A x`` to a module's
output cannot reach them. :class:`ParamLoraLayer` adds the update to the *parameter* instead: while the module it wraps
runs, the module sees ``W + ΔW`` in place of ``W``, with ``ΔW_e = s · B_e A_e`` for each expert (LoRA, Hu et al. 2021,
arXiv 2106.09685, §4.1), rank r per expert. The layout, ranks, scaling and file keys are those of PEFT's
``lora.ParamWrapper`` (PEFT 0.17+), so adapters load both ways:

====================  =========================  ====================================================
parameter             ΔW                         factors (``nn.Linear`` weights, as PEFT keeps them)
====================  =========================  ====================================================
``(E, out, in)``      ``s·B_e A_e`` per expert   A ``(E·r, in)``: expert e's rows ``e·r … e·r + r − 1``
``(E, in, out)`` [1]  ``(s·B_e A_e)ᵀ``           B ``(out, E·r)``: expert e's columns ``e, e + E, e + 2E …``
``(out, in)``         ``s·B A``                  A ``(r, in)``, B ``(out, r)``
====================  =========================  ====================================================

[1] a module with ``is_transposed = True`` (transformers' flag for experts stored input-major).

That is E·r·(in + out) trainable values per parameter. Several parameters of one module get nested layers (PEFT's
layout, which its files' keys follow): the first one found is wrapped first, the next wraps that layer, so a Mixtral
layer holds ``experts → ParamLoraLayer(down_proj) → ParamLoraLayer(gate_up_proj) → MixtralExperts`` and its file keys
are ``mlp.experts.lora_A.weight`` (down_proj) and ``mlp.experts.base_layer.lora_A.weight`` (gate_up_proj).

Merging adds ΔW to the parameter in place, as for any LoRA layer. Unmerged, a forward puts ``W + ΔW`` (one fused
multiply-add, :func:`~lorakit.tuners.lora.delta.add_lora_delta`) where the module reads the parameter, for the
duration of the module's own forward only, then puts the parameter back (PEFT registers a parametrization for the
same span). Those spans are serialised by a lock: two threads running the model at once each see their own weight.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, UnsupportedModuleError
from lorakit.layers.kinds import LayerKind
from lorakit.layers.routing import current_routes
from lorakit.tuners.lora.delta import add_lora_delta
from lorakit.tuners.lora.kinds import LoraOps
from lorakit.tuners.lora.layer import LoraLayer

#: ``init_lora_weights`` values a parameter's factors accept. "eva" (a data-driven start for target modules) leaves a
#: parameter's factors at the default start, as in PEFT (B = 0, A Kaiming-uniform).
PARAMETER_INITS = (True, False, "gaussian", "eva")
#: Held while a module runs with adapted parameters in place of its own (re-entrant: nested layers take it again).
_SWAP_LOCK = threading.RLock()


def owner_of(base: nn.Module) -> nn.Module:
    """The module that holds the parameters, under any :class:`ParamLoraLayer` s wrapped around it."""
    while isinstance(base, ParamLoraLayer):
        base = base.base_layer
    return base


class ParameterKind(LoraOps, LayerKind):
    """The geometry of one parameter of a module, with LoRA's factors for it (see the module docstring's table).

    One instance per parameter name (the name is the only thing it holds; the rest is read from the module).
    """

    name = "parameter"

    def __init__(self, parameter_name: str) -> None:
        self.parameter_name = parameter_name

    def matches(self, module: nn.Module) -> bool:
        return False  # chosen by name (target_parameters), never by a module's type

    def base_weight(self, base: nn.Module) -> torch.Tensor:
        """The wrapped parameter itself (what a merge writes into)."""
        return owner_of(base)._parameters[self.parameter_name]

    def geometry(self, base: nn.Module) -> tuple[int, int, int, bool]:
        """``(experts, in, out, transposed)``: a 2-D parameter ``(out, in)`` is one expert; a 3-D one is
        ``(E, out, in)``, or ``(E, in, out)`` when the module says ``is_transposed``.

        Raises:
            UnsupportedModuleError: the parameter has another number of dimensions.
        """
        owner = owner_of(base)
        shape = tuple(owner._parameters[self.parameter_name].shape)
        if len(shape) == 2:
            return 1, shape[1], shape[0], False
        if len(shape) != 3:
            raise UnsupportedModuleError(
                f"parameter {self.parameter_name!r} of {type(owner).__name__} has shape {shape}; target_parameters "
                "adapts 2-D (out, in) weights and 3-D (experts, out, in) stacks of them"
            )
        transposed = bool(getattr(owner, "is_transposed", False))
        return (shape[0], shape[1], shape[2], True) if transposed else (shape[0], shape[2], shape[1], False)

    def experts(self, base: nn.Module) -> int:
        return self.geometry(base)[0]

    def features(self, base: nn.Module) -> tuple[int, int]:
        _, k, d, _ = self.geometry(base)
        return k, d

    def bias(self, base: nn.Module) -> torch.Tensor | None:
        return None

    def create(self, layer: LoraLayer, adapter: str, r: int) -> tuple[nn.Module, nn.Module]:
        e = self.experts(layer.base_layer)
        return nn.Linear(layer.in_features, r * e, bias=False), nn.Linear(r * e, layer.out_features, bias=False)

    def factors(self, layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``: ``(r, in)`` and ``(out, r)`` for a 2-D parameter, ``(E, r, in)`` and ``(E, out, r)`` per expert
        for a 3-D one (views of the two factor weights, in PEFT's layout)."""
        a, b = self.factor_params(layer, adapter)
        e, k, d, _ = self.geometry(layer.base_layer)
        if owner_of(layer.base_layer)._parameters[self.parameter_name].dim() == 2:
            return a, b
        return a.reshape(e, -1, k), b.reshape(d, -1, e).permute(2, 0, 1)

    def to_weight_layout(self, delta: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``(E, out, in)`` onto the parameter: transposed per expert for an ``is_transposed`` module."""
        return delta.transpose(-2, -1) if self.geometry(base)[3] else delta


class ParamLoraLayer(LoraLayer):
    """LoRA adapters on one parameter of the wrapped module (see the module docstring).

    Attributes:
        parameter_name: the parameter's name on the module that holds it (``"gate_up_proj"``).
        num_experts: E, the leading dimension of a 3-D parameter (1 for a 2-D one), PEFT's attribute.
        base_layer: the module holding the parameter, or another :class:`ParamLoraLayer` around it.

    Plain LoRA only, as in PEFT: no dropout (it cannot be factored out of ``(W + ΔW) x``), no DoRA, no ``lora_bias``,
    and no batch that mixes adapters (``adapter_names``).
    """

    kind: ParameterKind

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer, ParameterKind(parameter_name))
        self.parameter_name = parameter_name

    @property
    def num_experts(self) -> int:
        return self.kind.experts(self.base_layer)

    def add(
        self,
        adapter: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """:meth:`LoraLayer.add` for a parameter. Raises :class:`ConfigError` for what a parameter cannot hold."""
        check_parameter_options(lora_dropout, init_lora_weights, kwargs.get("use_dora", False), kwargs.get("variant"))
        if kwargs.get("lora_bias"):
            raise ConfigError("lora_bias=True cannot be used with target_parameters (as in PEFT); set it to False")
        init = True if init_lora_weights == "eva" else init_lora_weights
        super().add(adapter, r, lora_alpha, 0.0, init, *args, **kwargs)

    def _kind_for(self, base_layer: nn.Module) -> LayerKind:
        return self.kind

    def adapted_weight(self, adapters: list[str]) -> torch.Tensor:
        """The parameter with ``adapters``' updates added, ``W + Σ s·B A`` in the parameter's layout and dtype
        (a new tensor, differentiable in the factors)."""
        weight = self.kind.base_weight(self.base_layer)
        transposed = self.kind.geometry(self.base_layer)[3]
        out = weight
        with torch.autocast(weight.device.type, enabled=False):  # the module must see its parameter's dtype
            for adapter in adapters:
                a, b = (f.to(weight.dtype) for f in self.variant[adapter].factors(self, adapter))
                if transposed:  # (s·B A)ᵀ = s·Aᵀ Bᵀ, per expert
                    a, b = b.transpose(-2, -1), a.transpose(-2, -1)
                out = add_lora_delta(out, b, a, self.scaling[adapter])
        return out

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        routes = current_routes()
        if routes is not None and routes.get(self) is not None:
            raise ConfigError(
                "adapter_names (a batch that mixes adapters) is not supported with target_parameters (as in PEFT): "
                f"{self.parameter_name!r} is adapted as a whole parameter; run one adapter per batch with set_adapter"
            )
        pending = [a for a in self.active_adapters if a not in self.merged_adapters]
        if not pending:
            return self.base_layer(x, *args, **kwargs)
        with _SWAP_LOCK:
            with substituted(owner_of(self.base_layer), self.parameter_name, self.adapted_weight(pending)):
                return self.base_layer(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}, {super().extra_repr()}"


def check_parameter_options(lora_dropout: float, init: Any, use_dora: bool = False, variant: str | None = None) -> None:
    """Refuse, naming the option, what LoRA on a parameter cannot do (PEFT refuses the same).

    Raises:
        ConfigError: dropout, DoRA or another variant, or an initialisation that reads a 2-D base weight.
    """
    if lora_dropout:
        raise ConfigError(
            f"lora_dropout={lora_dropout} cannot be used with target_parameters (as in PEFT): dropout on the input "
            "cannot be factored out of (W + ΔW) x; accepted: 0"
        )
    if use_dora or variant not in (None, "lora"):
        raise ConfigError(
            f"target_parameters takes plain LoRA only (as in PEFT), not {'DoRA' if use_dora else repr(variant)}; set "
            "use_dora=False or adapt these parameters in a separate plain-LoRA adapter"
        )
    if not any(init is v or (isinstance(v, str) and init == v) for v in PARAMETER_INITS):
        raise ConfigError(
            f"init_lora_weights={init!r} cannot be used with target_parameters: it starts from a layer's 2-D base "
            "weight; accepted: True, False, 'gaussian'"
        )


@contextlib.contextmanager
def substituted(owner: nn.Module, name: str, tensor: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``owner.<name>`` reads ``tensor`` instead of the registered parameter.

    The parameter stays registered (the module's parameter dict is swapped for a copy without it, then restored:
    its order, and so ``state_dict`` order, never changes); ``tensor`` is an attribute for the span of the block.
    """
    state = owner.__dict__
    params = state["_parameters"]
    state["_parameters"] = type(params)((k, v) for k, v in params.items() if k != name)
    state[name] = tensor
    try:
        yield
    finally:
        state.pop(name, None)
        state["_parameters"] = params
