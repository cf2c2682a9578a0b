"""Which peers failed lately and how far away each one is, as one gateway saw them.

The planner reads both through ``RouteCosts`` (``banned``, ``rtt_s``): a banned peer is only
a last resort, and a far one costs a round trip per token. A ban doubles with every
failure in a row, so a peer that keeps failing is soon left alone for long while one that
failed once is tried again in seconds; a success forgets the failures.

A *hung* peer (one that left a liveness probe unanswered: a frozen process or a partition
keeps its connections open, so nothing else says it is gone) stays banned until it answers
again, however long that takes: its record in the DHT would otherwise keep drawing new
streams to it, each stalling until its own deadline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

_MAX_DOUBLINGS = 60  # 2**60 times any sane base is past any cap: no float overflow


@dataclass
class _Peer:
    failures: int = 0  # in a row, not reset by a ban's expiry
    banned_until: float = -math.inf
    rtt_s: float | None = None
    hung: bool = False  # banned until it answers: see the module docstring


class PeerHealth:
    """Failures and round trips per peer, process-wide; pure given a clock.

    Not thread-safe: one gateway's event loop owns it.
    """

    def __init__(
        self,
        *,
        base_ban_s: float = 2.0,
        max_ban_s: float = 120.0,
        smoothing: float = 0.3,
        max_peers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < base_ban_s <= max_ban_s:
            raise ValueError(f"need 0 < base_ban_s <= max_ban_s, got {base_ban_s}, {max_ban_s}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if max_peers < 1:
            raise ValueError(f"max_peers must be at least 1, got {max_peers}")
        self._base = base_ban_s
        self._max = max_ban_s
        self._smoothing = smoothing
        self._max_peers = max_peers
        self._clock = clock
        self._peers: dict[str, _Peer] = {}  # least recently touched first

    def on_failure(self, peer_id: str) -> float:
        """Ban the peer for ``base * 2**(failures in a row - 1)``, capped; the ban's length.

        A failure while the peer is already banned is the same outage seen by another
        session (every stream through a dying server fails at once), so it does not
        lengthen the ban: the current ban's length is returned.
        """
        now = self._clock()
        peer = self._touch(peer_id)
        if peer.hung:
            return math.inf
        if peer.banned_until > now:
            return self._ban_length(peer.failures)
        peer.failures += 1
        length = self._ban_length(peer.failures)
        peer.banned_until = now + length
        return length

    def on_hung(self, peer_id: str) -> None:
        """The peer left a probe unanswered: banned until it answers one (``on_success``)."""
        peer = self._touch(peer_id)
        if not peer.hung:
            peer.failures += 1
        peer.hung = True
        peer.banned_until = math.inf

    def on_success(self, peer_id: str) -> None:
        """The peer answered: it recovered, so its failures and any ban are forgotten."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        if peer.rtt_s is None:
            del self._peers[peer_id]  # nothing left worth remembering
            return
        peer.failures = 0
        peer.banned_until = -math.inf
        peer.hung = False
        self._touch(peer_id)

    def is_hung(self, peer_id: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.hung

    def hung(self) -> frozenset[str]:
        """Peers that have not answered since a probe found them hung."""
        return frozenset(p for p, peer in self._peers.items() if peer.hung)

    def is_banned(self, peer_id: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.banned_until > self._clock()

    def banned(self) -> frozenset[str]:
        """Peers banned now; bans expire by themselves."""
        now = self._clock()
        return frozenset(p for p, peer in self._peers.items() if peer.banned_until > now)

    def observe_rtt(self, peer_id: str, seconds: float) -> None:
        """Fold one round trip into the peer's moving average; unusable samples are ignored."""
        if not (math.isfinite(seconds) and seconds >= 0):
            return
        peer = self._touch(peer_id)
        if peer.rtt_s is None:
            peer.rtt_s = seconds
        else:
            peer.rtt_s += self._smoothing * (seconds - peer.rtt_s)

    def rtts(self) -> dict[str, float]:
        """The smoothed round trip of every peer measured, in seconds."""
        return {p: peer.rtt_s for p, peer in self._peers.items() if peer.rtt_s is not None}

    def _ban_length(self, failures: int) -> float:
        doublings = min(max(failures - 1, 0), _MAX_DOUBLINGS)
        return float(min(self._base * 2.0**doublings, self._max))

    def _touch(self, peer_id: str) -> _Peer:
        """The peer's entry, now the most recent; the stalest are forgotten past the bound."""
        peer = self._peers.pop(peer_id, None) or _Peer()
        self._peers[peer_id] = peer
        while len(self._peers) > self._max_peers:
            del self._peers[next(iter(self._peers))]
        return peer
