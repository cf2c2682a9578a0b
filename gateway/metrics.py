"""Prometheus metrics of one gateway, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from client.metrics import ClientMetrics


class GatewayMetrics(ClientMetrics):
    """The swarm client's metrics (``client.metrics``) and the gateway's own."""

    def __init__(self) -> None:
        super().__init__(CollectorRegistry())
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
        self.queued = Gauge(
            "swarmgate_queued_requests", "Requests waiting for a slot", registry=self.registry
        )
        self.head_batch_rows = Histogram(
            "swarmgate_head_batch_rows",
            "Streams whose logits one LM head call computed together (the gateway batches "
            "the calls that arrive while its head thread is busy)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )

        # Speculative decoding (--speculate), per drafter: what it proposed, what the chain's
        # passes confirmed, and how many tokens each pass with drafts yielded.
        self.draft_tokens = Counter(
            "swarmgate_draft_tokens",
            "Draft tokens sent through the chain to be verified",
            ["drafter"],
            registry=self.registry,
        )
        self.draft_tokens_accepted = Counter(
            "swarmgate_draft_tokens_accepted",
            "Draft tokens the chain's pass confirmed",
            ["drafter"],
            registry=self.registry,
        )
        self.tokens_per_pass = Histogram(
            "swarmgate_tokens_per_pass",
            "Tokens one chain pass with drafts yielded: the drafts accepted, plus one",
            ["drafter"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=self.registry,
        )

    def observe_speculation(self, drafter: str, drafted: int, accepted: int) -> None:
        """A pass verified ``drafted`` drafts and kept ``accepted``."""
        self.draft_tokens.labels(drafter).inc(drafted)
        self.draft_tokens_accepted.labels(drafter).inc(accepted)
        self.tokens_per_pass.labels(drafter).observe(accepted + 1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
