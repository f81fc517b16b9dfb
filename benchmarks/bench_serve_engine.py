"""The serve engine alone, without HTTP: bench_serve's workload submitted in-process, to tell the model path's cost
from the server's. Times every prefill and decode step, mixed (client i on adapter i mod 8) against single.

    python benchmarks/bench_serve_engine.py --threads 1 --clients 8
    python benchmarks/bench_serve_engine.py --clients 32 --prefix-cache-mb 0      # without the prefix cache
    python benchmarks/bench_serve_engine.py --threads 1 --steps                   # what bounds a mixed step
    python benchmarks/bench_serve_engine.py --threads 1 --clients 8 16 32 64 --max-batch 64   # where it saturates

Setup as ``bench_serve.py``: SmolLM2-135M, 8 random LoRA adapters (r = 8, the seven projections), each client
sending ``--requests`` chat requests one after the other for exactly 16-48 tokens (``ignore_eos``), every user
message new, after one request per adapter. Prints per mode: tokens/s, prefill seconds and calls, decode steps
and their median time.

``--steps`` instead times one decode step alone (8 rows, 120 cached tokens each), interleaved: the base model, one
adapter and the 8 adapters one per row; then one adapter against one of rank 64 (as many weights as the 8 rank-8
ones together). Decoding a few rows reads every weight once, so a mixed step reads 8 adapters' factors where a
single one reads one: if mixing itself costs nothing, mixed / single equals r64 / single.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import TARGETS, make_adapters, question, with_adapters  # noqa: E402

LENGTHS = [16, 24, 32, 40, 48]


def run(engine_args: dict, model, tokenizer, names: list[str], mode: str, clients: int, requests: int) -> dict:
    from lorakit.serve.engine import Engine
    from lorakit.serve.protocol import Failed, Finished, GenerationRequest

    engine = Engine(model, stop_ids=set(), context=2048, **engine_args)
    spent: dict[str, list[float]] = {"prefill": [], "decode": []}
    batches: list[int] = []
    observed_step = engine.observer.step
    engine.observer.step = lambda rows: (batches.append(rows), observed_step(rows))[1]
    for name in spent:
        inner = getattr(engine, "_" + name)

        def timed(*args, _inner=inner, _name=name):
            start = time.perf_counter()
            out = _inner(*args)
            spent[_name].append(time.perf_counter() - start)
            return out

        setattr(engine, "_" + name, timed)
    engine.start()

    def prompt(i: int, r: int) -> tuple[int, ...]:
        messages = [{"role": "user", "content": question(i, r, mode)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    async def answer(request: GenerationRequest) -> None:
        handle = engine.submit(request, asyncio.get_running_loop())
        while not isinstance((await handle.events.get())[1], (Finished, Failed)):
            pass

    async def client(i: int) -> None:
        for r in range(requests):
            adapter = names[i % len(names)] if mode == "mixed" else names[0]
            length = LENGTHS[(i + r) % len(LENGTHS)]
            await answer(GenerationRequest(prompt(i, r), adapter, length, ignore_eos=True))

    async def everyone() -> float:
        # a server that has been running: every adapter has answered once (the template's prefix is cached)
        await asyncio.gather(*(answer(GenerationRequest(prompt(-1 - j, 0), name, 1)) for j, name in enumerate(names)))
        for times in (*spent.values(), batches):
            times.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return time.perf_counter() - start

    try:
        wall = asyncio.run(everyone())
    finally:
        engine.stop()
    tokens = sum(LENGTHS[(i + r) % len(LENGTHS)] for i in range(clients) for r in range(requests))
    return {
        "mode": mode,
        "tokens_per_s": round(tokens / wall, 2),
        "prefill_s": round(sum(spent["prefill"]), 2),
        "prefills": len(spent["prefill"]),
        "decode_s": round(sum(spent["decode"]), 2),
        "steps": len(spent["decode"]),
        "step_median_ms": round(statistics.median(spent["decode"]) * 1000, 1),
        "rows_per_step": round(statistics.mean(batches), 1),
    }


def steps(model, names: list[str], rows: int = 8, repeats: int = 15) -> dict:
    """Median decode-step times (ms): the base, one adapter and all adapters (one per row), interleaved; then, with
    a rank-64 adapter added (a pack of its own), one adapter and the rank-64 one, interleaved."""
    import copy

    from lorakit import LoraConfig

    with torch.inference_mode():
        past = model(input_ids=torch.randint(0, 1000, (rows, 120)), use_cache=True, adapter_names=[names[0]] * rows)
    args = {
        "input_ids": torch.randint(0, 1000, (rows, 1)),
        "attention_mask": torch.ones(rows, 121, dtype=torch.long),
        "position_ids": torch.full((rows, 1), 120),
        "use_cache": True,
    }

    def step(row_names: list[str]) -> float:
        cache = copy.deepcopy(past.past_key_values)
        start = time.perf_counter()
        with torch.inference_mode():
            model(**args, past_key_values=cache, adapter_names=row_names)
        return time.perf_counter() - start

    def interleaved(modes: dict[str, list[str]]) -> dict[str, float]:
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for r in range(repeats + 2):
            for mode, row_names in modes.items():
                spent = step(row_names)
                if r >= 2:  # the first two build the packs
                    times[mode].append(spent)
        return {mode: round(statistics.median(t) * 1000, 1) for mode, t in times.items()}

    mixed = [names[i % len(names)] for i in range(rows)]
    first = interleaved({"base": ["__base__"] * rows, "single": [names[0]] * rows, "mixed": mixed})
    torch.manual_seed(5)  # after the mixed steps: their pack never holds it
    model.add_adapter("r64", LoraConfig(r=64, lora_alpha=128, target_modules=TARGETS, init_lora_weights=False))
    model.eval()
    second = interleaved({"single": [names[0]] * rows, "single_r64": ["r64"] * rows})
    model.delete_adapter("r64")
    return {
        **{f"{mode}_ms": ms for mode, ms in first.items()},
        "mixed_over_single": round(first["single"] / first["mixed"], 3),
        "r64_ms": second["single_r64"],
        "r64_over_single": round(second["single"] / second["single_r64"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="mixed/single pairs, in alternating order")
    parser.add_argument("--prefix-cache-mb", type=float, default=1024)
    parser.add_argument("--steps", action="store_true", help="time single decode steps instead (what bounds them)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lorakit import PeftModel
    from lorakit.hub import load_model

    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), 8)
        model, tokenizer = with_adapters(load_model(None), adapters, PeftModel)
        names = list(adapters)
        if args.steps:
            print(steps(model, names), flush=True)
            return
        engine_args = {"max_batch": args.max_batch, "prefix_cache_bytes": int(args.prefix_cache_mb * 2**20)}
        for clients in args.clients:
            for round_ in range(args.rounds):  # the order alternates: a process's first run pays for its memory
                for mode in ("mixed", "single") if round_ % 2 == 0 else ("single", "mixed"):
                    result = run(engine_args, model, tokenizer, names, mode, clients, args.requests)
                    print({"clients": clients, **result}, flush=True)


if __name__ == "__main__":
    main()
