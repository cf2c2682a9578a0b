"""Tenants: with API keys configured, one key's cached prompts are invisible to another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.fakes import LocalSwarmClient

MODEL_ID = "tiny-llama"
# Long enough for several 32-token prefix blocks.
MESSAGES = [{"role": "user", "content": " ".join(f"Fact {i} is about rivers." for i in range(30))}]


def chat(client: TestClient, key: str, **extra: Any) -> None:
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2, "temperature": 0, **extra}
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text


def test_prefix_hashes_and_conversation_keys_are_salted_per_api_key(tiny_model: Path) -> None:
    swarm = LocalSwarmClient(tiny_model, MODEL_ID)
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model, api_keys=("ka", "kb"))
    with TestClient(create_app(settings, swarm_client=swarm)) as client:
        chat(client, "ka")
        chat(client, "kb")
        chat(client, "ka")
        chat(client, "ka", prompt_cache_key="shared-name")
        chat(client, "kb", prompt_cache_key="shared-name")
    (a1, a_hashes), (b1, b_hashes), (_, a_hashes_again), (a3, _), (b3, _) = swarm.opens
    assert len(a_hashes) >= 3
    assert not set(a_hashes) & set(b_hashes), "another key's blocks must never match"
    # The same key's blocks match (a resent prompt forks its earlier session: servers seed
    # the fork from those blocks).
    assert a_hashes_again == a_hashes
    assert b1 != a1
    assert b3 != a3, "one key's prompt_cache_key never names another key's conversation"


def test_a_gateway_without_keys_is_one_tenant(tiny_model: Path) -> None:
    swarm = LocalSwarmClient(tiny_model, MODEL_ID)
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model)
    with TestClient(create_app(settings, swarm_client=swarm)) as client:
        chat(client, "anything")
        chat(client, "something-else")
    (_, hashes), (_, hashes_again) = swarm.opens
    assert hashes == hashes_again  # one tenant: the same blocks, whoever sends them
