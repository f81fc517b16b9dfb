"""Batches that mix adapters: each row of a batch through its own adapter, with no loop over adapters.

For the adapters a_1 … a_n that a batch names (ranks R_j, scales s_j), a layer keeps their factors side by side
(a *pack*, cached while the weights do not change; a batch naming some of a cached pack's adapters runs on it when
that is at most :data:`COVER_SLACK` times as wide, so a server whose decode steps name ever-changing subsets of
its adapters keeps one pack of all of them) and picks, per batch, the cheaper of two exact ways to apply them:

* **grouped** (the usual case: rows spread over several adapters). Rows are gathered by adapter into
  ``X_g (n, G·T, in)`` (G the most rows any adapter has, T tokens per row, missing rows padded) and run through
  the stacked factors, ranks zero-padded to R = max R_j::

      A_stackᵀ (n, in, R),  Bᵀ_stack (n, R, out) = (s_j B_j)ᵀ
      U = bmm(bmm(X_g, A_stackᵀ), Bᵀ_stack)          (n, G·T, out), scattered back onto the rows

  Two batched GEMMs whatever n, and each row multiplies only its own adapter's factors: the arithmetic of a
  batch with a single adapter. This is the segment matmul of Punica (arXiv 2310.18547) and S-LoRA
  (arXiv 2311.03285), written with ``torch.bmm`` instead of custom kernels.
* **masked** (most rows on one adapter, a few on others, where padding every group to G would waste more):
  ``A' = [A_1; …; A_n] (ΣR_j, in)``, ``B' = [s_1 B_1, …, s_n B_n] (out, ΣR_j)`` and
  ``y = base(x) + ((x A'ᵀ) ⊙ M) B'ᵀ`` with a 0/1 mask M keeping each row's own block of columns.

The plan costs are ``n·G·R`` against ``batch·ΣR_j`` multiply-adds per token and input feature, the grouped plan
charged :data:`GROUPED_OVERHEAD` more for its extra operations (which outweigh its savings in small batches).
PEFT instead loops over adapters, one sub-batch each. A row named ``"__base__"``, or naming an adapter this layer
does not hold (a target it lacks), gets nothing. Variants whose update is not additive say so through
:meth:`LoraVariant.output_scale`: DoRA rows are then rescaled by their own m / ‖W + s·BA‖ (bias added after), so
LoRA, DoRA and AdaLoRA rows mix in one batch. An adapter with a bias on B (``lora_bias``) adds its ``s·b_B`` to
its own rows (a ``(batch, out)`` table built with the plan).

**Packed sequences.** With names per token (``rows_routed(names, per_token=True)``: ``batch × sequence`` names),
every token is a row of its own: sequences of different adapters packed into one row (``lorakit serve`` prefills
waiting prompts that way, without padding) each go through their own adapter.

**Threads.** Which rows go where is per-call state: :func:`routed` puts it in a context variable (each thread,
each asyncio task, sees its own), mapping the layers of the model that was called to that call's
:class:`RowRouting`, so a model called inside another model's forward keeps its own rows (or its active
adapters). Everything a layer caches across calls (its pack, the pack's stacks and plans) is an immutable
object that is replaced whole, never changed in place, so threads that build or read it at once each see a
complete one.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lorakit.errors import UnsupportedModuleError
from lorakit.layers.routing import RowRouting

if TYPE_CHECKING:
    from lorakit.tuners.lora.layer import LoraLayer

#: What the grouped plan's extra operations (gather, two batched GEMMs, scatter) cost over the masked plan's two
#: GEMMs, in the plans' units (rank columns × rows): measured on a 2-core CPU for SmolLM2-135M's layers
#: (8 adapters, r = 8, one token per row), the masked plan is faster up to about 8 rows, the grouped from 16 on.
GROUPED_OVERHEAD = 512

#: A call runs on a cached pack of more adapters than it names (the others' blocks masked, their groups empty) when
#: that pack is at most this many times as wide as the adapters named; a call of several adapters that finds none
#: packs every adapter of the layer when that is at most this much wider. A server's decode steps name ever-new
#: subsets of its adapters as requests come and go. Measured on SmolLM2-135M (8 adapters, r = 8, 8 rows, one CPU
#: thread): building a pack costs about two decode steps (~280 ms: a copy of the factors), while 4 adapters on the
#: pack of all 8 step 6% slower than on their own (decode reads every factor of the pack: memory-bound).
COVER_SLACK = 2

#: The packs a layer keeps are together at most this many times as wide as all its adapters (the oldest go first):
#: a server over 8 adapters keeps the pack of all of them (decode steps), each alone (one prompt's prefill), and a
#: few small compositions (several prompts).
PACK_BUDGET = 3

#: Compositions a layer remembers the pack of (a server over many adapters meets ever new ones); a pack no
#: composition names any more goes.
MAX_COMPOSITIONS = 256

#: Layer kinds whose adapter acts on the input's last dimension, where rows can be mixed.
MIXABLE_KINDS = ("linear", "conv1d_hf", "linear4bit", "linear8bit")


class _Rows:
    """Where the rows of one order go for one layout of factors (adapters in order, their ranks): the gather and
    scatter indices (grouped) or the 0/1 mask (masked). The same for every layer of that layout, so a call builds
    it once for all of them (:func:`_prepare` keeps it on the call's routing)."""

    def __init__(self, names: tuple[str, ...], blocks: dict[str, tuple[int, int]], device: Any, dtype: torch.dtype):
        batch, width = len(names), max(stop for _, stop in blocks.values())
        max_rank = max(stop - start for start, stop in blocks.values())
        groups: dict[str, list[int]] = {a: [] for a in blocks}
        for row, name in enumerate(names):
            if name in groups:
                groups[name].append(row)
        most = max(len(rows) for rows in groups.values())
        self.grouped = len(groups) * most * max_rank + GROUPED_OVERHEAD < batch * width
        if self.grouped:
            slots = [rows[i] if i < len(rows) else -1 for rows in groups.values() for i in range(most)]
            self.groups, self.width = len(groups), most
            self.gather = torch.tensor([max(r, 0) for r in slots], dtype=torch.long, device=device)
            kept = [i for i, r in enumerate(slots) if r >= 0]
            self.kept = None if len(kept) == len(slots) else torch.tensor(kept, dtype=torch.long, device=device)
            self.scatter = torch.tensor([r for r in slots if r >= 0], dtype=torch.long, device=device)
        else:
            self.mask = torch.zeros(batch, width, dtype=dtype, device=device)
            for row, name in enumerate(names):
                block = blocks.get(name)
                if block is not None:
                    self.mask[row, block[0] : block[1]] = 1


class _Plan:
    """How one order of rows goes through a pack: its :class:`_Rows`, and this layer's per-row tables (B biases,
    DoRA scales) when it has them."""

    def __init__(self, pack: _Pack, names: tuple[str, ...], rows: _Rows, out_features: int, dtype: torch.dtype):
        self.rows = rows
        self.scale = self.bias = None
        if pack.biases:  # lora_bias rows: their own s·b_B; every other row 0
            self.bias = torch.zeros(len(names), out_features, dtype=dtype, device=pack.device)
            for row, name in enumerate(names):
                if name in pack.biases:
                    self.bias[row] = pack.biases[name].to(dtype)
        if pack.scales:  # DoRA rows: their own m / ‖W + s·BA‖; every other row 1
            self.scale = torch.ones(len(names), out_features, dtype=dtype, device=pack.device)
            for row, name in enumerate(names):
                if name in pack.scales:
                    self.scale[row] = pack.scales[name].to(dtype)


class _Pack:
    """The factors of some adapters of one layer, and the plans of the row orders seen.

    Holds the factors as the layer has them (detached; no copy for plain LoRA) and builds, on first use, only the
    layout its plans need: the rank-padded stacks (grouped) or the concatenation (masked).
    """

    def __init__(self, layer: LoraLayer, adapters: tuple[str, ...]) -> None:
        self.adapters = adapters
        self.factors, self.blocks, self.scales, self.biases = {}, {}, {}, {}
        start = 0
        for adapter in adapters:
            variant = layer.variant[adapter]
            a, b = variant.factors(layer, adapter)  # (r, in), (out, r)
            self.factors[adapter] = (a.detach(), b.detach(), layer.scaling[adapter])
            self.blocks[adapter] = (start, start + a.shape[0])
            start += a.shape[0]
            scale = variant.output_scale(layer, adapter)
            if scale is not None:
                self.scales[adapter] = scale.detach().reshape(-1)
            b_bias = layer.kind.b_bias(layer, adapter)
            if b_bias is not None:
                self.biases[adapter] = (b_bias * layer.scaling[adapter]).detach()
        first_a, first_b, _ = self.factors[adapters[0]]
        self.dtype, self.device = first_a.dtype, first_a.device
        self.in_features, self.out_features = first_a.shape[1], first_b.shape[0]
        self.width = start
        self.layout = tuple(self.blocks.items())  # what a _Rows depends on
        self.max_rank = max(stop - begin for begin, stop in self.blocks.values())
        # built on first use, then only ever replaced whole (threads may build them at once: both are equal)
        self._stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._concatenated: tuple[torch.Tensor, torch.Tensor] | None = None
        self._plans: dict[tuple[str, ...], _Plan] = {}  # copied on write: a reader never sees it change

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_stackᵀ (n, in, R), Bᵀ_stack (n, R, out))``, ranks zero-padded to R (built on first use)."""
        got = self._stacks
        if got is None:
            n, r = len(self.adapters), self.max_rank
            a_stack_t = torch.zeros(n, self.in_features, r, dtype=self.dtype, device=self.device)
            bt_stack = a_stack_t.new_zeros(n, r, self.out_features)
            for j, (a, b, s) in enumerate(self.factors.values()):
                a_stack_t[j, :, : a.shape[0]] = a.t()
                bt_stack[j, : a.shape[0]] = b.t() * s
            got = self._stacks = (a_stack_t, bt_stack)
        return got

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A' (ΣR, in), B'ᵀ (ΣR, out))`` with each adapter's scale folded into its block of B' (first use; B'ᵀ
        contiguous: a GEMM reads it faster than a transposed view of B')."""
        got = self._concatenated
        if got is None:
            parts = list(self.factors.values())
            a_cat = torch.cat([a.to(self.dtype) for a, _, _ in parts], dim=0)
            bt_cat = torch.cat([(b * s).to(self.dtype).t() for _, b, s in parts], dim=0).contiguous()
            got = self._concatenated = (a_cat, bt_cat)
        return got

    def plan(self, names: tuple[str, ...], routing: RowRouting, out_features: int, dtype: torch.dtype) -> _Plan:
        plans = self._plans
        got = plans.get(names)
        if got is None:
            key = (names, self.layout, self.device, self.dtype)
            rows = routing.shared.get(key)
            if rows is None:
                rows = routing.shared[key] = _Rows(names, self.blocks, self.device, self.dtype)
            got = _Plan(self, names, rows, out_features, dtype)
            # a new dict, published in one assignment (another thread's plan may be dropped: it is rebuilt)
            self._plans = {**(plans if len(plans) <= 16 else {}), names: got}
        return got


