"""``GET /metrics``: what the server did, in Prometheus' text format (one registry per server, not the global one).

========================================== =========== ===================================================
name                                       kind        what
========================================== =========== ===================================================
``lorakit_requests_total``                 counter     generation requests by ``adapter`` and ``status``
                                                       (the HTTP status; ``499`` when the client left
                                                       before the answer ended)
``lorakit_prompt_tokens_total``            counter     prompt tokens read, by ``adapter``
``lorakit_prefix_cache_hit_tokens_total``  counter     prompt tokens whose keys and values came from the
                                                       prefix cache (not computed again), by ``adapter``
``lorakit_generated_tokens_total``         counter     tokens generated, by ``adapter`` (stop tokens too)
``lorakit_finished_sequences_total``       counter     answers (choices) ended, by ``adapter`` and ``reason``:
                                                       ``stop``, ``length`` or ``cancelled``
``lorakit_queue_length``                   gauge       requests waiting for a row
``lorakit_running_sequences``              gauge       sequences being decoded (rows in use)
``lorakit_batch_size``                     histogram   rows per decode step
``lorakit_time_to_first_token_seconds``    histogram   request arrival to its first token, by ``adapter``
``lorakit_inter_token_latency_seconds``    histogram   between two tokens of one answer, by ``adapter``
``lorakit_adapters_loaded``                gauge       adapters requests may name
========================================== =========== ===================================================

``adapter`` is the name a request's ``model`` field gave (the base model's id for the base), or ``-`` for a
request refused before its model was known (bad JSON, a wrong API key, an unknown name: so that clients
cannot create label values at will).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lorakit.layers.routing import BASE_ROW
from lorakit.serve.protocol import Observer

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics(Observer):
    """The server's counters, gauges and histograms; the scheduler reports into it as an :class:`Observer`.

    Args:
        base_name: the label the base model's rows get.
    """

    def __init__(self, base_name: str) -> None:
        self.base_name = base_name
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("lorakit_requests", "Generation requests", ["adapter", "status"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens read", ["adapter"], registry=r)
        self.prefix_hits = Counter(
            "lorakit_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache", ["adapter"], registry=r
        )
        self.generated_tokens = Counter("lorakit_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.finished_sequences = Counter(
            "lorakit_finished_sequences", "Answers ended", ["adapter", "reason"], registry=r
        )
        self.queue_length = Gauge("lorakit_queue_length", "Requests waiting for a row", registry=r)
        self.running_rows = Gauge("lorakit_running_sequences", "Sequences being decoded", registry=r)
        self.batch_size = Histogram("lorakit_batch_size", "Rows per decode step", buckets=_ROWS, registry=r)
        self.ttft = Histogram(
            "lorakit_time_to_first_token_seconds", "Arrival to first token", ["adapter"], buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "lorakit_inter_token_latency_seconds", "Between two tokens", ["adapter"], buckets=_LATENCY, registry=r
        )
        self.adapters_loaded = Gauge("lorakit_adapters_loaded", "Adapters requests may name", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, adapter: str, status: int | str, prompt_tokens: int = 0) -> None:
        self.requests.labels(adapter=self._label(adapter), status=str(status)).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(adapter=self._label(adapter)).inc(prompt_tokens)

    # -- Observer: called by the scheduler thread (prometheus_client's metrics are thread-safe) -------

    def waiting(self, count: int) -> None:
        self.queue_length.set(count)

    def prefilled(self, adapter: str, cached_tokens: int) -> None:
        self.prefix_hits.labels(adapter=self._label(adapter)).inc(cached_tokens)

    def step(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def running(self, rows: int) -> None:
        self.running_rows.set(rows)

    def finished(self, adapter: str, reason: str) -> None:
        self.finished_sequences.labels(adapter=self._label(adapter), reason=reason).inc()

    def first_token(self, adapter: str, seconds: float) -> None:
        self.ttft.labels(adapter=self._label(adapter)).observe(seconds)
        self.generated_tokens.labels(adapter=self._label(adapter)).inc()

    def next_token(self, adapter: str, seconds: float) -> None:
        self.itl.labels(adapter=self._label(adapter)).observe(seconds)
        self.generated_tokens.labels(adapter=self._label(adapter)).inc()

    def _label(self, adapter: str) -> str:
        return self.base_name if adapter == BASE_ROW else adapter
