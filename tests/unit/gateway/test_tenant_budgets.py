"""Bounds on what a gateway keeps for its clients apply per tenant (API key): one key that
floods the stored responses or the affinity store drops its own oldest entries, never
another key's conversations (Redis: tests/integration/test_tenant_budgets.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.engine.affinity_stores import InMemoryAffinityStore, SessionPin
from gateway.openai.models import ChatMessage
from gateway.responses.models import OutputMessage, OutputText, Response
from gateway.responses.store import InMemoryResponseStore, StoredResponse
from gateway.settings import GatewaySettings
from gateway.web.auth import tenant_of
from protocol.prefix import block_hashes
from routing.planner import Hop
from tests.fakes import LocalSwarmClient

KEYS = ("sk-flood", "sk-quiet")
FLOOD, QUIET = (tenant_of(f"Bearer {key}", KEYS) for key in KEYS)


def record(response_id: str, text: str = "Hello") -> StoredResponse:
    output = OutputMessage(id="msg_1", status="completed", content=[OutputText(text=text)])
    response = Response(id=response_id, model="m", status="completed", output=[output])
    messages = (ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content=text))
    return StoredResponse(response, messages, f"response:{response_id}")


def test_a_tenant_filling_its_response_budget_drops_only_its_own() -> None:
    size = len(record("resp_00").to_json())
    store = InMemoryResponseStore(max_bytes=4 * size)

    async def scenario() -> None:
        for i in range(3):
            await store.put(QUIET, record(f"resp_q{i}"))
        for i in range(40):  # ten times its budget
            await store.put(FLOOD, record(f"resp_{i:02d}"))
        for i in range(3):
            assert await store.get(QUIET, f"resp_q{i}") is not None, "another key's went"
        assert store.bytes_of(FLOOD) <= 4 * size
        assert await store.get(FLOOD, "resp_00") is None  # its own oldest went
        for i in range(36, 40):
            assert await store.get(FLOOD, f"resp_{i:02d}") is not None
        assert store.bytes_of(QUIET) == 3 * len(record("resp_q0").to_json())
        for i in range(3):
            assert await store.delete(QUIET, f"resp_q{i}")
        assert store.bytes_of(QUIET) == 0

    asyncio.run(scenario())


PIN = SessionPin("s", (Hop("a", 0, 4),), 64, "secret", "digest")


def test_a_tenant_flooding_affinity_evicts_only_its_own_pins() -> None:
    store = InMemoryAffinityStore(max_entries=10)
    quiet_hashes = block_hashes(list(range(96)), salt=QUIET)

    async def scenario() -> None:
        await store.put_key("conversation", PIN, tenant=QUIET)
        await store.put_prefixes(quiet_hashes, PIN, tenant=QUIET)
        for i in range(20):  # 60 prefixes: six times the bound
            hashes = block_hashes([i] * 96, salt=FLOOD)
            await store.put_prefixes(hashes, SessionPin(f"f{i}", (), 96, "x"), tenant=FLOOD)
        assert await store.get_key("conversation", tenant=QUIET) == PIN
        assert await store.longest_prefix(quiet_hashes, tenant=QUIET) == PIN
        assert store.entries(QUIET) == 4 and store.entries(FLOOD) == 10
        newest = block_hashes([19] * 96, salt=FLOOD)
        assert (await store.longest_prefix(newest, tenant=FLOOD)).session_id == "f19"  # type: ignore[union-attr]
        oldest = block_hashes([0] * 96, salt=FLOOD)
        assert await store.longest_prefix(oldest, tenant=FLOOD) is None

    asyncio.run(scenario())


def test_a_flood_of_pins_never_pushes_out_a_lease() -> None:
    store = InMemoryAffinityStore(max_entries=4)

    async def scenario() -> None:
        token = await store.acquire("running-session")
        assert token is not None
        await store.put_prefixes([f"h{i}" for i in range(50)], PIN, tenant=FLOOD)
        assert await store.acquire("running-session") is None  # still held
        assert await store.renew("running-session", token)

    asyncio.run(scenario())


def test_the_gateway_keeps_each_keys_pins_under_its_own_bound(tiny_model: Path) -> None:
    """Through the app: a request's pins are written for its key's tenant."""
    store = InMemoryAffinityStore(max_entries=6)
    settings = GatewaySettings(model_id="tiny", model_path=tiny_model, api_keys=KEYS)
    app = create_app(settings, LocalSwarmClient(tiny_model, "tiny"), affinity_store=store)

    def chat(key: str, text: str) -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 2,
            "temperature": 0,
        }
        headers = {"Authorization": f"Bearer {key}"}
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text

    with TestClient(app) as client:
        chat("sk-quiet", "Tell me about rivers. " * 20)
        kept = store.entries(QUIET)
        assert kept >= 2  # prefixes of its prompt (and answer)
        for i in range(6):
            chat("sk-flood", f"Prompt number {i}, about mountains and lakes. " * 12)
        assert store.entries(QUIET) == kept, "the other key's flood evicted these"
        assert store.entries(FLOOD) == 6
        assert store.entries("") == 0  # nothing written for no one in particular
