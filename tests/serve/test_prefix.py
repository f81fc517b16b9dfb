"""The prefix cache: what it matches, what it keeps, and that a prompt prefilled past a cached prefix computes
what the whole prompt computes (keys, values, logits; greedy answers through the engine), per adapter."""

from __future__ import annotations

import asyncio
import inspect

import pytest
import torch

from lorakit.serve.engine import Engine
from lorakit.serve.kv import cache_tensors
from lorakit.serve.prefix import PrefixCache, pack_prompts, past_cache, prompt_cache
from lorakit.serve.protocol import Finished, GenerationRequest
from serve.conftest import collect

LAYERS = 2


def _kv(tokens, fill: float = 1.0):
    """Per layer (1, 1, T, 2) keys and values whose position t holds fill * t."""
    t = torch.arange(len(tokens), dtype=torch.float32)[None, None, :, None].expand(1, 1, len(tokens), 2) * fill
    return [t.clone() for _ in range(LAYERS)], [t.clone() + 0.5 for _ in range(LAYERS)]


def test_lookup_finds_the_longest_common_prefix_to_the_token_and_leaves_the_last_token():
    cache = PrefixCache(1 << 20, block=4)
    stored = list(range(100, 120))  # 20 tokens
    cache.store("a", stored, *_kv(stored))
    assert cache.lookup("a", list(range(100, 103)) + [0, 0, 0]) is None  # not one whole block in common
    got = cache.lookup("a", list(range(100, 110)) + [7, 8, 9])  # 10 in common: 2 blocks and 2 tokens
    assert got is not None and got[0] == 10
    assert [k.shape[2] for k in got[1]] == [10] * LAYERS and torch.equal(got[1][0][0, 0, :, 0], torch.arange(10.0))
    assert torch.equal(got[2][1], _kv(stored)[1][1][:, :, :10])
    assert cache.lookup("a", stored)[0] == 19  # the whole prompt: its last token is left to compute
    assert cache.lookup("a", stored + [5])[0] == 20
    assert cache.lookup("b", stored) is None  # another adapter computed nothing here
    assert cache.lookup("a", [1] + stored) is None


def test_store_keeps_one_entry_per_prefix_chain_and_evicts_the_least_recent_within_the_budget():
    one = _kv(range(8))[0][0].numel() * 4 * 2 * LAYERS  # bytes of an 8-token prompt's keys and values
    cache = PrefixCache(3 * one, block=4)
    short, longer = list(range(8)), list(range(8)) + [50, 51, 52, 53]
    cache.store("a", short, *_kv(short))
    cache.store("a", longer, *_kv(longer))  # holds `short`: that entry goes
    assert len(cache) == 1 and cache.lookup("a", short + [9])[0] == 8
    cache.store("a", short, *_kv(short))  # already held by `longer`
    assert len(cache) == 1 and cache.nbytes == one * 12 // 8
    others = [[i] * 8 for i in (60, 61, 62)]
    cache.store("a", others[0], *_kv(others[0]))
    assert cache.lookup("a", longer + [1]) is not None  # `longer` is now the most recent
    cache.store("a", others[1], *_kv(others[1]))  # over the budget: the least recent (others[0]) goes
    assert cache.lookup("a", others[0] + [1]) is None and cache.lookup("a", longer + [1]) is not None
    assert cache.nbytes <= cache.budget
    cache.store("b", others[2], *_kv(others[2]))
    cache.drop("a")
    assert len(cache) == 1 and cache.lookup("b", others[2] + [1])[0] == 8 and cache.lookup("a", longer) is None
    huge = list(range(40))
    cache.store("a", huge, *_kv(huge))  # larger than the whole budget: not kept, nothing else lost
    assert cache.lookup("a", huge) is None and len(cache) == 1
    off = PrefixCache(0)
    off.store("a", huge, *_kv(huge))
    assert len(off) == 0 and off.lookup("a", huge) is None
    with pytest.raises(ValueError, match="budget"):
        PrefixCache(-1)


