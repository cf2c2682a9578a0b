"""Per-server series last as long as their server: churn does not grow /metrics forever."""

from __future__ import annotations

from gateway.metrics import GatewayMetrics


def test_servers_that_left_the_swarm_lose_their_series() -> None:
    metrics = GatewayMetrics()
    metrics.observe_hop("QmStays", 0.01)
    metrics.observe_hop("QmLeaves", 0.02)
    text = metrics.render().decode()
    assert 'peer="QmStays"' in text and 'peer="QmLeaves"' in text

    metrics.forget_peers({"QmStays", "QmNeverSeen"})
    text = metrics.render().decode()
    assert 'peer="QmStays"' in text and 'peer="QmLeaves"' not in text
    metrics.forget_peers(set())  # forgetting twice, or what was never observed, is fine
    assert "peer=" not in metrics.render().decode()
