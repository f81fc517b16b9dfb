"""Running the application on uvicorn, with a clean stop on SIGTERM.

On SIGTERM (or Ctrl-C) the server stops taking work at once: the engine refuses new requests (503) and
``/health`` answers 503, so a load balancer takes the instance out; uvicorn closes the listening socket and
waits up to ``shutdown_timeout`` seconds for the answers in flight (streams included) to finish; what still
runs then is cancelled, the scheduler thread is stopped, and the process ends by the signal (exit status 143
for SIGTERM, 130 for Ctrl-C, as shells report it).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from lorakit.errors import ConfigError
from lorakit.serve.adapters import check_name
from lorakit.serve.app import create_app
from lorakit.serve.engine import Engine
from lorakit.serve.generation import ServeSettings
from lorakit.serve.metrics import Metrics
from lorakit.serve.protocol import model_context, stop_token_ids
from lorakit.serve.schemas import APIError


@dataclass
class Service:
    """Everything one server runs: the engine (started), the application, its settings and metrics."""

    engine: Engine
    app: Any
    settings: ServeSettings
    metrics: Metrics


def build_service(
    model: Any,
    tokenizer: Any,
    *,
    base_name: str,
    adapters: dict[str, str] | None = None,
    api_key: str | None = None,
    adapter_root: str | Path | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
    max_tokens: int | None = None,
    context: int | None = None,
    shutdown_timeout: float = 30.0,
    prefix_cache_mb: float = 1024,
) -> Service:
    """Start the engine on ``model``, load ``adapters`` ({name: folder}) and build the application.

    Raises:
        ConfigError: a bad limit, an adapter name that is not accepted, a model the engine cannot run.
        AdapterFileError, ShapeMismatchError, ...: an adapter that does not load (the engine is stopped).
    """
    window = model_context(model.config, context)
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"--max-tokens {max_tokens}: give a positive number of tokens")
    if prefix_cache_mb < 0:
        raise ConfigError(f"--prefix-cache-mb {prefix_cache_mb}: give 0 (no prefix cache) or more MiB")
    metrics = Metrics(base_name)
    engine = Engine(
        model,
        stop_ids=stop_token_ids(model, tokenizer),
        context=window,
        max_batch=max_batch,
        max_queue=max_queue,
        observer=metrics,
        prefix_cache_bytes=int(prefix_cache_mb * 2**20),
    ).start()
    try:
        for name, folder in (adapters or {}).items():
            try:
                check_name(name, base_name)
            except APIError as exc:
                raise ConfigError(f"--adapter {name}={folder}: {exc.message}") from None
            engine.load_adapter(name, folder).result()
    except BaseException:
        engine.stop()
        raise
    settings = ServeSettings(
        base_name=base_name,
        context=window,
        max_tokens=min(max_tokens or window, window),
        api_key=api_key or None,
        adapter_root=None if adapter_root is None else Path(adapter_root),
        shutdown_timeout=shutdown_timeout,
    )
    return Service(engine, create_app(engine, tokenizer, settings, metrics), settings, metrics)


class Server(uvicorn.Server):
    """uvicorn's server, telling the engine to drain as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.engine.drain()
        super().handle_exit(sig, frame)


def make_server(
    app: Any,
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    shutdown_timeout: float = 30.0,
    log_level: str = "info",
    access_log: bool = True,
) -> Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=shutdown_timeout,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
    )
    return Server(config, engine)


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket (``port=0``: a free port, read back with ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
