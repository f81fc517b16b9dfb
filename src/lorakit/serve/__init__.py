"""``lorakit serve``: one base model, many adapters, behind an OpenAI-compatible HTTP endpoint.

Requests for different adapters share each decoding step (continuous batching through the mixed-adapter path).
The package is the server's rooms, each one idea:

* :mod:`~lorakit.serve.kv`: the decode batch's KV cache, one slot per running sequence at its own position;
* :mod:`~lorakit.serve.sampling`: each row's next token (greedy, temperature, top-p, per-request seed);
* :mod:`~lorakit.serve.engine`: the scheduler thread that owns the model, and :mod:`~lorakit.serve.protocol`:
  what it exchanges with the HTTP side (requests, events, errors);
* :mod:`~lorakit.serve.text`: incremental decoding and stop strings;
* :mod:`~lorakit.serve.schemas`, :mod:`~lorakit.serve.generation`, :mod:`~lorakit.serve.app`: the OpenAI API;
* :mod:`~lorakit.serve.adapters`: runtime adapter loading confined to ``--adapter-root``;
* :mod:`~lorakit.serve.metrics`: Prometheus; :mod:`~lorakit.serve.server`: uvicorn and a clean SIGTERM.

It needs the ``serve`` extra (``pip install 'lorakit[serve]'``: FastAPI, uvicorn, sse-starlette,
prometheus-client); lorakit itself never imports this package, so lorakit runs without them.
"""
