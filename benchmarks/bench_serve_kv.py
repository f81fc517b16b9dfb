"""The decode batch's KV cache: slots (lorakit.serve.kv) against per-sequence caches padded together each step.

    python benchmarks/bench_serve_kv.py --rows 8 32 --prompt 32 256
    python benchmarks/bench_serve_kv.py --rows 32 --prompt 768 1024

A random model of SmolLM2-135M's shape (LLaMA, 30 layers, 576 wide, 3 KV heads; no weights needed), fp32 on
the CPU. Each row gets a prompt of MIN-MAX tokens (prefilled alone, batch 1), then ``--steps`` decode steps run
over all rows at once, each row at its own position. Both strategies feed the same tokens and must produce the
same next tokens (checked), so only the cache handling differs. Prints ms per decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lorakit.serve.kv import SlotCache

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


class PaddedCache:
    """Per-sequence caches (each grown by concatenation, as DynamicCache), padded into one batch per step."""

    def __init__(self, caches: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        self.caches = caches  # [row][layer] -> (keys (1, h, L_i, d), values)

    def step(self) -> tuple[PaddedCache, torch.Tensor, torch.Tensor]:
        lengths = [row[0][0].shape[2] for row in self.caches]
        span = max(lengths) + 1
        positions = torch.tensor(lengths)
        mask = torch.zeros(len(lengths), 1, 1, span)
        mask.masked_fill_((torch.arange(span)[None, :] > positions[:, None])[:, None, None, :], torch.finfo().min)
        self.span, self.lengths = span, lengths
        return self, mask, positions[:, None]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        b, h, _, d = key_states.shape
        keys = key_states.new_zeros(b, h, self.span, d)
        values = value_states.new_zeros(b, h, self.span, d)
        for i, row in enumerate(self.caches):
            k, v = row[layer_idx]
            k = torch.cat([k, key_states[i : i + 1]], dim=2)
            v = torch.cat([v, value_states[i : i + 1]], dim=2)
            row[layer_idx] = (k, v)
            keys[i, :, : k.shape[2]], values[i, :, : v.shape[2]] = k[0], v[0]
        return keys, values


def prefill(model, ids: list[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers], int(out.logits[0, -1].argmax())


def decode(model, cache, tokens: list[int], steps: int) -> tuple[float, list[list[int]]]:
    produced = [[] for _ in tokens]
    start = time.perf_counter()
    for _ in range(steps):
        view, mask, positions = cache.step()
        logits = model(
            torch.tensor(tokens)[:, None], attention_mask=mask, position_ids=positions, cache=view, use_cache=True
        ).logits[:, -1]
        if isinstance(cache, SlotCache):
            cache.advance()
        tokens = logits.argmax(-1).tolist()
        for row, t in zip(produced, tokens):
            row.append(t)
    return (time.perf_counter() - start) / steps * 1000, produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--prompt", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each strategy, alternated (median kept)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2)).eval()
    results = []
    with torch.inference_mode():
        for rows in args.rows:
            gen = torch.Generator().manual_seed(rows)
            lengths = torch.randint(args.prompt[0], args.prompt[1] + 1, (rows,), generator=gen).tolist()
            prompts = [torch.randint(0, SMOLLM2["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
            filled = [prefill(model, p) for p in prompts]
            first = [t for _, t in filled]
            times: dict[str, list[float]] = {"slots": [], "padded": []}
            outputs = {}
            for _ in range(args.repeats):
                slots = SlotCache(SMOLLM2["num_hidden_layers"], rows, SMOLLM2["max_position_embeddings"])
                for kv, _ in filled:
                    slots.append([k for k, _ in kv], [v for _, v in kv])
                padded = PaddedCache([list(kv) for kv, _ in filled])
                for name, cache in (("slots", slots), ("padded", padded)):
                    ms, outputs[name] = decode(model, cache, first, args.steps)
                    times[name].append(ms)
            slot_ms, padded_ms = (statistics.median(times[k]) for k in ("slots", "padded"))
            same = outputs["slots"] == outputs["padded"]
            results.append({"rows": rows, "prompt": args.prompt, "slots_ms": slot_ms, "padded_ms": padded_ms})
            print(
                f"rows {rows:3d}, prompts {args.prompt[0]}-{args.prompt[1]}: slots {slot_ms:7.1f} ms/step, "
                f"padded {padded_ms:7.1f} ms/step (median of {args.repeats}; same tokens: {same})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "steps": args.steps, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
