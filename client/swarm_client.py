"""The gateway's side of the swarm: a live snapshot and inference sessions over P2P.

``SwarmClient`` is the seam the rest of the gateway is written against; ``P2PSwarmClient``
is the real one (hivemind DHT + P2P streams), tests may pass any other implementation.
It also keeps what the gateway learns about servers across requests: failures (a ban
with exponential backoff), opening round trips, and how many sessions it has on each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence, Set
from typing import Protocol

import torch
from hivemind import DHT
from hivemind.p2p import P2P

from client.chain import ChainSession
from client.hop_stream import SIMULATED_LINK, HopStream, detach
from client.liveness import Liveness
from client.metrics import ClientMetrics
from protocol.errors import NoRouteError, SwarmError
from protocol.logs import request_id
from protocol.membership import Membership, PassIssuer
from protocol.prefix import BLOCK_TOKENS, TokenHistory
from protocol.rpc import OpenSession, max_tokens_per_message
from protocol.swarm import ModelRecord
from routing.costs import PREFILL_FACTOR, RouteCosts, step_deadline_s
from routing.discovery import check_model, fetch_candidates, fetch_model, snapshot_of
from routing.health import PeerHealth
from routing.planner import Hop, plan_route
from routing.revocations import learn_revocations, watch_revocations
from routing.snapshot import SwarmSnapshot, carry_over, next_refresh_s, settled

__all__ = ["InferenceSession", "P2PSwarmClient", "SwarmClient", "detach"]

logger = logging.getLogger(__name__)


class InferenceSession(Protocol):
    """One conversation's state on a chain of servers."""

    @property
    def cached_tokens(self) -> int:
        """Leading prompt tokens that every server of the chain already holds."""
        ...

    @property
    def route(self) -> list[Hop]: ...

    def reuse(self, tokens: int) -> None:
        """Start the next step after ``tokens`` cached tokens (at most ``cached_tokens``)."""
        ...

    async def step(self, hidden: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        """hidden: [1, n, hidden_size] for the history's last n tokens → the chain's
        output, same shape. ``history``: every token fed so far, these included (a failed
        server's replacement is rebuilt from it)."""
        ...

    async def close(self) -> None:
        """Release the session on every server. Must not suspend: it runs in the cleanup
        of cancelled requests, where an await would be cancelled before doing its work."""
        ...


class SwarmClient(Protocol):
    def snapshot(self) -> SwarmSnapshot: ...

    async def open_session(
        self,
        max_length: int,
        *,
        session_id: str,
        secret: str,
        prefix_hashes: Sequence[str] = (),
        prefer: Sequence[Hop] | None = None,
        resume: tuple[int, str] = (0, ""),
        adapter: str | None = None,
    ) -> InferenceSession:
        """A session with room for ``max_length`` tokens, on ``prefer`` if that route still
        works; servers report how much of ``prefix_hashes`` they already hold (all of
        ``resume``'s (length, digest) history, when they hold exactly that). Its caches
        there are found again only with the same ``session_id`` and ``secret``. With an
        ``adapter``, only servers that hold that LoRA adapter take part."""
        ...


class P2PSwarmClient:
    """Keeps a fresh snapshot of one model's swarm and opens sessions on it."""

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        model: ModelRecord,
        *,
        embed: Callable[[list[int]], Awaitable[torch.Tensor]],
        membership: Membership | None = None,  # None: an open swarm
        refresh_period_s: float = 2.0,
        max_refresh_period_s: float = 10.0,
        prefill_chunk_tokens: int | None = None,
        step_floor_s: float = 10.0,
        health: PeerHealth | None = None,
        metrics: ClientMetrics | None = None,
        push: bool = True,
    ) -> None:
        self._dht = dht
        self._push = push  # hops push hidden states to each other where servers can
        self._prefix = prefix
        self._model = model  # the local files' model: servers of another shape are ignored
        self._membership = membership
        self._embed = embed
        self._refresh_period_s = refresh_period_s
        self._max_refresh_period_s = max(max_refresh_period_s, refresh_period_s)
        self._refresh_wait_s = refresh_period_s
        self._read_at = -math.inf  # monotonic time the last snapshot was read
        self._reading: asyncio.Future[SwarmSnapshot] | None = None
        self._wake = asyncio.Event()  # something suggests the swarm changed: read it soon
        self._prefill_chunk_tokens = prefill_chunk_tokens
        self._step_floor_s = step_floor_s
        self.health = health or PeerHealth()
        self._metrics = metrics or ClientMetrics()
        self.open_streams: Counter[str] = Counter()  # this gateway's sessions per server
        self._snapshot = SwarmSnapshot(model=model)
        self._p2p: P2P | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._revocations: asyncio.Task[None] | None = None
        # This process's pass, shown to every server it opens: it names our peer id.
        self._member_pass: Callable[[], str] = (
            PassIssuer(membership, dht.peer_id.to_base58()).current
            if membership is not None
            else lambda: ""  # an open swarm shows none
        )
        self.liveness = Liveness(
            self.health,
            self.snapshot,
            self._member_pass,
            self._metrics,
            SIMULATED_LINK,
            membership=membership,
        )
        self.liveness.on_hung = lambda peer_id: self._wake.set()

    def member_pass(self) -> str:
        """This process's pass to servers' RPCs (empty in an open swarm)."""
        return self._member_pass()

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
            check_model(await fetch_model(self._dht, self._prefix), self._model)
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())
        self._watcher = asyncio.create_task(
            self.liveness.watch_forever(lambda: list(self.open_streams))
        )

    async def aclose(self) -> None:
        for task in (self._refresher, self._watcher, self._revocations, self._reading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def snapshot(self) -> SwarmSnapshot:
        return self._snapshot

    async def refresh(self) -> SwarmSnapshot:
        """Read the swarm now (one read shared by everyone who asks while it runs)."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
        return await asyncio.shield(self._reading)

    async def _read(self) -> SwarmSnapshot:
        candidates = await fetch_candidates(self._dht, self._prefix, self._model)
        owners = None
        if self.liveness.verifies:
            known = self.liveness.owners
            await self.liveness.identify(
                c.peer_id for c in candidates if known.get(c.peer_id) != c.owner
            )
            owners = self.liveness.owners
        fresh = snapshot_of(self._model, candidates, owners)
        self._read_at = time.monotonic()
        self._snapshot = carry_over(self._snapshot, fresh, owners)
        self._metrics.forget_peers(set(self._snapshot.servers))
        return self._snapshot

    async def open_session(
        self,
        max_length: int,
        *,
        session_id: str,
        secret: str,
        prefix_hashes: Sequence[str] = (),
        prefer: Sequence[Hop] | None = None,
        resume: tuple[int, str] = (0, ""),
        adapter: str | None = None,
    ) -> ChainSession:
        held = len(prefix_hashes) * BLOCK_TOKENS
        # The pinned route's servers hold the conversation: the planner weighs that against
        # speed and load, keeps the hops that still work and re-plans only what was lost.
        costs = self.costs(
            cached_hops=tuple(prefer or ()), cached_tokens=held, prompt_tokens=held + 1
        )
        snapshot = self._snapshot.serving(adapter)
        try:
            route = plan_route(snapshot, snapshot.num_blocks, costs=costs)
        except NoRouteError:
            # A settled swarm is read only every few announcement periods: a server that
            # joined since (one holding this adapter, say) is looked for before a 503.
            if time.monotonic() - self._read_at < self._refresh_period_s:
                raise
            with contextlib.suppress(Exception):  # unreadable: the 503 stands
                snapshot = (await self.refresh()).serving(adapter)
            route = plan_route(snapshot, snapshot.num_blocks, costs=costs)
        chain = ChainSession(
            self,
            session_id,
            secret,
            max_length,
            on_failover=self._metrics.failovers.inc,
            resume=resume,
            push=self._push,
            on_input=lambda via: self._metrics.hop_inputs.labels(via).inc(),
            adapter=adapter,
        )
        await chain.open(route, prefix_hashes)
        return chain

    def costs(self, **session: object) -> RouteCosts:
        """What this gateway knows beyond the snapshot, plus what one session adds."""
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

    # ---- ChainHost: what a ChainSession asks of the client ----

    async def embed(self, ids: list[int]) -> torch.Tensor:
        return await self._embed(ids)

    def plan(self, start: int, end: int, exclude: Set[str], session: ChainSession) -> list[Hop]:
        self._metrics.replans.inc()
        snapshot, costs = self._snapshot.serving(session.adapter), self.costs()
        # A server already in the chain would get a second stream for the same session
        # (a cold fork, after a wait): only when nobody else can take the span.
        in_chain = {hop.peer_id for hop in session.route}
        try:
            return plan_route(snapshot, end, start=start, exclude=exclude | in_chain, costs=costs)
        except NoRouteError:
            return plan_route(snapshot, end, start=start, exclude=exclude, costs=costs)

    async def open_hop(self, hop: Hop, opening: OpenSession) -> tuple[HopStream, int]:
        assert self._p2p is not None, "start() first"
        snapshot = self._snapshot
        chunk = self._prefill_chunk_tokens or max_tokens_per_message(self._model.hidden_size)
        record = snapshot.servers.get(hop.peer_id)
        blocks = hop.length

        def deadline_s(tokens: int) -> float:
            if record is None:  # gone from the DHT since the plan: it gets the floor only
                return self._step_floor_s
            # A prefill chunk costs far less than that many decode steps.
            steps = 1 + math.ceil((tokens - 1) * PREFILL_FACTOR)
            return step_deadline_s(record, blocks, steps, floor_s=self._step_floor_s)

        def closed() -> None:
            self.open_streams[hop.peer_id] -= 1
            if self.open_streams[hop.peer_id] <= 0:
                del self.open_streams[hop.peer_id]

        self.open_streams[hop.peer_id] += 1

        def stepped(seconds: float) -> None:
            self._metrics.observe_hop(hop.peer_id, seconds)

        stream = HopStream(
            self._p2p,
            hop,
            chunk,
            deadline_s,
            on_close=closed,
            on_step=stepped,
            watch=self.liveness,
        )
        try:
            shown = opening.model_copy(
                update={"member_pass": self._member_pass(), "request_id": request_id.get()}
            )
            cached = await stream.open(shown)
        except BaseException:
            stream.close()
            raise
        self.health.observe_rtt(hop.peer_id, stream.open_rtt_s)
        self.liveness.answered(hop.peer_id)
        return stream, cached

    def failed(self, peer_id: str, error: SwarmError) -> None:
        self._wake.set()  # it may have left the swarm, and others with it
        ban = self.health.on_failure(peer_id)
        self._metrics.server_failures.labels(type(error).__name__).inc()
        avoided = "until it answers again" if math.isinf(ban) else f"for {ban:.0f} s"
        logger.warning("server %s failed (%s); avoided %s", peer_id, error, avoided)

    def succeeded(self, peer_id: str) -> None:
        self.health.on_success(peer_id)

    async def _refresh_forever(self) -> None:
        """Re-read the swarm every ``refresh_period_s`` while it changes (or some block has
        no server), backing off to ``max_refresh_period_s`` while it stays the same: each
        read costs the gateway's DHT a traversal, and the servers' own records change only
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
