"""The scheduler: one thread owns the model and decodes every running sequence together, whatever its adapter.

Continuous batching (Orca, Yu et al. OSDI 2022; across adapters as in Punica, arXiv 2310.18547, and S-LoRA,
arXiv 2311.03285). Each turn of the loop:

1. takes the commands the HTTP side sent (new requests, cancellations, adapter loads and deletions);
2. admits waiting requests while rows are free: their prompts are prefilled in one forward, packed into one
   sequence (each token sees only its own prompt, at its own position, through its own adapter: what each
   computes alone), each past the prefix its adapter already computed for an earlier prompt
   (:class:`~lorakit.serve.prefix.PrefixCache`), each first token chosen, each cache copied into a free row of
   the :class:`~lorakit.serve.kv.SlotCache`;
3. runs one decode step over every running row: one forward whose row i goes through its own adapter
   (``adapter_names=``, :mod:`lorakit.tuners.lora.mixed`) at its own position; rows that end leave at once.

A request joins the running batch at the next step and leaves when done, so a long answer never holds up a
short one. Greedy output is what ``generate`` gives for the same prompt and adapter alone: rows never see each
other (own cache, own positions, own adapter; the mask hides other rows' lengths).

**Threads.** Only the scheduler thread touches the model, the cache and the request records. The HTTP side
(any thread, usually the event loop) talks to it through :meth:`Engine.submit`, :meth:`Engine.cancel`,
:meth:`Engine.load_adapter` and :meth:`Engine.delete_adapter`, which put commands in a queue; the scheduler
answers each request through its :class:`RequestHandle`, posting events onto the event loop that owns it. The
few counters both sides read (waiting, running, the adapter names) are behind one lock.

**Failures.** A prefill that raises is retried prompt by prompt and a decode step that raises row by row, so
only the requests that fail alone are failed; the loop itself never dies.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import queue
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.errors import AdapterExistsError, AdapterNotFoundError, ConfigError
from lorakit.layers.routing import BASE_ROW, RowRouting
from lorakit.serve.kv import SlotCache, cache_tensors
from lorakit.serve.prefix import PrefixCache, pack_prompts, past_cache, prompt_cache
from lorakit.serve.protocol import (
    DrainingError,
    Failed,
    Finished,
    GenerationRequest,
    Observer,
    QueueFullError,
    RequestHandle,
    Token,
)
from lorakit.serve.sampling import Sampling, next_tokens, seeded_generator

log = logging.getLogger("lorakit.serve")


@dataclass(eq=False)  # identity: a request is itself, not its fields
class _Group:
    """A request as the scheduler holds it (created by submit, then owned by the scheduler thread only)."""

    request: GenerationRequest
    handle: RequestHandle
    arrival: float
    seed: int
    rows: list[_Row] = field(default_factory=list)
    open_choices: int = 0
    failed: bool = False


@dataclass(eq=False)
class _Row:
    group: _Group
    choice: int
    sampling: Sampling
    last: int = -1  # the token to feed next (not yet in the cache)
    generated: int = 0
    last_time: float = 0.0
    done: bool = False


class Engine:
    """The model, its adapters and the continuous-batching loop.

    Args:
        model: a causal LM (transformers), or a :class:`~lorakit.PeftModel` holding LoRA adapters; eval mode.
        stop_ids: token ids that end an answer (eos, end of turn).
        context: the most tokens a sequence may hold, prompt included.
        max_batch: the most sequences decoded together (rows of the cache).
        max_queue: the most requests waiting for a row beyond those the free rows take at once.
        observer: receives timings and sizes (metrics).
        prefill_tokens: the most prompt tokens prefilled together per loop turn before the running rows
            get their next step (at least one prompt always is), so a burst of new prompts delays running answers
            by a bounded time and the prefill's memory is bounded.
        prefix_cache_bytes: the most bytes of prompts' keys and values kept so that a later prompt for the same
            adapter that starts the same way prefills only the rest (:mod:`lorakit.serve.prefix`); 0: none kept.
    """

    def __init__(
        self,
        model: Any,
        *,
        stop_ids: set[int],
        context: int,
        max_batch: int = 32,
        max_queue: int = 256,
        observer: Observer | None = None,
        prefill_tokens: int = 2048,
        prefix_cache_bytes: int = 1 << 30,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or context < 2:
            raise ConfigError(
                f"max_batch must be >= 1 (got {max_batch}), max_queue >= 0 (got {max_queue}), context >= 2"
            )
        self.model = model.eval()
        self.stop_ids, self.context = frozenset(stop_ids), context
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.observer = observer or Observer()
        base = model.get_base_model() if hasattr(model, "peft_config") else model
        self.device = next(model.parameters()).device
        dtype = getattr(base, "dtype", torch.float32)
        self.dtype = dtype if dtype.is_floating_point else torch.float32  # what attention computes in
        params = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        self._slots = SlotCache(base.config.num_hidden_layers, max_batch, context)
        self._prefix = PrefixCache(prefix_cache_bytes)
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the counters below, read by the HTTP side
        self._adapters: tuple[str, ...] = tuple(getattr(model, "peft_config", {}))
        self._waiting_count = self._running_rows = 0
        self._draining = self._stopped = False
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        # owned by the scheduler thread
        self._waiting: deque[_Group] = deque()
        self._rows: list[_Row] = []  # row i of the cache
        self._groups: dict[int, _Group] = {}
        self._deleting: dict[str, list[Future]] = {}
        # the last per-row call's routing, kept while the rows' adapters are the same: no weight changes between
        # steps but through load and delete commands (which drop it), so its layers skip re-checking their packs
        self._routing: RowRouting | None = None
        self.steps = 0

    # -- the HTTP side ------------------------------------------------------------------------------

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters requests may name now (one being deleted is not among them), in load order."""
        return self._adapters

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "running": self._running_rows,
                "waiting": self._waiting_count,
                "draining": self._draining,
                "steps": self.steps,
            }

    def submit(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        events: asyncio.Queue | None = None,
        tag: int = 0,
    ) -> RequestHandle:
        """Queue ``request``; its events arrive on ``loop``, in ``events`` (a new queue by default) as
        ``(tag, event)``.

        Raises:
            DrainingError: the server is shutting down.
            AdapterNotFoundError: the adapter is not loaded (or is being deleted).
            QueueFullError: ``max_queue`` requests already wait beyond what the free rows take.
            ConfigError: ``n`` above ``max_batch``, or a prompt that leaves no room in the context.
        """
        if request.n > self.max_batch:
            raise ConfigError(f"n={request.n} choices need {request.n} rows; this server runs {self.max_batch}")
        if not 0 < len(request.prompt) < self.context:
            raise ConfigError(f"a prompt of {len(request.prompt)} tokens does not fit a context of {self.context}")
        with self._lock:
            if self._draining or self._stopped:
                raise DrainingError("the server is shutting down and takes no new requests")
            if request.adapter != BASE_ROW and request.adapter not in self._adapters:
                raise AdapterNotFoundError(f"no adapter {request.adapter!r}; loaded: {list(self._adapters)}")
            free = max(self.max_batch - self._running_rows, 0)
            if self._waiting_count >= self.max_queue + free:
                raise QueueFullError(
                    f"{self._waiting_count} requests are waiting (the queue holds {self.max_queue}); retry later"
                )
            self._waiting_count += 1
        handle = RequestHandle(self, next(self._ids), loop, asyncio.Queue() if events is None else events, tag)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        self._inbox.put(("submit", _Group(request, handle, time.perf_counter(), seed)))
        return handle

    def cancel(self, request_id: int, choice: int | None = None) -> None:
        self._inbox.put(("cancel", request_id, choice))

    def load_adapter(self, name: str, path: str) -> Future:
        """Load the LoRA adapter at ``path`` as ``name`` between two steps; the future holds its config or the
        error (AdapterExistsError, AdapterFileError, ConfigError, ShapeMismatchError), the model unchanged."""
        future: Future = Future()
        self._inbox.put(("load", name, path, future))
        return future

    def delete_adapter(self, name: str) -> Future:
        """Stop routing new requests to ``name`` now, and delete it once its requests (running or waiting)
        have finished; the future resolves then.

        Raises:
            AdapterNotFoundError: no such adapter (or it is already being deleted).
        """
        with self._lock:
            if name not in self._adapters:
                raise AdapterNotFoundError(f"no adapter {name!r}; loaded: {list(self._adapters)}")
            self._adapters = tuple(a for a in self._adapters if a != name)
        future: Future = Future()
        self._inbox.put(("delete", name, future))
        return future

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="lorakit-serve-scheduler", daemon=True)
        self._thread.start()
        return self

    def drain(self) -> None:
        """Take no new requests (503); those already in finish."""
        with self._lock:
            self._draining = True

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel whatever still runs or waits, and end the scheduler thread."""
        with self._lock:
            self._stopped = True
        self._inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the scheduler thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._take_commands():
                    return
                self._finish_deletes()
                self._admit()
                if self._rows:
                    self._decode()
            except Exception:  # a bug or an exhausted device: fail what runs, keep serving
                log.exception("scheduler turn failed; failing the running requests")
                self._routing = None
                for group in {id(r.group): r.group for r in self._rows}.values():
                    self._fail(group, 500, "the server failed while generating this answer")
                self._sweep()
                self._slots = SlotCache(self._slots.num_layers, self.max_batch, self.context)

    def _take_commands(self) -> bool:
        """Run the queued commands (waiting for one when idle). False after a stop command."""
        idle = not self._rows and not self._waiting
        try:
            command = self._inbox.get(timeout=0.5) if idle else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                self._shut_down()
                return False
            getattr(self, "_on_" + command[0])(*command[1:])
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _on_submit(self, group: _Group) -> None:
        self._groups[group.handle.id] = group
        self._waiting.append(group)
        self.observer.waiting(len(self._waiting))

    def _on_cancel(self, request_id: int, choice: int | None) -> None:
        group = self._groups.get(request_id)
        if group is None:
            return
        if group in self._waiting:
            self._waiting.remove(group)
            self._count(waiting=-1)
            del self._groups[request_id]
            for c in range(group.request.n):
                group.handle.post(Finished(c, "cancelled", 0))
            return
        for row in group.rows:
            if not row.done and (choice is None or row.choice == choice):
                self._finish(row, "cancelled")
        self._sweep()

    def _on_load(self, name: str, path: str, future: Future) -> None:
        try:
            config = self._load(name, path)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(config)

    def _on_delete(self, name: str, future: Future) -> None:
        self._deleting.setdefault(name, []).append(future)

    def _load(self, name: str, path: str) -> Any:
        from lorakit.config import PeftConfig, PeftType
        from lorakit.model import PeftModel

        held = getattr(self.model, "peft_config", {})
        if name == BASE_ROW or name in held or name in self._deleting:
            raise AdapterExistsError(f"an adapter named {name!r} is already loaded (or being deleted)")
        config = PeftConfig.from_pretrained(path)
        self._prefix.drop(name)  # what an earlier adapter of this name computed
        self._routing = None
        if config.peft_type != PeftType.LORA:
            raise ConfigError(
                f"{path} holds a {config.peft_type.value} adapter; the server mixes LoRA adapters (LORA) in a batch"
            )
        wrapped = not hasattr(self.model, "peft_config")
        if wrapped:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
        else:
            self.model.load_adapter(path, adapter_name=name)
            self.model.eval()
        try:  # one token through the mixed-adapter path: refuses what cannot share a batch (modules_to_save, ...)
            self._call({"input_ids": torch.zeros(1, 1, dtype=torch.long, device=self.device)}, [name])
        except Exception as exc:
            if wrapped:
                self.model = self.model.unload().eval()
            else:
                self.model.delete_adapter(name)
            raise ConfigError(f"adapter {name!r} ({path}) cannot run in a batch that mixes adapters: {exc}") from exc
        with self._lock:
            self._adapters = (*self._adapters, name)
        return self.model.peft_config[name]

    def _finish_deletes(self) -> None:
        for name in list(self._deleting):
            busy = any(r.group.request.adapter == name for r in self._rows)
            if busy or any(g.request.adapter == name for g in self._waiting):
                continue
            futures = self._deleting.pop(name)
            self._prefix.drop(name)
            self._routing = None
            try:
                self.model.delete_adapter(name)
            except Exception as exc:
                for f in futures:
                    f.set_exception(exc)
            else:
                for f in futures:
                    f.set_result(name)

    def _admit(self) -> None:
        """Prefill the waiting requests the free rows and ``prefill_tokens`` take, together (at least one)."""
        batch: list[_Group] = []
        rows, tokens = self._slots.rows, 0
        while self._waiting and rows + self._waiting[0].request.n <= self.max_batch:
            head = self._waiting[0]
            if batch and tokens + len(head.request.prompt) > self.prefill_tokens:  # (before the prefix cache)
                break
            batch.append(self._waiting.popleft())
            self._count(waiting=-1)
            rows, tokens = rows + head.request.n, tokens + len(head.request.prompt)
        self.observer.waiting(len(self._waiting))
        held = getattr(self.model, "peft_config", {})
        live = []
        for group in batch:
            if group.request.adapter != BASE_ROW and group.request.adapter not in held:
                self._fail(group, 404, f"adapter {group.request.adapter!r} was deleted before this request started")
            else:
                live.append(group)
        if not live:
            return
        if len(live) == 1:
            prefilled = [self._prefill_alone(live[0])]
        else:
            try:
                prefilled = self._prefill(live)
            except Exception:
                log.warning("a prefill of %d prompts failed; prefilling each alone", len(live), exc_info=True)
                prefilled = [self._prefill_alone(group) for group in live]
        for group, got in zip(live, prefilled):
            if got is not None:
                self._start(group, *got)
        self.observer.running(len(self._rows))

    def _prefill_alone(self, group: _Group) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None:
        """:meth:`_prefill` of one request; None (the request failed with 500) if it raises."""
        try:
            return self._prefill([group])[0]
        except Exception:
            log.exception("prefill failed (request %d, adapter %r)", group.handle.id, group.request.adapter)
            self._fail(group, 500, "the server failed to read this prompt")
            return None

    def _prefill(self, groups: list[_Group]) -> list[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]:
        """One forward over the prompts of ``groups``, each past the prefix its adapter already computed for an
        earlier prompt, packed into one sequence (:mod:`lorakit.serve.prefix`: each token sees only its own
        prompt and goes through its own adapter, so every prompt computes what it computes alone). Per group:
        ``(last logits (1, vocab), keys, values)``, the whole prompt's cache ``(1, kv_heads, T, head_dim)`` per
        layer; each is kept for later prompts."""
        prompts = [g.request.prompt for g in groups]
        cached = [self._prefix.lookup(g.request.adapter, g.request.prompt) for g in groups]
        packed = pack_prompts(prompts, cached, self.device, self.dtype)
        args = {**packed.args, "use_cache": True}
        if packed.past_keys is not None:
            args[self._cache_arg] = past_cache(packed.past_keys, packed.past_values)
        if len(groups) == 1:  # as generate runs it: one row, one adapter, the last token's logits
            if self._keep_logits:
                args["logits_to_keep"] = 1
            out = self._call(args, [groups[0].request.adapter])
            logits = out.logits[:, -1]
        else:  # one packed row, an adapter per token, each prompt's last token's logits (prompts, vocab)
            if self._keep_logits:
                args["logits_to_keep"] = torch.tensor(packed.last, device=self.device)
            names = [g.request.adapter for g, (_, _, _, n) in zip(groups, packed.spans) for _ in range(n)]
            out = self._call(args, names, per_token=True)
            logits = out.logits[0] if self._keep_logits else out.logits[0, packed.last]
        keys, values = cache_tensors(out.cache if getattr(out, "cache", None) is not None else out.past_key_values)
        past = 0 if packed.past_keys is None else packed.past_keys[0].shape[2]
        got = []
        for i, (group, span) in enumerate(zip(groups, packed.spans)):
            prompt_keys, prompt_values = prompt_cache(keys, values, span, past)
            self.observer.prefilled(group.request.adapter, span[1])
            self._prefix.store(group.request.adapter, prompts[i], prompt_keys, prompt_values)
            got.append((logits[i : i + 1], prompt_keys, prompt_values))
        return got

    def _start(self, group: _Group, logits: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Give each of ``group``'s choices its first token and a row holding the prompt's cache."""
        request = group.request
        now = time.perf_counter()
        for choice in range(request.n):
            generator = None if request.temperature <= 0 else seeded_generator(group.seed + choice, self.device)
            row = _Row(group, choice, Sampling(request.temperature, request.top_p, generator))
            group.rows.append(row)
            group.open_choices += 1
            if self._accept(row, self._choose(logits, [row])[0], now):
                self._slots.append(keys, values)
                self._rows.append(row)
                self._count(running=1)
        if not group.open_choices:
            del self._groups[group.handle.id]

    def _decode(self) -> None:
        rows = self._rows
        try:
            logits = self._step(0, len(rows))  # (b, vocab)
            self._slots.advance()
        except Exception:
            log.exception("decode step over %d rows failed; retrying each row alone", len(rows))
            self._routing = None
            logits = self._step_rows_alone()
        self.steps += 1
        self.observer.step(len(rows))
        now = time.perf_counter()
        live = [i for i, r in enumerate(rows) if not r.done and logits[i] is not None]
        if live:
            if len(live) < len(rows) or not isinstance(logits, torch.Tensor):  # some rows failed
                logits = torch.stack([logits[i] for i in live])
            tokens = self._choose(logits, [rows[i] for i in live])
            for i, token in zip(live, tokens):
                self._accept(rows[i], token, now)
        self._sweep()

    def _step_rows_alone(self) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for i, row in enumerate(self._rows):
            try:
                out.append(self._step(i, i + 1)[0])
                self._slots.advance(i, i + 1)
            except Exception as exc:
                log.warning("row %d (request %d) fails alone: %s", i, row.group.handle.id, exc)
                self._fail(row.group, 500, "the server failed while generating this answer")
                out.append(None)
        return out

    def _step(self, start: int, stop: int) -> torch.Tensor:
        """One decode step over rows ``[start, stop)``: each row's next-token logits ``(b, vocab)``."""
        rows = self._rows[start:stop]
        cache, mask, positions = self._slots.step(start, stop)
        ids = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.device)  # (b, 1)
        args = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, self._cache_arg: cache}
        return self._call({**args, "use_cache": True}, [r.group.request.adapter for r in rows]).logits[:, -1]

    def _call(self, args: dict[str, Any], names: list[str], per_token: bool = False) -> Any:
        """The model on ``args``, row i (token i with ``per_token``) through adapter ``names[i]``."""
        with torch.inference_mode():
            if not hasattr(self.model, "peft_config"):
                return self.model(**args)
            if per_token:
                routing = RowRouting(names, per_token=True)
            else:
                if self._routing is None or self._routing.names != tuple(names):
                    self._routing = RowRouting(names)
                routing = self._routing
            with self.model.base_model.rows_routed(routing):
                return self.model(**args)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Each row's next token from its logits ``(b, vocab)``; stop tokens masked for rows under ``min_tokens``."""
        early = [i for i, r in enumerate(rows) if r.generated < r.group.request.min_tokens]
        if early and self.stop_ids:
            logits = logits.clone()
            logits[torch.tensor(early)[:, None], torch.tensor(sorted(self.stop_ids))] = float("-inf")
        return next_tokens(logits, [r.sampling for r in rows])

    def _accept(self, row: _Row, token: int, now: float) -> bool:
        """Record ``row``'s new token; False when the row has ended (a stop token, or no budget left)."""
        group = row.group
        row.generated += 1
        if row.generated == 1:
            self.observer.first_token(group.request.adapter, now - group.arrival)
        else:
            self.observer.next_token(group.request.adapter, now - row.last_time)
        row.last_time = now
        if token in self.stop_ids and not group.request.ignore_eos:
            self._finish(row, "stop")
            return False
        group.handle.post(Token(row.choice, token))
        row.last = token
        if row.generated >= group.request.max_tokens or len(group.request.prompt) + row.generated >= self.context:
            self._finish(row, "length")
            return False
        return True

    def _finish(self, row: _Row, reason: str) -> None:
        self.observer.finished(row.group.request.adapter, reason)
        row.done = True
        row.group.open_choices -= 1
        row.group.handle.post(Finished(row.choice, reason, row.generated))

    def _fail(self, group: _Group, status: int, message: str) -> None:
        if group.failed:
            return
        group.failed = True
        for row in group.rows:
            row.done = True
        group.open_choices = 0
        group.handle.post(Failed(status, message))
        self._groups.pop(group.handle.id, None)

    def _sweep(self) -> None:
        """Free the rows that ended (the last row moves into each hole)."""
        for i in range(len(self._rows) - 1, -1, -1):
            row = self._rows[i]
            if not row.done:
                continue
            moved = self._slots.remove(i)
            if moved is not None:
                self._rows[i] = self._rows[moved]
            self._rows.pop()
            self._count(running=-1)
            if row.group.open_choices == 0:
                self._groups.pop(row.group.handle.id, None)
        self.observer.running(len(self._rows))

    def _count(self, waiting: int = 0, running: int = 0) -> None:
        with self._lock:
            self._waiting_count += waiting
            self._running_rows += running

    def _shut_down(self) -> None:
        for group in list(self._waiting):
            for c in range(group.request.n):
                group.handle.post(Finished(c, "cancelled", 0))
        self._count(waiting=-len(self._waiting))
        self._waiting.clear()
        for row in self._rows:
            if not row.done:
                self._finish(row, "cancelled")
        self._sweep()
        for futures in self._deleting.values():
            for f in futures:
                f.set_exception(DrainingError("the server stopped before the adapter's requests finished"))
        self._deleting.clear()
        while True:  # commands that came in after stop: answer them
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "submit":
                command[1].handle.post(Failed(503, "the server is shutting down"))
            elif command[0] in ("load", "delete"):
                command[-1].set_exception(DrainingError("the server is shutting down"))
