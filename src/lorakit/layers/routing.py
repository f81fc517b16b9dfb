"""Which adapter each row of a batch goes through, for one call: per-call state kept in a context variable.

:func:`routed` makes a :class:`RowRouting` the one the given layers follow, in the current thread or asyncio
task only, and only for the layers of the model that was called (a model called inside another model's forward
keeps its own rows). Any method's layers can read it (:data:`ROUTES`); LoRA's use it in
:mod:`lorakit.tuners.lora.mixed`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

#: The row name that means "the base model, no adapter" (PEFT's spelling).
BASE_ROW = "__base__"


class RowRouting:
    """Which adapter each row of the batches in one call (a forward, or a whole ``generate``) goes through.

    One object per call, shared by the layers of the called model and by no other call (see :func:`routed`). It
    remembers, per layer, the pack and plan that layer used, so from the second forward of a generation on
    (every new token) a layer goes straight to its GEMMs: the factors are checked for changes once per call, not
    once per token (they cannot change while a forward runs). A caller that knows no weight changes between its
    calls may keep one for the next call with the same names, in one thread (``lorakit serve``'s scheduler between
    decode steps; ``rows_routed`` takes it): the checks are then made once for all of them.
    """

    __slots__ = ("names", "per_token", "adapters", "used", "shared", "_rows", "_seen")

    def __init__(self, names: list[str], per_token: bool = False) -> None:
        self.names = tuple(names)
        #: the names are per token of a packed batch (``batch × sequence`` of them), not per row: layers that
        #: act on each token alone (LoRA's linear layers) take them; others refuse (see :meth:`rows`)
        self.per_token = per_token
        self.adapters = tuple(dict.fromkeys(names))  # each name once, in order of first use
        self.used = frozenset(self.adapters)
        #: what the layers of this call build once for all of them (LoRA: where the rows go per layout)
        self.shared: dict[Any, Any] = {}
        self._rows: dict[int, tuple[str, ...]] = {}
        self._seen: dict[nn.Module, tuple[int, torch.dtype, Any, Any]] = {}

    def rows(self, batch: int) -> tuple[str, ...]:
        """The names stretched to ``batch`` rows when generation repeats each row (beam search, several samples)."""
        got = self._rows.get(batch)
        if got is None:
            if self.per_token and batch != len(self.names):
                raise ValueError(
                    f"adapter names are given per token ({len(self.names)}), and this layer takes them per row "
                    f"({batch}): tokens of different adapters packed in one row run through LoRA linear layers only"
                )
            if batch == len(self.names):
                got = self.names
            elif batch % len(self.names) == 0:
                got = tuple(n for n in self.names for _ in range(batch // len(self.names)))
            else:
                raise ValueError(f"adapter_names has {len(self.names)} entries for a batch of {batch} rows")
            self._rows[batch] = got
        return got


#: The routings in force in this context (thread, asyncio task): layer -> the routing of the call that set it.
#: Never changed in place: :func:`routed` sets a new dict and restores the old one.
ROUTES: ContextVar[dict[nn.Module, RowRouting] | None] = ContextVar("lorakit_row_routes", default=None)

#: How many :func:`routed` blocks are open, in every thread together (changed under ``_OPEN_LOCK``).
_open_routings = 0
_OPEN_LOCK = threading.Lock()


def current_routes() -> dict[nn.Module, RowRouting] | None:
    """:data:`ROUTES` in this context, what a layer's ``forward`` asks.

    Under ``torch.compile`` with no :func:`routed` block open anywhere, None without reading the context variable:
    dynamo cannot trace ``ContextVar.get`` (a graph break in every adapter layer: 10 graphs instead of 1 for a
    2-layer LLaMA with LoRA on q and v), but it guards the count as a constant, so a compiled forward recompiles,
    and reads :data:`ROUTES`, once a block is open. Eager code always reads :data:`ROUTES`.
    """
    if not _open_routings and torch.compiler.is_compiling():
        return None
    return ROUTES.get()


@contextlib.contextmanager
def routed(layers: Iterable[nn.Module], routing: RowRouting) -> Iterator[None]:
    """Inside the block, and only in the current context (thread, asyncio task), ``layers`` run ``routing``.

    Routings nest: the layers of a model called inside the block keep their own routing, or none.
    """
    global _open_routings
    outer = ROUTES.get()
    routes = dict.fromkeys(layers, routing)
    with _OPEN_LOCK:
        _open_routings += 1
    token = ROUTES.set(routes if outer is None else {**outer, **routes})
    try:
        yield
    finally:
        ROUTES.reset(token)
        with _OPEN_LOCK:
            _open_routings -= 1
