"""From an OpenAI request to engine requests, and from the engine's events to OpenAI's answers (JSON or SSE).

Prompts are tokenized as ``lorakit generate`` does: ``/v1/completions`` text with the tokenizer's special tokens
(``--raw``), ``/v1/chat/completions`` through the chat template with the generation prompt and no extra special
tokens. ``max_tokens`` over the server's cap (``--max-tokens``), or a prompt plus ``max_tokens`` longer than
the context, is refused with 400 rather than silently shortened; when ``max_tokens`` is absent, completions get
OpenAI's 16 and chat answers may run to the cap or the end of the context. Each choice's text is decoded from
all its tokens (:class:`~lorakit.serve.text.TextStream`), so streamed pieces add up to the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterNotFoundError, ConfigError
from lorakit.layers.routing import BASE_ROW
from lorakit.serve.engine import Engine
from lorakit.serve.protocol import Failed, Finished, GenerationRequest, RequestHandle, ServeError, Token
from lorakit.serve.schemas import APIError, ChatCompletionRequest, CompletionRequest
from lorakit.serve.text import TextStream

#: The engine's reasons as OpenAI's ``finish_reason`` ("abort": the server cancelled it, as vLLM says).
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}


@dataclass
class ServeSettings:
    """What the HTTP side needs to know about the server (the engine holds the rest)."""

    base_name: str  #: the ``model`` id of the base model
    context: int  #: tokens a sequence may hold, prompt included
    max_tokens: int  #: the most tokens one answer may ask for
    api_key: str | None = None
    adapter_root: Path | None = None  #: where ``POST /v1/adapters`` may load from (None: it is refused)
    shutdown_timeout: float = 30.0


def adapter_for(settings: ServeSettings, engine: Engine, model: str) -> str:
    """The adapter a request's ``model`` names (``"__base__"`` for the base); 404 listing the names otherwise."""
    if model == settings.base_name:
        return BASE_ROW
    if model in engine.adapters:
        return model
    names = [settings.base_name, *engine.adapters]
    raise APIError(404, f"model {model!r} is not served here; models: {names}", param="model", code="model_not_found")


def budget(settings: ServeSettings, prompt_tokens: int, requested: int | None, default: int | None) -> int:
    """How many tokens an answer may generate (see the module docstring); 400 when it cannot fit."""
    room = settings.context - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"the prompt is {prompt_tokens} tokens; this model's context is {settings.context} tokens, "
            "which must also hold at least one new token",
            param="prompt",
            code="context_length_exceeded",
        )
    if requested is None:
        return min(room, settings.max_tokens, default or settings.max_tokens)
    if requested > settings.max_tokens:
        raise APIError(
            400,
            f"max_tokens={requested} is over this server's limit of {settings.max_tokens} (--max-tokens)",
            param="max_tokens",
        )
    if requested > room:
        raise APIError(
            400,
            f"the prompt ({prompt_tokens} tokens) plus max_tokens={requested} exceeds this model's context of "
            f"{settings.context} tokens; ask for at most {room}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def completion_prompts(tokenizer: Any, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """The prompts' token ids and texts (for ``echo``)."""
    ids, texts = [], []
    vocab = len(tokenizer)
    for prompt in body.prompts():
        if isinstance(prompt, str):
            ids.append(list(tokenizer(prompt)["input_ids"]))
            texts.append(prompt)
        else:
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "prompt")
            ids.append(list(prompt))
            texts.append(tokenizer.decode(prompt))
    return ids, texts


