"""Adapters loaded and deleted while the server runs: confined to --adapter-root, refused whole when bad, deleted
only after their requests finished."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from serve.conftest import running_server


def _error(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def _names(http):
    return [m["id"] for m in http.get("/v1/models").json()["data"]]


@pytest.fixture(scope="module")
def loaded(files, one_thread):
    """A server of its own (adapters come and go here), with the adapter root and "alpha"."""
    with running_server(files.model, adapters={"alpha": str(files.adapters["alpha"])}, adapter_root=files.root) as s:
        yield s


@pytest.fixture
def http(loaded):
    import httpx

    with httpx.Client(base_url=loaded.url, timeout=60) as c:
        yield c


@pytest.fixture
def client(loaded):
    from openai import OpenAI

    return OpenAI(base_url=loaded.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(client, model, prompt="hello world", max_tokens=12):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def test_an_adapter_loaded_at_runtime_serves_what_lorakit_generate_gives(http, client, reference):
    response = http.post("/v1/adapters", json={"name": "late", "path": "late"})
    assert response.status_code == 201, response.text
    assert response.json() == {**response.json(), "id": "late", "object": "model", "parent": "tiny"}
    assert _names(http) == ["tiny", "alpha", "late"]
    assert _greedy(client, "late").strip() == reference("late", "hello world", 12)
    assert _error(http.post("/v1/adapters", json={"name": "late", "path": "late"}), 409)
    assert http.delete("/v1/adapters/late").json() == {"id": "late", "object": "model", "deleted": True}
    assert _names(http) == ["tiny", "alpha"]


def test_paths_outside_the_adapter_root_are_403(http, files, tmp_path):
    link = files.root / "escape"
    if not link.exists():
        link.symlink_to(files.outside, target_is_directory=True)
    for path in (str(files.outside), "../outside", "escape", "/etc"):
        assert "outside the adapter root" in _error(http.post("/v1/adapters", json={"name": "x", "path": path}), 403)
    assert _names(http) == ["tiny", "alpha"]


def test_a_bad_adapter_is_refused_and_nothing_else_changes(http, client):
    before = _greedy(client, "alpha"), _greedy(client, "tiny")
    corrupt = _error(http.post("/v1/adapters", json={"name": "broken", "path": "corrupt"}), 400)
    assert "corrupt" in corrupt
    whole_module = _error(http.post("/v1/adapters", json={"name": "saved", "path": "saved"}), 400)
    assert "mix" in whole_module
    assert _error(http.post("/v1/adapters", json={"name": "x", "path": "missing"}), 404)
    assert _error(http.post("/v1/adapters", json={"name": "bad/name", "path": "late"}), 400)
    assert _error(http.post("/v1/adapters", json={"name": "tiny", "path": "late"}), 409)
    assert _error(http.post("/v1/adapters", json={"name": "x"}), 400)
    assert _names(http) == ["tiny", "alpha"]
    assert (_greedy(client, "alpha"), _greedy(client, "tiny")) == before
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="broken", prompt="x", max_tokens=2)


def test_deleting_an_unknown_adapter_is_404(http):
    assert "nobody" in _error(http.delete("/v1/adapters/nobody"), 404)


def test_delete_waits_for_the_requests_in_flight_and_refuses_new_ones(http, client, reference):
    assert http.post("/v1/adapters", json={"name": "late", "path": "late"}).status_code == 201
    started, pieces, deleted = threading.Event(), [], {}

    def stream():
        for chunk in client.completions.create(
            model="late", prompt="Say hello", max_tokens=300, temperature=0, stream=True
        ):
            pieces.append(chunk.choices[0].text)
            started.set()

    def delete():
        deleted["response"] = http.delete("/v1/adapters/late")
        deleted["stream_done"] = not streaming.is_alive()

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert started.wait(60)
    deleting = threading.Thread(target=delete)
    deleting.start()
    deadline = time.monotonic() + 30
    while "late" in _names(http):  # gone from the list at once...
        assert time.monotonic() < deadline
        time.sleep(0.01)
    if streaming.is_alive():  # ...so new requests for it are refused while the old one runs
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="late", prompt="x", max_tokens=2)
    streaming.join(60), deleting.join(60)
    assert deleted["response"].status_code == 200 and deleted["stream_done"]
    assert "".join(pieces).strip() == reference("late", "Say hello", 300)  # it finished whole
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="x", max_tokens=2)
