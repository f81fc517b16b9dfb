"""The server's parts on their own: the slot cache, sampling, incremental text, the context rule, and the engine
keeping every other request going when one fails."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import LlamaConfig

from lorakit.errors import ConfigError
from lorakit.serve.engine import Engine
from lorakit.serve.kv import SlotCache
from lorakit.serve.protocol import Failed, GenerationRequest, model_context
from lorakit.serve.sampling import Sampling, next_tokens, seeded_generator
from lorakit.serve.text import TextStream
from serve.conftest import collect as _events


def _kv(length: int, fill: float, layers: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.full((1, 2, length, 4), fill + i) for i in range(layers)], [
        torch.full((1, 2, length, 4), -fill - i) for i in range(layers)
    ]


def test_slot_cache_keeps_each_row_at_its_own_length_and_fills_holes_with_the_last_row():
    cache = SlotCache(num_layers=2, max_rows=4, max_len=64)
    for length, fill in ((3, 1.0), (7, 2.0), (5, 3.0)):
        cache.append(*_kv(length, fill))
    view, mask, positions = cache.step()
    assert positions.flatten().tolist() == [3, 7, 5] and mask.shape == (3, 1, 1, 8)
    assert (mask[:, 0, 0] == 0).tolist() == [[j <= n for j in range(8)] for n in (3, 7, 5)]
    keys, values = view.update(torch.full((3, 2, 1, 4), 9.0), torch.full((3, 2, 1, 4), -9.0), layer_idx=1)
    assert keys.shape == (3, 2, 8, 4) and keys[1, :, 7].eq(9).all() and keys[1, :, :7].eq(3.0).all()
    cache.advance()
    assert cache.remove(0) == 2  # the last row moved into row 0
    assert cache.lengths == [6, 8]
    assert cache.keys[0][0, :, :5].eq(3.0).all() and cache.keys[1][0, :, 5].eq(9.0).all()
    assert cache.values[1][1, :, :7].eq(-3.0).all()
    cache.remove(1), cache.remove(0)
    assert cache.capacity() == (0, 0)  # an empty batch gives its memory back


def test_slot_cache_grows_and_refuses_what_does_not_fit():
    cache = SlotCache(num_layers=2, max_rows=2, max_len=40)
    cache.append(*_kv(3, 1.0))
    rows, length = cache.capacity()
    cache.append(*_kv(30, 2.0))
    assert cache.capacity()[0] >= 2 and cache.capacity()[1] >= 31 and (rows, length) != cache.capacity()
    assert cache.keys[0][0, :, :3].eq(1.0).all()  # kept across the growth
    with pytest.raises(ValueError, match="rows are in use"):
        cache.append(*_kv(3, 1.0))
    with pytest.raises(ValueError, match="no room"):
        SlotCache(2, 2, 8).append(*_kv(8, 1.0))


def test_greedy_is_argmax_and_a_tiny_top_p_keeps_only_the_likeliest_token():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 2.5]])
    assert next_tokens(logits, [Sampling(), Sampling()]) == [1, 2]
    gen = seeded_generator(0)
    picks = {next_tokens(logits[:1], [Sampling(1.0, 1e-3, gen)])[0] for _ in range(50)}
    assert picks == {1}
    spread = {next_tokens(logits[:1], [Sampling(5.0, 1.0, gen)])[0] for _ in range(200)}
    assert spread == {0, 1, 2}


class _Chars:
    """A tokenizer whose token i is the i-th piece (pieces may split a character's UTF-8 bytes)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_split_characters_and_possible_stop_strings():
    pieces = [b"Hel", b"lo ", b"\xc3", b"\xa9", b" wo", b"rld", b"END", b"more"]
    stream = TextStream(_Chars(pieces), stop=["rld!", "END"])
    out = [stream.add(i) for i in range(4)]
    assert out == ["Hel", "lo ", "", "é"]  # the split é waits for its second byte
    assert stream.add(4) == " wo" and stream.add(5) == ""  # "rld" may begin "rld!"
    assert stream.add(6) == "rld" and stream.stopped  # "END" stops; "rld" was not a stop after all
    assert stream.add(7) == "" and stream.text == "Hello é world"
    plain = TextStream(_Chars(pieces))
    assert "".join(plain.add(i) for i in range(8)) + plain.finish() == "Hello é worldENDmore"


def test_the_context_is_the_models_positions_or_its_sliding_window():
    assert model_context(LlamaConfig(max_position_embeddings=512)) == 512
    assert model_context(LlamaConfig(max_position_embeddings=512), 100) == 100
    window = LlamaConfig(max_position_embeddings=512)
    window.sliding_window = 128
    assert model_context(window) == 128
    mixed = LlamaConfig(max_position_embeddings=512)
    mixed.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ConfigError, match="full attention"):
        model_context(mixed)


