"""Prompts' KV caches kept per adapter, so that a prompt that starts like an earlier one prefills only the rest.

Chat prompts repeat their beginning: the template, a system prompt, few-shot examples, the earlier turns of a
conversation. Their keys and values need not be computed again (automatic prefix caching, as vLLM's; SGLang's
RadixAttention, Zheng et al., arXiv 2312.07104). With LoRA the keys and values depend on the adapter (k_proj,
v_proj and every layer below carry it), so entries are per adapter, as in vLLM where the prefix hash includes
the LoRA id: a prompt reuses only what the same adapter computed.

:class:`PrefixCache` keeps whole prompts' caches, least recently used out first, within a byte budget. A lookup
walks the prompt in blocks of :attr:`PrefixCache.block` tokens through a chained hash (each block's key hashes
the previous key and the block's tokens, so one dictionary probe per block whatever the prompt's length), then
extends token by token inside the entry it reached: the match is the longest common prefix with that entry, not
a multiple of the block. A match always leaves the prompt's last token to compute, whose logits choose the first
answer token.

:func:`pack_prompts` lays out one forward over several prompts with cached prefixes of different lengths, packed
into one sequence without padding: their cached prefixes one after the other as the past, their remaining tokens
one after the other as the input, a mask that keeps each token to its own prompt (causal inside it), and each
token's position its place in its own prompt. Every prompt computes what it computes alone; :func:`prompt_cache`
cuts a prompt's whole cache ``(1, kv_heads, P_i + n_i, head_dim)`` back out of the forward's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Tensors = list[torch.Tensor]  # one per layer, (1, kv_heads, T, head_dim)


@dataclass(eq=False)
class _Entry:
    adapter: str
    tokens: tuple[int, ...]
    keys: Tensors
    values: Tensors
    nbytes: int
    hashes: list[int] = field(default_factory=list)


class PrefixCache:
    """Whole prompts' keys and values by adapter, within ``budget`` bytes (0: nothing is kept).

    Owned by the scheduler thread (no locking).

    Args:
        budget: the most bytes of keys and values held.
        block: tokens per hashed block of a lookup (the match itself is exact to the token).
    """

    def __init__(self, budget: int, block: int = 16) -> None:
        if budget < 0 or block < 1:
            raise ValueError(f"budget must be >= 0 bytes (got {budget}) and block >= 1 token (got {block})")
        self.budget, self.block = budget, block
        self.nbytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id(entry) -> entry, least recent first
        self._index: dict[int, dict[int, _Entry]] = {}  # chained block hash -> entries holding that prefix

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, adapter: str, tokens: Sequence[int]) -> tuple[int, Tensors, Tensors] | None:
        """The longest cached prefix of ``tokens`` computed by ``adapter``, leaving at least the last token.

        Returns:
            ``(length, keys, values)``, the keys and values per layer ``(1, kv_heads, length, head_dim)`` (views:
            read them, do not write), or None when not even one block matches.
        """
        if not self._entries:
            return None
        tokens = tuple(tokens)
        limit = len(tokens) - 1
        entry, reached, key = None, 0, hash(adapter)
        while reached + self.block <= limit:
            key = hash((key, tokens[reached : reached + self.block]))
            bucket = self._index.get(key)
            if not bucket:
                break
            entry, reached = next(reversed(bucket.values())), reached + self.block
        if entry is None or entry.tokens[:reached] != tokens[:reached]:  # none, or a hash collision
            return None
        end = min(limit, len(entry.tokens))
        while reached < end and entry.tokens[reached] == tokens[reached]:
            reached += 1
        self._entries.move_to_end(id(entry))
        return reached, [k[:, :, :reached] for k in entry.keys], [v[:, :, :reached] for v in entry.values]

    def store(self, adapter: str, tokens: Sequence[int], keys: Tensors, values: Tensors) -> None:
        """Keep a copy of a whole prompt's cache (per layer ``(1, kv_heads, len(tokens), head_dim)``).

        An entry this prompt extends (its tokens are a prefix of ``tokens``) is dropped: the new one holds it.
        A prompt whose cache alone exceeds the budget is not kept.
        """
        tokens = tuple(tokens)
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if nbytes > self.budget or len(tokens) < self.block:
            return
        hashes, key = [], hash(adapter)
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = hash((key, tokens[start : start + self.block]))
            hashes.append(key)
        for old in self._index.get(hashes[-1], {}).values():
            if old.adapter == adapter and old.tokens[: len(tokens)] == tokens:  # already held
                self._entries.move_to_end(id(old))
                return
        for key in hashes:  # entries whose whole prompt begins this one: the new entry holds them
            for old in [e for e in self._index.get(key, {}).values() if e.hashes[-1] == key]:
                if old.adapter == adapter and tokens[: len(old.tokens)] == old.tokens:
                    self._remove(old)
        entry = _Entry(adapter, tokens, [k.clone() for k in keys], [v.clone() for v in values], nbytes, hashes)
        for key in hashes:
            self._index.setdefault(key, {})[id(entry)] = entry
        self._entries[id(entry)] = entry
        self.nbytes += nbytes
        while self.nbytes > self.budget:
            self._remove(next(iter(self._entries.values())))

    def drop(self, adapter: str) -> None:
        """Forget what ``adapter`` computed (it was deleted, or a new adapter takes its name)."""
        for entry in [e for e in self._entries.values() if e.adapter == adapter]:
            self._remove(entry)

    def _remove(self, entry: _Entry) -> None:
        if self._entries.pop(id(entry), None) is None:
            return
        self.nbytes -= entry.nbytes
        for key in entry.hashes:
            bucket = self._index.get(key)
            if bucket is not None:
                bucket.pop(id(entry), None)
                if not bucket:
                    del self._index[key]


@dataclass
class Packed:
    """One forward over several prompts packed into one sequence (:func:`pack_prompts`).

    Attributes:
        args: ``input_ids (1, N)``, what is left of every prompt one after the other; for more than one prompt
            also ``position_ids (1, N)`` and an additive ``attention_mask (1, 1, N, P + N)``.
        past_keys, past_values: per layer ``(1, kv_heads, P, head_dim)``, the prompts' cached prefixes one after
            the other (None when nothing is cached).
        spans: per prompt ``(past_start, cached, new_start, new)``: where its prefix and its new tokens lie.
        last: per prompt, the index of its last token among the N new ones (its logits choose the first token).
    """

    args: dict[str, Any]
    past_keys: Tensors | None
    past_values: Tensors | None
    spans: list[tuple[int, int, int, int]]
    last: list[int]


def pack_prompts(
    prompts: Sequence[Sequence[int]],
    cached: Sequence[tuple[int, Tensors, Tensors] | None],
    device: torch.device | str,
    dtype: torch.dtype,
) -> Packed:
    """Lay out prompts whose first ``P_i`` tokens are cached (``cached[i]``) as one packed sequence.

    Packing instead of padding: the linear layers, most of a prefill's work, see exactly the tokens to compute
    (padded to the longest, prompts of 16-40 tokens past their cached prefix waste about a third). The mask lets
    each token see its own prompt's cached prefix and its own prompt's tokens up to itself, nothing else; each
    token's position is its place in its own prompt. A single prompt goes unmasked, as ``generate`` runs it.
    """
    spans, past, new = [], 0, 0
    for prompt, hit in zip(prompts, cached):
        start = 0 if hit is None else hit[0]
        if len(prompt) - start < 1:
            raise ValueError("every prompt needs at least one token beyond its cached prefix")
        spans.append((past, start, new, len(prompt) - start))
        past, new = past + start, new + len(prompt) - start
    ids = torch.tensor([t for prompt, (_, start, _, _) in zip(prompts, spans) for t in prompt[start:]])
    args: dict[str, Any] = {"input_ids": ids[None].to(device)}
    if len(prompts) > 1:
        positions = torch.cat([torch.arange(start, start + n) for _, start, _, n in spans])
        mask = torch.full((new, past + new), torch.finfo(dtype).min, dtype=dtype)
        for past_start, start, new_start, n in spans:
            mask[new_start : new_start + n, past_start : past_start + start] = 0
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            block = mask[new_start : new_start + n, past + new_start : past + new_start + n]
            block.masked_fill_(causal, 0)
        args["position_ids"] = positions[None].to(device)
        args["attention_mask"] = mask[None, None].to(device)
    keys = values = None
    if past:
        hits = [h for h in cached if h is not None and h[0]]
        keys = [torch.cat([h[1][layer] for h in hits], dim=2) for layer in range(len(hits[0][1]))]
        values = [torch.cat([h[2][layer] for h in hits], dim=2) for layer in range(len(hits[0][2]))]
    return Packed(args, keys, values, spans, [new_start + n - 1 for _, _, new_start, n in spans])


def prompt_cache(keys: Tensors, values: Tensors, span: tuple[int, int, int, int], past: int) -> tuple[Tensors, Tensors]:
    """One prompt's whole cache ``(1, kv_heads, P_i + n_i, head_dim)`` per layer out of a packed forward's
    ``(1, kv_heads, past + N, head_dim)``: its cached prefix, then its new tokens."""
    past_start, start, new_start, n = span

    def cut(t: torch.Tensor) -> torch.Tensor:
        tail = t[:, :, past + new_start : past + new_start + n]
        return torch.cat([t[:, :, past_start : past_start + start], tail], dim=2) if start else tail

    return [cut(k) for k in keys], [cut(v) for v in values]


def past_cache(keys: Tensors, values: Tensors) -> Any:
    """A transformers ``DynamicCache`` holding ``keys`` and ``values`` (per layer ``(b, kv_heads, P, head_dim)``)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    return cache
