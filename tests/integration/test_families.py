"""Model families beyond Llama through real node processes: a two-node swarm of a tiny
BLOOM (ALiBi, no rotary), Falcon (grouped kv heads) and Mixtral (MoE) answers
greedily exactly as `transformers` `generate` on the whole model. So does a Llama with a
trained model's narrow init (0.02), whose close logits leave greedy choices little room."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import run_swarm
from tests.reference import greedy_ids, token_texts
from tests.tiny_model import TINY_BLOCKS, build_tiny_family, build_tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = list(range(500, 530))
NEW_TOKENS = 10


NARROW = "llama-narrow-init"
NARROW_NEW_TOKENS = 64  # close logits: the more tokens, the more chances to flip one


@pytest.mark.parametrize("family", ["bloom", "falcon", "mixtral", NARROW])
def test_a_swarm_of_the_family_answers_as_generate(
    family: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp(f"tiny-{family}")
    if family == NARROW:
        model = build_tiny_llama(folder, initializer_range=0.02)
        new_tokens = NARROW_NEW_TOKENS
    else:
        model = build_tiny_family(folder, family)
        new_tokens = NEW_TOKENS
    logs = tmp_path_factory.mktemp(f"{family}-logs")
    with run_swarm(model, logs, [(0, 1), (1, TINY_BLOCKS)]) as swarm:
        body = {
            "model": swarm.model_id,
            "prompt": PROMPT,
            "max_tokens": new_tokens,
            "logit_bias": {"0": -100, "2": -100},  # no end of text: all new_tokens compared
            "temperature": 0,
            "logprobs": 0,
        }
        r = httpx.post(f"{swarm.base_url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        tokens = r.json()["choices"][0]["logprobs"]["tokens"]
        swarm_info = httpx.get(f"{swarm.base_url}/swarm", timeout=10).json()
    expected = greedy_ids(model, PROMPT, new_tokens, logit_bias={"0": -100, "2": -100})
    assert len(expected) == new_tokens
    assert tokens == token_texts(model, expected)
    assert len(swarm_info["servers"]) == 2
