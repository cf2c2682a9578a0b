"""What a process that is not a server knows of the swarm: a live snapshot, and what it
learns about servers across requests.

``SwarmView`` reads one model's servers from the DHT and keeps the snapshot fresh, keeps
the health of every server it has used (failures banned with exponential backoff, opening
round trips), how many streams this process has open on each, and the liveness watch that
tells hung servers from slow ones. It opens no session: the inference client
(``client.swarm_client``) and the fine-tuner plan and call over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence, Set
from typing import Any

from hivemind.p2p import P2P

from client.hop_connection import NO_DELAY
from client.liveness import Liveness
from client.metrics import ClientMetrics
from protocol.errors import NoRouteError, SwarmError
from protocol.latency import SimulatedLink
from protocol.membership import Membership
from protocol.swarm import ModelRecord
from routing.costs import RouteCosts
from routing.health import PeerHealth
from routing.planner import Hop, plan_route
from routing.snapshot import SwarmSnapshot, carry_over, next_refresh_s, settled
from swarm_dht.discovery import fetch_candidates, fetch_model, snapshot_of, warn_if_model_differs
from swarm_dht.join import SwarmMember, join_swarm
from swarm_dht.revocations import learn_revocations, watch_revocations

# Hop is the client's word for one server of a planned chain: its users plan through the
# view and need not reach into the planner for the type.
__all__ = ["Hop", "SwarmView"]

logger = logging.getLogger(__name__)


class SwarmView:
    """Keeps a fresh snapshot of one model's swarm, and this process's view of its servers.

    ``link``: the simulated network delay of this process's messages to servers
    (benchmarks only), injected by whoever starts the process; none by default."""

    def __init__(
        self,
        member: SwarmMember,
        prefix: str,
        model: ModelRecord,
        *,
        refresh_period_s: float = 2.0,
        max_refresh_period_s: float = 10.0,
        health: PeerHealth | None = None,
        metrics: ClientMetrics | None = None,
        link: SimulatedLink = NO_DELAY,
    ) -> None:
        self._dht = member.dht
        self._prefix = prefix
        self.model = model  # the local files' model: servers of another shape are ignored
        self._membership = membership = member.membership
        # This process's pass, shown to every server it calls: it names our peer id.
        self._member_pass = member.member_pass
        self.link = link
        self._refresh_period_s = refresh_period_s
        self._max_refresh_period_s = max(max_refresh_period_s, refresh_period_s)
        self._refresh_wait_s = refresh_period_s
        self._read_at = -math.inf  # monotonic time the last snapshot was read
        self._reading: asyncio.Future[SwarmSnapshot] | None = None
        self._wake = asyncio.Event()  # something suggests the swarm changed: read it soon
        self.health = health or PeerHealth()
        self.metrics = metrics or ClientMetrics()
        self.open_streams: Counter[str] = Counter()  # this process's streams per server
        self._snapshot = SwarmSnapshot(model=model)
        self._p2p: P2P | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._revocations: asyncio.Task[None] | None = None
        self.liveness = Liveness(
            self.health,
            self.snapshot,
            self._member_pass,
            self.metrics,
            link,
            membership=membership,
        )
        self.liveness.on_hung = lambda peer_id: self._wake.set()
        self._own_member: SwarmMember | None = None  # left on aclose: see join()

    @classmethod
    def join(
        cls,
        initial_peers: Sequence[str],
        membership: Membership | None,
        prefix: str,
        model: ModelRecord,
        **options: Any,
    ) -> SwarmView:
        """A view over a DHT peer of its own (client mode), joined through
        ``initial_peers``, which ``aclose`` leaves: how a gateway or a fine-tuner uses the
        swarm. ``options`` as for the constructor."""
        member = join_swarm(initial_peers, membership, client_mode=True)
        try:
            view = cls(member, prefix, model, **options)
        except BaseException:
            member.leave()
            raise
        view._own_member = member
        return view

    def member_pass(self) -> str:
        """This process's pass to servers' RPCs (empty in an open swarm)."""
        return self._member_pass()

    @property
    def p2p(self) -> P2P:
        """The DHT process's P2P daemon, to open streams to servers on."""
        assert self._p2p is not None, "start() first"
        return self._p2p

    async def start(self) -> None:
        self._p2p = await self._dht.replicate_p2p()
        self.liveness.attach(self._p2p)
        if self._membership is not None:
            handed: set[str] = set()  # revocations the DHT's process has
            with contextlib.suppress(Exception):  # read again by the watch below
                await learn_revocations(self._dht, self._membership, handed)
            self._revocations = asyncio.create_task(
                watch_revocations(self._dht, self._membership, handed)
            )
        with contextlib.suppress(Exception):  # no record yet: the servers will write one
            warn_if_model_differs(await fetch_model(self._dht, self._prefix), self.model)
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())
        self._watcher = asyncio.create_task(
            self.liveness.watch_forever(lambda: list(self.open_streams))
        )

    async def aclose(self) -> None:
        try:
            for task in (self._refresher, self._watcher, self._revocations, self._reading):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        finally:
            if self._own_member is not None:
                self._own_member.leave()
                self._own_member = None

    def snapshot(self) -> SwarmSnapshot:
        return self._snapshot

    def read_lately(self) -> bool:
        """Whether the swarm was read within the last refresh period."""
        return time.monotonic() - self._read_at < self._refresh_period_s

    async def refresh(self) -> SwarmSnapshot:
        """Read the swarm now (one read shared by everyone who asks while it runs)."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
        return await asyncio.shield(self._reading)

    async def _read(self) -> SwarmSnapshot:
        candidates = await fetch_candidates(self._dht, self._prefix, self.model)
        owners = None
        if self.liveness.verifies:
            known = self.liveness.owners
            await self.liveness.identify(
                c.peer_id for c in candidates if known.get(c.peer_id) != c.owner
            )
            owners = self.liveness.owners
        fresh = snapshot_of(self.model, candidates, owners)
        self._read_at = time.monotonic()
        self._snapshot = carry_over(self._snapshot, fresh, owners)
        self.metrics.forget_peers(set(self._snapshot.servers))
        return self._snapshot

    def costs(self, **session: object) -> RouteCosts:
        """What this process knows beyond the snapshot, plus what one session adds."""
        rtts = self.health.rtts()
        # A server never measured is assumed typical, not slow: else the first server that
        # answered would keep all traffic and new replicas would never be tried.
        typical = statistics.median(rtts.values()) if rtts else RouteCosts.default_rtt_s
        return RouteCosts(
            rtt_s=rtts,
            default_rtt_s=typical,
            local_load=dict(self.open_streams),
            banned=self.health.banned(),
            **session,  # type: ignore[arg-type]
        )

    def plan(
        self,
        end: int | None = None,
        *,
        start: int = 0,
        exclude: Set[str] = frozenset(),
        avoid: Set[str] = frozenset(),
        adapter: str | None = None,
    ) -> list[Hop]:
        """Live servers for blocks [start, end) (to the last block by default) that run
        ``adapter``, costed with what this process knows: never ``exclude``, and ``avoid``
        only when nobody else can take the span. ``NoRouteError`` if none."""
        snapshot, costs = self._snapshot.serving(adapter), self.costs()
        end = snapshot.num_blocks if end is None else end
        try:
            return plan_route(snapshot, end, start=start, exclude=exclude | avoid, costs=costs)
        except NoRouteError:
            return plan_route(snapshot, end, start=start, exclude=exclude, costs=costs)

    def failed(self, peer_id: str, error: SwarmError) -> None:
        self._wake.set()  # it may have left the swarm, and others with it
        ban = self.health.on_failure(peer_id)
        self.metrics.server_failures.labels(type(error).__name__).inc()
        avoided = "until it answers again" if math.isinf(ban) else f"for {ban:.0f} s"
        logger.warning("server %s failed (%s); avoided %s", peer_id, error, avoided)

    def succeeded(self, peer_id: str) -> None:
        self.health.on_success(peer_id)

    async def _refresh_forever(self) -> None:
        """Re-read the swarm every ``refresh_period_s`` while it changes (or some block has
        no server), backing off to ``max_refresh_period_s`` while it stays the same: each
        read costs this process's DHT a traversal, and the servers' own records change only
        when they announce. A failed server wakes it at once (at most once a period)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._refresh_wait_s)
            woken = self._wake.is_set()
            self._wake.clear()
            await asyncio.sleep(max(0.0, self._read_at + self._refresh_period_s - time.monotonic()))
            before = self._snapshot
            try:
                after = await self.refresh()
            except Exception as e:  # the last snapshot stays in use until the DHT answers
                logger.warning("swarm refresh failed: %s", e)
                after = None
            self._refresh_wait_s = next_refresh_s(
                self._refresh_wait_s,
                settled=after is not None and not woken and settled(before, after),
                fastest=self._refresh_period_s,
                slowest=self._max_refresh_period_s,
            )
