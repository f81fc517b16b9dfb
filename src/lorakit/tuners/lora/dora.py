"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

The adapted weight is ``W' = m ⊙ V / ‖V‖_c`` with ``V = W + s·BA`` (paper eq. 5): a trainable magnitude m
(one entry per row of W in PyTorch's ``(out, in)`` layout, initialised to ‖W + s·BA‖_c, so the model starts
equal to the base) times the direction of the LoRA-updated weight. For an input x the layer outputs::

    h = (m / ‖V‖) ⊙ (W x + s·B A x) + bias

so DoRA is a LoRA update followed by a rescale per output feature. This module is that *variant* of the
LoRA layer (:class:`DoraVariant`); the layer kinds supply the geometry, so it works on every kind.

Three things differ from the reference implementation (and from PEFT):

* **The norm never materialises V** (:func:`dora_norm`). Row i of V is ``W_i + s·B_i A``, so
  ``‖V_i‖² = ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ``: A Wᵀ ``(r, out)``, A Aᵀ ``(r, r)`` and the
  constant ‖W_i‖² (cached while W is unchanged) — r·in·out multiply-adds and no out×in temporary. PEFT
  builds V, and an in×in identity to get BA, on every forward.
* **The norm is computed once per weight state** and reused until W, A, B or s change (the tensors' identity
  and version counters, and the count of optimizer steps taken in the process, are the cache key;
  ``train()``/``eval()`` also clear it): once in eval mode, once per optimizer step in training. PEFT
  recomputes it on every forward unless a global switch is set.
* **Detached by default** (paper §4.3: ‖V‖ treated as a constant in backward, −24% training memory on
  LLaMA-7B for ~0.2 points). ``grad_through_norm=True`` on the magnitude keeps it in the graph, as eq. 5
  is written.

Several adapters on one layer follow PEFT: each DoRA adapter rescales the output accumulated so far,
``h ← (m/‖V‖) ⊙ (h − bias + s·BAx) + bias``, with ‖V‖ = ‖W + s·BA‖ taken against the base weight W without
any merged adapter. Merging goes the same way, ``W ← (m/‖V‖) ⊙ (W + s·BA)``, so merged, partly merged and
unmerged layers compute the same function, and unmerging divides by the recorded factor and subtracts ΔW.

With dropout active in training, the input of the rescaled part is dropped as in the paper's code and PEFT:
``h = base(x) + (m/‖V‖ − 1) ⊙ W·drop(x) + (m/‖V‖) ⊙ s·BA·drop(x)``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lorakit.tuners.lora.variant import LoraVariant, _commit_finite

if TYPE_CHECKING:
    from lorakit.tuners.lora.layer import LoraLayer


