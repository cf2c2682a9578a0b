"""Prometheus metrics of one gateway, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from protocol.rpc import STEP_SECONDS_BUCKETS


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "swarmgate_requests",
            "Completion requests by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "swarmgate_prompt_tokens",
            "Prompt tokens sent through the swarm",
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "swarmgate_generated_tokens", "Tokens generated", registry=self.registry
        )
        self.active_streams = Gauge(
            "swarmgate_active_generations", "Generations in progress", registry=self.registry
        )
        self.ttft = Histogram(
            "swarmgate_time_to_first_token_seconds",
            "From request to first generated token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.token_latency = Histogram(
            "swarmgate_inter_token_seconds",
            "Between generated tokens",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=self.registry,
        )

        self.affinity_errors = Counter(
            "swarmgate_affinity_errors",
            "Affinity store (Redis) calls that failed",
            registry=self.registry,
        )
        self.cached_tokens = Counter(
            "swarmgate_cached_prompt_tokens",
            "Prompt tokens reused from server caches",
            registry=self.registry,
        )
        self.server_failures = Counter(
            "swarmgate_server_failures",
            "Servers that failed a session (each then banned for a while and routed around)",
            ["error"],
            registry=self.registry,
        )

        self.queued = Gauge(
            "swarmgate_queued_requests", "Requests waiting for a slot", registry=self.registry
        )
        self.hop_step = Histogram(
            "swarmgate_hop_step_seconds",
            "One step through one server of a chain, network included, by server",
            ["peer"],
            buckets=STEP_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.replans = Counter(
            "swarmgate_replans",
            "Spans planned again because a server failed or was full",
            registry=self.registry,
        )
        self.hop_inputs = Counter(
            "swarmgate_hop_inputs",
            "Inputs of chain hops after the first, one per hop per step message: pushed by "
            "the hop before (node to node), or relayed through this gateway",
            ["via"],
            registry=self.registry,
        )
        self.hung_servers = Counter(
            "swarmgate_hung_servers",
            "Servers found hung: a step past its soft deadline, then a liveness probe left "
            "unanswered (each avoided until it answers again)",
            registry=self.registry,
        )
        self.failovers = Counter(
            "swarmgate_failovers",
            "Servers replaced in the middle of a generation, which then went on",
            registry=self.registry,
        )
        self.head_batch_rows = Histogram(
            "swarmgate_head_batch_rows",
            "Streams whose logits one LM head call computed together (the gateway batches "
            "the calls that arrive while its head thread is busy)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )

        self._hop_peers: set[str] = set()

    def observe_hop(self, peer: str, seconds: float) -> None:
        self._hop_peers.add(peer)
        self.hop_step.labels(peer).observe(seconds)

    def forget_peers(self, keep: set[str]) -> None:
        """Drop the series of servers that left the swarm: in a swarm with churn, per-peer
        series would otherwise grow without bound."""
        for peer in self._hop_peers - keep:
            self.hop_step.remove(peer)
        self._hop_peers &= keep

    def render(self) -> bytes:
        return generate_latest(self.registry)
