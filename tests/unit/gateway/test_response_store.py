"""Stored responses in memory: per tenant, with a TTL and a byte bound (Redis is tested for
real, in tests/integration/test_responses.py)."""

from __future__ import annotations

import asyncio
import json

from gateway.openai.models import ChatMessage, ToolCall, ToolCallFunction
from gateway.responses.models import (
    FunctionCallOutputItem,
    InputMessage,
    InputText,
    OutputMessage,
    OutputText,
    Response,
)
from gateway.responses.store import InMemoryResponseStore, StoredResponse


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(response_id: str, text: str = "Hello") -> StoredResponse:
    output = OutputMessage(id="msg_1", status="completed", content=[OutputText(text=text)])
    call = ToolCall(id="call_1", function=ToolCallFunction(name="f", arguments="{}"))
    messages = (
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content=None, tool_calls=[call]),
        ChatMessage(role="tool", tool_call_id="call_1", content="42"),
        ChatMessage(role="assistant", content=text),
    )
    response = Response(id=response_id, model="m", status="completed", output=[output])
    return StoredResponse(response, messages, "response:resp_0")


def test_a_record_round_trips_through_json() -> None:
    stored = record("resp_1", "Grüße 👋")
    assert StoredResponse.from_json(stored.to_json()) == stored


def test_a_records_input_round_trips_and_an_older_record_has_none() -> None:
    items = (
        InputMessage(role="user", content=[InputText(type="input_text", text="Hi")]),
        FunctionCallOutputItem(type="function_call_output", call_id="call_1", output="42"),
    )
    stored = record("resp_1")
    with_input = StoredResponse(stored.response, stored.messages, stored.conversation_key, items)
    assert StoredResponse.from_json(with_input.to_json()) == with_input
    older = json.loads(with_input.to_json())
    del older["input"]
    assert StoredResponse.from_json(json.dumps(older)).input is None


def test_records_are_per_tenant_and_expire() -> None:
    clock = Clock()
    store = InMemoryResponseStore(ttl_s=10, clock=clock)

    async def scenario() -> None:
        await store.put("tenant-a", record("resp_1"))
        assert await store.get("tenant-a", "resp_1") == record("resp_1")
        assert await store.get("tenant-b", "resp_1") is None
        assert not await store.delete("tenant-b", "resp_1")
        clock.now = 11
        assert await store.get("tenant-a", "resp_1") is None

    asyncio.run(scenario())


def test_the_least_recently_used_go_first_beyond_the_byte_bound() -> None:
    size = len(record("resp_0").to_json())
    store = InMemoryResponseStore(max_bytes=3 * size)

    async def scenario() -> None:
        for i in range(3):
            await store.put("", record(f"resp_{i}"))
        assert await store.get("", "resp_0") is not None  # now the most recently used
        await store.put("", record("resp_3"))
        assert await store.get("", "resp_1") is None
        for kept in ("resp_0", "resp_2", "resp_3"):
            assert await store.get("", kept) is not None
        assert await store.delete("", "resp_3")
        assert await store.get("", "resp_3") is None

    asyncio.run(scenario())
