"""What the HTTP side and the scheduler exchange: requests, events, the request handle, errors, the observer.

The HTTP side builds a :class:`GenerationRequest` and gets a :class:`RequestHandle` back from
:meth:`lorakit.serve.engine.Engine.submit`; the scheduler answers through the handle with :class:`Token`,
:class:`Finished` and :class:`Failed` events, posted onto the event loop that owns the handle's queue. Also here:
the two facts about a model the server needs before it starts (:func:`model_context`, :func:`stop_token_ids`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorakit.errors import ConfigError, LorakitError
from lorakit.layers.routing import BASE_ROW

if TYPE_CHECKING:
    from lorakit.serve.engine import Engine


def model_context(config: Any, limit: int | None = None) -> int:
    """The tokens a sequence may hold: the model's positions (its sliding window, if it uses one), capped by
    ``limit``.

    Raises:
        ConfigError: layers that are not full attention in every position (linear attention, mixed
            sliding/full layers): the slot cache does not handle them.
    """
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if kinds not in ({"full_attention"}, {"sliding_attention"}):
        raise ConfigError(
            f"lorakit serve runs models whose layers all use full attention; this one has {sorted(kinds)}"
        )
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not positions:
        raise ConfigError("the model's config gives no max_position_embeddings; pass the context length (--context)")
    context = min(positions, window) if window else positions
    if limit is not None:
        if limit < 2:
            raise ConfigError(f"--context {limit}: a sequence needs at least 2 tokens (a prompt and an answer)")
        context = min(context, limit)
    return int(context)


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end an answer: those ``generate`` stops at (the generation config's ``eos_token_id``, else the
    tokenizer's eos), so that greedy answers equal ``lorakit generate``'s."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set([eos] if isinstance(eos, int) else list(eos or []))


class ServeError(LorakitError):
    """A request the server cannot take now; ``status`` is the HTTP status it answers with."""

    status = 500


class QueueFullError(ServeError):
    status = 429


class DrainingError(ServeError):
    status = 503


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue, ``n`` times. ``temperature == 0``: greedy; ``seed`` None: a random one.

    ``min_tokens``: the stop tokens cannot be chosen before that many tokens (their logits are masked, as
    ``generate(min_new_tokens=)``); ``ignore_eos``: a stop token does not end the answer (it counts as a token;
    decoded text skips it). Both are vLLM's sampling parameters of the same names, used to benchmark at fixed
    answer lengths."""

    prompt: tuple[int, ...]
    adapter: str = BASE_ROW
    max_tokens: int = 16
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class Token:
    """Choice ``choice`` produced ``token`` (never a stop token)."""

    choice: int
    token: int


@dataclass(frozen=True)
class Finished:
    """Choice ``choice`` ended: ``"stop"`` (a stop token), ``"length"`` (max_tokens or the context), or
    ``"cancelled"``; ``tokens`` counts what it generated, a final stop token included."""

    choice: int
    reason: str
    tokens: int


@dataclass(frozen=True)
class Failed:
    """The whole request failed; no further events follow."""

    status: int
    message: str


class RequestHandle:
    """The HTTP side's end of one request: ``events`` receives ``(tag, event)`` pairs, each event a
    :class:`Token`, :class:`Finished` or :class:`Failed`, in order, on the event loop that submitted it.
    Several requests may share one queue (the prompts of one HTTP request), told apart by their ``tag``."""

    def __init__(
        self, engine: Engine, request_id: int, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, tag: int
    ) -> None:
        self.id, self.tag, self._engine, self._loop = request_id, tag, engine, loop
        self.events = events

    def cancel(self, choice: int | None = None) -> None:
        """Stop generating (one choice, or all); the rows are freed at the next step."""
        self._engine.cancel(self.id, choice)

    def post(self, event: Token | Finished | Failed) -> None:
        """Called by the scheduler thread: hand ``event`` to the owning loop."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (self.tag, event))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Observer:
    """What the scheduler reports as it runs (no-ops; :class:`lorakit.serve.metrics.Metrics` records them)."""

    def waiting(self, count: int) -> None: ...

    def prefilled(self, adapter: str, cached_tokens: int) -> None:
        """A prompt was prefilled, its first ``cached_tokens`` taken from the prefix cache."""

    def step(self, rows: int) -> None: ...

    def running(self, rows: int) -> None: ...

    def finished(self, adapter: str, reason: str) -> None: ...

    def first_token(self, adapter: str, seconds: float) -> None: ...

    def next_token(self, adapter: str, seconds: float) -> None: ...
