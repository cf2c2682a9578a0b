"""Stored responses (`store: true`): what `previous_response_id` continues,
`GET /v1/responses/{id}` returns and `GET /v1/responses/{id}/input_items` lists.

Unlike affinity, this is the conversation itself, not a hint: it lives in Redis when the
gateway has one (so that any gateway can continue any conversation), else in memory; either
way with a TTL. Records are keyed per tenant, so that one API key never reads, continues or
deletes another's responses, and cannot tell whether an id exists elsewhere. The byte
budget is per tenant too: a key that stores a flood of responses drops its own oldest, never
another key's.

Redis keys (all with the TTL):
    sg:{model}:response:{sha256(tenant, response id)}  → StoredResponse JSON
    sg:{model}:responses:{sha256(tenant)}               → zset: record hash → written at (ms)
    sg:{model}:response-bytes:{sha256(tenant)}          → hash: record hash → bytes, "total"
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import TypeAdapter

from gateway.openai.models import ChatMessage
from gateway.responses.models import InputItem, Response
from protocol.errors import StoreUnavailable

RECORD_VERSION = 1
MAX_RECORD_BYTES = 8 * 1024 * 1024  # a longer conversation is not stored (with a warning)
_INPUT = TypeAdapter(list[InputItem])


@dataclass(frozen=True)
class StoredResponse:
    """A finished response and the conversation it ends (its instructions left out: OpenAI
    does not carry them over to a follow-up)."""

    response: Response
    messages: tuple[ChatMessage, ...]  # every turn so far, this response's output included
    # The client's name for the conversation, which its next turn continues (stored as
    # "session_key", the name records have always had).
    conversation_key: str
    # This request's own input items, as sent (a string as one user message). None in a
    # record written before they were kept: an older reader ignores the field, and a newer
    # one reads such a record without it, so the version stays.
    input: tuple[InputItem, ...] | None = None

    def to_json(self) -> str:
        record: dict[str, Any] = {
            "v": RECORD_VERSION,
            "session_key": self.conversation_key,
            "messages": [m.model_dump(mode="json", exclude_none=True) for m in self.messages],
            "response": self.response.model_dump(mode="json"),
        }
        if self.input is not None:
            record["input"] = _INPUT.dump_python(list(self.input), mode="json", exclude_none=True)
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> StoredResponse:
        data = json.loads(raw)
        items = data.get("input")
        return cls(
            Response.model_validate(data["response"]),
            tuple(ChatMessage.model_validate(m) for m in data["messages"]),
            str(data["session_key"]),
            None if items is None else tuple(_INPUT.validate_python(items)),
        )


class ResponseStore(Protocol):
    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The tenant's stored response; raises ``StoreUnavailable`` if the store is down."""
        ...

    async def put(self, tenant: str, record: StoredResponse) -> None: ...

    async def delete(self, tenant: str, response_id: str) -> bool:
        """Whether there was such a response."""
        ...

    async def aclose(self) -> None: ...


def record_key(tenant: str, response_id: str) -> str:
    return hashlib.sha256(f"{tenant}\0{response_id}".encode()).hexdigest()


MAX_TENANT_BYTES = 256 * 1024 * 1024  # stored JSON per tenant (API key) before its oldest go


def tenant_digest(tenant: str) -> str:
    return hashlib.sha256(f"tenant\0{tenant}".encode()).hexdigest()[:32]


class _Shelf:
    """One tenant's stored responses, least recently used first, and their bytes."""

    def __init__(self) -> None:
        self.records: OrderedDict[str, tuple[float, str]] = OrderedDict()  # (expires, JSON)
        self.bytes = 0