def dora_norm(w_sq: torch.Tensor, a_mt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms ``‖M_i + s·B_i A‖`` of the LoRA-updated weight without forming it (DoRA eq. 5's ‖V‖_c).

    Args:
        w_sq: ``(d,)``, the squared row norms ‖M_i‖² of the base weight M ``(d, k)``.
        a_mt: ``(r, d)``, A Mᵀ.
        a: ``(r, k)``, the LoRA down-projection A.
        b: ``(d, r)``, the LoRA up-projection B.
        scaling: s.

    Returns:
        ``(d,)``: ``sqrt(‖M_i‖² + 2s·B_i·(A Mᵀ)_{:,i} + s²·B_i (A Aᵀ) B_iᵀ)``; the sum is clamped at 0 before
        the root, since rounding can take an exactly zero row slightly below it.
    """
    cross = (b * a_mt.t()).sum(1)  # B_i · (A M_iᵀ)
    quad = ((b @ (a @ a.t())) * b).sum(1)  # B_i (A Aᵀ) B_iᵀ = ‖B_i A‖²
    return (w_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0).sqrt()


_STEPS = [0]  # optimizer steps taken in this process, by any torch optimizer (see _count_optimizer_steps)
_STEPS_HOOK: list[Any] = []
_STEPS_LOCK = threading.Lock()


def _count_optimizer_steps() -> None:
    """Count every optimizer step of the process (a global ``torch.optim`` post-step hook, registered once).

    Version counters alone miss some updates: torch's fused AdamW (``fused=True``, what ``lorakit train`` and
    the HF Trainer's ``optim="adamw_torch_fused"`` run) writes the parameters without moving them (torch 2.13),
    so a cache keyed on versions only would keep the first step's norm for the whole run. Any step of any
    optimizer invalidates every cached norm: at most one recomputation per step, what training needs anyway.
    """
    with _STEPS_LOCK:
        if _STEPS_HOOK:
            return

        def bump(optimizer: Any, args: Any, kwargs: Any) -> None:
            _STEPS[0] += 1

        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEPS_HOOK.append(register_optimizer_step_post_hook(bump))


class DoraMagnitude(nn.Module):
    """The trainable magnitude m of one DoRA adapter on one layer, and the caches of its norm.

    Attributes:
        weight: m, of the layer kind's ``channel_shape``: ``(out,)`` for linear layers and embeddings,
            ``(1, out, 1, …)`` for convolutions (PEFT's layout, so files match).
        grad_through_norm: False (default): ‖W + s·BA‖ is a constant in backward (paper §4.3). True: it is
            differentiated, and gradients reach A and B through it too.
        cache_norm: True (default): norms are reused while their tensors are unchanged (:meth:`cached`). False:
            recomputed on every call, for weights that change without moving their version counters (FSDP2
            refills a unit's unsharded parameters in place so; ``lorakit.training.fsdp`` turns it off).
    """

    def __init__(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(tuple(shape), device=device, dtype=dtype))
        self.grad_through_norm = False
        self.cache_norm = True
        self._cache: dict[str, tuple[list[tuple[Any, ...]], Any, torch.Tensor]] = {}
        _count_optimizer_steps()

    def cached(
        self, name: str, tensors: Sequence[torch.Tensor], extra: Any, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """``compute()``, reused while ``tensors`` are the same objects holding the same storage at the same
        version (in-place updates bump the version; ``module.to()`` and ``.data =`` swap the storage) and no
        optimizer has stepped since (:func:`_count_optimizer_steps`).

        Under ``torch.compile`` the norm is computed in the graph: dynamo cannot trace the cache's storage checks
        (a graph break in every DoRA layer), and a compiled graph cannot keep a tensor across calls anyway."""
        if not self.cache_norm or torch.compiler.is_compiling():
            return compute()
        try:
            key = [(weakref.ref(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors]
        except RuntimeError:  # inference-mode tensors carry no version counter: never cache
            return compute()
        extra = (extra, _STEPS[0])
        hit = self._cache.get(name)
        if (
            hit is not None
            and hit[1] == extra
            and all(
                entry[0]() is t and entry[1:] == (t._version, t.data_ptr(), t.dtype, t.device)
                for entry, t in zip(hit[0], tensors)
            )
        ):
            return hit[2]
        value = compute()
        self._cache[name] = (key, extra, value)
        return value

    def clear_cache(self) -> None:
        """Forget cached norms (needed only after changing a weight through ``.data``, which bumps nothing)."""
        self._cache.clear()

    def train(self, mode: bool = True) -> DoraMagnitude:
        self.clear_cache()  # a mode switch is where users expect state to be re-read
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, grad_through_norm={self.grad_through_norm}"


class DoraVariant(LoraVariant):
    """DoRA on any layer kind; the magnitudes live in the layer's ``lora_magnitude_vector`` ModuleDict."""

    name = "dora"
    containers: ClassVar[dict[str, type[nn.Module]]] = {"lora_magnitude_vector": nn.ModuleDict}

    # -- parameters -----------------------------------------------------------------------------------

    def attach(self, layer: LoraLayer, adapter: str) -> None:
        """m ← ‖W + s·BA‖ (= ‖W‖ with the default B = 0), so the adapted model starts equal to the base."""
        a, _ = layer.kind.factor_params(layer, adapter)
        magnitude = DoraMagnitude(layer.kind.channel_shape(layer), a.device, a.dtype)
        with torch.no_grad():
            magnitude.weight.copy_(self.norm(layer, adapter).view(magnitude.weight.shape))
        layer.lora_magnitude_vector[adapter] = magnitude

    def extra_state(self, layer: LoraLayer, adapter: str) -> dict[str, nn.Parameter]:
        return {"lora_magnitude_vector": layer.lora_magnitude_vector[adapter].weight}

    # -- the norm and the scale -----------------------------------------------------------------------

    def norm(self, layer: LoraLayer, adapter: str) -> torch.Tensor:
        """``(d,)``: ‖M + s·BA‖ per row, M the layer's base weight *without* merged adapters (:func:`dora_norm`).

        Measuring against the unmerged weight makes the function independent of which other adapters are
        merged: merging never changes outputs. With adapters merged, ``A Mᵀ`` is corrected by their low-rank
        factors and ‖M_i‖² comes from a one-off copy of the unmerged weight. Differentiable in A, B (and W,
        if it requires grad) when grad mode is on; computed in float32 or the factors' wider dtype.
        """
        kind, base = layer.kind, layer.base_layer
        a, b = kind.factors(layer, adapter)
        dtype = torch.promote_types(a.dtype, torch.float32)
        weight = kind.base_weight(base)
        if weight.requires_grad and torch.is_grad_enabled() and not layer.merged_adapters:
            w_sq = kind.row_sq_norms(base, dtype)
        else:
            holder = layer._modules.get("lora_magnitude_vector")
            magnitude = holder[adapter] if holder is not None and adapter in holder else None
            w_sq = (
                self._unmerged_w_sq(layer, dtype)
                if magnitude is None
                else magnitude.cached("w_sq", (weight,), dtype, lambda: self._unmerged_w_sq(layer, dtype))
            )
        a_mt = kind.project_rows(base, a).to(dtype)
        for merged in reversed(layer.merged_adapters):
            a_mt = layer.variant[merged].unmerge_projection(layer, merged, a_mt, a, layer._merge_records[merged])
        return dora_norm(w_sq, a_mt, a.to(dtype), b.to(dtype), layer.scaling[adapter])

    @staticmethod
    def _unmerged_w_sq(layer: LoraLayer, dtype: torch.dtype) -> torch.Tensor:
        """‖M_i‖² of the base weight with every merged adapter taken out (cached by the caller)."""
        kind, base = layer.kind, layer.base_layer
        with torch.no_grad():
            if not layer.merged_adapters:
                return kind.row_sq_norms(base, dtype)
            weight = kind.base_weight(base).detach().clone()  # once per merge state, not per forward
            for merged in reversed(layer.merged_adapters):
                layer.variant[merged].unmerge(layer, merged, weight, layer._merge_records[merged])
            return kind.row_sq_norms(base, dtype, weight)

    def scale(self, layer: LoraLayer, adapter: str) -> torch.Tensor:
        """``m / ‖W + s·BA‖`` in the magnitude's shape; the norm detached unless ``grad_through_norm``.

        A detached norm is cached until W, A, B or s change: in eval mode it is computed once, in training
        once per optimizer step (gradient-accumulation micro-batches share it).
        """
        magnitude = layer.lora_magnitude_vector[adapter]
        if magnitude.grad_through_norm and torch.is_grad_enabled():
            norm = self.norm(layer, adapter)
        else:
            a, b = layer.kind.factor_params(layer, adapter)
            weight = layer.kind.base_weight(layer.base_layer)

            def compute() -> torch.Tensor:
                with torch.no_grad():
                    return self.norm(layer, adapter)

            norm = magnitude.cached("norm", (weight, a, b), layer.scaling[adapter], compute)
        m = magnitude.weight
        return m / norm.view(m.shape).to(m.dtype)

    def output_scale(self, layer: LoraLayer, adapter: str) -> torch.Tensor:
        return self.scale(layer, adapter)

    # -- forward --------------------------------------------------------------------------------------

    def add_output(self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        kind = layer.kind
        scale = self.scale(layer, adapter).to(result.dtype)
        bias = kind.bias(layer.base_layer)
        if bias is not None:
            bias = bias.view(kind.channel_shape(layer)).to(result.dtype)
        dropout = layer.lora_dropout[adapter]
        if layer.training and kind.drops_input and not isinstance(dropout, nn.Identity):
            dropped = dropout(x)
            base_part = layer.base_layer(dropped)  # W·drop(x) (+ bias, taken out below)
            if bias is not None:
                base_part = base_part - bias
            updated = kind.add_output(layer, adapter, dropped, base_part, dropout=False)
            return torch.addcmul(result - base_part, scale, updated)
        updated = kind.add_output(layer, adapter, x, result - bias if bias is not None else result)
        return torch.addcmul(bias, scale, updated) if bias is not None else scale * updated

    def fast_forward(self, layer: LoraLayer, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """Plain ``nn.Linear``: LoRA's fused product and the rescale in one kernel (see
        :class:`~lorakit.tuners.lora.fused.DoraLinearFunction`); without grad, everything after the base GEMM is
        in place."""
        if not layer.kind.has_fused_forward:
            return None
        return layer.kind.fused_forward(layer, adapter, x, scale=self.scale(layer, adapter))

    # -- merging --------------------------------------------------------------------------------------

    def merge(self, layer: LoraLayer, adapter: str, weight: torch.Tensor, safe_merge: bool) -> torch.Tensor:
        """``W ← (m / ‖W + ΔW‖) ⊙ (W + ΔW)`` row-wise; returns the factor, which :meth:`unmerge` divides by."""
        if safe_merge:
            merged, factor = self.merged(layer, adapter, weight)
            _commit_finite(weight, merged, adapter)
            return factor
        factor = self._merge_factor(layer, adapter, weight)
        weight.add_(layer.delta_weight(adapter).to(weight.dtype)).mul_(factor)
        return factor

    def merged(self, layer: LoraLayer, adapter: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m / ‖W + ΔW‖) ⊙ (W + ΔW)`` as a new tensor in ``weight``'s dtype, and the factor (out of place)."""
        factor = self._merge_factor(layer, adapter, weight)
        return (weight + layer.delta_weight(adapter).to(weight.dtype)) * factor, factor

    def _merge_factor(self, layer: LoraLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """``m / ‖W + ΔW‖`` in ``weight``'s dtype, shaped to scale its rows (the norm against the unmerged W)."""
        factor = layer.lora_magnitude_vector[adapter].weight.reshape(-1) / self.norm(layer, adapter)
        return factor.to(weight.dtype).view(layer.kind.row_shape(layer.base_layer))

    def unmerge(self, layer: LoraLayer, adapter: str, weight: torch.Tensor, record: torch.Tensor) -> None:
        weight.div_(record).sub_(layer.delta_weight(adapter).to(weight.dtype))

    def unmerge_projection(
        self, layer: LoraLayer, adapter: str, projection: torch.Tensor, a: torch.Tensor, record: torch.Tensor
    ) -> torch.Tensor:
        """Merging scaled the rows of W + ΔW by ``record``; ``A (W/f)ᵀ`` divides the columns of ``A Wᵀ``."""
        unscaled = projection / record.reshape(1, -1).to(projection.dtype)
        return super().unmerge_projection(layer, adapter, unscaled, a, record)
