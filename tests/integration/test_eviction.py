"""A node whose cache budget holds one conversation evicts idle ones and stays exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Swarm, node_infos, run_swarm
from tests.integration.test_affinity import Conversation, assistant, user
from tests.processes import wait_for
from tests.tiny_model import TINY_BLOCKS

pytestmark = pytest.mark.integration

# The tiny model keeps 2 KV heads x 16 values x 4 bytes x 2 (keys, values) per token and
# block: 1 KiB per token for all 4 blocks. 100 KiB fits one ~70-token conversation only.
BUDGET_BYTES = 100 * 1024


@pytest.fixture(scope="module")
def small_swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    logs = tmp_path_factory.mktemp("small-swarm-logs")
    # run_swarm gives the node its --metrics-port (no port chosen at import time here).
    with run_swarm(tiny_model, logs, [(0, TINY_BLOCKS)], "--cache-bytes", str(BUDGET_BYTES)) as s:
        yield s


def test_a_tiny_budget_evicts_idle_sessions_and_answers_stay_exact(small_swarm: Swarm) -> None:
    first = Conversation(small_swarm, small_swarm.base_url)
    a1 = first.ask([user("Tell me about apples and pears. " * 4)])
    second = Conversation(small_swarm, small_swarm.base_url)
    second.ask([user("Tell me about whales and dolphins. " * 4)])  # evicts the first

    [info] = node_infos(small_swarm.initial_peers).values()
    assert info.evictions >= 1
    assert info.cache_bytes_free <= BUDGET_BYTES
    # The metrics endpoint serves a snapshot that the node publishes every second.
    evictions = f"swarmgate_node_cache_evictions_total {float(info.evictions)}"

    def scraped() -> str:
        return httpx.get(small_swarm.node_metrics[0], timeout=5).text

    wait_for(lambda: evictions in scraped(), 10, "the node's metrics to show the eviction")
    assert f"swarmgate_node_cache_bytes_budget {float(BUDGET_BYTES)}" in scraped()

    a2 = first.ask([*a1.messages, assistant(a1), user("Which is sweeter?")])
    assert a2.cached == 0  # its cache is gone, the answer is still exact (checked in ask)
