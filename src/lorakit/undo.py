"""What undoes an injection's changes to the base model, kept while a load is still running.

Some starts rewrite the base weights as they inject (PiSSA, OLoRA and CorDA leave the residual W − s·BA in the
base). Loading a saved adapter of theirs re-runs the start, then writes the file's tensors; if that write is
refused, the model must come back exactly as it was, base weights included. An injection offers its undo
(:func:`offer`); a load collects them (:func:`keep_undos`) and calls them when it fails. Outside a load nothing is
kept (the originals would stay in memory). The list is per call (a context variable): threads never share it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

_KEPT: ContextVar[list[Callable[[], None]] | None] = ContextVar("lorakit_kept_undos", default=None)


def offer(undo: Callable[[], None]) -> None:
    """Keep ``undo`` if a load running in this context collects them; else drop it."""
    kept = _KEPT.get()
    if kept is not None:
        kept.append(undo)


@contextlib.contextmanager
def keep_undos() -> Iterator[list[Callable[[], None]]]:
    """Collect the undos of the injections made inside (newest last)."""
    kept: list[Callable[[], None]] = []
    token = _KEPT.set(kept)
    try:
        yield kept
    finally:
        _KEPT.reset(token)


def run_undos(undos: list[Callable[[], None]]) -> None:
    """Undo, newest first."""
    for undo in reversed(undos):
        undo()
