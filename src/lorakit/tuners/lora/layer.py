"""The LoRA adapter layer: wraps a frozen base layer and adds named low-rank updates.

``h = base(x) + Σ_active s_a · B_a A_a dropout_a(x)`` (LoRA paper §4.1). The layer *wraps* its base
(``self.base_layer``) rather than subclassing it, so any module that a :mod:`~lorakit.layers.kinds` strategy
understands can be adapted. Adapters are keyed by name; merging is an explicit call and ``merged_adapters``
records it — switching ``train()``/``eval()`` never touches weights.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterExistsError, AdapterNotFoundError, MergeError, suggest
from lorakit.layers.base import WeightLayer
from lorakit.layers.kinds import LayerKind, kind_for
from lorakit.layers.routing import ROUTES, RowRouting, current_routes
from lorakit.tuners.lora.delta import lora_delta, lora_scaling
from lorakit.tuners.lora.dora import DoraVariant
from lorakit.tuners.lora.kinds import lora_kind
from lorakit.tuners.lora.loftq import loftq_initialize
from lorakit.tuners.lora.mixed import mixed_forward
from lorakit.tuners.lora.starts import run_start
from lorakit.tuners.lora.variant import LoraVariant, check_finite

#: The variants an adapter can use, by name (:mod:`lorakit.tuners.lora.variant`); stateless, so shared.
#: Other methods built on LoRA's layer add theirs (AdaLoRA registers "adalora" in :mod:`lorakit.tuners.adalora.layer`).
VARIANTS: dict[str, LoraVariant] = {"lora": LoraVariant(), "dora": DoraVariant()}


class LoraLayer(WeightLayer):
    """A base layer plus any number of named LoRA adapters.

    Attributes:
        base_layer: the wrapped, frozen module (``nn.Linear``, ``nn.Embedding``, ``nn.ConvNd``, ``Conv1D``).
        kind: the :class:`~lorakit.layers.kinds.LayerKind` strategy for the base layer's geometry.
        variant: per adapter, the :class:`~lorakit.tuners.lora.variant.LoraVariant` strategy (plain LoRA or DoRA)
            that decides how the update enters the output and the weight.
        lora_magnitude_vector: DoRA magnitudes, per DoRA adapter (PEFT's attribute name and state-dict keys);
            present while the layer holds a DoRA adapter (each variant's ``containers``).
        r, lora_alpha, scaling: per-adapter rank, alpha and s = lora_scaling(alpha, r); s is a 0-d tensor after
            :func:`~lorakit.tuners.lora.hotswap.prepare_model_for_compiled_hotswap` (a swap then changes it in place).
        active_adapters: adapters applied in ``forward`` (in order).
        merged_adapters: adapters whose ΔW currently sits inside ``base_layer``'s weight.
        disable_adapters: when True, ``forward`` returns ``base_layer``'s output alone.
        row_adapters: the :class:`~lorakit.layers.routing.RowRouting` of the mixed-adapter call running in this
            thread (context), or None (read-only; set by :func:`~lorakit.layers.routing.routed`).
    """

    def __init__(self, base_layer: nn.Module, kind: LayerKind) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = lora_kind(kind)  # the base's geometry with LoRA's factors (lorakit.tuners.lora.kinds)
        self.in_features, self.out_features = self.kind.features(base_layer)
        for container in self.kind.containers:
            holder = nn.ParameterDict() if container.startswith("lora_embedding") else nn.ModuleDict()
            setattr(self, container, holder)
        self.lora_dropout = nn.ModuleDict()
        self.variant: dict[str, LoraVariant] = {}
        self._merge_records: dict[str, object] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float | torch.Tensor] = {}
        self.use_rslora: dict[str, bool] = {}
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    # -- adapters -------------------------------------------------------------------------------------

    def add(
        self,
        adapter: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
        loftq_config: dict[str, Any] | None = None,
        variant: str | None = None,
        lora_bias: bool = False,
    ) -> None:
        """Create adapter ``adapter`` with its own A, B and dropout, placed on the base weight's device.

        Args:
            dtype: dtype of A and B (and of DoRA's magnitude); defaults to the base weight's floating dtype.
            use_dora: make it a DoRA adapter (:mod:`lorakit.tuners.lora.dora`): a magnitude per output feature,
                initialised so that the layer's output is unchanged.
            loftq_config: with ``init_lora_weights="loftq"``, the arguments of
                :func:`~lorakit.tuners.lora.loftq.loftq_initialize` (which also rewrites the base weight to Q).
            variant: the update's form by name (``VARIANTS``: "lora", "dora", "adalora"); default from
                ``use_dora``.
            lora_bias: give B a trainable bias b_B (PEFT's ``lora_bias``): the update is ``s·(B A x + b_B)``,
                and merging adds ``s·b_B`` to the base layer's bias.

        Raises:
            AdapterExistsError: the layer already holds an adapter of that name.
            ConfigError, UnsupportedModuleError: the kind cannot hold this adapter (its ``check_adapter``); the
                layer is unchanged.
        """
        if adapter in self.r:
            raise AdapterExistsError(f"adapter {adapter!r} already exists on this layer")
        self.kind.check_adapter(self, r, variant or ("dora" if use_dora else "lora"), init_lora_weights, lora_bias)
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(
                f"lora_bias=True on a {type(self.base_layer).__name__} without a bias: the adapter runs, but it "
                "cannot be merged (no base bias to fold s·b_B into)",
                stacklevel=2,
            )
        self.adapters_stamp += 1
        self.r[adapter] = r
        self.lora_alpha[adapter] = lora_alpha
        self.use_rslora[adapter] = use_rslora
        self.scaling[adapter] = lora_scaling(lora_alpha, r, use_rslora)
        self.lora_dropout[adapter] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        a, b = self.kind.create(self, adapter, r)
        weight = self.kind.base_weight(self.base_layer)
        if dtype is None:
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
        for container, factor in zip(self.kind.containers, (a, b)):
            getattr(self, container)[adapter] = factor.to(device=weight.device, dtype=dtype)
        variant = variant or ("dora" if use_dora else "lora")
        if not run_start(self, adapter, init_lora_weights, variant):  # PiSSA, OLoRA, orthogonal (starts.py)
            self.kind.init_factors(self, adapter, init_lora_weights)
        if init_lora_weights == "loftq":
            loftq_initialize(self, adapter, **(loftq_config or {}))
        if lora_bias:
            self.kind.attach_lora_bias(self, adapter, init_lora_weights)
        self.variant[adapter] = VARIANTS[variant]
        for name, holder in self.variant[adapter].containers.items():  # the variant's own state, made on first use
            if name not in self._modules:
                setattr(self, name, holder())
        self.variant[adapter].attach(self, adapter)
        self.variant[adapter].initialize(self, adapter, init_lora_weights)

    @property
    def row_adapters(self) -> RowRouting | None:
        routes = ROUTES.get()
        return None if routes is None else routes.get(self)

    @property
    def use_dora(self) -> dict[str, bool]:
        """PEFT's per-adapter flag, read-only here (the variant is chosen when the adapter is added)."""
        return {a: v.name == "dora" for a, v in self.variant.items()}

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def _check(self, adapter: str) -> None:
        if adapter not in self.r:
            raise AdapterNotFoundError(
                f"adapter {adapter!r} is not on this layer; it holds {self.adapter_names()}" + suggest(adapter, self.r)
            )

    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        self._check(adapter)
        out: dict[str, torch.Tensor] = {}
        for container in self.kind.containers:
            holder = getattr(self, container)[adapter]
            if isinstance(holder, nn.Parameter):
                out[container] = holder
            else:
                for name, param in holder.named_parameters():
                    out[self.variant[adapter].file_key(f"{container}.{name}")] = param
        out.update(self.variant[adapter].extra_state(self, adapter))
        return out

    def adapter_param_key(self, adapter: str, file_key: str) -> str:
        return self.variant[adapter].param_key(self, adapter, file_key)

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        self._check(adapter)
        b_bias = self.kind.b_bias(self, adapter)
        return [
            *self.kind.factor_params(self, adapter),
            *([] if b_bias is None else [b_bias]),
            *self.variant[adapter].extra_state(self, adapter).values(),
        ]

    def delete(self, adapter: str) -> None:
        """Remove an adapter. Raises :class:`MergeError` if it is merged (unmerge first)."""
        self._check(adapter)
        if adapter in self.merged_adapters:
            raise MergeError(f"adapter {adapter!r} is merged into the base weight; unmerge it before deleting it")
        for container in (*self.kind.containers, "lora_dropout"):
            del getattr(self, container)[adapter]
        for name in self.variant[adapter].containers:  # the variant's state goes with its last adapter
            holder = getattr(self, name)
            del holder[adapter]
            if not len(holder):
                delattr(self, name)
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.variant):
            del table[adapter]
        self._forget(adapter)

    def original(self) -> nn.Module:
        return self.base_layer

    # -- the update -----------------------------------------------------------------------------------

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW of one adapter in the base weight's layout and shape (computed by :func:`lora_delta`)."""
        self._check(adapter)
        a, b = self.variant[adapter].factors(self, adapter)
        delta = lora_delta(b, a, self.scaling[adapter])
        return self.kind.to_weight_layout(delta, self.base_layer)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold each adapter (default: the active ones) into the base weight, in place, in the given order.

        Plain LoRA adds ΔW; DoRA rescales the rows of W + ΔW (:mod:`lorakit.tuners.lora.dora`). The weight is
        changed in place under ``no_grad``, which bumps its version counter (caches keyed on it see it).

        Args:
            safe_merge: compute the merged weight (every adapter of ``adapter_names`` folded in, in the weight's
                own dtype) out of place first, and refuse to write it if it holds NaN or Inf.

        Raises:
            MergeError: the base layer is quantized, or ``safe_merge`` found non-finite values; the weight is
                unchanged.
        """
        pending = self._pending(adapter_names)
        self._refuse_quantized(pending)
        weight = self.kind.base_weight(self.base_layer)
        if safe_merge:
            merged, records = self.merged_weight(pending)
            if records:
                weight.copy_(merged)
            for adapter, record in records:
                self._merge_records[adapter] = record
                self.merged_adapters.append(adapter)
                self._shift_bias(adapter, 1.0)
            return
        for adapter in pending:
            self._merge_records[adapter] = self.variant[adapter].merge(self, adapter, weight, False)
            self.merged_adapters.append(adapter)
            self._shift_bias(adapter, 1.0)

    def _refuse_quantized(self, pending: list[str]) -> None:
        """Also refuse what the kind cannot merge (a grouped convolution, B's bias without a base bias)."""
        super()._refuse_quantized(pending)
        self.kind.refuse_merge(self, pending)

    def _bias_delta(self, adapter: str) -> torch.Tensor | None:
        """``s·b_B`` of a ``lora_bias`` adapter (what merging adds to the base bias), or None."""
        b_bias = self.kind.b_bias(self, adapter)
        return None if b_bias is None else b_bias * self.scaling[adapter]

    def _shift_bias(self, adapter: str, sign: float) -> None:
        """Base bias ± s·b_B (merge: +1, unmerge: −1), in place; nothing for an adapter without B's bias."""
        delta = self._bias_delta(adapter)
        if delta is not None:
            bias = self.base_layer.bias
            bias.add_(delta.to(bias.dtype), alpha=sign)

    def merged_result(self, adapter_names: list[str]) -> Any:
        return self.merged_weight(adapter_names)

    def _kind_for(self, base_layer: nn.Module) -> LayerKind:
        return lora_kind(kind_for(base_layer))

    @torch.no_grad()
    def merged_weight(self, adapter_names: list[str] | None = None) -> tuple[torch.Tensor, list[tuple[str, Any]]]:
        """The base weight with ``adapter_names`` (default: the active ones; those held and not merged yet, in
        order) folded in, computed out of place in the weight's own dtype, and each adapter's merge record. The
        layer is left unchanged; with nothing to merge, the weight itself and no record.

        Raises:
            MergeError: a step gives NaN/Inf in the weight's dtype (the sum overflows, or DoRA's rescale does).
        """
        weight = self.kind.base_weight(self.base_layer)
        bias = getattr(self.base_layer, "bias", None)
        records = []
        pending = self._pending(adapter_names)
        self.kind.refuse_merge(self, pending)
        for adapter in pending:
            weight, record = self.variant[adapter].merged(self, adapter, weight)
            check_finite(weight, adapter)
            delta = self._bias_delta(adapter)
            if delta is not None:  # the base bias as merging would leave it, checked too
                bias = bias + delta.to(bias.dtype)
                check_finite(bias, adapter)
            records.append((adapter, record))
        return weight, records

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, newest first; the base weight comes back within float tolerance."""
        weight = self.kind.base_weight(self.base_layer)
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            self.variant[adapter].unmerge(self, adapter, weight, self._merge_records.pop(adapter))
            self._shift_bias(adapter, -1.0)

    # -- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        routes = current_routes()  # each row its own adapter, for this call only (lorakit.tuners.lora.mixed)
        if routes is not None:
            routing = routes.get(self)
            if routing is not None:
                return mixed_forward(self, x, routing, *args, **kwargs)
        pending = [a for a in self.active_adapters if a not in self.merged_adapters]
        if len(pending) == 1 and not args and not kwargs:
            fused = self.variant[pending[0]].fast_forward(self, pending[0], x)
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        for adapter in pending:
            result = self.variant[adapter].add_output(self, adapter, x, result)
        return result

    def extra_repr(self) -> str:
        ranks = ", ".join(
            f"{a}: r={self.r[a]}" + (f" {self.variant[a].name}" if self.variant[a].name != "lora" else "")
            for a in self.r
        )
        return f"kind={self.kind.name}, adapters=({ranks}), merged={self.merged_adapters}"
