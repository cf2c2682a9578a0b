"""Speculative decoding through real servers: a gateway with `--speculate lookup` sends a
token and its drafts through the chain in one pass, pushed from hop to hop or relayed by
the gateway, and servers crop what was not taken. Its answers are `generate`'s, token for
token, and a seeded sample is the one a gateway without drafts draws."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Swarm, running_gateway
from tests.reference import greedy_ids, token_texts

pytestmark = pytest.mark.integration

PROMPT = list(range(300, 316)) * 2
NEW_TOKENS = 40
# A tiny random model never repeats itself; held to a handful of tokens it does, so lookup
# keeps drafting, and its drafts are sometimes right and sometimes wrong.
FEW = {str(token): 30.0 for token in range(100, 105)}


def completion(url: str, model: str, **extra: object) -> dict:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "logit_bias": FEW,
        "logprobs": 0,
        **extra,
    }
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


@pytest.mark.parametrize("transport", ["push", "relay"])
def test_drafts_through_the_chain_change_nothing_of_the_answer(
    swarm: Swarm, tmp_path: Path, transport: str
) -> None:
    flags = ["--speculate", "lookup", *(["--no-push"] if transport == "relay" else [])]
    with running_gateway(swarm, tmp_path, *flags, name=f"gateway speculating {transport}") as url:
        greedy = completion(url, swarm.model_id, temperature=0)
        expected = greedy_ids(swarm.model_path, PROMPT, NEW_TOKENS, logit_bias=FEW)
        assert greedy["choices"][0]["logprobs"]["tokens"] == token_texts(swarm.model_path, expected)
        proposed = counter(url, "swarmgate_draft_tokens_total")
        accepted = counter(url, "swarmgate_draft_tokens_accepted_total")
        # Drafts were taken (several tokens a pass) and refused (servers cropped them).
        assert 0 < accepted < proposed

        seeded = {"temperature": 0.9, "seed": 1234}
        sampled = completion(url, swarm.model_id, **seeded)
        plain = completion(swarm.base_url, swarm.model_id, **seeded)
        assert sampled["choices"][0]["text"] == plain["choices"][0]["text"]
        tokens = ("prompt_tokens", "completion_tokens")
        assert [sampled["usage"][k] for k in tokens] == [plain["usage"][k] for k in tokens]
