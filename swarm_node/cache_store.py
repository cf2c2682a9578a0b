"""The node's KV caches, one per session, under a byte budget: the ``CacheStore``.

A session here is a gateway's inference session over some of this span's blocks, found by
its cache key (``inference_stream.cache_key``); ``CachedSession`` is what the node keeps of
one: its place in the budget, its position and block hashes, and its keys and values
(``kv``, a ``KVBuffers``).

The only place that creates, trims or drops caches. A session's cache stays after its
stream closes so that the conversation's next turn sends only its new tokens; idle
sessions leave in LRU order when room is needed, or after an idle TTL. A session in use is
never evicted: it reserves room for its ``max_length`` tokens when its stream opens, so a
request that was accepted can always finish.

A step is all or nothing: ``check_step`` validates it without changing anything, the
forward pass runs, and only then ``commit_step`` records the new length. A step that fails
or is cancelled mid-forward ``discard``s the session: its cache may be half-written, and the
forward may still be running on it, so it is never handed to another stream.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from protocol.errors import CapacityExceeded, InvalidRequest
from protocol.prefix import BLOCK_TOKENS, common_blocks
from swarm_node.kv_buffers import KVBuffers


@dataclass
class CachedSession:
    key: str
    start: int
    end: int
    kv: KVBuffers
    reserved_bytes: int = 0  # held while in use, so the request can reach max_length
    position: int = 0  # tokens in the cache
    hashes: list[str] = field(default_factory=list)  # one per full block of those tokens
    digest: str = ""  # of all those tokens, partial block included ("": unknown)
    size_bytes: int = 0
    in_use: bool = False
    last_used: float = 0.0
    keep: bool = True  # False: dropped when its stream closes (a throwaway replay)
    adapter: str | None = None  # the LoRA adapter its keys and values were computed with
    # The peer that opened it (its stream's caller, as libp2p authenticated it), who wrote
    # what it holds: only that peer's new sessions are seeded from it.
    caller: str = ""

    def charge(self) -> int:
        return max(self.size_bytes, self.reserved_bytes) if self.in_use else self.size_bytes


@dataclass
class CacheStats:
    sessions: int
    used_bytes: int
    free_bytes: int
    evictions: int
    tokens_computed: int
    tokens_reused: int


class CacheStore:
    """Every session's cache on this node, by cache key, LRU first."""

    def __init__(
        self,
        budget_bytes: int,
        bytes_per_token_per_block: int,
        *,
        idle_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_bytes = budget_bytes
        self._per_token_block = bytes_per_token_per_block
        self._idle_ttl_s = idle_ttl_s
        self._clock = clock
        self._cached: OrderedDict[str, CachedSession] = OrderedDict()  # LRU first
        # Block hash → keys of the sessions holding that block: chained hashes make a hash
        # name a whole prefix, so a new session can be seeded from any holder of its own.
        self._holders: dict[str, set[str]] = {}
        self._used = 0  # the sum of every stored session's charge, kept as they change
        self.evictions = 0
        self.tokens_computed = 0
        self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self._cached)

    def in_use(self, key: str) -> bool:
        session = self._cached.get(key)
        return session is not None and session.in_use

    def cache_keys(self) -> list[str]:
        return list(self._cached)

    @property
    def used_bytes(self) -> int:
        return self._used

    def stats(self) -> CacheStats:
        used = self.used_bytes
        return CacheStats(
            len(self),
            used,
            max(0, self.budget_bytes - used),
            self.evictions,
            self.tokens_computed,
            self.tokens_reused,
        )

    def open(
        self,
        key: str,
        start: int,
        end: int,
        max_length: int,
        prefix_hashes: Sequence[str],
        new_kv: Callable[[], KVBuffers],
        *,
        keep: bool = True,
        resume: tuple[int, str] = (0, ""),
        adapter: str | None = None,
        caller: str = "",
    ) -> tuple[CachedSession, int]:
        """A session for a new stream and how many of its prefix tokens are cached here:
        whole blocks of ``prefix_hashes``, or all of it when it holds exactly the history
        ``resume`` (length, digest) names.

        ``caller``: the peer opening it, who writes to it from now on. An existing session
        is resumed by whoever shows its key (the secret proves the conversation is theirs),
        and then counts as that caller's."""
        self.expire()
        reserve = max_length * (end - start) * self._per_token_block
        session = self._cached.get(key)
        if session is not None and session.in_use:
            # Another stream is using this cache right now: never share it, fork a fresh one.
            key, session = f"{key}#{uuid.uuid4().hex[:8]}", None
        elif session is not None and (session.start, session.end, session.adapter) != (
            start,
            end,
            adapter,
        ):
            self._drop(key)
            session = None
        kept = session is not None
        if session is None:
            session = CachedSession(key, start, end, new_kv(), adapter=adapter, caller=caller)
            cached = 0
        else:
            blocks = common_blocks(session.hashes, prefix_hashes)
            cached = min(blocks * BLOCK_TOKENS, session.position)
            if session.digest and resume == (session.position, session.digest):
                cached = session.position  # the partial last block too
            self._remove(key)
        try:
            self._make_room(max(reserve, session.size_bytes))  # what it is charged once back
        except CapacityExceeded:
            if kept:  # refused, not lost: it stays cached for a later try
                self._insert(session)
            raise
        session.reserved_bytes, session.in_use, session.keep = reserve, True, keep
        session.caller = caller
        self._insert(session)
        return session, cached

    def find_prefix(
        self, session: CachedSession, prefix_hashes: Sequence[str]
    ) -> tuple[CachedSession, int] | None:
        """Another session of the same caller over the same blocks and adapter holding
        the longest prefix of ``prefix_hashes``, and how many tokens of it: a fresh session
        is seeded from it instead of recomputing what this node already has.

        Block hashes are the caller's word, not checked against the cache: any member can
        write hidden states of its choosing under a prompt's hashes. So a session is seeded
        only from what its own caller wrote, and nobody can poison another's prefixes."""
        wanted = (session.start, session.end, session.adapter, session.caller)
        for index in range(len(prefix_hashes) - 1, -1, -1):
            tokens = (index + 1) * BLOCK_TOKENS
            for key in self._holders.get(prefix_hashes[index], ()):
                donor = self._cached[key]
                if (
                    donor is not session
                    and (
                        donor.start,
                        donor.end,
                        donor.adapter,
                        donor.caller,
                    )
                    == wanted
                ):
                    return donor, tokens
        return None

    def seed(self, session: CachedSession, donor: CachedSession, tokens: int) -> None:
        """``session`` now holds a copy of ``donor``'s first ``tokens`` tokens."""
        hashes = donor.hashes[: tokens // BLOCK_TOKENS]
        size = session.kv.nbytes
        self._change(session, position=tokens, hashes=hashes, size_bytes=size)

    def check_step(
        self, session: CachedSession, position: int, tokens: int, new_hashes: Sequence[str]
    ) -> list[str]:
        """Validate a step of ``tokens`` tokens from ``position`` without changing anything;
        the block hashes the session will hold once it is done.

        ``position`` below what the cache holds drops the rest first (an edited or
        regenerated turn); above it, the step is refused.
        """
        if position > session.position:
            # Says nothing of how much is cached: that is the conversation owner's business.
            raise InvalidRequest(f"step at position {position} is past this session's cache")
        end = position + tokens
        if end * (session.end - session.start) * self._per_token_block > max(
            session.reserved_bytes, session.size_bytes
        ):
            raise InvalidRequest("the session grows past the max_length it opened with")
        hashes = session.hashes[: position // BLOCK_TOKENS] + list(new_hashes)
        if len(hashes) > end // BLOCK_TOKENS:
            raise InvalidRequest("more block hashes than full blocks")
        return hashes

    def truncate(self, session: CachedSession, position: int) -> None:
        """The session's tokens from ``position`` on are being replaced (a step from there
        was accepted): stop offering them to anyone."""
        hashes = session.hashes[: position // BLOCK_TOKENS]
        position = min(position, session.position)
        self._change(session, position=position, hashes=hashes, digest="")

    def commit_step(
        self,
        session: CachedSession,
        position: int,
        tokens: int,
        hashes: list[str],
        *,
        first: bool = False,
        digest: str = "",
    ) -> None:
        """Record a step whose forward pass completed (``hashes`` from ``check_step``).

        ``first``: the stream's first step, whose ``position`` is the prefix it reused.
        """
        if first:
            self.tokens_reused += min(position, session.position)
        size = session.kv.nbytes
        end = position + tokens
        self._change(session, position=end, hashes=hashes, size_bytes=size, digest=digest)
        self.tokens_computed += tokens

    def discard(self, session: CachedSession) -> None:
        """Forget a session whose cache may be half-written; a forward may still be running
        on it. The next stream under its id starts from an empty cache of its own."""
        self._change(session, in_use=False, keep=False)
        if self._cached.get(session.key) is session:
            self._drop(session.key)

    def release(self, session: CachedSession) -> None:
        """The stream closed: the cache stays for the next turn (forks are not reusable)."""
        self._change(session, in_use=False, last_used=self._clock())
        reusable = session.keep and "#" not in session.key and session.position > 0
        if not reusable and self._cached.get(session.key) is session:
            self._drop(session.key)

    def expire(self) -> None:
        now = self._clock()
        for key in [
            k
            for k, s in self._cached.items()
            if not s.in_use and now - s.last_used > self._idle_ttl_s
        ]:
            self._drop(key, evicted=True)

    def _make_room(self, need: int) -> None:
        if self._used + need <= self.budget_bytes:
            return
        idle = sum(s.charge() for s in self._cached.values() if not s.in_use)
        if self._used - idle + need > self.budget_bytes:
            # Refused before anything is evicted: a request too big for the budget must not
            # cost every other conversation its cache.
            raise CapacityExceeded("no room for this session's cache here right now")
        while self._used + need > self.budget_bytes:
            victim = next(k for k, s in self._cached.items() if not s.in_use)
            self._drop(victim, evicted=True)

    def _change(self, session: CachedSession, **fields: object) -> None:
        """Set ``fields`` on ``session``, keeping the byte total and the index right."""
        stored = self._cached.get(session.key) is session
        if stored:
            self._used -= session.charge()
            if "hashes" in fields:
                self._reindex(session, session.hashes, fields["hashes"])  # type: ignore[arg-type]
        for name, value in fields.items():
            setattr(session, name, value)
        if stored:
            self._used += session.charge()

    def _insert(self, session: CachedSession) -> None:
        self._cached[session.key] = session
        self._used += session.charge()
        self._index(session)

    def _remove(self, key: str) -> CachedSession | None:
        session = self._cached.pop(key, None)
        if session is not None:
            self._used -= session.charge()
            self._unindex(session)
        return session

    def _index(self, session: CachedSession, hashes: Sequence[str] | None = None) -> None:
        for block_hash in session.hashes if hashes is None else hashes:
            self._holders.setdefault(block_hash, set()).add(session.key)

    def _unindex(self, session: CachedSession, hashes: Sequence[str] | None = None) -> None:
        for block_hash in session.hashes if hashes is None else hashes:
            holders = self._holders.get(block_hash)
            if holders is not None:
                holders.discard(session.key)
                if not holders:
                    del self._holders[block_hash]

    def _reindex(self, session: CachedSession, old: list[str], new: list[str]) -> None:
        """Index only what changed. Chained hashes agree on a prefix and differ after it, so
        the walk back from the end stops at once for the usual append or crop."""
        same = min(len(old), len(new))
        while same and old[same - 1] != new[same - 1]:
            same -= 1
        self._unindex(session, old[same:])
        self._index(session, new[same:])

    def _drop(self, key: str, *, evicted: bool = False) -> None:
        if self._remove(key) is not None and evicted:
            self.evictions += 1
