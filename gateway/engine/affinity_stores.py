"""Where conversations live: session key or prompt prefix → the session and its route.

Two stores behind one interface: in memory (one gateway) and Redis (gateways sharing
state). Everything here is soft state. Losing it costs cache hits, never answers: the
servers report what they really hold, and a miss recomputes.

Pins (session keys and prefixes) are kept per tenant, each tenant within ``max_entries``
of its own: one API key that floods the store with prompts drops its own oldest pins, never
another key's conversations. (Session keys and prefix hashes are salted with the tenant
already, so that no tenant can find another's.)

Redis keys (all with TTLs, so nothing grows without bound):
    sg:{model}:key:{sha256(session key)}  → pin      a client-named conversation
    sg:{model}:prefix:{block hash}         → pin      a prompt prefix seen before
    sg:{model}:pins:{sha256(tenant)}       → zset     a tenant's pins above, by when written
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
    """Pins are ``tenant``'s ("" on a gateway without API keys): each tenant's count against
    its own bound."""

    async def get_key(self, key: str, *, tenant: str = "") -> SessionPin | None: ...

    async def put_key(self, key: str, pin: SessionPin, *, tenant: str = "") -> None: ...

    async def longest_prefix(self, hashes: Sequence[str], *, tenant: str = "") -> SessionPin | None:
        """The pin stored under the last hash of ``hashes`` that has one."""
        ...

    async def put_prefixes(
        self, hashes: Sequence[str], pin: SessionPin, *, tenant: str = ""
    ) -> None: ...

    async def acquire(self, session_id: str) -> str | None:
        """A lease token, or None while another request holds the session."""
        ...

    async def renew(self, session_id: str, token: str) -> bool: ...

    async def release(self, session_id: str, token: str) -> None: ...

    async def aclose(self) -> None: ...


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenant_digest(tenant: str) -> str:
    return hashlib.sha256(f"tenant\0{tenant}".encode()).hexdigest()[:32]


MAX_TENANT_ENTRIES = 100_000  # pins (session keys and prefixes) per tenant


class _Expiring:
    """Values with expiry times, at most ``max_entries``: once full, the expired go, then
    the oldest insertions."""

    def __init__(self, clock: Callable[[], float], max_entries: int) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self.values: dict[str, tuple[float, str]] = {}  # key → (expires at, value)

    def get(self, key: str) -> str | None:
        entry = self.values.get(key)
        if entry is None or entry[0] <= self._clock():
            self.values.pop(key, None)
            return None
        return entry[1]

    def set(self, key: str, value: str, ttl_s: float) -> None:
        if key not in self.values and len(self.values) >= self._max_entries:
            self._evict()
        self.values[key] = (self._clock() + ttl_s, value)

    def _evict(self) -> None:
        now = self._clock()
        for key in [k for k, (exp, _) in self.values.items() if exp <= now]:
            del self.values[key]
        while len(self.values) >= self._max_entries:  # still full: oldest insertions go
            del self.values[next(iter(self.values))]


class InMemoryAffinityStore:
    """One gateway's affinity, with the same TTL semantics as Redis: each tenant's pins
    within ``max_entries`` of its own; leases apart, which no tenant's pins can push out."""

    def __init__(
        self,
        *,
        ttl_s: float = 1800.0,
        lease_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_TENANT_ENTRIES,
    ) -> None:
        self._ttl_s = ttl_s
        self._lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._max_entries = max_entries
        self._pins: dict[str, _Expiring] = {}  # by tenant
        # A lease lives while its request runs (admission bounds those), then is released.
        self._leases = _Expiring(clock, max_entries)

    def entries(self, tenant: str) -> int:
        """Pins kept for ``tenant`` now (expired ones included until they are evicted)."""
        pins = self._pins.get(tenant)
        return 0 if pins is None else len(pins.values)

    def _get(self, tenant: str, key: str) -> str | None:
        pins = self._pins.get(tenant)
        return None if pins is None else pins.get(key)

    def _set(self, tenant: str, key: str, value: str) -> None:
        pins = self._pins.get(tenant)
        if pins is None:
            pins = self._pins[tenant] = _Expiring(self._clock, self._max_entries)
        pins.set(key, value, self._ttl_s)

    async def get_key(self, key: str, *, tenant: str = "") -> SessionPin | None:
        raw = self._get(tenant, f"key:{_digest(key)}")
        return SessionPin.from_json(raw) if raw else None

    async def put_key(self, key: str, pin: SessionPin, *, tenant: str = "") -> None:
        self._set(tenant, f"key:{_digest(key)}", pin.to_json())

    async def longest_prefix(self, hashes: Sequence[str], *, tenant: str = "") -> SessionPin | None:
        for h in reversed(hashes):
            raw = self._get(tenant, f"prefix:{h}")
            if raw:
                return SessionPin.from_json(raw)
        return None

    async def put_prefixes(
        self, hashes: Sequence[str], pin: SessionPin, *, tenant: str = ""
    ) -> None:
        value = pin.to_json()
        for h in hashes:
            self._set(tenant, f"prefix:{h}", value)

    async def acquire(self, session_id: str) -> str | None:
        if self._leases.get(session_id) is not None:
            return None
        token = uuid.uuid4().hex
        self._leases.set(session_id, token, self._lease_ttl_s)
        return token

    async def renew(self, session_id: str, token: str) -> bool:
        if self._leases.get(session_id) != token:
            return False
        self._leases.set(session_id, token, self._lease_ttl_s)
        return True

    async def release(self, session_id: str, token: str) -> None:
        if self._leases.get(session_id) == token:
            del self._leases.values[session_id]

    async def aclose(self) -> None:
        self._pins.clear()
        self._leases.values.clear()


