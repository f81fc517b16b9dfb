"""``lorakit serve`` under load: concurrent clients over 8 adapters of SmolLM2-135M, against the same server with
every client on one adapter, and against one request at a time with ``set_adapter`` per request.

    python benchmarks/bench_serve.py --json benchmarks/results/bench_serve.json
    python benchmarks/bench_serve.py --clients 1 8 --requests 1 --lengths 16     # a quick look

Setup: the default model (fp32, CPU unless CUDA is there), 8 LoRA adapters (r=8, alpha=16, q/k/v/o/gate/up/down,
random A and B, fixed seeds), the real server (uvicorn) on a free port in this process, ``--max-batch`` rows.
Each of N clients sends ``--requests`` streamed chat requests one after the other (greedy), client i on adapter
i mod 8 ("mixed") or all on adapter 0 ("single"). Request r of client i asks for exactly
``lengths[(i + r) mod len(lengths)]`` tokens (``max_tokens`` with vLLM's ``ignore_eos``), so both modes do the
same work whatever the adapters say, and answers of different lengths make rows join and leave the batch at
different steps, as continuous batching is meant for. Measured client-side from the SSE stream: aggregate
tokens/s (all tokens / wall time), time to first token and inter-token latency (p50, p99); server-side, the
rows per decode step and the prompt tokens the prefix cache gave. The clients run in a process of their own (as
real clients would), so they never hold the server's GIL. The modes alternate, each pair ``--rounds`` times; the
table takes each one's median. Every user message is new (its first words number the run, the client and the
request), so prompts share only the chat template and its system prompt; before the runs, each adapter answers
one request (a server that has been running holds that prefix for every adapter).

The baselines answer requests one at a time in-process, ``set_adapter`` then ``generate`` (the same lengths,
``min_new_tokens``): lorakit's PeftModel, and PEFT's when it is installed ("the way a PEFT user serves today").
The ceiling: a static batch, the first request of every client in one ``generate`` call on one adapter, each
answer the mean length. The issue's goals: mixed >= 0.9x single, and at 32 clients >= 8x the sequential tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import torch

QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "Convert to ISO 8601 (YYYY-MM-DD): March 5, 2021",
]


def question(client: int, request: int, run: str = "") -> str:
    """Request ``request`` of client ``client`` in run ``run``: every user message differs from its first words,
    in every run, so what prompts share is the chat template and its system prompt, as in a real chat service
    (the prefix cache reuses that, and no run finds an earlier run's prompts in it)."""
    return f"Request {run}{client}.{request}: {QUESTIONS[(client + request) % len(QUESTIONS)]}"


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(folder: Path, count: int) -> dict[str, str]:
    from lorakit import LoraConfig, get_peft_model
    from lorakit.hub import load_model

    out = {}
    for i in range(count):
        model, _ = load_model(None)
        torch.manual_seed(100 + i)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(folder / f"a{i}")
        out[f"a{i}"] = str(folder / f"a{i}")
    return out


async def one_client(
    http: httpx.AsyncClient, model: str, requests: int, lengths: list[int], offset: int, run: str
) -> list[dict]:
    out = []
    for r in range(requests):
        text = question(offset, r, run)
        body = {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": lengths[(offset + r) % len(lengths)],
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start, stamps, tokens = time.perf_counter(), [], 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        out.append({"tokens": tokens, "ttft": stamps[0] - start if stamps else None, "gaps": gaps})
    return out


def client_process(url: str, models: list[str], requests: int, lengths: list[int], run: str) -> dict:
    """The load generator, run in a process of its own so that it never holds the server's GIL."""
    return asyncio.run(run_clients(url, models, requests, lengths, run))


async def run_clients(url: str, models: list[str], requests: int, lengths: list[int], run: str) -> dict:
    limits = httpx.Limits(max_connections=len(models) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, m, requests, lengths, i, run) for i, m in enumerate(models)))
        wall = time.perf_counter() - start
    flat = [r for client in results for r in client]
    ttft = sorted(r["ttft"] for r in flat if r["ttft"] is not None)
    gaps = sorted(g for r in flat for g in r["gaps"])
    tokens = sum(r["tokens"] for r in flat)
    return {
        "clients": len(models),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "itl_p50_s": _pct(gaps, 50),
        "itl_p99_s": _pct(gaps, 99),
    }


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * p / 100))], 4)


