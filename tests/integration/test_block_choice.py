"""Servers started without --blocks split the model between them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL_ID, printed_initial_peers, start_gateway
from tests.processes import Process, http_ok, no_orphans, stop_all, wait_for
from tests.tiny_model import TINY_BLOCKS

pytestmark = pytest.mark.integration


def test_nodes_without_blocks_take_the_least_covered_spans(
    tiny_model: Path, tmp_path: Path
) -> None:
    half = str(TINY_BLOCKS // 2)
    with no_orphans():
        dht = Process("dht", ["dht"], tmp_path)
        processes = [dht]
        try:
            wait_for(lambda: "--initial-peers" in dht.output() or not dht.alive(), 60, "the DHT")
            peers = printed_initial_peers(dht.output())
            node = [
                "node",
                "--model",
                str(tiny_model),
                "--model-name",
                MODEL_ID,
                "--initial-peers",
                *peers,
                "--num-blocks",
                half,
                "--announce-period",
                "2",
            ]
            first = Process("node-a", node, tmp_path)
            processes.append(first)
            # The first claims its span as soon as it chose it, before it has loaded it.
            wait_for(
                lambda: "loading blocks" in first.output() or not first.alive(),
                60,
                "the first node to choose",
            )
            processes.append(Process("node-b", node, tmp_path))
            gateway, url = start_gateway(tiny_model, peers, tmp_path)
            processes.append(gateway)
            wait_for(lambda: http_ok(f"{url}/health") or not gateway.alive(), 120, "a full chain")
            spans = sorted(
                (s["start"], s["end"]) for s in httpx.get(f"{url}/swarm").json()["servers"]
            )
            assert spans == [(0, TINY_BLOCKS // 2), (TINY_BLOCKS // 2, TINY_BLOCKS)]
        finally:
            stop_all(processes)
