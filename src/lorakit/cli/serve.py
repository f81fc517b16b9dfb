"""``lorakit serve``: one base model and many adapters behind an OpenAI-compatible HTTP endpoint."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

EXAMPLES = """\
examples:
  lorakit serve --adapter dates=runs/dates --adapter sql=runs/sql --port 8000
  lorakit serve --model ./my-model --adapter-root /srv/adapters --api-key "$KEY" --max-batch 32

  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "dates", "messages": [{"role": "user", "content": "March 5, 2021"}], "temperature": 0}'
  curl localhost:8000/v1/adapters -d '{"name": "sql2", "path": "sql-v2"}'     # a folder under --adapter-root
  curl -X DELETE localhost:8000/v1/adapters/sql                               # after its requests finish

Requests name an adapter (or the base model) in their "model" field; GET /v1/models lists them. Answers for
different adapters are decoded together, in one batch. --api-key (or $LORAKIT_API_KEY) guards every route
but /health. SIGTERM stops taking requests, lets those in flight finish (up to --shutdown-timeout seconds),
then exits. Needs the serve extra: pip install 'lorakit[serve]'.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model and its adapters over an OpenAI-compatible HTTP API",
        description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models) that decodes "
        "requests for many adapters of one base model together (continuous batching).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="base model folder or cached hub id (default: SmolLM2)")
    p.add_argument(
        "--adapter", action="append", default=None, metavar="NAME=FOLDER", help="an adapter to serve (repeatable)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("LORAKIT_API_KEY"),
        help="required as 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY; none: no key needed)",
    )
    p.add_argument("--adapter-root", default=None, help="POST /v1/adapters loads folders under it (default: off)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (32)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the free rows; then 429 (256)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="the most tokens one answer may ask for (default: the context); more is refused with 400",
    )
    p.add_argument("--context", type=int, default=None, help="cap on prompt + answer tokens (default: the model's)")
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=1024,
        help="MiB of prompts' keys and values kept per adapter, so that prompts starting the same way (template, "
        "system prompt, earlier turns) skip that part of the prefill (1024; 0: off)",
    )
    p.add_argument("--served-model-name", default=None, help="the base model's id in the API (default: its name)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight answers get on SIGTERM")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(run=run)


def served_name(model: str | None) -> str:
    """The base model's id in the API: the default model's name, a folder's name, or the hub id."""
    from pathlib import Path

    from lorakit.hub import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def run(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    from lorakit.cli.generate import parse_adapters
    from lorakit.errors import ConfigError, MissingDependencyError
    from lorakit.hub import load_model

    missing = [
        m for m in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client") if not importlib.util.find_spec(m)
    ]
    if missing:
        raise MissingDependencyError(f"lorakit serve needs {', '.join(missing)}: pip install 'lorakit[serve]'")
    if args.max_batch < 1 or args.max_queue < 0 or not 0 < args.port < 65536 or args.shutdown_timeout < 0:
        raise ConfigError("--max-batch must be >= 1, --max-queue >= 0, --port in 1-65535, --shutdown-timeout >= 0")
    if args.adapter_root is not None and not os.path.isdir(args.adapter_root):
        raise ConfigError(f"--adapter-root {args.adapter_root}: no such folder")
    from lorakit.serve.server import build_service, make_server

    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = parse_adapters(args.adapter)
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    service = build_service(
        model.to(device),
        tokenizer,
        base_name=args.served_model_name or served_name(args.model),
        adapters=adapters,
        api_key=args.api_key,
        adapter_root=args.adapter_root,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens=args.max_tokens,
        context=args.context,
        shutdown_timeout=args.shutdown_timeout,
        prefix_cache_mb=args.prefix_cache_mb,
    )
    names = [service.settings.base_name, *service.engine.adapters]
    print(
        f"lorakit serve: {names} on http://{args.host}:{args.port} (context {service.settings.context})",
        file=sys.stderr,
        flush=True,
    )
    server = make_server(service.app, service.engine, args.host, args.port, args.shutdown_timeout, args.log_level)
    server.run()
    return 0
