"""The decode batch's KV cache: one preallocated slot per running sequence, each at its own position.

Rows ``0 … B-1`` of per-layer buffers ``keys[l], values[l] (rows_cap, kv_heads, len_cap, head_dim)`` hold the
B running sequences; row i holds ``lengths[i]`` tokens. A decode step feeds one new token per row at position
``lengths[i]`` (its RoPE position too) and attends over ``[0, max(lengths) + 1)`` through an additive mask that
hides each row's unused tail, so every row computes what it would alone: its own keys, its own positions.

* A sequence joins with its prefill's cache (batch 1, computed exactly as ``generate`` computes it) copied into
  row B: :meth:`SlotCache.append`.
* A sequence that ends leaves a hole that the last row moves into (one copy of one row,
  :meth:`SlotCache.remove`), so the running rows stay ``0 … B-1`` and the step's keys are a view of the
  buffers, never a gather.
* The buffers grow by doubling (rows up to ``max_rows``, length up to the context) and are released when the
  batch empties, so memory follows what runs instead of ``max_batch × context``.

Why slots rather than per-sequence caches padded together each step: measured on CPU (one thread, fp32, a random
model of SmolLM2-135M's shape: 30 layers, 3 KV heads; base rows; 16 decode steps, 12 for the long prompts; median
of 3 alternated runs; both produce the same tokens), ``benchmarks/bench_serve_kv.py``::

    rows  prompt tokens   slots (ms/step)   per-sequence caches padded per step (ms/step)
       8      32-256             99                106
      32      32-256            215                263
      32    768-1024            345                731

Padding per-sequence caches copies every row's whole cache in each layer at each step (and appending to them
copies it again), while a slot step writes one token per row and reads the buffers in place: the gap grows with
the batch and the context. Slots cost memory for the longest running sequence times the rows, which the
growth-by-doubling keeps to what the batch holds.

The model sees :class:`StepCache` as its ``cache`` (``past_key_values``): a transformers attention layer calls
``cache.update(key_states, value_states, layer_idx, ...)`` and attends over what it returns, with the 4-D mask
passed as ``attention_mask`` used as is. Models that mix sliding-window and full-attention layers, or use linear
attention, are refused; a model whose layers all slide gets its window as the context
(:func:`lorakit.serve.protocol.model_context`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class SlotCache:
    """The keys and values of the running sequences, one row each, rows ``0 … rows-1`` in use.

    Args:
        num_layers: the model's attention layers.
        max_rows: the most sequences at once (``--max-batch``).
        max_len: the context length: no row grows past it.
    """

    def __init__(self, num_layers: int, max_rows: int, max_len: int) -> None:
        self.num_layers, self.max_rows, self.max_len = num_layers, max_rows, max_len
        self.keys: list[torch.Tensor] = []  # per layer (rows_cap, kv_heads, len_cap, head_dim)
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # tokens held by each running row

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def capacity(self) -> tuple[int, int]:
        """``(rows, length)`` the buffers hold now (0, 0 when released)."""
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def append(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> int:
        """Add a row holding one sequence's cache and return its index.

        Args:
            keys, values: per layer ``(1, kv_heads, T, head_dim)``, a batch-1 prefill's cache.
        """
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of keys and values, got {len(keys)}, {len(values)}")
        length = keys[0].shape[2]
        if length >= self.max_len:
            raise ValueError(f"a cache of {length} tokens leaves no room in a context of {self.max_len}")
        if self.rows >= self.max_rows:
            raise ValueError(f"all {self.max_rows} rows are in use")
        row = self.rows
        self._reserve(row + 1, length + 1, keys, values)
        for layer in range(self.num_layers):
            self.keys[layer][row, :, :length] = keys[layer][0]
            self.values[layer][row, :, :length] = values[layer][0]
        self.lengths.append(length)
        return row

    def remove(self, row: int) -> int | None:
        """Drop ``row``; the last row moves into its place. Returns the index the moved row had (None if none)."""
        last = self.rows - 1
        if not 0 <= row <= last:
            raise IndexError(f"row {row} is not in use (rows in use: {self.rows})")
        moved = None
        if row != last:
            n = self.lengths[last]
            for layer in range(self.num_layers):
                self.keys[layer][row, :, :n] = self.keys[layer][last, :, :n]
                self.values[layer][row, :, :n] = self.values[layer][last, :, :n]
            self.lengths[row] = n
            moved = last
        self.lengths.pop()
        if not self.lengths:  # nothing runs: give the memory back
            self.keys, self.values = [], []
        return moved

    def step(self, start: int = 0, stop: int | None = None) -> tuple[StepCache, torch.Tensor, torch.Tensor]:
        """What a decode step over rows ``[start, stop)`` passes to the model.

        Returns:
            ``(cache, attention_mask (b, 1, 1, L), position_ids (b, 1))``: the mask is additive (0 where a row
            attends, the dtype's minimum elsewhere) over ``L = max(lengths) + 1`` positions.
        """
        stop = self.rows if stop is None else stop
        if not 0 <= start < stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) are not all in use (rows in use: {self.rows})")
        lengths = self.lengths[start:stop]
        span = max(lengths) + 1
        if span > self.max_len:
            raise ValueError(f"a row of {span - 1} tokens has no room left in a context of {self.max_len}")
        self._reserve(stop, span)
        buffer = self.keys[0]
        positions = torch.tensor(lengths, dtype=torch.long, device=buffer.device)  # (b,)
        mask = torch.zeros(len(lengths), 1, 1, span, dtype=buffer.dtype, device=buffer.device)
        hidden = torch.arange(span, device=buffer.device)[None, :] > positions[:, None]  # (b, L)
        mask.masked_fill_(hidden[:, None, None, :], torch.finfo(buffer.dtype).min)
        return StepCache(self, start, stop, positions, span), mask, positions[:, None]

    def advance(self, start: int = 0, stop: int | None = None) -> None:
        """After a step over ``[start, stop)`` succeeded: each of those rows holds one more token."""
        stop = self.rows if stop is None else stop
        for i in range(start, stop):
            self.lengths[i] += 1

    def _reserve(
        self,
        rows: int,
        length: int,
        like_keys: Sequence[torch.Tensor] | None = None,
        like_values: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Grow the buffers (doubling, within the limits) to hold ``rows`` rows of ``length`` tokens."""
        have_rows, have_len = self.capacity()
        if rows <= have_rows and length <= have_len:
            return
        new_rows = min(self.max_rows, max(rows, 2 * have_rows, 1))
        new_len = min(self.max_len, max(length, 2 * have_len, 16))
        if self.keys:
            like_keys, like_values = self.keys, self.values
        if like_keys is None or like_values is None:
            raise RuntimeError("the first row of a slot cache comes from append()")
        keys, values = [], []
        for layer in range(self.num_layers):
            for like, out in ((like_keys[layer], keys), (like_values[layer], values)):
                grown = like.new_zeros(new_rows, like.shape[1], new_len, like.shape[3])
                if self.keys:  # copy what the rows in use hold
                    grown[:have_rows, :, :have_len] = like
                out.append(grown)
        self.keys, self.values = keys, values


class StepCache:
    """The cache object a model's attention layers see during one decode step over rows ``[start, stop)``.

    ``update`` writes each row's new key and value at that row's own position and returns the rows' keys and
    values over the step's span: a view of the slot buffers, no copy.
    """

    def __init__(self, slots: SlotCache, start: int, stop: int, positions: torch.Tensor, span: int) -> None:
        self.slots, self.start, self.stop, self.span = slots, start, stop, span
        self.positions = positions  # (b,) where each row's new token goes
        self.row_index = torch.arange(start, stop, device=positions.device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``key_states, value_states (b, kv_heads, 1, head_dim)`` -> the rows' ``(b, kv_heads, span, head_dim)``."""
        if key_states.shape[2] != 1:
            raise ValueError(f"a decode step feeds one token per row, got {key_states.shape[2]}")
        keys, values = self.slots.keys[layer_idx], self.slots.values[layer_idx]
        keys[self.row_index, :, self.positions] = key_states[:, :, 0].to(keys.dtype)
        values[self.row_index, :, self.positions] = value_states[:, :, 0].to(values.dtype)
        return keys[self.start : self.stop, :, : self.span], values[self.start : self.stop, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest row before this step (transformers asks when no ``position_ids`` are given)."""
        return self.span - 1


def cache_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer ``(keys, values)`` lists, each ``(batch, kv_heads, T, head_dim)``, of a transformers cache a
    forward returned: a ``DynamicCache`` (``layers`` in transformers 5, ``key_cache`` in 4) or legacy tuples."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [layer.keys for layer in layers], [layer.values for layer in layers]
    if hasattr(cache, "key_cache"):
        return list(cache.key_cache), list(cache.value_cache)
    return [k for k, _ in cache], [v for _, v in cache]