def with_adapters(loaded: tuple, adapters: dict[str, str], peft_model: type) -> tuple:
    """``(model, tokenizer)`` with every adapter loaded (``peft_model``: lorakit's PeftModel or PEFT's), eval mode."""
    model, tokenizer = loaded
    names = list(adapters)
    model = peft_model.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval(), tokenizer


def sequential(adapters: dict[str, str], requests: int, lengths: list[int], library: str) -> dict:
    """One request at a time in-process: set_adapter, then generate (the chat template, greedy, a fixed length)."""
    from lorakit.hub import load_model

    if library == "peft":
        from peft import PeftModel
    else:
        from lorakit import PeftModel
    model, tokenizer = with_adapters(load_model(None), adapters, PeftModel)
    names = list(adapters)
    tokens, start = 0, time.perf_counter()
    for i in range(requests):
        model.set_adapter(names[i % len(names)])
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question(i, 0)}], tokenize=False, add_generation_prompt=True
        )
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        length = lengths[i % len(lengths)]
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=length,
                min_new_tokens=length,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        tokens += out.shape[1] - enc["input_ids"].shape[1]
    wall = time.perf_counter() - start
    return {
        "library": library,
        "requests": requests,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
    }


def static_batch(adapters: dict[str, str], rows: int, length: int) -> dict:
    """The ceiling the issue names: ``rows`` prompts in one ``generate`` call (left-padded), one adapter, every
    answer exactly ``length`` tokens; no server, no arrivals, no mixing."""
    from lorakit import PeftModel
    from lorakit.hub import load_model

    model, tokenizer = load_model(None)
    name = next(iter(adapters))
    model = PeftModel.from_pretrained(model, adapters[name], adapter_name=name).eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question(i, 0)}], tokenize=False, add_generation_prompt=True
        )
        for i in range(rows)
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=length, min_new_tokens=length, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    wall = time.perf_counter() - start
    tokens = (out.shape[1] - enc["input_ids"].shape[1]) * rows
    return {
        "library": "lorakit",
        "rows": rows,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests each client sends, one after the other")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 24, 32, 40, 48], help="answer lengths")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="mixed/single pairs per client count")
    parser.add_argument("--sequential-requests", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prefix-cache-mb", type=float, default=1024, help="the server's prefix cache (0: off)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lorakit.hub import load_model
    from lorakit.serve.server import bound_socket, build_service, make_server

    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), args.adapters)
        baselines = [sequential(adapters, args.sequential_requests, args.lengths, "lorakit")]
        if importlib.util.find_spec("peft") is not None:
            baselines.append(sequential(adapters, args.sequential_requests, args.lengths, "peft"))
        for b in baselines:
            print(json.dumps({"mode": "sequential", **b}), flush=True)
        static = static_batch(adapters, max(args.clients), sum(args.lengths) // len(args.lengths))
        print(json.dumps({"mode": "static", **static}), flush=True)
        model, tokenizer = load_model(None)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        service = build_service(
            model.to(device),
            tokenizer,
            base_name="base",
            adapters=adapters,
            max_batch=args.max_batch,
            prefix_cache_mb=args.prefix_cache_mb,
        )
        batches: list[int] = []
        cached: list[int] = []
        observer = service.engine.observer
        observed_step, observed_prefill = observer.step, observer.prefilled

        def step(rows: int) -> None:
            batches.append(rows)
            observed_step(rows)

        def prefilled(adapter: str, tokens: int) -> None:
            cached.append(tokens)
            observed_prefill(adapter, tokens)

        observer.step, observer.prefilled = step, prefilled
        sock = bound_socket()
        server = make_server(service.app, service.engine, log_level="warning", access_log=False)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        names = list(adapters)
        rows = []
        clients_pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        clients_pool.submit(time.sleep, 0).result()  # started before the clock runs
        # a server that has been running: every adapter has answered once (the template's prefix is cached)
        clients_pool.submit(client_process, url, ["base", *names], 1, [1], "warm-").result()
        for clients in args.clients:
            for round_ in range(args.rounds):
                for mode in ("mixed", "single") if round_ % 2 == 0 else ("single", "mixed"):
                    models = [names[i % len(names)] if mode == "mixed" else names[0] for i in range(clients)]
                    batches.clear()
                    cached.clear()
                    run = f"{clients}{mode[0]}{round_}-"
                    job = clients_pool.submit(client_process, url, models, args.requests, args.lengths, run)
                    result = job.result()
                    result["steps"] = len(batches)
                    result["rows_per_step_mean"] = round(sum(batches) / len(batches), 2) if batches else None
                    result["rows_per_step_max"] = max(batches, default=None)
                    result["prompt_tokens_cached_mean"] = round(sum(cached) / len(cached), 1) if cached else None
                    rows.append({"mode": mode, "round": round_, **result})
                    print(json.dumps(rows[-1]), flush=True)
        clients_pool.shutdown()
        server.should_exit = True
        thread.join(60)
    table = summarize(rows, baselines, args.clients, static)
    print(table)
    if args.json:
        payload = {
            "argv": sys.argv[1:],
            "threads": torch.get_num_threads(),
            "machine": {"torch": torch.__version__, "platform": platform.platform(), "cpus": os.cpu_count()},
            "runs": rows,
            "sequential": baselines,
            "static": static,
            "table": table,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


def summarize(rows: list[dict], baselines: list[dict], clients: list[int], static: dict) -> str:
    """The README table: per client count, the median of each mode's rounds."""
    seq = {b["library"]: b["tokens_per_s"] for b in baselines}
    head = "| clients | mixed tok/s | single tok/s | mixed / single | mixed / sequential (lorakit" + (
        ", PEFT)" if "peft" in seq else ")"
    )
    lines = [
        head + " | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | rows per step (mean, max) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in clients:
        mixed = _median_run([r for r in rows if r["clients"] == n and r["mode"] == "mixed"])
        single = _median_run([r for r in rows if r["clients"] == n and r["mode"] == "single"])
        over_seq = " / ".join(f"{mixed['tokens_per_s'] / seq[k]:.1f}x" for k in ("lorakit", "peft") if k in seq)
        lines.append(
            f"| {n} | {mixed['tokens_per_s']:.1f} | {single['tokens_per_s']:.1f} | "
            f"{mixed['tokens_per_s'] / single['tokens_per_s']:.2f}x | {over_seq} | "
            f"{mixed['ttft_p50_s']:.2f} / {mixed['ttft_p99_s']:.2f} | "
            f"{mixed['itl_p50_s'] * 1000:.0f} / {mixed['itl_p99_s'] * 1000:.0f} | "
            f"{mixed['rows_per_step_mean']}, {mixed['rows_per_step_max']} |"
        )
    base = ", ".join(f"{k} {v:.1f} tok/s" for k, v in seq.items())
    top = max(clients)
    mixed = _median_run([r for r in rows if r["clients"] == top and r["mode"] == "mixed"])
    return "\n".join(lines) + (
        f"\n\nsequential (one request at a time, set_adapter + generate): {base}"
        f"\nstatic batch ({static['rows']} prompts in one generate, one adapter, {static['tokens'] // static['rows']} "
        f"tokens each): {static['tokens_per_s']:.1f} tok/s, {static['tokens_per_s'] / seq['lorakit']:.1f}x sequential; "
        f"the server at {top} clients mixed: {mixed['tokens_per_s'] / static['tokens_per_s']:.2f}x of it"
    )


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2]


if __name__ == "__main__":
    main()
