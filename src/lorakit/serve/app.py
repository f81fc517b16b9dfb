"""The ASGI application (FastAPI): OpenAI's routes, adapter management, health and metrics.

=========================================  ==================================================================
``POST /v1/completions``                   text in, text out; ``stream: true`` answers with server-sent events
``POST /v1/chat/completions``              messages through the chat template; streams too
``GET  /v1/models``, ``/v1/models/{id}``   the base model and every adapter requests may name
``POST /v1/adapters`` ``{name, path}``     load an adapter folder from under ``--adapter-root`` (201)
``DELETE /v1/adapters/{name}``             stop taking requests for it; delete it once its requests finished
``GET  /health``                           200 while serving, 503 once shutting down (never needs the key)
``GET  /metrics``                          Prometheus text format (:mod:`lorakit.serve.metrics`)
=========================================  ==================================================================

Errors have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 bad input (malformed JSON,
unsupported fields, a prompt or ``max_tokens`` that does not fit, a corrupt adapter), 401 a missing or wrong
API key (``Authorization: Bearer KEY``), 403 a path outside the adapter root, 404 an unknown model or adapter
(the message lists the names), 409 a taken adapter name, 429 a full queue (with ``Retry-After``), 503 shutting
down. A client that leaves before its answer is complete has its rows freed at the next decode step.

A streamed answer's headers go out with its first token, so what fails before it (a full queue, an adapter
deleted meanwhile, a prompt the model cannot read) still gets its HTTP status; a failure after it ends the
stream with an ``{"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import AdapterExistsError, AdapterNotFoundError, LorakitError
from lorakit.serve.adapters import check_name, confined
from lorakit.serve.engine import Engine
from lorakit.serve.generation import (
    Answers,
    Reply,
    ServeSettings,
    adapter_for,
    budget,
    chat_prompt,
    completion_prompts,
    submit_all,
)
from lorakit.serve.metrics import CONTENT_TYPE, Metrics
from lorakit.serve.protocol import DrainingError, GenerationRequest
from lorakit.serve.schemas import (
    COMPLETION_MAX_TOKENS,
    AdapterLoad,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_message,
)

log = logging.getLogger("lorakit.serve")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
CLIENT_GONE = 499  # nginx's status for "the client closed the request": what the metrics call it


@dataclass
class _Served:
    engine: Engine
    tokenizer: Any
    settings: ServeSettings
    metrics: Metrics
    started: int


def create_app(engine: Engine, tokenizer: Any, settings: ServeSettings, metrics: Metrics) -> FastAPI:
    """The application; the engine is started by the caller and stopped when the application shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    served = _Served(engine, tokenizer, settings, metrics, int(time.time()))
    app.state.served = served
    app.add_middleware(Guard, api_key=settings.api_key, metrics=metrics)
    metrics.adapters_loaded.set(len(engine.adapters))

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return _error(APIError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return _error(APIError(500, "the server failed on this request"))

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = engine.stats()
        status = "draining" if stats["draining"] else "ok"
        return JSONResponse({"status": status, **stats}, status_code=503 if stats["draining"] else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [settings.base_name, *engine.adapters]
        return {"object": "list", "data": [_card(served, name) for name in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        adapter_for(settings, engine, model_id)  # 404 with the names
        return _card(served, model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        adapter = adapter_for(settings, engine, body.model)
        request.state.adapter = body.model
        prompts, texts = completion_prompts(tokenizer, body)
        limits = [budget(settings, len(p), body.max_tokens, COMPLETION_MAX_TOKENS) for p in prompts]
        reply = Reply(False, body.model, body.n, prompts, texts if body.echo else None, body.include_usage())
        return await _generate(served, request, body, adapter, prompts, limits, reply)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        adapter = adapter_for(settings, engine, body.model)
        request.state.adapter = body.model
        prompts = [chat_prompt(tokenizer, body)]
        limits = [budget(settings, len(prompts[0]), body.requested_max_tokens(), None)]
        reply = Reply(True, body.model, body.n, prompts, None, body.include_usage())
        return await _generate(served, request, body, adapter, prompts, limits, reply)

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: AdapterLoad) -> JSONResponse:
        name = check_name(body.name, settings.base_name)
        folder = confined(settings.adapter_root, body.path)
        try:
            await asyncio.wrap_future(engine.load_adapter(name, str(folder)))
        except AdapterExistsError as exc:
            raise APIError(409, str(exc), param="name") from None
        except DrainingError as exc:
            raise APIError(503, str(exc)) from None
        except (LorakitError, ValueError, OSError) as exc:
            raise APIError(400, f"adapter {body.path!r} was refused: {exc}", param="path") from None
        metrics.adapters_loaded.set(len(engine.adapters))
        return JSONResponse(_card(served, name), status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str) -> dict[str, Any]:
        try:
            future = engine.delete_adapter(name)
        except AdapterNotFoundError as exc:
            raise APIError(404, str(exc), param="name", code="model_not_found") from None
        metrics.adapters_loaded.set(len(engine.adapters))
        try:
            await asyncio.shield(asyncio.wrap_future(future))  # its requests finish first
        except DrainingError as exc:
            raise APIError(503, str(exc)) from None
        return {"id": name, "object": "model", "deleted": True}

    return app


async def _generate(
    served: _Served,
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    adapter: str,
    prompts: list[list[int]],
    limits: list[int],
    reply: Reply,
) -> Response:
    temperature, top_p = body.temperature_or_default(), body.top_p_or_default()
    requests = [
        GenerationRequest(
            tuple(p),
            adapter,
            limit,
            body.n,
            temperature,
            top_p,
            None if body.seed is None else body.seed + i * body.n,
            min(body.min_tokens, limit),
            body.ignore_eos,
        )
        for i, (p, limit) in enumerate(zip(prompts, limits))
    ]
    events, handles = submit_all(served.engine, requests)
    served.metrics.prompt_tokens.labels(adapter=body.model).inc(sum(len(p) for p in prompts))
    answers = Answers(served.tokenizer, events, handles, body.n, body.stop_strings())
    updates = answers.updates()
    if body.stream:  # wait for the first piece before answering 200, so early failures get their status
        first = await _unless_client_leaves(request, updates.__anext__(), answers)
        if first is None:
            return Response(status_code=CLIENT_GONE)
        stream = _events(request, reply, answers, updates, first)
        grace = served.settings.shutdown_timeout
        return EventSourceResponse(stream, sep="\n", ping=15, shutdown_grace_period=grace)
    texts = [""] * len(answers.finish)

    async def collect() -> bool:
        async for index, piece, _ in updates:
            texts[index] += piece
        return True

    if await _unless_client_leaves(request, collect(), answers) is None:
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(reply.whole(texts, answers))


async def _unless_client_leaves(request: Request, work: Awaitable[Any], answers: Answers) -> Any:
    """``await work``, unless the client disconnects first: then cancel the answers and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        answers.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        try:
            return task.result()
        except BaseException:
            answers.cancel()
            raise
    task.cancel()
    answers.cancel()
    request.state.outcome = CLIENT_GONE
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(
    request: Request, reply: Reply, answers: Answers, updates: AsyncIterator[Any], first: Any
) -> AsyncIterator[dict[str, str]]:
    """The SSE events of a streamed answer; the answers are cancelled if the stream stops early."""
    outcome: int = CLIENT_GONE
    try:
        for data in [*reply.opening(), *reply.piece(*first)]:
            yield {"data": data}
        async for update in updates:
            for data in reply.piece(*update):
                yield {"data": data}
        for data in reply.closing(answers):
            yield {"data": data}
        outcome = 200
    except APIError as exc:  # a prompt failed after the stream began: say so in the stream, then end it
        outcome = exc.status
        yield {"data": json.dumps(exc.body())}
    finally:
        if not answers.done:
            answers.cancel()
        request.state.outcome = outcome


def _card(served: _Served, name: str) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": served.started, "owned_by": "lorakit"}
    if name != served.settings.base_name:
        card["parent"] = served.settings.base_name
    return card


def _error(exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class Guard:
    """ASGI middleware: the API key on every path but ``/health``, and the request counts by adapter and status.

    Pure ASGI (not ``BaseHTTPMiddleware``), so streamed answers and client disconnects pass through untouched.
    """

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.key = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = scope["path"] in GENERATION_PATHS
        if self.key is not None and scope["path"] != "/health" and not self._authorized(scope):
            if counted:
                self.metrics.request("-", 401)
            given = any(name == b"authorization" for name, _ in scope.get("headers", ()))
            message = "the API key is wrong" if given else "an API key is required: Authorization: Bearer KEY"
            response = JSONResponse(
                APIError(401, message, code="invalid_api_key").body(),
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        status = [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if counted:
                state = scope.get("state", {})
                self.metrics.request(state.get("adapter", "-"), state.get("outcome", status[0]))

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return hmac.compare_digest(value, self.key)
        return False
