"""LoRA adapters through real node processes started with `--adapters`: model BASE:ADAPTER
answers as peft's `PeftModel`, the base model on the same servers as `generate`, their
caches never mix, and a node given an adapter it cannot serve stops and names it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import peft
import pytest
import torch
from transformers import LlamaForCausalLM

from tests.integration.conftest import MODEL_ID, Swarm, run_swarm, start_node
from tests.processes import wait_for
from tests.reference import greedy_ids, token_texts
from tests.tiny_model import TINY_BLOCKS

pytestmark = pytest.mark.integration

PROMPT = list(range(300, 340))  # more than one 32-token block: reusable by prefix
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapter_swarm(
    tiny_model: Path, tiny_adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Swarm]:
    logs = tmp_path_factory.mktemp("adapter-swarm-logs")
    spans = [(0, 1), (1, TINY_BLOCKS)]  # the adapter is split between servers too
    with run_swarm(tiny_model, logs, spans, "--adapters", str(tiny_adapter)) as swarm:
        wait_for(lambda: len(models(swarm)) == 2, 60, "the adapter to be listed")
        yield swarm


def models(swarm: Swarm) -> list[str]:
    data = httpx.get(f"{swarm.base_url}/v1/models", timeout=10).json()["data"]
    return [card["id"] for card in data]


def complete(swarm: Swarm, model: str) -> tuple[list[int], int]:
    """Greedy token ids and cached prompt tokens of one completion."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "logprobs": 0,
    }
    r = httpx.post(f"{swarm.base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["model"] == model
    tokens = reply["choices"][0]["logprobs"]["tokens"]
    cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
    return tokens, cached


def test_adapter_and_base_answer_exactly_and_keep_their_caches_apart(
    adapter_swarm: Swarm, tiny_model: Path, tiny_adapter: Path
) -> None:
    assert models(adapter_swarm) == [MODEL_ID, f"{MODEL_ID}:pirate"]
    pirate, pirate_cached = complete(adapter_swarm, f"{MODEL_ID}:pirate")
    assert pirate == token_texts(
        tiny_model, greedy_ids(tiny_model, PROMPT, NEW_TOKENS, tiny_adapter)
    )
    assert pirate_cached == 0
    # Same prompt, base model: the servers hold its first block, but computed with the
    # adapter's weights, so nothing may be reused.
    base, base_cached = complete(adapter_swarm, MODEL_ID)
    assert base == token_texts(tiny_model, greedy_ids(tiny_model, PROMPT, NEW_TOKENS))
    assert base != pirate and base_cached == 0
    # Each model reuses its own.
    assert complete(adapter_swarm, f"{MODEL_ID}:pirate") == (pirate, 32)
    assert complete(adapter_swarm, MODEL_ID) == (base, 32)


def test_an_unserved_adapter_is_model_not_found(adapter_swarm: Swarm) -> None:
    body = {"model": f"{MODEL_ID}:parrot", "prompt": "hi", "max_tokens": 1}
    r = httpx.post(f"{adapter_swarm.base_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_node_given_a_non_lora_adapter_stops_and_names_it(
    adapter_swarm: Swarm, tiny_model: Path, tmp_path: Path
) -> None:
    base = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "prompted")
    node = start_node(
        tiny_model,
        adapter_swarm.initial_peers,
        tmp_path,
        (0, 1),
        "--adapters",
        str(tmp_path / "prompted"),
    )
    try:
        wait_for(lambda: not node.alive(), 60, "the node to refuse its adapter")
        assert node.stop() != 0
        assert "'prompted'" in node.output() and "only LoRA adapters" in node.output()
    finally:
        node.stop()
