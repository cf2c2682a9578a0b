"""Node-to-node push on a real three-server chain: nodes dial each other over hivemind P2P,
show their passes and the hop's token, and the answers equal relaying and `generate`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import Swarm, run_swarm, running_gateway
from tests.integration.test_swarm_chat import PROMPTS, _reference, hf_greedy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def chain(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """DHT, three servers (blocks 0:2, 2:3, 3:4) and a gateway that pushes (the default)."""
    logs = tmp_path_factory.mktemp("push-logs")
    with run_swarm(tiny_model, logs, [(0, 2), (2, 3), (3, 4)]) as swarm:
        yield swarm


def hop_inputs(base_url: str) -> dict[str, float]:
    """The gateway's ``swarmgate_hop_inputs_total`` by ``via``."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    pattern = r'^swarmgate_hop_inputs_total\{via="(\w+)"\} ([0-9.e+]+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def answers(base_url: str, model: str) -> list[str | None]:
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    return [
        sdk.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        .choices[0]
        .message.content
        for messages in PROMPTS
    ]


def test_pushed_answers_equal_relayed_ones_and_transformers_generate(
    chain: Swarm, tmp_path: Path
) -> None:
    tokenizer = _reference(chain.model_path)[1]
    expected = [
        tokenizer.decode(hf_greedy(chain.model_path, m, MAX_TOKENS)[1], skip_special_tokens=True)
        for m in PROMPTS
    ]

    pushed = answers(chain.base_url, chain.model_id)
    with running_gateway(chain, tmp_path, "--no-push", name="relaying gateway") as relay_url:
        relayed = answers(relay_url, chain.model_id)
        relay_inputs = hop_inputs(relay_url)

    assert pushed == expected
    assert relayed == expected
    push_inputs = hop_inputs(chain.base_url)
    # Every hop after the first took its input from the hop before it (two per message),
    # never through the gateway; the relaying gateway did the opposite.
    assert push_inputs.get("push", 0) > 2 * len(PROMPTS) and push_inputs.get("relay", 0) == 0
    assert relay_inputs.get("relay", 0) > 2 * len(PROMPTS) and relay_inputs.get("push", 0) == 0
    for node in chain.nodes:  # no push failed or was refused
        assert "push to" not in node.output(), node.output()[-2000:]
