"""How an adapter's update enters the layer: the strategy interface, and plain LoRA.

A :class:`~lorakit.tuners.lora.layer.LoraLayer` holds, per adapter, a *variant*: a stateless strategy that decides
how that adapter changes the layer's output and its base weight. Plain LoRA adds ``s · B A x``; DoRA
(:mod:`lorakit.tuners.lora.dora`) rescales the result per output feature. Per-adapter state (factors, magnitudes,
merge records) lives on the layer; variants only compute. The layer's geometry (Linear, Conv, Embedding…)
is the other, independent strategy (:mod:`lorakit.layers.kinds`), so every variant works on every kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lorakit.errors import MergeError

if TYPE_CHECKING:
    from lorakit.tuners.lora.layer import LoraLayer


class LoraVariant:
    """Plain LoRA (LoRA paper §4.1): ``h = base(x) + s · B A dropout(x)``; merging adds ΔW = s·BA to W."""

    name = "lora"
    #: The per-adapter containers this variant keeps on the layer (PEFT's attribute names): created when the
    #: first adapter of the variant is attached, removed with the last one (a variant owns its state).
    containers: ClassVar[dict[str, type[nn.Module]]] = {}

    def attach(self, layer: LoraLayer, adapter: str) -> None:
        """Create the variant's own parameters once A and B exist and are initialised (none for plain LoRA)."""

    def initialize(self, layer: LoraLayer, adapter: str, init: bool | str) -> None:
        """Re-initialise after :meth:`attach` where the variant starts differently from LoRA (no-op here)."""

    def extra_state(self, layer: LoraLayer, adapter: str) -> dict[str, nn.Parameter]:
        """The variant's parameters keyed as in PEFT's files (relative to the layer, without the name)."""
        return {}

    def file_key(self, state_key: str) -> str:
        """The file key of a factor tensor named ``state_key`` (``lora_A.weight``...) relative to the layer."""
        return state_key

    def param_key(self, layer: LoraLayer, adapter: str, file_key: str) -> str:
        """The ``state_dict`` key (relative to the layer) of the tensor stored as ``file_key``."""
        container, _, rest = file_key.partition(".")
        if container == "lora_magnitude_vector":  # PEFT's files drop the module's ``.weight``
            return f"{container}.{adapter}.weight"
        return f"{container}.{adapter}.{rest}" if rest else f"{container}.{adapter}"

    def output_scale(self, layer: LoraLayer, adapter: str) -> torch.Tensor | None:
        """A per-output-feature factor applied to ``W x + s·B A x`` before the bias, or None (plain LoRA adds)."""
        return None

    def factors(self, layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, k), B (d, r))`` with ΔW = s·BA: LoRA's factors as the layer kind flattens them."""
        return layer.kind.factors(layer, adapter)

    def add_output(self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The layer's output after this adapter, given ``result`` (the output so far) and the input ``x``."""
        return layer.kind.add_output(layer, adapter, x, result)

    def fast_forward(self, layer: LoraLayer, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """``base(x)`` plus this adapter alone in one fused computation, or None where that is not exact."""
        return layer.kind.fused_forward(layer, adapter, x)

    def merge(self, layer: LoraLayer, adapter: str, weight: torch.Tensor, safe_merge: bool) -> Any:
        """Fold the adapter into ``weight`` in place (under ``no_grad``); returns what :meth:`unmerge` needs.

        Raises:
            MergeError: ``safe_merge`` and the merged weight would hold NaN/Inf; ``weight`` is unchanged.
        """
        if safe_merge:
            merged, record = self.merged(layer, adapter, weight)
            _commit_finite(weight, merged, adapter)
            return record
        weight.add_(layer.delta_weight(adapter).to(weight.dtype))
        return None

    def merged(self, layer: LoraLayer, adapter: str, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``weight`` with the adapter folded in, as a new tensor in ``weight``'s dtype (``weight`` is unchanged),
        and what :meth:`unmerge` will need: the same arithmetic as :meth:`merge`, out of place."""
        return weight + layer.delta_weight(adapter).to(weight.dtype), None

    def unmerge(self, layer: LoraLayer, adapter: str, weight: torch.Tensor, record: Any) -> None:
        """Undo :meth:`merge` in place; ``record`` is what it returned."""
        weight.sub_(layer.delta_weight(adapter).to(weight.dtype))

    def unmerge_projection(
        self, layer: LoraLayer, adapter: str, projection: torch.Tensor, a: torch.Tensor, record: Any
    ) -> torch.Tensor:
        """Given ``A Mᵀ`` ``(r, d)`` for a weight M holding this merged adapter, ``A M'ᵀ`` for the weight M'
        before the merge — from the low-rank factors alone: ``A ΔWᵀ = s·(A A_jᵀ) B_jᵀ`` is r×r_j×d work."""
        a_j, b_j = (f.to(projection.dtype) for f in self.factors(layer, adapter))
        return projection - layer.scaling[adapter] * (a.to(projection.dtype) @ a_j.t()) @ b_j.t()


def check_finite(merged: torch.Tensor, adapter: str) -> None:
    """Raise :class:`MergeError` if ``merged`` (a weight with ``adapter`` folded in) holds NaN/Inf (safe_merge)."""
    if not torch.isfinite(merged).all():
        raise MergeError(
            f"merging adapter {adapter!r} would put NaN/Inf into the base weight (in its dtype, {merged.dtype}); "
            "nothing was merged"
        )


def _commit_finite(weight: torch.Tensor, merged: torch.Tensor, adapter: str) -> None:
    """Copy ``merged`` into ``weight`` unless it holds NaN/Inf (safe_merge)."""
    check_finite(merged, adapter)
    weight.copy_(merged)
