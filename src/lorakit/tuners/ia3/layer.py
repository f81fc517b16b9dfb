"""IA³'s layer: a base layer whose output (or, for feedforward modules, input) is rescaled by learned vectors.

Liu et al. 2022 (arXiv 2205.05638), §3.3: ``h = l ⊙ (W x + b)`` for keys, values and other output-scaled
modules, ``h = W (l ⊙ x) + b`` for feedforward modules. Several active adapters multiply their vectors. A merge
is exact in the weight's own dtype: W ⊙ l along the output axis (and b ⊙ l), or along the input axis.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterExistsError, AdapterNotFoundError, MergeError, UnsupportedModuleError, suggest
from lorakit.layers.base import WeightLayer
from lorakit.layers.kinds import ConvKind, LayerKind
from lorakit.layers.routing import RowRouting, current_routes

#: What a merge keeps to undo itself exactly: the entries where l is 0 or not finite (dividing cannot bring those
#: back), and the original weight slices and bias values there.
MergeRecord = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class IA3Layer(WeightLayer):
    """A base layer plus any number of named IA³ vectors.

    Attributes:
        base_layer: the wrapped, frozen module (``nn.Linear``, transformers ``Conv1D``, ``nn.ConvNd``, a
            bitsandbytes linear).
        kind: the :class:`~lorakit.layers.kinds.LayerKind` strategy for the base layer's geometry.
        ia3_l: the vector of each adapter (PEFT's attribute name and state-dict keys ``ia3_l.<adapter>``). Linear
            layers: ``(out_features, 1)``, or ``(1, in_features)`` for a feedforward adapter; convolutions
            ``(1, features, 1, …)``, as PEFT shapes them.
        feedforward: per adapter, whether it rescales the input (True) or the output (False).
        merged_adapters: adapters whose vector currently sits inside ``base_layer``'s weight (and bias).
        disable_adapters: when True, ``forward`` returns ``base_layer``'s output alone.
    """

    def __init__(self, base_layer: nn.Module, kind: LayerKind) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.in_features, self.out_features = kind.features(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self.merged_adapters: list[str] = []
        self._merge_records: dict[str, MergeRecord] = {}
        self.disable_adapters = False

    @property
    def is_feedforward(self) -> bool:
        """PEFT's per-layer flag: whether the layer's (first) adapter rescales the input."""
        return next(iter(self.feedforward.values()), False)

    @property
    def _channels_first(self) -> bool:
        """Convolutions hold features in dimension 1 of their activations; linears in the last one."""
        return isinstance(self.kind, ConvKind)

    # -- adapters -------------------------------------------------------------------------------------

    def add(self, adapter: str, feedforward: bool, init_ia3_weights: bool = True, dtype: torch.dtype | None = None):
        """Create adapter ``adapter``'s vector on the base weight's device.

        Args:
            feedforward: rescale the input (``in_features`` entries) instead of the output (``out_features``).
            init_ia3_weights: ones (the layer starts equal to its base), else standard normal.
            dtype: the vector's dtype; defaults to the base weight's floating dtype (float32 otherwise).

        Raises:
            AdapterExistsError: the layer already holds an adapter of that name.
        """
        if adapter in self.ia3_l:
            raise AdapterExistsError(f"adapter {adapter!r} already exists on this layer")
        features = self.in_features if feedforward else self.out_features
        if self._channels_first:
            shape = (1, features) + (1,) * (self.kind.base_weight(self.base_layer).dim() - 2)
        else:
            shape = (1, features) if feedforward else (features, 1)
        weight = self.kind.base_weight(self.base_layer)
        if dtype is None:
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
        vector = torch.ones(shape) if init_ia3_weights else torch.randn(shape)
        self.adapters_stamp += 1
        self.ia3_l[adapter] = nn.Parameter(vector.to(device=weight.device, dtype=dtype))
        self.feedforward[adapter] = feedforward

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def _check(self, adapter: str) -> None:
        if adapter not in self.ia3_l:
            raise AdapterNotFoundError(
                f"adapter {adapter!r} is not on this layer; it holds {self.adapter_names()}"
                + suggest(adapter, self.feedforward)
            )

    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        self._check(adapter)
        return {"ia3_l": self.ia3_l[adapter]}

    def adapter_param_key(self, adapter: str, file_key: str) -> str:
        return f"{file_key}.{adapter}"

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        self._check(adapter)
        return [self.ia3_l[adapter]]

    def delete(self, adapter: str) -> None:
        """Remove an adapter. Raises :class:`MergeError` if it is merged (unmerge first)."""
        self._check(adapter)
        if adapter in self.merged_adapters:
            raise MergeError(f"adapter {adapter!r} is merged into the base weight; unmerge it before deleting it")
        del self.ia3_l[adapter]
        del self.feedforward[adapter]
        self._forget(adapter)

    def original(self) -> nn.Module:
        return self.base_layer

    # -- merging --------------------------------------------------------------------------------------

    def _weight_vector(self, adapter: str) -> tuple[torch.Tensor, int]:
        """The adapter's vector shaped to scale the base weight in its own layout, and the axis it scales."""
        shape = (self.kind.column_shape if self.feedforward[adapter] else self.kind.row_shape)(self.base_layer)
        return self.ia3_l[adapter].detach().reshape(shape), shape.index(-1)

    def _bias_vector(self, adapter: str) -> torch.Tensor | None:
        """The adapter's vector for the base bias: output scaling only (a feedforward vector acts before it)."""
        return None if self.feedforward[adapter] else self.ia3_l[adapter].detach().flatten()

    def merged_result(self, adapter_names: list[str]) -> Any:
        return self.merged_tensors(adapter_names)

    @torch.no_grad()
    def merged_tensors(
        self, adapter_names: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[str, MergeRecord]]]:
        """The base weight and bias with ``adapter_names`` (default: the active ones; those held and not merged,
        in order) folded in, computed out of place in their own dtypes, and each adapter's merge record. The layer
        is left unchanged.

        Raises:
            MergeError: a step gives NaN/Inf in the weight's (or bias's) dtype.
        """
        weight = self.kind.base_weight(self.base_layer)
        bias = self.kind.bias(self.base_layer)
        records = []
        for adapter in self._pending(adapter_names):
            weight, bias, record = self._merge_step(adapter, weight, bias)
            for what, tensor in (("weight", weight), ("bias", bias)):
                if tensor is not None and not torch.isfinite(tensor).all():
                    raise MergeError(
                        f"merging adapter {adapter!r} gives NaN/Inf in the {what} ({tensor.dtype}); its vector holds "
                        "non-finite or too large values. Nothing was merged"
                    )
            records.append((adapter, record))
        return weight, bias, records

    def _merge_step(
        self, adapter: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, MergeRecord]:
        vector, axis = self._weight_vector(adapter)
        lost = (~torch.isfinite(vector) | (vector == 0)).flatten().nonzero().flatten()
        bias_vector = self._bias_vector(adapter)
        scales_bias = bias is not None and bias_vector is not None
        record = (lost, weight.index_select(axis, lost), bias[lost].clone() if scales_bias else None)
        weight = (weight * vector).to(weight.dtype)
        if scales_bias:
            bias = (bias * bias_vector).to(bias.dtype)
        return weight, bias, record

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold each adapter (default: the active ones) into the base weight (and bias), in place, in order.

        Args:
            safe_merge: compute the merged weight and bias (every adapter of ``adapter_names`` folded in, in
                their own dtypes) out of place first, and refuse to write them if they hold NaN or Inf.

        Raises:
            MergeError: the base layer is quantized, or ``safe_merge`` found non-finite values; the layer is
                unchanged.
        """
        pending = self._pending(adapter_names)
        self._refuse_quantized(pending)
        if not pending:
            return
        weight = self.kind.base_weight(self.base_layer)
        bias = self.kind.bias(self.base_layer)
        if safe_merge:
            new_weight, new_bias, records = self.merged_tensors(pending)
        else:
            new_weight, new_bias, records = weight, bias, []
            for adapter in pending:
                new_weight, new_bias, record = self._merge_step(adapter, new_weight, new_bias)
                records.append((adapter, record))
        weight.copy_(new_weight)
        if bias is not None:
            bias.copy_(new_bias)
        for adapter, record in records:
            self._merge_records[adapter] = record
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, newest first: divide by l again, and put back the slices where l was 0 or not finite
        (kept by the merge). Exact up to one rounding of the division."""
        weight = self.kind.base_weight(self.base_layer)
        bias = self.kind.bias(self.base_layer)
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            lost, weight_slices, bias_values = self._merge_records.pop(adapter)
            vector, axis = self._weight_vector(adapter)
            safe = torch.where(torch.isfinite(vector) & (vector != 0), vector, torch.ones_like(vector))
            weight.copy_((weight / safe).to(weight.dtype))
            weight.index_copy_(axis, lost, weight_slices)
            bias_vector = self._bias_vector(adapter)
            if bias is not None and bias_vector is not None:
                safe = torch.where(torch.isfinite(bias_vector) & (bias_vector != 0), bias_vector, 1.0)
                bias.copy_((bias / safe).to(bias.dtype))
                bias[lost] = bias_values

    # -- forward --------------------------------------------------------------------------------------

    def _scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The products of the active, unmerged adapters' vectors on the input side and on the output side, shaped
        for activations (a convolution's ``(1, C, 1, …)`` as it is, a linear layer's flattened); None for a side
        that no such adapter scales. One pass over the active list, as few tensor ops as the vectors allow."""
        before = after = None
        merged = self.merged_adapters
        for adapter in self.active_adapters:
            if merged and adapter in merged:
                continue
            vector = self.ia3_l[adapter]
            if self.feedforward[adapter]:
                before = vector if before is None else before * vector
            else:
                after = vector if after is None else after * vector
        if not self._channels_first:
            before = None if before is None else before.flatten()
            after = None if after is None else after.flatten()
        return before, after

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        routes = current_routes()  # each row its own adapter, for this call only (adapter_names=...)
        if routes is not None:
            routing = routes.get(self)
            if routing is not None:
                return self._routed_forward(x, routing, *args, **kwargs)
        before, after = self._scales()
        if before is not None:
            x = _scaled(x, before)
        result = self.base_layer(x, *args, **kwargs)
        return result if after is None else _scaled(result, after)

    def _routed_forward(self, x: torch.Tensor, routing: RowRouting, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row i of ``x`` through adapter ``routing.rows(batch)[i]`` (``"__base__"``: none): one vector per row."""
        if self._channels_first:
            raise UnsupportedModuleError(
                "a batch that mixes IA³ adapters (adapter_names=...) runs on linear layers only; this layer wraps a "
                f"{type(self.base_layer).__name__}. Run these rows in separate batches with set_adapter"
            )
        rows = routing.rows(x.shape[0])
        before = self._row_scales(rows, x, feedforward=True)
        if before is not None:
            x = (x * before).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        after = self._row_scales(rows, result, feedforward=False)
        if after is not None:
            result = (result * after).to(result.dtype)
        return result

    def _row_scales(self, rows: tuple[str, ...], like: torch.Tensor, feedforward: bool) -> torch.Tensor | None:
        """``(batch, 1, …, features)``: each row's vector on one side, ones for rows without one there."""
        held = {a for a in set(rows) if a in self.feedforward and self.feedforward[a] == feedforward}
        if not held:
            return None
        features = self.in_features if feedforward else self.out_features
        dtype = next(self.ia3_l[a].dtype for a in held)
        ones = torch.ones(features, dtype=dtype, device=like.device)
        scales = torch.stack([self.ia3_l[a].flatten() if a in held else ones for a in rows])
        return scales.view(len(rows), *(1,) * (like.dim() - 2), features)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{a}: {'input' if ff else 'output'}" for a, ff in self.feedforward.items())
        return f"kind={self.kind.name}, adapters=({adapters}), merged={self.merged_adapters}"


def _scaled(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t * scale`` in ``t``'s dtype: the product in the promoted dtype, cast back only if it differs (PEFT's
    ``(t * scale).to(t.dtype)`` without the call when the dtypes already agree)."""
    out = t * scale
    return out if out.dtype == t.dtype else out.to(t.dtype)