def chat_prompt(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    """The messages through the model's chat template, with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions with the text", param="messages")
    try:
        text = tokenizer.apply_chat_template(
            [m.for_template() for m in body.messages], tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # the template's own checks (roles out of order, ...)
        raise APIError(400, f"the chat template refused these messages: {exc}", param="messages") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def submit_all(engine: Engine, requests: list[GenerationRequest]) -> tuple[asyncio.Queue, list[RequestHandle]]:
    """Submit every prompt of one HTTP request, all answering into one queue; all or none (on an error the
    ones already submitted are cancelled)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    handles: list[RequestHandle] = []
    try:
        for tag, request in enumerate(requests):
            handles.append(engine.submit(request, loop, events, tag))
    except (ServeError, AdapterNotFoundError, ConfigError) as exc:
        for handle in handles:
            handle.cancel()
        status = exc.status if isinstance(exc, ServeError) else 404 if isinstance(exc, AdapterNotFoundError) else 400
        raise APIError(status, str(exc), param="model" if status == 404 else None) from None
    return events, handles


@dataclass
class Answers:
    """The choices of one HTTP request as their events arrive; ``updates()`` yields ``(index, text, finish)``."""

    tokenizer: Any
    events: asyncio.Queue
    handles: list[RequestHandle]
    n: int
    stop: list[str]
    streams: list[TextStream] = field(init=False)
    tokens: list[int] = field(init=False)
    finish: list[str | None] = field(init=False)

    def __post_init__(self) -> None:
        total = len(self.handles) * self.n
        self.streams = [TextStream(self.tokenizer, self.stop) for _ in range(total)]
        self.tokens, self.finish = [0] * total, [None] * total

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def updates(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """Text pieces as they can be sent, and each choice's end (``finish`` set, last piece for that index).

        Raises:
            APIError: the engine failed a prompt (its status and message).
        """
        while not self.done:
            tag, event = await self.events.get()
            if isinstance(event, Failed):
                raise APIError(event.status, event.message)
            index = tag * self.n + event.choice
            if self.finish[index] is not None:  # ended at a stop string: what follows is dropped
                continue
            stream = self.streams[index]
            if isinstance(event, Token):
                self.tokens[index] += 1
                piece = stream.add(event.token)
                if stream.stopped:
                    self.handles[tag].cancel(event.choice)
                    self.finish[index] = "stop"
                    yield index, piece, "stop"
                elif piece:
                    yield index, piece, None
            elif isinstance(event, Finished):
                self.tokens[index] = max(self.tokens[index], event.tokens)
                self.finish[index] = FINISH_REASONS[event.reason]
                yield index, stream.finish(), self.finish[index]

    def usage(self, prompts: list[list[int]]) -> dict[str, int]:
        prompt, completion = sum(len(p) for p in prompts), sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Reply:
    """How the answers of one request are written: OpenAI's completion or chat objects."""

    chat: bool
    model: str
    n: int
    prompts: list[list[int]]
    echo: list[str] | None = None  # completions with echo: each prompt's text, put before its choices' text
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model}

    def _prefix(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo else ""

    def whole(self, texts: list[str], answers: Answers) -> dict[str, Any]:
        """The non-streamed answer."""
        choices = []
        for i, (text, finish) in enumerate(zip(texts, answers.finish)):
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None}
            else:
                choice = {"index": i, "text": self._prefix(i) + text, "logprobs": None}
            choices.append({**choice, "finish_reason": finish})
        return {**self._head(False), "choices": choices, "usage": answers.usage(self.prompts)}

    def opening(self) -> list[str]:
        """The first chunks of a stream: each chat choice's role, each echoed completion's prompt."""
        total = len(self.prompts) * self.n
        if self.chat:
            return [self._chunk(i, {"role": "assistant", "content": ""}, None) for i in range(total)]
        return [self._chunk(i, self._prefix(i), None) for i in range(total)] if self.echo else []

    def piece(self, index: int, text: str, finish: str | None) -> list[str]:
        """The chunks for one update: its text (if any), then its end (if it ended)."""
        out = []
        if text:
            out.append(self._chunk(index, {"content": text} if self.chat else text, None))
        if finish is not None:
            out.append(self._chunk(index, {} if self.chat else "", finish))
        return out

    def closing(self, answers: Answers) -> list[str]:
        out = []
        if self.include_usage:
            out.append(json.dumps({**self._head(True), "choices": [], "usage": answers.usage(self.prompts)}))
        return [*out, "[DONE]"]

    def _chunk(self, index: int, content: Any, finish: str | None) -> str:
        if self.chat:
            choice = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": content, "logprobs": None, "finish_reason": finish}
        body = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return json.dumps(body)
