"""Bottleneck adapters' layer: a module whose output is a sub-block's output (before the model's residual add),
followed by named bottleneck adapters.

Houlsby et al. 2019 (arXiv 1902.00751), §2.1: ``a = x + W_up σ(W_down x + b_down) + b_up`` on the sub-block output,
``W_down: (m, d)``, ``W_up: (d, m)``; Pfeiffer et al. 2020 (arXiv 2005.00247, §2.2) feed it the sum with the
residual stream. What each option computes is in :class:`~lorakit.tuners.bottleneck.config.BottleneckConfig`; the
arithmetic follows the adapters library's ``Adapter`` / ``ParallelAdapter`` modules step for step, so outputs
agree with it on the same weights. The residual stream r is read from the input of another module of the block
(a :class:`ResidualTap`), since the wrapped module does not see it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterExistsError, AdapterNotFoundError, MergeError, suggest
from lorakit.layers.base import AdapterLayer
from lorakit.layers.kinds import LayerKind
from lorakit.layers.routing import BASE_ROW, RowRouting, current_routes
from lorakit.tuners.bottleneck.config import NON_LINEARITIES, BottleneckConfig

#: The adapter's tensors, by file key (relative to the layer): ``bottleneck_down.weight`` and so on.
PARTS = ("bottleneck_down", "bottleneck_up", "bottleneck_norm_before", "bottleneck_norm_after", "bottleneck_gate")
SCALE = "bottleneck_scale"


class ResidualTap:
    """Remembers, per thread, the first input of one module of a block: the residual stream entering a sub-block.

    A forward pre-hook on that module stores the tensor; the adapter layer takes it (and forgets it, so no
    activation outlives its forward). One value per thread: calls from several threads never see each other's.
    """

    def __init__(self, module: nn.Module) -> None:
        self._local = threading.local()
        self._handle = module.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._local.value = args[0] if args else kwargs.get("hidden_states")

    def take(self) -> torch.Tensor | None:
        value = getattr(self._local, "value", None)
        self._local.value = None
        return value

    def remove(self) -> None:
        self._handle.remove()

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy(model): a fresh per-thread store, the same hook
        return {"_handle": self._handle}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._handle = state["_handle"]
        self._local = threading.local()


@dataclass(frozen=True)
class Options:
    """What one adapter computes, beyond its tensors (from its :class:`BottleneckConfig`)."""

    non_linearity: str
    original_ln_before: bool
    residual_before_ln: bool | str
    adapter_residual_before_ln: bool
    is_parallel: bool
    scaling: float | None  # None: a trained ``bottleneck_scale``
    use_gating: bool

    @classmethod
    def of(cls, config: BottleneckConfig) -> Options:
        scaling = None if isinstance(config.scaling, str) else float(config.scaling)
        return cls(
            config.non_linearity,
            config.original_ln_before,
            config.residual_before_ln,
            config.adapter_residual_before_ln,
            config.is_parallel,
            scaling,
            config.use_gating,
        )

    @property
    def needs_residual(self) -> bool:
        return self.original_ln_before or self.is_parallel


class SublayerKind(LayerKind):
    """The geometry of a bottleneck site: ``hidden`` features in and out (what ``lorakit estimate`` reads)."""

    name = "sublayer_output"

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden

    def matches(self, module: nn.Module) -> bool:
        return False

    def features(self, base: nn.Module) -> tuple[int, int]:
        return self.hidden, self.hidden


class BottleneckLayer(AdapterLayer):
    """A module whose output is a sub-block's output, plus any number of named bottleneck adapters after it.

    Attributes:
        base_layer: the wrapped, frozen module (``o_proj``, a dropout, ...); its output ``(..., hidden)`` is h.
        sublayer: ``"attention"`` or ``"feedforward"``; ``block``: the name of the block the layer sits in.
        bottleneck_down / bottleneck_up: per adapter, ``nn.Linear(hidden, m)`` and ``nn.Linear(m, hidden)``.
        bottleneck_norm_before / bottleneck_norm_after / bottleneck_gate: per adapter, when its config asks.
        bottleneck_scale: per adapter with ``scaling="learned"`` ``(1,)`` or ``"channel"`` ``(hidden,)``.
        merged_adapters: always empty: nothing can be merged (see :meth:`merge`).
        disable_adapters: when True, ``forward`` returns ``base_layer``'s output alone.
    """

    def __init__(
        self, base_layer: nn.Module, hidden: int, sublayer: str, block: str, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden = hidden
        self.kind = SublayerKind(hidden)
        self.sublayer, self.block = sublayer, block
        for part in PARTS:
            setattr(self, part, nn.ModuleDict())
        self.bottleneck_scale = nn.ParameterDict()
        self.bottleneck_dropout = nn.ModuleDict()
        self.options: dict[str, Options] = {}
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # the model's own post-LN norm and the residual tap: used here, owned by the model (no submodule)
        self.__dict__["_norm"] = norm
        self.__dict__["_tap"] = None

    # -- adapters -------------------------------------------------------------------------------------

    @torch.no_grad()
    def add(
        self,
        adapter: str,
        config: BottleneckConfig,
        bottleneck: int,
        residual: nn.Module | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """Create adapter ``adapter`` with a bottleneck of ``bottleneck`` features, initialised as
        ``config.init_weights`` says (the adapters library's schemes).

        Args:
            residual: the module whose first input is the residual stream (required when the config reads it).

        Raises:
            AdapterExistsError: the layer already holds an adapter of that name.
        """
        if adapter in self.options:
            raise AdapterExistsError(f"adapter {adapter!r} already exists on this layer")
        options = Options.of(config)
        if options.needs_residual and self._tap is None:
            self.__dict__["_tap"] = ResidualTap(residual)
        d = self.hidden
        made = {"bottleneck_down": nn.Linear(d, bottleneck), "bottleneck_up": nn.Linear(bottleneck, d)}
        if config.ln_before:
            made["bottleneck_norm_before"] = nn.LayerNorm(d)
        if config.ln_after:
            made["bottleneck_norm_after"] = nn.LayerNorm(d)
        if config.use_gating:
            made["bottleneck_gate"] = nn.Linear(d, 1)
        _initialise(made, config.init_weights)
        for part, module in made.items():
            getattr(self, part)[adapter] = module.to(device=device, dtype=dtype)
        if config.scaling in ("learned", "channel"):
            shape = (1,) if config.scaling == "learned" else (d,)
            self.bottleneck_scale[adapter] = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.bottleneck_dropout[adapter] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.options[adapter] = options
        self.adapters_stamp += 1

    def adapter_names(self) -> list[str]:
        return list(self.options)

    def _check(self, adapter: str) -> None:
        if adapter not in self.options:
            raise AdapterNotFoundError(
                f"adapter {adapter!r} is not on this layer; it holds {self.adapter_names()}"
                + suggest(adapter, self.options)
            )

    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        self._check(adapter)
        state = {}
        for part in PARTS:
            held = getattr(self, part)
            if adapter in held:
                state.update({f"{part}.{k}": v for k, v in held[adapter].named_parameters()})
        if adapter in self.bottleneck_scale:
            state[SCALE] = self.bottleneck_scale[adapter]
        return state

    def adapter_param_key(self, adapter: str, file_key: str) -> str:
        part, _, rest = file_key.partition(".")
        return f"{part}.{adapter}.{rest}" if rest else f"{part}.{adapter}"

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return list(self.adapter_state(adapter).values())

    def delete(self, adapter: str) -> None:
        self._check(adapter)
        for part in (*PARTS, SCALE, "bottleneck_dropout"):
            held = getattr(self, part)
            if adapter in held:
                del held[adapter]
        del self.options[adapter]
        self._forget(adapter)

    def original(self) -> nn.Module:
        return self.base_layer

    def release(self) -> None:
        """Remove the residual tap's hook from the model (once this layer has left it)."""
        if self._tap is not None:
            self._tap.remove()
            self.__dict__["_tap"] = None

    # -- merging: impossible ----------------------------------------------------------------------------

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Always raises :class:`MergeError`: σ between the projections is not linear, so no weight update of the
        base model computes the adapter (Houlsby et al. 2019, §2.1)."""
        raise MergeError(merge_refusal([self.options[a].non_linearity for a in self.options]))

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    # -- forward --------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        residual = self._tap.take() if self._tap is not None else None  # always taken: no activation outlives us
        output = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return output
        hidden, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        routes = current_routes()  # each row its own adapter, for this call only (adapter_names=...)
        routing = routes.get(self) if routes is not None else None
        if routing is not None:
            hidden = self._routed(hidden, residual, routing)
        else:
            for adapter in self.active_adapters:  # several active adapters: one after the other (Stack)
                hidden = self._adapt(adapter, hidden, residual)
        return hidden if rest is None else (hidden, *rest)

    def _routed(self, hidden: torch.Tensor, residual: torch.Tensor | None, routing: RowRouting) -> torch.Tensor:
        """Row i through adapter ``routing.rows(batch)[i]`` (``"__base__"``, or one this layer lacks: none)."""
        rows = routing.rows(hidden.shape[0])
        out = hidden
        for adapter in dict.fromkeys(rows):
            if adapter == BASE_ROW or adapter not in self.options:
                continue
            index = torch.tensor([i for i, a in enumerate(rows) if a == adapter], device=hidden.device)
            part_residual = None if residual is None else residual.index_select(0, index)
            adapted = self._adapt(adapter, hidden.index_select(0, index), part_residual)
            out = out.index_copy(0, index, adapted)
        return out

    def _adapt(self, adapter: str, h: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """One adapter on the sub-block output h ``(batch, seq, hidden)`` given the residual stream r (same shape):
        the adapters library's ``pre_forward`` and ``forward``. Computed in the adapter's dtype, returned in h's."""
        options = self.options[adapter]
        if options.needs_residual and r is None:
            raise RuntimeError(
                f"bottleneck adapter {adapter!r} after {self.block}'s {self.sublayer} reads the residual stream "
                "entering that sub-block, but the module that receives it did not run in this forward (call the "
                "whole model, not the sub-block alone)"
            )
        if options.is_parallel:
            x = res = r
        else:
            x = res = h
            if options.original_ln_before:
                x = h + r
                if options.residual_before_ln == "post_add":
                    res = x
                if self._norm is not None:
                    x = self._norm(x)
            if options.residual_before_ln is False:
                res = x
        dtype = self.bottleneck_down[adapter].weight.dtype
        x = x.to(dtype)
        z = self.bottleneck_norm_before[adapter](x) if adapter in self.bottleneck_norm_before else x
        up = self.bottleneck_up[adapter](NON_LINEARITIES[options.non_linearity](self.bottleneck_down[adapter](z)))
        up = up * (options.scaling if options.scaling is not None else self.bottleneck_scale[adapter])
        out = self.bottleneck_dropout[adapter](up)
        if options.use_gating:  # one gate per row: the mean over the sequence of sigmoid(w·x + b)
            out = out * torch.sigmoid(self.bottleneck_gate[adapter](x)).mean(dim=1).unsqueeze(-1)
        norm_after = self.bottleneck_norm_after[adapter] if adapter in self.bottleneck_norm_after else None
        if options.is_parallel:  # the adapters library's ParallelAdapter: no skip inside, h added after
            if norm_after is not None:
                out = norm_after(out)
            return (out + h.to(dtype)).to(h.dtype)
        res = res.to(dtype)
        if options.adapter_residual_before_ln:
            out = out + res
        if norm_after is not None:
            out = norm_after(out)
        if not options.adapter_residual_before_ln:
            out = out + res
        return out.to(h.dtype)

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{a}: {self.bottleneck_down[a].out_features}" for a in self.options)
        return f"{self.sublayer} of {self.block}, hidden={self.hidden}, bottleneck=({sizes})"


def merge_refusal(non_linearities: list[str]) -> str:
    """Why a bottleneck adapter cannot be merged into the base weights (one message for every entry point)."""
    names = ", ".join(repr(n) for n in dict.fromkeys(non_linearities)) or "a non-linearity"
    return (
        "bottleneck adapters cannot be merged into the base weights: an adapter adds W_up σ(W_down x + b_down) + b_up "
        f"after its sub-block, and σ (here {names}) between the two projections is not linear, so no weight update "
        "of the base model computes it (Houlsby et al. 2019, §2.1). Keep the adapters unmerged; unload() removes them "
        "and gives back the base model"
    )


@torch.no_grad()
def _initialise(modules: dict[str, nn.Module], scheme: str) -> None:
    """The adapters library's initialisations (``Adapter.__init__``): ``"bert"`` normal(0, 0.02) weights and zero
    biases everywhere; ``"mam_adapter"`` a Kaiming-uniform down-projection and a zero up-projection (the adapter
    starts as the identity); ``"houlsby"`` truncated normal(0, 0.01) in [-0.02, 0.02] and zero biases for both
    projections (Houlsby et al. 2019, §3.6)."""
    down, up, gate = modules["bottleneck_down"], modules["bottleneck_up"], modules.get("bottleneck_gate")
    if scheme == "bert":
        for linear in (down, up, gate):
            if linear is not None:
                linear.weight.normal_(0.0, 0.02)
                linear.bias.zero_()
    elif scheme == "mam_adapter":
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        for tensor in (down.bias, up.weight, up.bias):
            tensor.zero_()
        if gate is not None:
            gate.weight.normal_(0.0, 0.02)
            gate.bias.zero_()
    else:
        for linear in (down, up):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            linear.bias.zero_()
