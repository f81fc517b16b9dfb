"""Batches that mix adapters: each row of a batch through its own adapter, with no loop over adapters.

For the adapters a_1 … a_n that a batch names, the layer concatenates their factors once (cached while the
weights do not change)::

    A' = [A_1; …; A_n]              (ΣR, in)     R_j the rank of a_j (ranks may differ)
    B' = [s_1 B_1, …, s_n B_n]      (out, ΣR)

and computes, for the whole batch, ``h = x A'ᵀ`` and ``y = base(x) + (h ⊙ M) B'ᵀ``, where the 0/1 mask M keeps
for each row only the block of columns that belongs to its adapter. That is two GEMMs whatever the number of
adapters (their inner size ΣR stays small next to the base layer's), instead of PEFT's loop of one sub-batch
per adapter (Punica, arXiv 2310.18547, and S-LoRA, arXiv 2311.03285, batch the same way with custom kernels).
A row named ``"__base__"``, or naming an adapter this layer does not hold (a target it lacks), gets nothing.
Variants whose update is not additive say so through :meth:`LoraVariant.output_scale`: DoRA rows are then
rescaled by their own m / ‖W + s·BA‖ (bias added after), so LoRA, DoRA and AdaLoRA rows mix in one batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lorakit.errors import UnsupportedModuleError

if TYPE_CHECKING:
    from lorakit.layers.lora import LoraLayer

#: The row name that means "the base model, no adapter" (PEFT's spelling).
BASE_ROW = "__base__"
#: Layer kinds whose adapter acts on the input's last dimension, where rows can be mixed.
MIXABLE_KINDS = ("linear", "conv1d_hf", "linear4bit", "linear8bit")


class _Pack:
    """The concatenated factors of some adapters of one layer, and what each row needs from them."""

    def __init__(self, layer: LoraLayer, adapters: tuple[str, ...]) -> None:
        a_parts, b_parts, self.blocks, self.scales = [], [], {}, {}
        start = 0
        for adapter in adapters:
            variant = layer.variant[adapter]
            a, b = variant.factors(layer, adapter)  # (r, in), (out, r)
            a_parts.append(a.detach())
            b_parts.append(b.detach() * layer.scaling[adapter])
            self.blocks[adapter] = (start, start + a.shape[0])
            start += a.shape[0]
            scale = variant.output_scale(layer, adapter)
            if scale is not None:
                self.scales[adapter] = scale.detach().reshape(-1)
        dtype = a_parts[0].dtype
        self.a = torch.cat([p.to(dtype) for p in a_parts], dim=0)
        self.b = torch.cat([p.to(dtype) for p in b_parts], dim=1)
        self.width = start
        self._rows: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def rows(self, names: tuple[str, ...], out_features: int, dtype: torch.dtype, device: Any) -> tuple[Any, Any]:
        """``(mask (batch, ΣR), per-row output scale (batch, out) or None)`` for this order of rows (cached)."""
        got = self._rows.get(names)
        if got is None:
            mask = torch.zeros(len(names), self.width, dtype=self.a.dtype, device=device)
            scale = torch.ones(len(names), out_features, dtype=dtype, device=device) if self.scales else None
            for row, name in enumerate(names):
                block = self.blocks.get(name)
                if block is not None:
                    mask[row, block[0] : block[1]] = 1
                if scale is not None and name in self.scales:
                    scale[row] = self.scales[name].to(dtype)
            if len(self._rows) > 16:
                self._rows.clear()
            got = self._rows[names] = (mask, scale)
        return got


def _stamp(layer: LoraLayer, adapters: tuple[str, ...]) -> tuple[Any, ...]:
    """What the cached pack was built for: cheap to read on every forward (no walk over the parameters)."""
    return adapters, layer.adapters_stamp, id(layer.base_layer), tuple(layer.scaling[a] for a in adapters)


def _watched(layer: LoraLayer, adapters: tuple[str, ...]) -> list[tuple[torch.Tensor, int, int]]:
    """The tensors a pack depends on, with their version counters and storage, read once per pack."""
    tensors = [layer.kind.base_weight(layer.base_layer)]
    for adapter in adapters:
        tensors.extend(layer.kind.factor_params(layer, adapter))
        tensors.extend(layer.variant[adapter].extra_state(layer, adapter).values())
    return [(t, t._version, t.data_ptr()) for t in tensors]


def _fresh(watched: list[tuple[torch.Tensor, int, int]]) -> bool:
    return all(t._version == version and t.data_ptr() == ptr for t, version, ptr in watched)


def row_names_for(names: list[str], batch: int) -> list[str]:
    """``names`` stretched to ``batch`` rows when generation repeats each row (beam search, several samples)."""
    if batch == len(names):
        return names
    if batch % len(names) == 0:
        k = batch // len(names)
        return [n for n in names for _ in range(k)]
    raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch} rows")


def mixed_forward(layer: LoraLayer, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
    """``layer``'s output for a batch whose row i goes through adapter ``names[i]`` (no dropout: eval only)."""
    if layer.kind.name not in MIXABLE_KINDS:
        raise UnsupportedModuleError(
            f"batches that mix adapters run through linear layers; {type(layer.base_layer).__name__} is adapted "
            "here: give the batch a single adapter (set_adapter) instead"
        )
    names = row_names_for(names, x.shape[0])
    result = layer.base_layer(x, *args, **kwargs)
    adapters = tuple(a for a in dict.fromkeys(names) if a in layer.r)
    if not adapters:
        return result
    stamp = _stamp(layer, adapters)
    cached = layer.__dict__.get("_mixed_pack")  # one batch composition at a time
    if cached is None or cached[0] != stamp or not _fresh(cached[1]):
        cached = layer.__dict__["_mixed_pack"] = (stamp, _watched(layer, adapters), _Pack(layer, adapters))
    pack = cached[2]

    batch = x.shape[0]
    mask, scale = pack.rows(tuple(names), result.shape[-1], result.dtype, x.device)
    h = F.linear(x.to(pack.a.dtype), pack.a) * mask.view((batch,) + (1,) * (x.dim() - 2) + (pack.width,))
    if scale is None and result.dtype == h.dtype:  # one GEMM that also adds: result + h B'ᵀ
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, pack.width), pack.b.t())
        return flat.view(result.shape)
    update = F.linear(h, pack.b).to(result.dtype)
    if scale is None:
        return result + update
    bias = layer.kind.bias(layer.base_layer)
    z = result - bias if bias is not None else result
    out = (z + update) * scale.view((batch,) + (1,) * (result.dim() - 2) + (result.shape[-1],))
    return out + bias if bias is not None else out
