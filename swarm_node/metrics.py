"""A block server's Prometheus metrics, read from its live state when scraped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protocol.rpc import STEP_SECONDS_BUCKETS, ServerInfo


class InfoBoard:
    """The node's latest ``ServerInfo``: rebuilt on the event loop, read from any thread.

    Reading the session store from prometheus' scrape thread would iterate (and expire)
    it while the loop mutates it; a published immutable snapshot cannot be torn.
    """

    def __init__(self, read: Callable[[], ServerInfo]) -> None:
        self._read = read  # runs on the event loop only
        self.latest = read()

    def refresh(self) -> ServerInfo:
        self.latest = self._read()  # one reference swap: readers see the old or the new
        return self.latest

    async def run(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.refresh()


class _NodeCollector(Collector):
    def __init__(self, info: Callable[[], ServerInfo], budget_bytes: int) -> None:
        self._info = info
        self._budget_bytes = budget_bytes

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        info = self._info()
        yield GaugeMetricFamily(
            "swarmgate_node_cached_sessions",
            "Sessions with a KV cache here",
            value=info.cached_sessions,
        )
        yield GaugeMetricFamily(
            "swarmgate_node_open_streams", "Inference streams open now", value=info.load
        )
        yield GaugeMetricFamily(
            "swarmgate_node_cache_bytes_free", "KV cache budget left", value=info.cache_bytes_free
        )
        yield GaugeMetricFamily(
            "swarmgate_node_cache_bytes_budget", "KV cache budget", value=self._budget_bytes
        )
        yield CounterMetricFamily(
            "swarmgate_node_cache_evictions", "Sessions evicted", value=info.evictions
        )
        yield CounterMetricFamily(
            "swarmgate_node_tokens_computed",
            "Positions run through this span",
            value=info.tokens_computed,
        )
        yield CounterMetricFamily(
            "swarmgate_node_tokens_reused",
            "Prompt positions served from a cache",
            value=info.tokens_reused,
        )


class NodeMetrics:
    """Everything a node exports: its state (read from the board when scraped) and the time
    its steps take (observed as they finish; prometheus' histograms are thread-safe)."""

    def __init__(self, info: Callable[[], ServerInfo], budget_bytes: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_NodeCollector(info, budget_bytes))
        self.step_seconds = Histogram(
            "swarmgate_node_step_seconds",
            "One step of one session through this span (prefill: more than one token)",
            ["phase"],
            buckets=STEP_SECONDS_BUCKETS,
            registry=self.registry,
        )

        self.batch_segments = Histogram(
            "swarmgate_node_batch_sessions",
            "Sessions whose tokens ran together in one forward (continuous batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "swarmgate_node_batch_tokens",
            "Tokens in one forward: decode steps plus at most one prefill chunk",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )

    def observe_batch(self, sessions: int, tokens: int) -> None:
        self.batch_segments.observe(sessions)
        self.batch_tokens.observe(tokens)

    def observe_step(self, tokens: int, seconds: float) -> None:
        self.step_seconds.labels("prefill" if tokens > 1 else "decode").observe(seconds)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` on ``host:port`` from a background thread."""
        start_http_server(port, addr=host, registry=self.registry)
