"""Model families beyond Llama through real node processes: a two-node swarm of a tiny
BLOOM (ALiBi, no rotary), Falcon (grouped kv heads) and Mixtral (MoE) answers
greedily exactly as `transformers` `generate` on the whole model. So does a Llama with a
trained model's narrow init (0.02), whose close logits leave greedy choices little room.

The four swarms share one DHT, each under its own model name, as models share a real
swarm, and start together: a swarm's start is mostly waiting (imports, announcements),
which four swarms can do at once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import printed_initial_peers, start_gateway, start_node
from tests.processes import Process, http_ok, no_orphans, stop_all, wait_for
from tests.reference import greedy_ids, token_texts
from tests.tiny_model import TINY_BLOCKS, build_tiny_family, build_tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = list(range(500, 530))
NEW_TOKENS = 10
NARROW = "llama-narrow-init"
NARROW_NEW_TOKENS = 64  # close logits: the more tokens, the more chances to flip one
FAMILIES = ["bloom", "falcon", "mixtral", NARROW]
NO_EOS = {"0": -100, "2": -100}  # no end of text: all new tokens compared


@dataclass(frozen=True)
class FamilySwarm:
    model: Path
    url: str
    model_id: str


@pytest.fixture(scope="module")
def family_swarms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FamilySwarm]]:
    """Per family: its model and a healthy gateway over two nodes, all on one DHT."""
    logs = tmp_path_factory.mktemp("family-logs")
    models = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        models[family] = (
            build_tiny_llama(folder, initializer_range=0.02)
            if family == NARROW
            else build_tiny_family(folder, family)
        )
    with no_orphans():
        dht = Process("dht", ["dht"], logs)
        processes = [dht]
        try:
            wait_for(lambda: "--initial-peers" in dht.output() or not dht.alive(), 60, "the DHT")
            peers = printed_initial_peers(dht.output())
            swarms = {}
            for family, model in models.items():
                model_id = f"tiny-{family}"
                for start, end in [(0, 1), (1, TINY_BLOCKS)]:
                    processes.append(
                        start_node(
                            model,
                            peers,
                            logs,
                            (start, end),
                            name=f"{family} node {start}-{end}",
                            model_id=model_id,
                        )
                    )
                gateway, url = start_gateway(
                    model, peers, logs, name=f"{family} gateway", model_id=model_id
                )
                processes.append(gateway)
                swarms[family] = FamilySwarm(model, url, model_id)

            def ready() -> bool:
                for process in processes:
                    assert process.alive(), f"{process.name} died:\n{process.output()[-3000:]}"
                return all(http_ok(f"{s.url}/health") for s in swarms.values())

            wait_for(ready, 240, "every family's swarm to become healthy", poll_s=0.5)
            yield swarms
        finally:
            stop_all(processes)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_swarm_of_the_family_answers_as_generate(
    family: str, family_swarms: dict[str, FamilySwarm]
) -> None:
    swarm = family_swarms[family]
    new_tokens = NARROW_NEW_TOKENS if family == NARROW else NEW_TOKENS
    body = {
        "model": swarm.model_id,
        "prompt": PROMPT,
        "max_tokens": new_tokens,
        "logit_bias": NO_EOS,
        "temperature": 0,
        "logprobs": 0,
    }
    r = httpx.post(f"{swarm.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    swarm_info = httpx.get(f"{swarm.url}/swarm", timeout=10).json()
    expected = greedy_ids(swarm.model, PROMPT, new_tokens, logit_bias=NO_EOS)
    assert len(expected) == new_tokens
    assert tokens == token_texts(swarm.model, expected)
    # Its own two servers, none of the other families' on the same DHT.
    assert len(swarm_info["servers"]) == 2