class NoAffinity:
    """Affinity switched off (`--no-affinity`): every request starts a fresh session."""

    async def get_key(self, key: str, *, tenant: str = "") -> SessionPin | None:
        return None

    async def put_key(self, key: str, pin: SessionPin, *, tenant: str = "") -> None:
        pass

    async def longest_prefix(self, hashes: Sequence[str], *, tenant: str = "") -> SessionPin | None:
        return None

    async def put_prefixes(
        self, hashes: Sequence[str], pin: SessionPin, *, tenant: str = ""
    ) -> None:
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
# Writes pins and keeps their tenant within its bound, atomically: the tenant's index (when
# written, ms, by key) first loses what has expired by its own TTL, then its oldest go while
# it holds more than the bound. KEYS: index. ARGV: ttl ms, now ms, bound, key prefix, pin
# JSON, then the keys (after the prefix) to write.
_PUT_PINS = """
local ttl, now, bound = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('zremrangebyscore', KEYS[1], '-inf', now - ttl)
for i = 6, #ARGV do
  redis.call('set', ARGV[4] .. ARGV[i], ARGV[5], 'PX', ttl)
  redis.call('zadd', KEYS[1], now, ARGV[i])
end
local excess = redis.call('zcard', KEYS[1]) - bound
if excess > 0 then
  for _, member in ipairs(redis.call('zrange', KEYS[1], 0, excess - 1)) do
    redis.call('del', ARGV[4] .. member)
  end
  redis.call('zremrangebyrank', KEYS[1], 0, excess - 1)
end
redis.call('pexpire', KEYS[1], ttl)
return redis.call('zcard', KEYS[1])
"""


class RedisAffinityStore:
    """Affinity shared by every gateway that uses the same Redis, each tenant's pins within
    ``max_entries`` (its oldest written dropped first). Redis's own ``maxmemory`` eviction
    knows no tenants: give it room for every tenant's pins, or its LRU picks among all."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        ttl_s: float = 1800.0,
        lease_ttl_s: float = 30.0,
        timeout_s: float = 0.5,
        max_entries: int = MAX_TENANT_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import redis.asyncio as redis

        self._redis: Any = redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._prefix = f"sg:{namespace}:"
        self._ttl_ms = int(ttl_s * 1000)
        self._lease_ms = int(lease_ttl_s * 1000)
        self._max_entries = max_entries
        self._clock = clock  # wall time: every gateway on the Redis agrees on it
        self._put_pins = self._redis.register_script(_PUT_PINS)

    def _index(self, tenant: str) -> str:
        return f"{self._prefix}pins:{tenant_digest(tenant)}"

    async def entries(self, tenant: str) -> int:
        """Pins indexed for ``tenant`` now, as counted in Redis."""
        return int(await self._redis.zcard(self._index(tenant)))

    async def _put(self, tenant: str, keys: Sequence[str], value: str) -> None:
        now_ms = int(self._clock() * 1000)
        args: list[str | int] = [
            self._ttl_ms,
            now_ms,
            self._max_entries,
            self._prefix,
            value,
            *keys,
        ]
        await self._put_pins(keys=[self._index(tenant)], args=args)

    @property
    def client(self) -> Any:
        """The ``redis.asyncio`` client, for other soft state kept beside affinity."""
        return self._redis

    async def get_key(self, key: str, *, tenant: str = "") -> SessionPin | None:
        raw = await self._redis.get(f"{self._prefix}key:{_digest(key)}")
        return SessionPin.from_json(raw) if raw else None

    async def put_key(self, key: str, pin: SessionPin, *, tenant: str = "") -> None:
        await self._put(tenant, [f"key:{_digest(key)}"], pin.to_json())

    async def longest_prefix(self, hashes: Sequence[str], *, tenant: str = "") -> SessionPin | None:
        if not hashes:
            return None
        found = await self._redis.mget([f"{self._prefix}prefix:{h}" for h in hashes])
        for raw in reversed(found):
            if raw:
                return SessionPin.from_json(raw)
        return None

    async def put_prefixes(
        self, hashes: Sequence[str], pin: SessionPin, *, tenant: str = ""
    ) -> None:
        if hashes:
            await self._put(tenant, [f"prefix:{h}" for h in hashes], pin.to_json())

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