def _stamp(layer: LoraLayer, adapters: tuple[str, ...]) -> tuple[Any, ...]:
    """What the cached pack was built for: cheap to read on every forward (no walk over the parameters)."""
    return adapters, layer.adapters_stamp, id(layer.base_layer), tuple(layer.scaling.get(a) for a in adapters)


def _watched(layer: LoraLayer, adapters: tuple[str, ...]) -> list[tuple[torch.Tensor, int, int]]:
    """The tensors a pack depends on, with their version counters and storage, read once per pack."""
    tensors = [layer.kind.base_weight(layer.base_layer)]
    for adapter in adapters:
        tensors.extend(layer.kind.factor_params(layer, adapter))
        b_bias = layer.kind.b_bias(layer, adapter)
        if b_bias is not None:
            tensors.append(b_bias)
        tensors.extend(layer.variant[adapter].extra_state(layer, adapter).values())
    return [(t, t._version, t.data_ptr()) for t in tensors]


class _Entry:
    """A cached pack and what it was built from (its stamp, the tensors it depends on)."""

    __slots__ = ("stamp", "watched", "pack")

    def __init__(self, layer: LoraLayer, adapters: tuple[str, ...]) -> None:
        self.stamp, self.watched = _stamp(layer, adapters), _watched(layer, adapters)
        self.pack = _Pack(layer, adapters)

    def fresh(self, layer: LoraLayer) -> bool:
        """The layer's adapters, scales and weights are still those the pack was built from (False once an adapter
        is added or removed, the stamp changes: the pack may hold one that is gone)."""
        return self.stamp == _stamp(layer, self.pack.adapters) and all(
            t._version == version and t.data_ptr() == ptr for t, version, ptr in self.watched
        )