class InMemoryResponseStore:
    """One gateway's stored responses: each for ``ttl_s``; once a tenant's hold more than
    ``max_bytes`` of JSON, that tenant's least recently used are dropped first."""

    def __init__(
        self,
        *,
        ttl_s: float = 86400.0,
        max_bytes: int = MAX_TENANT_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._shelves: dict[str, _Shelf] = {}  # by tenant

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        shelf = self._shelves.get(tenant)
        entry = shelf.records.get(response_id) if shelf is not None else None
        if shelf is None or entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(tenant, response_id)
            return None
        shelf.records.move_to_end(response_id)
        return StoredResponse.from_json(entry[1])

    async def put(self, tenant: str, record: StoredResponse) -> None:
        response_id = record.response.id
        raw = record.to_json()
        self._drop(tenant, response_id)
        shelf = self._shelves.setdefault(tenant, _Shelf())
        shelf.records[response_id] = (self._clock() + self._ttl_s, raw)
        shelf.bytes += len(raw)
        while shelf.bytes > self._max_bytes and len(shelf.records) > 1:
            self._drop(tenant, next(iter(shelf.records)))

    async def delete(self, tenant: str, response_id: str) -> bool:
        found = await self.get(tenant, response_id) is not None
        self._drop(tenant, response_id)
        return found

    def bytes_of(self, tenant: str) -> int:
        """The JSON a tenant's stored responses hold now."""
        shelf = self._shelves.get(tenant)
        return 0 if shelf is None else shelf.bytes

    def _drop(self, tenant: str, response_id: str) -> None:
        shelf = self._shelves.get(tenant)
        if shelf is None:
            return
        entry = shelf.records.pop(response_id, None)
        if entry is not None:
            shelf.bytes -= len(entry[1])
        if not shelf.records:
            del self._shelves[tenant]  # tenants come and go: keep only those with records

    async def aclose(self) -> None:
        self._shelves.clear()


# Writes a record and keeps its tenant within its byte budget, atomically: the tenant's
# index (written-at ms by record hash) first loses what has expired by its own TTL, then
# the oldest records go while the tenant holds more than the budget (the new one stays).
# KEYS: record, index, sizes. ARGV: JSON, ttl ms, now ms, budget, record key prefix, hash.
_PUT = """
local ttl, now, budget = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function forget(member)
  local size = tonumber(redis.call('hget', KEYS[3], member) or '0')
  if redis.call('hdel', KEYS[3], member) == 1 then
    redis.call('hincrby', KEYS[3], 'total', -size)
  end
  redis.call('zrem', KEYS[2], member)
end
for _, member in ipairs(redis.call('zrangebyscore', KEYS[2], '-inf', now - ttl)) do
  forget(member)
end
forget(ARGV[6])
local size = string.len(ARGV[1])
redis.call('set', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('zadd', KEYS[2], now, ARGV[6])
redis.call('hset', KEYS[3], ARGV[6], size)
local total = redis.call('hincrby', KEYS[3], 'total', size)
while total > budget and redis.call('zcard', KEYS[2]) > 1 do
  local oldest = redis.call('zrange', KEYS[2], 0, 0)[1]
  if oldest == ARGV[6] then break end
  forget(oldest)
  redis.call('del', ARGV[5] .. oldest)
  total = tonumber(redis.call('hget', KEYS[3], 'total'))
end
redis.call('pexpire', KEYS[2], ttl)
redis.call('pexpire', KEYS[3], ttl)
return total
"""
# Deletes a record and its place in its tenant's budget. KEYS: record, index, sizes.
# ARGV: hash.
_DELETE = """
local found = redis.call('del', KEYS[1])
local size = tonumber(redis.call('hget', KEYS[3], ARGV[1]) or '0')
if redis.call('hdel', KEYS[3], ARGV[1]) == 1 then
  redis.call('hincrby', KEYS[3], 'total', -size)
end
redis.call('zrem', KEYS[2], ARGV[1])
return found
"""


class RedisResponseStore:
    """Stored responses shared by every gateway on the same Redis, each tenant's within
    ``max_bytes`` (its oldest written dropped first). ``client`` is a ``redis.asyncio``
    client; it is closed here only if ``owned``.

    Redis's own ``maxmemory`` eviction knows no tenants: give it room for every tenant's
    budget, or its LRU picks among all of them."""

    def __init__(
        self,
        client: Any,
        *,
        namespace: str,
        ttl_s: float = 86400.0,
        max_bytes: int = MAX_TENANT_BYTES,
        owned: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._namespace = namespace
        self._prefix = f"sg:{namespace}:response:"
        self._ttl_ms = int(ttl_s * 1000)
        self._max_bytes = max_bytes
        self._owned = owned
        self._clock = clock  # wall time: every gateway on the Redis agrees on it
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)

    def _keys(self, tenant: str, member: str) -> list[str]:
        digest = tenant_digest(tenant)
        return [
            self._prefix + member,
            f"sg:{self._namespace}:responses:{digest}",
            f"sg:{self._namespace}:response-bytes:{digest}",
        ]

    async def bytes_of(self, tenant: str) -> int:
        """The JSON a tenant's stored responses hold now, as counted in Redis."""
        total = await self._redis.hget(self._keys(tenant, "")[2], "total")
        return int(total or 0)

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        try:
            raw = await self._redis.get(self._prefix + record_key(tenant, response_id))
        except Exception as e:
            raise StoreUnavailable(str(e) or type(e).__name__) from e
        return StoredResponse.from_json(raw) if raw else None

    async def put(self, tenant: str, record: StoredResponse) -> None:
        member = record_key(tenant, record.response.id)
        now_ms = int(self._clock() * 1000)
        args = [record.to_json(), self._ttl_ms, now_ms, self._max_bytes, self._prefix, member]
        await self._put(keys=self._keys(tenant, member), args=args)

    async def delete(self, tenant: str, response_id: str) -> bool:
        member = record_key(tenant, response_id)
        try:
            return bool(await self._delete(keys=self._keys(tenant, member), args=[member]))
        except Exception as e:
            raise StoreUnavailable(str(e) or type(e).__name__) from e

    async def aclose(self) -> None:
        if self._owned:
            await self._redis.aclose()
