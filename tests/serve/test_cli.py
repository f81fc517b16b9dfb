"""``lorakit serve`` as a process: it starts from the command line, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lorakit.cli import build_parser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_line_lists_serve_and_its_options():
    args = build_parser().parse_args(["serve", "--adapter", "a=x", "--adapter-root", "r", "--max-batch", "4"])
    assert (args.adapter, args.adapter_root, args.max_batch, args.max_queue, args.host) == (
        ["a=x"],
        "r",
        4,
        256,
        "127.0.0.1",
    )
    assert args.prefix_cache_mb == 1024
    assert build_parser().parse_args(["serve", "--prefix-cache-mb", "0"]).prefix_cache_mb == 0


def test_a_negative_prefix_cache_is_refused_before_anything_starts(files):
    from lorakit.errors import ConfigError
    from lorakit.hub import load_model
    from lorakit.serve.server import build_service

    model, tokenizer = load_model(files.model)
    with pytest.raises(ConfigError, match="--prefix-cache-mb -1"):
        build_service(model, tokenizer, base_name="tiny", prefix_cache_mb=-1)


def test_serve_answers_then_finishes_in_flight_answers_on_sigterm(files):
    from openai import OpenAI

    port = _free_port()
    command = [sys.executable, "-m", "lorakit", "serve", "--model", str(files.model), "--port", str(port)]
    command += ["--adapter", f"alpha={files.adapters['alpha']}", "--api-key", "k", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["model", "alpha"]
        started, finish = threading.Event(), []

        def stream():
            chunks = client.completions.create(
                model="alpha", prompt="hello", max_tokens=500, temperature=0, stream=True
            )
            for chunk in chunks:
                started.set()
                finish.append(chunk.choices[0].finish_reason)

        streaming = threading.Thread(target=stream)
        streaming.start()
        assert started.wait(60)
        process.send_signal(signal.SIGTERM)
        streaming.join(60)
        assert finish[-1] in ("length", "stop") and len(finish) > 1  # the answer in flight ended whole
        with pytest.raises(httpx.TransportError):  # no new connections
            httpx.get(url + "/health", timeout=5)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), stderr
    assert "Traceback" not in stderr, stderr


SERVER_PACKAGES = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client", "starlette")


def test_lorakit_and_its_command_line_import_no_server_package():
    loaded = f"[m for m in {SERVER_PACKAGES} if m in sys.modules]"
    code = f"import sys, lorakit, lorakit.cli; lorakit.cli.build_parser(); print({loaded})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_serve_without_the_extra_says_how_to_install_it():
    code = (
        "import sys\n"
        f"for name in {SERVER_PACKAGES}: sys.modules[name] = None  # as if not installed\n"
        "from lorakit.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "pip install 'lorakit[serve]'" in result.stderr and "fastapi" in result.stderr