def _pack_for(layer: LoraLayer, adapters: tuple[str, ...]) -> _Pack:
    """A fresh pack holding ``adapters``: the one cached for them, else the narrowest cached pack that holds them
    within :data:`COVER_SLACK`, else a new one (of every adapter of the layer where that is within the slack)."""
    packs: dict[tuple[str, ...], _Entry] = layer.__dict__.get("_mixed_packs", {})
    entry = packs.get(adapters)
    if entry is not None and entry.fresh(layer):
        return entry.pack
    live = [e for e in dict.fromkeys(packs.values()) if e.fresh(layer)]  # oldest first
    width, wanted = sum(layer.r[a] for a in adapters), set(adapters)
    covers = [e for e in live if wanted <= e.pack.blocks.keys() and e.pack.width <= COVER_SLACK * width]
    if covers:
        entry = min(covers, key=lambda e: e.pack.width)
    else:
        entry = None
        everything = tuple(layer.r)
        if len(adapters) > 1 and everything != adapters and sum(layer.r.values()) <= COVER_SLACK * width:
            # an adapter this call does not name must not fail it: then pack only those it names
            with contextlib.suppress(Exception):
                entry = _Entry(layer, everything)
        entry = entry or _Entry(layer, adapters)
        budget = PACK_BUDGET * sum(layer.r.values()) - entry.pack.width
        while live and sum(e.pack.width for e in live) > budget:  # the oldest go first
            live.pop(0)
        live.append(entry)
    # a new dict, published in one assignment (threads): each composition seen, on the pack it runs on
    keep = set(map(id, live))
    kept = {key: e for key, e in packs.items() if id(e) in keep and key not in (adapters, entry.pack.adapters)}
    kept = dict(list(kept.items())[max(0, len(kept) - MAX_COMPOSITIONS + 2) :])  # the oldest are forgotten
    layer.__dict__["_mixed_packs"] = {**kept, entry.pack.adapters: entry, adapters: entry}
    return entry.pack


