"""Stored responses (`store: true`): what `previous_response_id` continues,
`GET /v1/responses/{id}` returns and `GET /v1/responses/{id}/input_items` lists.

Unlike affinity, this is the conversation itself, not a hint: it lives in Redis when the
gateway has one (so that any gateway can continue any conversation), else in memory; either
way with a TTL. Records are keyed per tenant, so that one API key never reads, continues or
deletes another's responses, and cannot tell whether an id exists elsewhere.

Redis key (with a TTL):
    sg:{model}:response:{sha256(tenant, response id)}  → StoredResponse JSON
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

from protocol.errors import StoreUnavailable
from protocol.openai import ChatMessage
from protocol.responses import InputItem, Response

RECORD_VERSION = 1
MAX_RECORD_BYTES = 8 * 1024 * 1024  # a longer conversation is not stored (with a warning)
_INPUT = TypeAdapter(list[InputItem])


@dataclass(frozen=True)
class StoredResponse:
    """A finished response and the conversation it ends (its instructions left out: OpenAI
    does not carry them over to a follow-up)."""

    response: Response
    messages: tuple[ChatMessage, ...]  # every turn so far, this response's output included
    session_key: str  # the name of the conversation's swarm session, for its next turn
    # This request's own input items, as sent (a string as one user message). None in a
    # record written before they were kept: an older reader ignores the field, and a newer
    # one reads such a record without it, so the version stays.
    input: tuple[InputItem, ...] | None = None

    def to_json(self) -> str:
        record: dict[str, Any] = {
            "v": RECORD_VERSION,
            "session_key": self.session_key,
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


class InMemoryResponseStore:
    """One gateway's stored responses: each for ``ttl_s``, the least recently used dropped
    first once they hold more than ``max_bytes`` of JSON."""

    def __init__(
        self,
        *,
        ttl_s: float = 86400.0,
        max_bytes: int = 256 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._records: OrderedDict[str, tuple[float, str]] = OrderedDict()  # (expires, JSON)
        self._bytes = 0

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        key = record_key(tenant, response_id)
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(key)
            return None
        self._records.move_to_end(key)
        return StoredResponse.from_json(entry[1])

    async def put(self, tenant: str, record: StoredResponse) -> None:
        key = record_key(tenant, record.response.id)
        raw = record.to_json()
        self._drop(key)
        self._records[key] = (self._clock() + self._ttl_s, raw)
        self._bytes += len(raw)
        while self._bytes > self._max_bytes and len(self._records) > 1:
            self._drop(next(iter(self._records)))

    async def delete(self, tenant: str, response_id: str) -> bool:
        key = record_key(tenant, response_id)
        found = await self.get(tenant, response_id) is not None
        self._drop(key)
        return found

    def _drop(self, key: str) -> None:
        entry = self._records.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])

    async def aclose(self) -> None:
        self._records.clear()
        self._bytes = 0


class RedisResponseStore:
    """Stored responses shared by every gateway on the same Redis. ``client`` is a
    ``redis.asyncio`` client; it is closed here only if ``owned``."""

    def __init__(
        self, client: Any, *, namespace: str, ttl_s: float = 86400.0, owned: bool = False
    ) -> None:
        self._redis = client
        self._prefix = f"sg:{namespace}:response:"
        self._ttl_ms = int(ttl_s * 1000)
        self._owned = owned

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        try:
            raw = await self._redis.get(self._prefix + record_key(tenant, response_id))
        except Exception as e:
            raise StoreUnavailable(str(e) or type(e).__name__) from e
        return StoredResponse.from_json(raw) if raw else None

    async def put(self, tenant: str, record: StoredResponse) -> None:
        key = self._prefix + record_key(tenant, record.response.id)
        await self._redis.set(key, record.to_json(), px=self._ttl_ms)

    async def delete(self, tenant: str, response_id: str) -> bool:
        try:
            return bool(await self._redis.delete(self._prefix + record_key(tenant, response_id)))
        except Exception as e:
            raise StoreUnavailable(str(e) or type(e).__name__) from e

    async def aclose(self) -> None:
        if self._owned:
            await self._redis.aclose()
