"""Where conversations live: session key or prompt prefix → the session and its route.

Two stores behind one interface: in memory (one gateway) and Redis (gateways sharing
state). Everything here is soft state. Losing it costs cache hits, never answers: the
servers report what they really hold, and a miss recomputes.

Redis keys (all with TTLs, so nothing grows without bound):
    sg:{model}:key:{sha256(session key)}  → pin      a client-named conversation
    sg:{model}:prefix:{block hash}         → pin      a prompt prefix seen before
    sg:{model}:lease:{session id}          → token    one request at a time per session
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from routing.planner import Hop

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionPin:
    """A conversation's session on the swarm: its id and secret, route and the tokens it
    caches. The secret lives here and on no server: whoever reads this store can resume."""

    session_id: str
    route: tuple[Hop, ...]
    length: int
    secret: str = ""  # "": a pin written before sessions had secrets, not resumable
    digest: str = ""  # TokenHistory.digest of all ``length`` tokens: who continues it exactly

    def to_json(self) -> str:
        hops = [[h.peer_id, h.start, h.end] for h in self.route]
        return json.dumps(
            {
                "session": self.session_id,
                "secret": self.secret,
                "route": hops,
                "length": self.length,
                "digest": self.digest,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> SessionPin:
        data = json.loads(raw)
        route = tuple(Hop(str(p), int(s), int(e)) for p, s, e in data["route"])
        return cls(
            str(data["session"]),
            route,
            int(data["length"]),
            str(data.get("secret", "")),
            str(data.get("digest", "")),
        )


class AffinityStore(Protocol):
    async def get_key(self, key: str) -> SessionPin | None: ...

    async def put_key(self, key: str, pin: SessionPin) -> None: ...

    async def longest_prefix(self, hashes: Sequence[str]) -> SessionPin | None:
        """The pin stored under the last hash of ``hashes`` that has one."""
        ...

    async def put_prefixes(self, hashes: Sequence[str], pin: SessionPin) -> None: ...

    async def acquire(self, session_id: str) -> str | None:
        """A lease token, or None while another request holds the session."""
        ...

    async def renew(self, session_id: str, token: str) -> bool: ...

    async def release(self, session_id: str, token: str) -> None: ...

    async def aclose(self) -> None: ...


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class InMemoryAffinityStore:
    """One gateway's affinity, with the same TTL semantics as Redis."""

    def __init__(
        self,
        *,
        ttl_s: float = 1800.0,
        lease_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self._ttl_s = ttl_s
        self._lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._max_entries = max_entries
        self._values: dict[str, tuple[float, str]] = {}  # key → (expires at, value)

    def _get(self, key: str) -> str | None:
        entry = self._values.get(key)
        if entry is None or entry[0] <= self._clock():
            self._values.pop(key, None)
            return None
        return entry[1]

    def _set(self, key: str, value: str, ttl_s: float) -> None:
        if len(self._values) >= self._max_entries:
            self._evict()
        self._values[key] = (self._clock() + ttl_s, value)

    def _evict(self) -> None:
        now = self._clock()
        for key in [k for k, (exp, _) in self._values.items() if exp <= now]:
            del self._values[key]
        while len(self._values) >= self._max_entries:  # still full: oldest insertions go
            del self._values[next(iter(self._values))]

    async def get_key(self, key: str) -> SessionPin | None:
        raw = self._get(f"key:{_digest(key)}")
        return SessionPin.from_json(raw) if raw else None

    async def put_key(self, key: str, pin: SessionPin) -> None:
        self._set(f"key:{_digest(key)}", pin.to_json(), self._ttl_s)

    async def longest_prefix(self, hashes: Sequence[str]) -> SessionPin | None:
        for h in reversed(hashes):
            raw = self._get(f"prefix:{h}")
            if raw:
                return SessionPin.from_json(raw)
        return None

    async def put_prefixes(self, hashes: Sequence[str], pin: SessionPin) -> None:
        for h in hashes:
            self._set(f"prefix:{h}", pin.to_json(), self._ttl_s)

    async def acquire(self, session_id: str) -> str | None:
        if self._get(f"lease:{session_id}") is not None:
            return None
        token = uuid.uuid4().hex
        self._set(f"lease:{session_id}", token, self._lease_ttl_s)
        return token

    async def renew(self, session_id: str, token: str) -> bool:
        if self._get(f"lease:{session_id}") != token:
            return False
        self._set(f"lease:{session_id}", token, self._lease_ttl_s)
        return True

    async def release(self, session_id: str, token: str) -> None:
        if self._get(f"lease:{session_id}") == token:
            del self._values[f"lease:{session_id}"]

    async def aclose(self) -> None:
        self._values.clear()


class NoAffinity:
    """Affinity switched off (`--no-affinity`): every request starts a fresh session."""

    async def get_key(self, key: str) -> SessionPin | None:
        return None

    async def put_key(self, key: str, pin: SessionPin) -> None:
        pass

    async def longest_prefix(self, hashes: Sequence[str]) -> SessionPin | None:
        return None

    async def put_prefixes(self, hashes: Sequence[str], pin: SessionPin) -> None:
        pass

    async def acquire(self, session_id: str) -> str | None:
        return uuid.uuid4().hex

    async def renew(self, session_id: str, token: str) -> bool:
        return True

    async def release(self, session_id: str, token: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


# Deletes or extends a lease only if it is still ours (another request may hold it now).
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)


class RedisAffinityStore:
    """Affinity shared by every gateway that uses the same Redis."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        ttl_s: float = 1800.0,
        lease_ttl_s: float = 30.0,
        timeout_s: float = 0.5,
    ) -> None:
        import redis.asyncio as redis

        self._redis: Any = redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._prefix = f"sg:{namespace}:"
        self._ttl_ms = int(ttl_s * 1000)
        self._lease_ms = int(lease_ttl_s * 1000)

    @property
    def client(self) -> Any:
        """The ``redis.asyncio`` client, for other soft state kept beside affinity."""
        return self._redis

    async def get_key(self, key: str) -> SessionPin | None:
        raw = await self._redis.get(f"{self._prefix}key:{_digest(key)}")
        return SessionPin.from_json(raw) if raw else None

    async def put_key(self, key: str, pin: SessionPin) -> None:
        await self._redis.set(f"{self._prefix}key:{_digest(key)}", pin.to_json(), px=self._ttl_ms)

    async def longest_prefix(self, hashes: Sequence[str]) -> SessionPin | None:
        if not hashes:
            return None
        found = await self._redis.mget([f"{self._prefix}prefix:{h}" for h in hashes])
        for raw in reversed(found):
            if raw:
                return SessionPin.from_json(raw)
        return None

    async def put_prefixes(self, hashes: Sequence[str], pin: SessionPin) -> None:
        if not hashes:
            return
        value = pin.to_json()
        async with self._redis.pipeline(transaction=False) as pipe:
            for h in hashes:
                pipe.set(f"{self._prefix}prefix:{h}", value, px=self._ttl_ms)
            await pipe.execute()

    async def acquire(self, session_id: str) -> str | None:
        token = uuid.uuid4().hex
        ok = await self._redis.set(
            f"{self._prefix}lease:{session_id}", token, nx=True, px=self._lease_ms
        )
        return token if ok else None

    async def renew(self, session_id: str, token: str) -> bool:
        key = f"{self._prefix}lease:{session_id}"
        return bool(await self._redis.eval(_RENEW, 1, key, token, self._lease_ms))

    async def release(self, session_id: str, token: str) -> None:
        await self._redis.eval(_RELEASE, 1, f"{self._prefix}lease:{session_id}", token)

    async def aclose(self) -> None:
        await self._redis.aclose()
