"""On a real Redis: each tenant's stored responses and affinity pins stay within a bound of
their own, so that one API key cannot evict another's conversations from the shared store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from gateway.engine.affinity_stores import RedisAffinityStore, SessionPin
from gateway.openai.models import ChatMessage
from gateway.responses.models import OutputMessage, OutputText, Response
from gateway.responses.store import RedisResponseStore, StoredResponse, record_key
from routing.planner import Hop
from tests.processes import RedisServer

pytestmark = pytest.mark.integration

FLOOD, QUIET = "a" * 32, "b" * 32  # tenants, as tenant_of digests keys


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def record(response_id: str) -> StoredResponse:
    output = OutputMessage(id="msg_1", status="completed", content=[OutputText(text="Hi!")])
    response = Response(id=response_id, model="m", status="completed", output=[output])
    messages = (
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hi!"),
    )
    return StoredResponse(response, messages, f"response:{response_id}")


def test_a_tenant_filling_its_response_budget_in_redis_drops_only_its_own(
    redis_url: str,
) -> None:
    size = len(record("resp_00").to_json().encode())
    namespace = "budget-test"

    async def scenario() -> None:
        client = redis.asyncio.from_url(redis_url)
        store = RedisResponseStore(client, namespace=namespace, max_bytes=4 * size, owned=True)
        try:
            for i in range(3):
                await store.put(QUIET, record(f"resp_q{i}"))
            for i in range(40):
                await store.put(FLOOD, record(f"resp_{i:02d}"))
                await asyncio.sleep(0.002)  # distinct write times: "oldest" is well defined
            for i in range(3):
                assert await store.get(QUIET, f"resp_q{i}") is not None, "another key's went"
            assert await store.bytes_of(QUIET) == 3 * size
            assert await store.bytes_of(FLOOD) == 4 * size
            assert await store.get(FLOOD, "resp_00") is None
            for i in range(36, 40):
                assert await store.get(FLOOD, f"resp_{i:02d}") is not None
            # Dropped records leave nothing behind in Redis.
            prefix = f"sg:{namespace}:response:"
            assert not await client.exists(prefix + record_key(FLOOD, "resp_00"))
            assert await client.dbsize() == 3 + 4 + 2 * 2  # records, and two keys per tenant
            assert await store.delete(QUIET, "resp_q0")
            assert not await store.delete(QUIET, "resp_q0")
            assert await store.bytes_of(QUIET) == 2 * size
        finally:
            await client.flushdb()
            await store.aclose()

    asyncio.run(scenario())


def test_expired_responses_leave_their_tenants_budget(redis_url: str) -> None:
    size = len(record("resp_0").to_json().encode())

    async def scenario() -> None:
        client = redis.asyncio.from_url(redis_url)
        store = RedisResponseStore(client, namespace="ttl-test", ttl_s=0.3, owned=True)
        try:
            await store.put(QUIET, record("resp_0"))
            assert await store.bytes_of(QUIET) == size
            await asyncio.sleep(0.5)
            assert await store.get(QUIET, "resp_0") is None
            await store.put(QUIET, record("resp_1"))
            assert await store.bytes_of(QUIET) == size  # the expired one no longer counts
        finally:
            await client.flushdb()
            await store.aclose()

    asyncio.run(scenario())


def test_a_tenant_flooding_redis_affinity_evicts_only_its_own_pins(redis_url: str) -> None:
    pin = SessionPin("quiet", (Hop("a", 0, 4),), 64, "secret", "digest")

    async def scenario() -> None:
        store = RedisAffinityStore(redis_url, namespace="pins-test", max_entries=10)
        try:
            await store.put_key("conversation", pin, tenant=QUIET)
            await store.put_prefixes(["q1", "q2", "q3"], pin, tenant=QUIET)
            for i in range(20):  # 60 prefixes: six times the bound
                flood = SessionPin(f"f{i}", (), 96, "x")
                await store.put_prefixes([f"f{i}-{j}" for j in range(3)], flood, tenant=FLOOD)
                await asyncio.sleep(0.002)
            assert await store.get_key("conversation", tenant=QUIET) == pin
            assert await store.longest_prefix(["q1", "q2", "q3"], tenant=QUIET) == pin
            assert await store.entries(QUIET) == 4
            assert await store.entries(FLOOD) == 10
            newest = await store.longest_prefix([f"f19-{j}" for j in range(3)], tenant=FLOOD)
            assert newest is not None and newest.session_id == "f19"
            assert await store.longest_prefix(["f0-0", "f0-1", "f0-2"], tenant=FLOOD) is None
            keys = redis.Redis.from_url(redis_url).keys("sg:pins-test:prefix:f*")
            assert len(keys) == 10  # the evicted are deleted, not left to their TTL
        finally:
            await store.client.flushdb()
            await store.aclose()

    asyncio.run(scenario())