def mixed_forward(layer: LoraLayer, x: torch.Tensor, routing: RowRouting, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``layer``'s output for a batch whose row i goes through adapter ``routing.rows(batch)[i]`` (eval only: no
    dropout); with names per token (:attr:`RowRouting.per_token`), token j of the flattened batch through
    ``routing.names[j]``."""
    if routing.per_token and x.dim() > 2 and x.shape[0] != len(routing.names):  # each token a row: (b·T, 1, in)
        out = mixed_forward(layer, x.reshape(-1, 1, x.shape[-1]), routing, *args, **kwargs)
        return out.view(*x.shape[:-1], out.shape[-1])
    result = layer.base_layer(x, *args, **kwargs)
    seen = routing._seen.get(layer)
    if seen is not None and seen[0] == x.shape[0] and seen[1] == result.dtype:
        pack, plan = seen[2], seen[3]
    else:
        pack, plan = _prepare(layer, routing, x, result)
        routing._seen[layer] = (x.shape[0], result.dtype, pack, plan)
    if pack is None:
        return result
    out = _apply(layer, pack, plan, x, result)
    if plan.bias is None:
        return out
    return out + plan.bias.view((x.shape[0],) + (1,) * (out.dim() - 2) + (out.shape[-1],))


def _apply(layer: LoraLayer, pack: _Pack, plan: _Plan, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` (the base output) plus each row's own ``s·B A x`` (DoRA rows rescaled); no B biases."""
    if plan.rows.grouped:
        update = _grouped_update(pack, plan.rows, x)
        if update.dtype != result.dtype:
            update = update.to(result.dtype)
        if plan.scale is None:
            return result.index_add_(0, plan.rows.scatter, update)
        update = torch.zeros_like(result).index_add_(0, plan.rows.scatter, update)
    else:
        batch = x.shape[0]
        a_cat, bt_cat = pack.concatenated()
        h = F.linear(x.to(pack.dtype), a_cat) * plan.rows.mask.view((batch,) + (1,) * (x.dim() - 2) + (pack.width,))
        if plan.scale is None and result.dtype == h.dtype:  # one GEMM that also adds: result + h B'ᵀ
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, pack.width), bt_cat)
            return flat.view(result.shape)
        update = torch.matmul(h, bt_cat).to(result.dtype)
        if plan.scale is None:
            return result + update
    bias = layer.kind.bias(layer.base_layer)
    z = result - bias if bias is not None else result
    out = (z + update) * plan.scale.view((x.shape[0],) + (1,) * (result.dim() - 2) + (result.shape[-1],))
    return out + bias if bias is not None else out


