"""Which session a request continues, and the lease that keeps it to one request at a time.

Lookup order: the client's session key (``prompt_cache_key``, ``X-Session-ID``, ``user``),
else the longest prompt prefix seen before. The affinity store may fail at any moment
(Redis restarting): then requests run on fresh sessions, with a warning and a metric, and
affinity resumes by itself when the store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gateway.engine.affinity_stores import AffinityStore, SessionPin
from gateway.metrics import GatewayMetrics
from protocol.prefix import TokenHistory
from routing.planner import Hop

logger = logging.getLogger(__name__)
T = TypeVar("T")

WARN_EVERY_S = 30.0  # a store that is down would otherwise log on every request


@dataclass(frozen=True)
class Claim:
    session_id: str
    secret: str  # the servers find the session's caches only with it
    prefer: tuple[Hop, ...] | None  # the route that holds the session's caches
    lease: str | None  # None: the store was unreachable, the session id is fresh anyway
    key: str | None
    # (length, digest) of the pinned history this request extends exactly, if it does: the
    # servers then resume all of it, its last partial block included.
    resume: tuple[int, str] = (0, "")
    tenant: str = ""  # whose pins these are: each tenant's count against its own bound


def continues(pin: SessionPin, history: TokenHistory) -> bool:
    """Whether ``history`` starts with the pinned conversation's whole history."""
    return (
        bool(pin.digest) and pin.length <= len(history) and history.digest(pin.length) == pin.digest
    )


class SessionAffinity:
    def __init__(
        self, store: AffinityStore, metrics: GatewayMetrics, *, lease_ttl_s: float = 30.0
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._renew_every_s = lease_ttl_s / 3
        self._last_warning = -WARN_EVERY_S

    async def claim(self, key: str | None, history: TokenHistory, *, tenant: str = "") -> Claim:
        """The session to use; never two requests on one cache.

        A session key names a conversation, which the request continues (an edited turn
        crops it: that is the client's own history). Without one, a pinned session is
        continued only by a request that extends its whole history exactly. Any other
        request that shares its prefix forks: a fresh session, placed preferably on the
        servers of the pin, which seed it with a copy of the shared prefix, so that neither
        conversation crops the other's cache.
        """
        pin = await self._guard(
            self._store.get_key(key, tenant=tenant)
            if key
            else self._store.longest_prefix(history.hashes, tenant=tenant)
        )
        if pin is None or not pin.secret:
            return await self._fresh(key, None, tenant)
        extends = continues(pin, history)
        if key or extends:
            taken, lease = await self._acquire(pin.session_id)
            if not taken:
                resume = (pin.length, pin.digest) if extends else (0, "")
                return Claim(pin.session_id, pin.secret, pin.route, lease, key, resume, tenant)
        return await self._fresh(key, pin.route, tenant)

    async def _fresh(self, key: str | None, near: tuple[Hop, ...] | None, tenant: str) -> Claim:
        session_id = uuid.uuid4().hex
        _, lease = await self._acquire(session_id)
        return Claim(session_id, secrets.token_hex(16), near, lease, key, tenant=tenant)

    async def remember(self, claim: Claim, route: Sequence[Hop], history: TokenHistory) -> None:
        """Record where the conversation's caches now live, for its next turn."""
        length = len(history)
        pin = SessionPin(
            claim.session_id, tuple(route), length, claim.secret, history.digest(length)
        )
        if claim.key:
            await self._guard(self._store.put_key(claim.key, pin, tenant=claim.tenant))
        await self._guard(self._store.put_prefixes(history.hashes, pin, tenant=claim.tenant))

    async def release(self, claim: Claim) -> None:
        if claim.lease is not None:
            await self._guard(self._store.release(claim.session_id, claim.lease))

    @contextlib.asynccontextmanager
    async def held(self, claim: Claim) -> AsyncIterator[None]:
        """Renews the lease while the body runs (a long generation outlives one TTL)."""
        if claim.lease is None:
            yield
            return
        renewer = asyncio.create_task(self._renew_forever(claim))
        try:
            yield
        finally:
            renewer.cancel()

    async def _renew_forever(self, claim: Claim) -> None:
        assert claim.lease is not None
        while True:
            await asyncio.sleep(self._renew_every_s)
            await self._guard(self._store.renew(claim.session_id, claim.lease))

    async def _acquire(self, session_id: str) -> tuple[bool, str | None]:
        """(taken by another request, our lease token)."""
        try:
            lease = await self._store.acquire(session_id)
        except Exception as e:
            self._failed(e)
            return False, None
        return lease is None, lease

    async def _guard(self, call: Awaitable[T]) -> T | None:
        try:
            return await call
        except Exception as e:
            self._failed(e)
            return None

    def _failed(self, error: Exception) -> None:
        self._metrics.affinity_errors.inc()
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            logger.warning("affinity store unavailable, running without affinity: %s", error)
