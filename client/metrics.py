"""Prometheus metrics of a swarm client: how its chains fared, in a registry it is given.

The gateway's own metrics (``gateway.metrics``) extend these on the same registry, so its
``/metrics`` shows both; a fine-tuner keeps them in a registry nobody scrapes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from protocol.rpc import STEP_SECONDS_BUCKETS


class ClientMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.server_failures = Counter(
            "swarmgate_server_failures",
            "Servers that failed a session (each then banned for a while and routed around)",
            ["error"],
            registry=self.registry,
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