async def _answer(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[list[int], object]:
    return await _run(engine, GenerationRequest(tuple(prompt), max_tokens=max_tokens))


def test_a_request_that_fails_never_stops_the_others(files, one_thread):
    """A forward that raises for one row's token: the batch is retried row by row, that request alone fails
    (500), the others finish with the answers they get alone, and the engine keeps serving."""
    from lorakit.hub import load_model

    model, tokenizer = load_model(files.model)
    engine = Engine(model, stop_ids=set(), context=256, max_batch=4).start()
    try:
        prompts = [tokenizer(p)["input_ids"] for p in ("hello world", "Say hello", "What is the capital")]

        async def alone():
            return [await _answer(engine, p, 12) for p in prompts]

        solo = asyncio.run(alone())
        poison = solo[0][0][4]  # the 5th token of the first answer
        assert all(poison not in tokens for tokens, _ in solo[1:])

        def refuse(module, args, kwargs):
            ids = kwargs["input_ids"]
            if ids.shape[1] == 1 and (ids == poison).any() or (ids.shape[1] > 1 and (ids == 999).any()):
                raise RuntimeError("poisoned row")

        hook = model.register_forward_pre_hook(refuse, with_kwargs=True)

        async def together():
            return await asyncio.gather(*(_answer(engine, p, 12) for p in [*prompts, [999, 5]]))

        crowd = asyncio.run(together())
        hook.remove()
        assert isinstance(crowd[0][1], Failed) and crowd[0][1].status == 500  # failed at its 5th token
        assert crowd[0][0] == solo[0][0][:5]
        assert isinstance(crowd[3][1], Failed)  # its prompt itself fails
        assert [c[0] for c in crowd[1:3]] == [s[0] for s in solo[1:]]
        assert asyncio.run(alone()) == solo  # still serving
    finally:
        engine.stop()


def test_ignore_eos_and_min_tokens_give_fixed_lengths_as_vllm_and_generate_do(files, one_thread):
    """``ignore_eos``: the stop token is emitted and the answer runs to max_tokens; ``min_tokens``: the stop token
    cannot be chosen before, the answer equals ``generate(min_new_tokens=)``; without either it stops there."""
    from lorakit.hub import load_model

    model, tokenizer = load_model(files.model)
    prompt = tuple(tokenizer("hello world")["input_ids"])
    free = Engine(model, stop_ids=set(), context=256, max_batch=4).start()
    try:
        plain = asyncio.run(_run(free, GenerationRequest(prompt, max_tokens=12)))[0]
    finally:
        free.stop()
    stop = plain[3]  # make the 4th greedy token a stop token
    engine = Engine(model, stop_ids={stop}, context=256, max_batch=4).start()
    try:
        stopped, end = asyncio.run(_run(engine, GenerationRequest(prompt, max_tokens=12)))
        assert stopped == plain[:3] and end.reason == "stop" and end.tokens == 4
        ignored, end = asyncio.run(_run(engine, GenerationRequest(prompt, max_tokens=12, ignore_eos=True)))
        assert ignored == plain and end.reason == "length" and end.tokens == 12
        held, end = asyncio.run(_run(engine, GenerationRequest(prompt, max_tokens=12, min_tokens=12)))
        assert end.reason == "length" and len(held) == 12 and stop not in held and held[:3] == plain[:3]
        with torch.inference_mode():
            want = model.generate(
                torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=stop
            )[0, len(prompt) :].tolist()
        assert held == want
    finally:
        engine.stop()


async def _run(engine: Engine, request: GenerationRequest) -> tuple[list[int], object]:
    return await _events(engine.submit(request, asyncio.get_running_loop()))


def _together(engine: Engine, requests: list[GenerationRequest]) -> list[tuple[list[int], object]]:
    """Every request waiting when the scheduler starts (so they are admitted together), then each one's answer."""

    async def run() -> list[tuple[list[int], object]]:
        loop = asyncio.get_running_loop()
        handles = [engine.submit(r, loop) for r in requests]
        engine.start()
        return [await _events(h) for h in handles]

    return asyncio.run(run())


def test_prompts_waiting_together_are_prefilled_packed_in_one_forward_each_as_alone(files, one_thread):
    """Prompts of different lengths on different adapters (and the base), all waiting when the scheduler turns:
    one prefill forward over them packed into one sequence, and every greedy answer is the one it gets alone."""
    from lorakit import PeftModel
    from lorakit.hub import load_model

    model, tokenizer = load_model(files.model)
    names = list(files.adapters)
    model = PeftModel.from_pretrained(model, files.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(files.adapters[name], adapter_name=name)
    texts = ["hello world", "Say hello to everyone here", "What", "What is the capital of France?", "hi there"]
    requests = [
        GenerationRequest(tuple(tokenizer(t)["input_ids"]), (names + ["__base__"])[i % 4], 10)
        for i, t in enumerate(texts)
    ]
    shapes = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    engine = Engine(model, stop_ids=set(), context=256, max_batch=8, prefix_cache_bytes=0)  # each prompt whole
    try:
        crowd = _together(engine, requests)
        prefills = [s for s in shapes if s[1] > 1]
        assert prefills == [(1, sum(len(r.prompt) for r in requests))]  # packed: one sequence, no padding
        alone = [asyncio.run(_run(engine, r)) for r in requests]
        assert [s for s in shapes if s[1] > 1][1:] == [(1, len(r.prompt)) for r in requests]
        assert [c[0] for c in crowd] == [a[0] for a in alone] and all(len(c[0]) == 10 for c in crowd)
        assert len({tuple(a[0]) for a in alone}) == len(texts)  # the adapters and prompts do differ
    finally:
        hook.remove()
        engine.stop()


def test_decode_steps_keep_one_routing_while_their_rows_stay_and_drop_it_on_a_delete(files, one_thread, monkeypatch):
    """Between commands no weight changes, so the scheduler keeps the last decode step's routing (its layers skip
    re-checking their packs) for as long as the rows name the same adapters; deleting an adapter drops it, and the
    answer stays what the request gets alone."""
    from lorakit import PeftModel
    from lorakit.hub import load_model
    from lorakit.layers.routing import RowRouting

    model, tokenizer = load_model(files.model)
    names = list(files.adapters)
    model = PeftModel.from_pretrained(model, files.adapters[names[0]], adapter_name=names[0])
    model.load_adapter(files.adapters[names[1]], adapter_name=names[1])
    made = []
    init = RowRouting.__init__
    monkeypatch.setattr(RowRouting, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    engine = Engine(model, stop_ids=set(), context=256, max_batch=8, prefix_cache_bytes=0)
    prompt = tuple(tokenizer("Say hello")["input_ids"])
    requests = [GenerationRequest(prompt, name, 12) for name in names[:2]]
    try:
        crowd = _together(engine, requests)  # one prefill, then every step over both rows
        decoding = [r for r in made if not r.per_token]  # (the prefill names one adapter per token)
        assert engine.steps == 11 and len(decoding) == 1  # not one per step
        assert engine._routing is decoding[0] and decoding[0].names == tuple(names[:2])
        engine.delete_adapter(names[1]).result(60)
        assert engine._routing is None
        assert asyncio.run(_run(engine, requests[0]))[0] == crowd[0][0]
    finally:
        engine.stop()
