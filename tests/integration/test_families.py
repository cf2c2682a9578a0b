"""Model families beyond Llama through real node processes: a two-node swarm of a tiny
BLOOM (ALiBi, no rotary), Falcon (grouped kv heads) and Mixtral (MoE) answers
greedily exactly as `transformers` `generate` on the whole model."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.integration.conftest import run_swarm
from tests.tiny_model import TINY_BLOCKS, build_tiny_family

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = list(range(500, 530))
NEW_TOKENS = 10


def hf_tokens(model: Path) -> list[str]:
    whole = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        out = whole.generate(
            input_ids=torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = [t for t in out[0, len(PROMPT) :].tolist() if t != tokenizer.eos_token_id]
    return [tokenizer.decode([t]) for t in ids]


@pytest.mark.parametrize("family", ["bloom", "falcon", "mixtral"])
def test_a_swarm_of_the_family_answers_as_generate(
    family: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = build_tiny_family(tmp_path_factory.mktemp(f"tiny-{family}"), family)
    logs = tmp_path_factory.mktemp(f"{family}-logs")
    with run_swarm(model, logs, [(0, 1), (1, TINY_BLOCKS)]) as swarm:
        body = {
            "model": swarm.model_id,
            "prompt": PROMPT,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "logprobs": 0,
        }
        r = httpx.post(f"{swarm.base_url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        tokens = r.json()["choices"][0]["logprobs"]["tokens"]
        swarm_info = httpx.get(f"{swarm.base_url}/swarm", timeout=10).json()
    assert tokens == hf_tokens(model)
    assert len(swarm_info["servers"]) == 2