def test_prompts_packed_past_cached_prefixes_of_different_lengths_compute_what_each_whole_prompt_does():
    """Prompts with no cached prefix, a short one, a long one and all but one token, packed into one sequence
    whose tokens go through different adapters (names per token): each prompt's logits and whole keys and
    values equal those of the whole prompt run alone through its adapter."""
    from conftest import tiny_llama
    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], init_lora_weights=False
    )
    model = get_peft_model(tiny_llama(vocab_size=64), config)
    model.add_adapter("other", config)  # random too: init_lora_weights=False
    model.eval()
    prompts = [list(torch.randint(0, 64, (n,)).tolist()) for n in (9, 14, 12, 7)]
    starts, adapters = [0, 5, 11, 6], ["default", "other", "__base__", "other"]
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.get_base_model().forward).parameters else "past_key_values"
    )

    def whole(prompt, adapter):
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompt]), use_cache=True, adapter_names=[adapter])
        keys, values = cache_tensors(getattr(out, "cache", None) or out.past_key_values)
        return out.logits[:, -1], keys, values

    alone = [whole(p, a) for p, a in zip(prompts, adapters)]
    assert not torch.allclose(alone[1][0], whole(prompts[1], "default")[0])  # the adapters do differ
    cached = [
        None if s == 0 else (s, [k[:, :, :s] for k in a[1]], [v[:, :, :s] for v in a[2]]) for s, a in zip(starts, alone)
    ]
    packed = pack_prompts(prompts, cached, "cpu", torch.float32)
    new = sum(len(p) - s for p, s in zip(prompts, starts))
    assert packed.args["input_ids"].shape == (1, new) and packed.past_keys[0].shape[2] == sum(starts)
    names = [a for a, (_, _, _, n) in zip(adapters, packed.spans) for _ in range(n)]
    with torch.inference_mode(), model.base_model.rows_routed(names, per_token=True):
        out = model(**packed.args, **{cache_arg: past_cache(packed.past_keys, packed.past_values)}, use_cache=True)
    keys, values = cache_tensors(getattr(out, "cache", None) or out.past_key_values)
    for i, span in enumerate(packed.spans):
        prompt_keys, prompt_values = prompt_cache(keys, values, span, sum(starts))
        torch.testing.assert_close(out.logits[:, packed.last[i]], alone[i][0], atol=1e-5, rtol=1e-4)
        for got, want in zip(prompt_keys + prompt_values, alone[i][1] + alone[i][2]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    one = pack_prompts([prompts[1]], [cached[1]], "cpu", torch.float32)  # one prompt: unmasked, as generate
    assert set(one.args) == {"input_ids"} and one.past_keys[0].shape[2] == starts[1]
    with pytest.raises(ValueError, match="beyond its cached prefix"):
        pack_prompts([prompts[0]], [(len(prompts[0]), alone[0][1], alone[0][2])], "cpu", torch.float32)


def test_names_per_token_are_refused_by_layers_that_take_them_per_row():
    from lorakit.layers.routing import RowRouting

    routing = RowRouting(["a", "b", "a"], per_token=True)
    assert routing.rows(3) == ("a", "b", "a")
    with pytest.raises(ValueError, match="per token"):
        routing.rows(1)


async def _answer(engine: Engine, request: GenerationRequest) -> list[int]:
    tokens, end = await collect(engine.submit(request, asyncio.get_running_loop()))
    assert isinstance(end, Finished), end
    return tokens


def test_the_engine_prefills_only_past_what_the_same_adapter_computed_and_answers_as_without_the_cache(
    files, one_thread, tmp_path
):
    """Prompts sharing a long beginning on two adapters: the second prompt of an adapter computes only its own
    tail, an adapter never reuses another's prefix, a new adapter under a deleted one's name reuses nothing,
    and every greedy answer equals the engine's without a prefix cache."""
    from lorakit import PeftModel
    from lorakit.hub import load_model
    from serve.conftest import write_adapter

    def with_adapters(folders: dict[str, str]) -> PeftModel:
        items = list(folders.items())
        model = PeftModel.from_pretrained(load_model(files.model)[0], items[0][1], adapter_name=items[0][0])
        for name, folder in items[1:]:
            model.load_adapter(folder, adapter_name=name)
        return model

    tokenizer = load_model(files.model)[1]
    a, b = list(files.adapters)[:2]
    model = with_adapters({a: files.adapters[a], b: files.adapters[b]})
    system = "You are a helpful assistant who answers in one short sentence. "
    prompts = [tuple(tokenizer(system + q)["input_ids"]) for q in ("Hi?", "Where is Paris?", "Name a colour.")]

    def common(x, y):
        return next(i for i, (s, t) in enumerate(zip(x, y)) if s != t)

    order = [(a, prompts[0]), (a, prompts[1]), (b, prompts[1]), (b, prompts[2])]
    widths = [len(prompts[0]), len(prompts[1]) - common(*prompts[:2]), len(prompts[1]), len(prompts[2])]
    widths[3] -= common(prompts[1], prompts[2])
    assert common(*prompts[:2]) > 16  # a whole block or more is shared
    plain = Engine(model, stop_ids=set(), context=256, max_batch=4, prefix_cache_bytes=0).start()
    try:
        want = [asyncio.run(_answer(plain, GenerationRequest(p, name, 8))) for name, p in order]
    finally:
        plain.stop()
    seen: list[int] = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    engine = Engine(model, stop_ids=set(), context=256, max_batch=4).start()
    try:
        got, prefilled = [], []
        for name, prompt in order:
            seen.clear()
            got.append(asyncio.run(_answer(engine, GenerationRequest(prompt, name, 8))))
            prefilled.append(seen[0])
        assert prefilled == widths
        assert got == want and len({tuple(g) for g in got}) == len(order)  # the adapters and prompts do differ
        engine.delete_adapter(b).result(timeout=30)
        fresh = str(write_adapter(files.model, tmp_path / "fresh", 42))
        engine.load_adapter(b, fresh).result(timeout=30)
        seen.clear()
        again = asyncio.run(_answer(engine, GenerationRequest(prompts[2], b, 8)))
        assert seen[0] == len(prompts[2])  # nothing reused from the deleted adapter of that name
    finally:
        hook.remove()
        engine.stop()
    reference = Engine(with_adapters({b: fresh}), stop_ids=set(), context=256, prefix_cache_bytes=0).start()
    try:
        assert again == asyncio.run(_answer(reference, GenerationRequest(prompts[2], b, 8)))
    finally:
        reference.stop()


def test_metrics_count_the_prompt_tokens_taken_from_the_prefix_cache(http):
    from serve.conftest import metric

    def hits() -> float:
        return metric(http.get("/metrics").text, "lorakit_prefix_cache_hit_tokens_total", adapter="gamma")

    before = hits()
    prompt = "A long shared instruction that every request of this test starts with, then: "
    for tail in ("one", "two"):
        body = {"model": "gamma", "prompt": prompt + tail, "max_tokens": 2, "temperature": 0}
        assert http.post("/v1/completions", json=body).status_code == 200
    assert hits() - before >= len(prompt) // 2  # the second prompt reused the first's beginning
