"""Bad input gets the right HTTP error (OpenAI's error body), and the server keeps serving everyone else."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from serve.conftest import CONTEXT, metric, running_server


def _post(http, path, **body):
    return http.post(path, json=body)


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _still_serving(client, reference):
    r = client.completions.create(model="alpha", prompt="hello world", max_tokens=5, temperature=0)
    assert r.choices[0].text.strip() == reference("alpha", "hello world", 5)


def test_malformed_json_is_400(http, client, reference):
    for body in (b"{not json", b'{"model": "alpha", "prompt": "x",}', b""):
        response = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert "JSON" in _error(response, 400)["message"] or response.status_code == 400
    _still_serving(client, reference)


def test_missing_and_invalid_fields_are_400_naming_the_field(http):
    assert _error(_post(http, "/v1/completions", model="alpha"), 400)["param"] == "prompt"
    assert _error(_post(http, "/v1/chat/completions", model="alpha", messages=[]), 400)["param"] == "messages"
    bad = _post(http, "/v1/completions", model="alpha", prompt="x", temperature=-1)
    assert _error(bad, 400)["param"] == "temperature"
    assert (
        "stop" in _error(_post(http, "/v1/completions", model="alpha", prompt="x", stop=list("abcde")), 400)["message"]
    )
    over = _error(_post(http, "/v1/completions", model="alpha", prompt="x", max_tokens=4, min_tokens=5), 400)
    assert "min_tokens=5" in over["message"]
    chat = dict(model="alpha", messages=[{"role": "user", "content": "x"}], max_completion_tokens=2, min_tokens=3)
    assert "min_tokens" in _error(_post(http, "/v1/chat/completions", **chat), 400)["message"]


def test_unsupported_options_are_refused_not_ignored(http):
    for field, value in (("logprobs", 2), ("suffix", "end"), ("presence_penalty", 0.5)):
        response = _post(http, "/v1/completions", model="alpha", prompt="x", **{field: value})
        assert field in _error(response, 400)["message"]
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    assert (
        _post(http, "/v1/chat/completions", model="alpha", messages=[{"role": "user", "content": image}]).status_code
        == 400
    )
    tools = [{"type": "function", "function": {"name": "f"}}]
    chat = dict(model="alpha", messages=[{"role": "user", "content": "x"}])
    assert "tools" in _error(_post(http, "/v1/chat/completions", **chat, tools=tools), 400)["message"]


def test_unknown_model_is_404_listing_the_names(client, reference):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="delta", prompt="x", max_tokens=2)
    message = caught.value.body["message"]
    assert "delta" in message and all(name in message for name in ("tiny", "alpha", "beta", "gamma"))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="delta", messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("delta")
    _still_serving(client, reference)


def test_a_prompt_longer_than_the_context_is_400(client, reference):
    long = "hello world " * CONTEXT
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="alpha", prompt=long, max_tokens=2)
    assert caught.value.code == "context_length_exceeded" and str(CONTEXT) in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": long}], stream=True)
    _still_serving(client, reference)


def test_max_tokens_over_the_limit_or_past_the_context_is_400(client, reference):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="alpha", prompt="hello", max_tokens=CONTEXT + 1)
    assert "limit" in caught.value.body["message"] and caught.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="alpha", prompt="hello world " * 100, max_tokens=CONTEXT - 10)
    assert caught.value.code == "context_length_exceeded"
    _still_serving(client, reference)


def test_the_api_key_guards_everything_but_health(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, path in (
            ("GET", "/v1/models"),
            ("GET", "/metrics"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/adapters"),
            ("DELETE", "/v1/adapters/alpha"),
            ("GET", "/nowhere"),
        ):
            response = anonymous.request(method, path, json={})
            assert _error(response, 401)["code"] == "invalid_api_key", path
            assert response.headers["www-authenticate"] == "Bearer"
            wrong = anonymous.request(method, path, json={}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
    from openai import OpenAI

    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_requests_are_counted_by_adapter_and_status(http, client):
    before = http.get("/metrics").text
    client.completions.create(model="beta", prompt="hello", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nobody", prompt="hello", max_tokens=2)
    after = http.get("/metrics").text
    for labels in ({"adapter": "beta", "status": "200"}, {"adapter": "-", "status": "404"}):
        assert (
            metric(after, "lorakit_requests_total", **labels) == metric(before, "lorakit_requests_total", **labels) + 1
        )
    assert metric(after, "lorakit_generated_tokens_total", adapter="beta") >= 2


def test_a_client_that_leaves_mid_stream_frees_its_row_at_once(server, http):
    before = http.get("/metrics").text
    body = {"model": "gamma", "prompt": "hello", "max_tokens": CONTEXT - 10, "stream": True, "temperature": 0}
    # (gamma's greedy answer to "hello" runs to its budget: only the client's leaving can end it early)
    with http.stream("POST", "/v1/completions", json=body) as response:
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data:")
            if received == 2:
                break  # leave: closing the response closes the connection
    _wait(lambda: server.service.engine.stats()["running"] == 0)
    after = http.get("/metrics").text
    gone = {"adapter": "gamma", "status": "499"}
    assert metric(after, "lorakit_requests_total", **gone) == metric(before, "lorakit_requests_total", **gone) + 1
    cancelled = {"adapter": "gamma", "reason": "cancelled"}  # not ended by its budget or a stop token
    assert metric(after, "lorakit_finished_sequences_total", **cancelled) == (
        metric(before, "lorakit_finished_sequences_total", **cancelled) + 1
    )


def test_a_client_that_leaves_before_a_whole_answer_frees_its_row(server, http):
    before = http.get("/metrics").text
    body = {"model": "gamma", "prompt": "hello", "max_tokens": CONTEXT - 10, "temperature": 0}  # runs to its budget
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", json=body, timeout=0.3)
    _wait(lambda: server.service.engine.stats()["running"] == 0)
    gone = {"adapter": "gamma", "status": "499"}
    _wait(lambda: _grew(http, before, "lorakit_requests_total", **gone))
    assert _grew(http, before, "lorakit_finished_sequences_total", adapter="gamma", reason="cancelled")


def _grew(http, before, name, **labels):
    return metric(http.get("/metrics").text, name, **labels) == metric(before, name, **labels) + 1


def _wait(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def small(files, one_thread):
    """A server with one row and room for one waiting request, no adapter root, no API key."""
    adapters = {"alpha": str(files.adapters["alpha"])}
    with running_server(files.model, adapters=adapters, max_batch=1, max_queue=1) as s:
        yield s


def test_a_full_queue_is_429_and_the_others_still_finish(small):
    from openai import OpenAI

    client = OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    engine = small.service.engine
    started, results = threading.Event(), {}

    def run(name, **kw):
        text = ""
        for chunk in client.completions.create(model="alpha", prompt="hello", temperature=0, stream=True, **kw):
            text += chunk.choices[0].text
            started.set()
        results[name] = text

    first = threading.Thread(target=run, args=("first",), kwargs={"max_tokens": 400})
    first.start()
    assert started.wait(60)
    second = threading.Thread(target=run, args=("second",), kwargs={"max_tokens": 3})
    second.start()
    _wait(lambda: engine.stats()["waiting"] == 1)  # the first answer holds the only row; the second waits
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="alpha", prompt="hello", max_tokens=3)
    assert caught.value.response.headers["retry-after"] == "1"
    first.join(60), second.join(60)
    assert set(results) == {"first", "second"}
    assert client.completions.create(model="alpha", prompt="hello", max_tokens=3).usage.completion_tokens == 3


def test_runtime_loading_is_off_without_an_adapter_root(small):
    with httpx.Client(base_url=small.url, timeout=30) as http:
        _error(http.post("/v1/adapters", json={"name": "late", "path": "late"}), 403)


def test_a_draining_server_refuses_new_work_with_503(small):
    small.service.engine.drain()
    with httpx.Client(base_url=small.url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "draining"
        assert http.get("/health").status_code == 503
        _error(http.post("/v1/completions", json={"model": "alpha", "prompt": "x"}), 503)
