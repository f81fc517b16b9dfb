"""What the server answers: greedy answers equal ``lorakit generate``'s whatever shares the batch, streaming equals
non-streaming, sampling follows the seed, stop strings, usage, ``n``, several prompts, echo."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from serve.conftest import metric

PROMPTS = [
    "What is the capital of France?",
    "Convert to YYYY-MM-DD: March 5, 2021",
    "Say hello",
    "the 5th of March, 2021",
    "hello world",
    "You are a test bot.",
]


def _chat(client, model, prompt, max_tokens, **kw):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, **kw
    )
    return r.choices[0].message.content


def _text(client, model, prompt, max_tokens, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def test_concurrent_requests_on_different_adapters_equal_lorakit_generate(client, server, http, reference):
    """A long streamed answer runs while requests for every adapter (and the base) join and leave its batch:
    each greedy answer is what ``lorakit generate`` gives for that prompt and adapter alone."""
    before = http.get("/metrics").text
    models = ["alpha", "beta", "gamma", "tiny", "alpha", "beta"]
    jobs = [(m, p, 12 + 9 * i, i % 2 == 0) for i, (m, p) in enumerate(zip(models, PROMPTS))]  # (.., chat?)
    long_prompt, long_tokens = "Say hello", 300
    started, pieces = threading.Event(), []

    def long_stream():
        stream = client.completions.create(
            model="gamma", prompt=long_prompt, max_tokens=long_tokens, temperature=0, stream=True
        )
        for chunk in stream:
            pieces.append(chunk.choices[0].text)
            started.set()

    def one(job):
        model, prompt, max_tokens, chat = job
        if chat:
            return _chat(client, model, prompt, max_tokens)
        return _text(client, model, prompt, max_tokens).choices[0].text

    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        streaming = pool.submit(long_stream)
        assert started.wait(60)
        answers = list(pool.map(one, jobs))
        streaming.result()
    for (model, prompt, max_tokens, chat), answer in zip(jobs, answers):
        source = [{"role": "user", "content": prompt}] if chat else prompt
        assert answer.strip() == reference(model, source, max_tokens), (model, prompt, chat)
    assert "".join(pieces).strip() == reference("gamma", long_prompt, long_tokens)
    after = http.get("/metrics").text
    steps = metric(after, "lorakit_batch_size_count") - metric(before, "lorakit_batch_size_count")
    alone = metric(after, "lorakit_batch_size_bucket", le="1.0") - metric(before, "lorakit_batch_size_bucket", le="1.0")
    assert steps - alone > 0  # some steps decoded several rows together
    assert len({a for a in answers}) == len(answers)  # the adapters do change the answers


def test_streamed_pieces_add_up_to_the_whole_answer(client):
    for stop in (None, ["ll"]):
        whole = _text(client, "beta", "hello world", 40, stop=stop)
        stream = client.completions.create(
            model="beta", prompt="hello world", max_tokens=40, temperature=0, stream=True, stop=stop
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_stream_sends_the_role_then_the_content_then_usage(client, reference):
    chunks = list(
        client.chat.completions.create(
            model="alpha",
            messages=[{"role": "user", "content": "Say hello"}],
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip() == reference("alpha", [{"role": "user", "content": "Say hello"}], 10)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_a_stop_string_cuts_the_answer_before_it(client):
    whole = _text(client, "alpha", "Say hello", 30).choices[0].text
    stop = whole[10:13]
    cut = _text(client, "alpha", "Say hello", 30, stop=[stop, "never appears"])
    assert cut.choices[0].text == whole[: whole.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 30


def test_ignore_eos_and_min_tokens_pass_through_the_openai_client(client, server, reference):
    """vLLM's extensions, as its users send them (``extra_body``): the answer runs to max_tokens although nearly
    every token is made a stop token here (all but 16), which ends it at once without them."""
    engine = server.service.engine
    saved, engine.stop_ids = engine.stop_ids, frozenset(range(16, len(reference.tokenizer)))
    try:

        def ask(**extra):
            messages = [{"role": "user", "content": "hi"}]
            return client.chat.completions.create(
                model="beta", messages=messages, max_tokens=9, temperature=0, extra_body=extra
            )

        plain = ask()
        assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 9
        for extra in ({"ignore_eos": True}, {"min_tokens": 9}):
            r = ask(**extra)
            assert r.usage.completion_tokens == 9 and r.choices[0].finish_reason == "length"
    finally:
        engine.stop_ids = saved


def test_usage_counts_the_prompt_and_the_answer(client, reference):
    tokenizer = reference.tokenizer
    r = _text(client, "tiny", "hello world", 7)
    assert r.usage.prompt_tokens == len(tokenizer("hello world")["input_ids"])
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].finish_reason == "length" and r.model == "tiny"


def test_seeded_sampling_repeats_and_n_choices_differ(client):
    def sample(seed, n=1):
        r = client.completions.create(model="beta", prompt="hello", max_tokens=20, temperature=1.0, seed=seed, n=n)
        return [c.text for c in r.choices]

    first = sample(5)
    assert sample(5) == first
    assert sample(6) != first
    three = sample(5, n=3)
    assert three[0] == first[0] and len(set(three)) == 3
    top = client.completions.create(model="beta", prompt="hello", max_tokens=20, temperature=1.0, top_p=1e-6, seed=1)
    assert top.choices[0].text == _text(client, "beta", "hello", 20).choices[0].text  # top-p ~0 is greedy


def test_several_prompts_and_n_give_every_choice_in_order(client):
    r = client.completions.create(model="gamma", prompt=["hello", "Say hello"], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    alone = [_text(client, "gamma", p, 8).choices[0].text for p in ("hello", "Say hello")]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert r.usage.completion_tokens == 32


def test_token_prompts_and_echo(client, reference):
    ids = reference.tokenizer("hello world")["input_ids"]
    by_ids = client.completions.create(model="alpha", prompt=ids, max_tokens=6, temperature=0)
    by_text = _text(client, "alpha", "hello world", 6)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = _text(client, "alpha", "hello world", 6, echo=True)
    assert echoed.choices[0].text == "hello world" + by_text.choices[0].text


def test_models_lists_the_base_and_every_adapter(client):
    models = client.models.list()
    assert [m.id for m in models.data][:4] == ["tiny", "alpha", "beta", "gamma"]
    assert client.models.retrieve("beta").parent == "tiny"
