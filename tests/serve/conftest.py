"""Fixtures for ``lorakit serve``: a tiny model with three adapters, and the real server (uvicorn) on a free port.

The model is the training tests' tiny random LLaMA (SmolLM2's chat template, a byte-level tokenizer) with a
context of 1024 tokens, so an answer can run long enough for a test to act while it is being generated. The
adapters have random A and B (``init_lora_weights=False``), so each one changes what the model says.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_llama
from training.conftest import make_tokenizer

pytest.importorskip("fastapi")
pytest.importorskip("openai")

ADAPTERS = ("alpha", "beta", "gamma")
API_KEY = "test-key"
CONTEXT = 1024


def write_model(folder: Path) -> Path:
    tokenizer = make_tokenizer()
    model = tiny_llama(
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_adapter(model_dir: Path, folder: Path, seed: int, **config: Any) -> Path:
    from lorakit import LoraConfig, get_peft_model
    from lorakit.hub import load_model

    model, _ = load_model(model_dir)
    torch.manual_seed(seed)
    settings = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(model, LoraConfig(**{**settings, **config})).save_pretrained(folder)
    return folder


@dataclass
class Files:
    model: Path
    adapters: dict[str, Path]  # ADAPTERS, outside the adapter root (given at start-up)
    root: Path  # --adapter-root: "late" (a good adapter), "corrupt" (truncated weights), "embed" (not mixable)
    outside: Path  # a good adapter outside the root


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> Files:
    base = tmp_path_factory.mktemp("serve")
    model = write_model(base / "model")
    adapters = {name: write_adapter(model, base / "adapters" / name, seed) for seed, name in enumerate(ADAPTERS, 1)}
    root = base / "root"
    write_adapter(model, root / "late", 7)
    corrupt = write_adapter(model, root / "corrupt", 8)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    write_adapter(model, root / "saved", 9, modules_to_save=["lm_head"])
    return Files(model, adapters, root, write_adapter(model, base / "outside", 10))


@dataclass
class Running:
    url: str
    service: Any
    server: Any


@contextlib.contextmanager
def running_server(model_dir: Path, base_name: str = "tiny", **options: Any) -> Iterator[Running]:
    """The real server (uvicorn, in a thread of this process) on a free port; stopped on exit."""
    from lorakit.hub import load_model
    from lorakit.serve.server import bound_socket, build_service, make_server

    model, tokenizer = load_model(model_dir)
    service = build_service(model, tokenizer, base_name=base_name, **options)
    sock = bound_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(service.app, service.engine, "127.0.0.1", port, shutdown_timeout=5, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{port}", service, server)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="session")
def one_thread() -> Iterator[None]:
    """One PyTorch thread: the tiny model's steps are too small to share, and the test machine's cores are few."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(files: Files, one_thread: None) -> Iterator[Running]:
    """The shared server: three adapters, an API key, the adapter root, 8 rows."""
    adapters = {name: str(path) for name, path in files.adapters.items()}
    with running_server(files.model, adapters=adapters, api_key=API_KEY, adapter_root=files.root, max_batch=8) as s:
        yield s


@pytest.fixture
def client(server: Running) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(server: Running) -> Iterator[Any]:
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


class Reference:
    """``lorakit generate``'s answers (its ``complete``: one prompt, ``model.generate``) on the same files."""

    def __init__(self, files: Files) -> None:
        from lorakit.cli.generate import load_for_inference

        folders = {name: str(path) for name, path in files.adapters.items()} | {"late": str(files.root / "late")}
        self.model, self.tokenizer = load_for_inference(str(files.model), folders, "cpu")

    def __call__(self, adapter: str, prompt: str | list[dict[str, str]], max_tokens: int) -> str:
        from argparse import Namespace

        from lorakit.cli.generate import complete

        args = Namespace(temperature=0.0, top_p=1.0, max_new_tokens=max_tokens)
        if adapter == "tiny":
            with self.model.disable_adapter():
                return complete(self.model, self.tokenizer, prompt, args)
        self.model.set_adapter(adapter)
        return complete(self.model, self.tokenizer, prompt, args)


@pytest.fixture(scope="session")
def reference(files: Files, one_thread: None) -> Reference:
    return Reference(files)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample == name and ",".join(sorted(label_text.rstrip("}").split(","))) == want:
            return float(value)
    return 0.0


async def collect(handle: Any) -> tuple[list[int], Any]:
    """An engine request's tokens and its last event (Finished or Failed), read from its handle."""
    from lorakit.serve.protocol import Failed, Finished, Token

    tokens = []
    while True:
        _, event = await handle.events.get()
        if isinstance(event, Token):
            tokens.append(event.token)
        elif isinstance(event, (Finished, Failed)):
            return tokens, event