def _prepare(
    layer: LoraLayer, routing: RowRouting, x: torch.Tensor, result: torch.Tensor
) -> tuple[_Pack | None, _Plan | None]:
    """The layer's pack for the adapters this call names (rebuilt if its factors changed) and the rows' plan."""
    if layer.kind.name not in MIXABLE_KINDS:
        raise UnsupportedModuleError(
            f"batches that mix adapters run through linear layers; {type(layer.base_layer).__name__} is adapted "
            "here: give the batch a single adapter (set_adapter) instead"
        )
    names = routing.rows(x.shape[0])
    # in the layer's own order, not the rows': a batch whose rows change order keeps the pack (its stacks)
    adapters = tuple(a for a in layer.r if a in routing.used)
    if not adapters:
        return None, None
    pack = _pack_for(layer, adapters)
    return pack, pack.plan(names, routing, result.shape[-1], result.dtype)


def _grouped_update(pack: _Pack, plan: _Rows, x: torch.Tensor) -> torch.Tensor:
    """Each used row's update ``s_j B_j A_j x``, in ``plan.scatter``'s order of rows: (used rows, …, out)."""
    a_stack_t, bt_stack = pack.stacks()
    rows = x.index_select(0, plan.gather)  # (n·G, …, in), grouped by adapter
    if rows.dtype != a_stack_t.dtype:
        rows = rows.to(a_stack_t.dtype)
    inner = rows.shape[1:-1]
    h = torch.bmm(rows.view(plan.groups, -1, rows.shape[-1]), a_stack_t)  # (n, G·T, R)
    u = torch.bmm(h, bt_stack).view(plan.groups * plan.width, *inner, bt_stack.shape[-1])  # (n·G, …, out)
    return u if plan.kept is None else u.index_select(0, plan.kept)
