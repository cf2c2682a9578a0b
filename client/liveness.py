"""Telling hung servers from slow ones, for one gateway: soft step deadlines from each hop's
own step times (routing/deadlines.py), liveness probes, and bans that last until a hung
server answers again.

A probe is the cheapest call a server answers, ``rpc_info``: it runs on the server's event
loop, beside (not behind) its forwards, so a busy server answers it in milliseconds while a
frozen one (``kill -STOP``, a partition) never does. Probes of one peer are shared: every
stream suspecting it at once waits for the same call.

``watch_forever`` also probes in the background, every ``WATCH_PERIOD_S``: servers found
hung (to lift their ban the moment they answer), and servers this gateway holds streams to
that have not answered anything for ``IDLE_PROBE_S`` (idle sessions), so that a server that
hung between steps fails its streams before their next step waits for it.

The same call tells the gateway which owner tag each server signs its DHT records with
(``identify``): the answer comes over a connection libp2p authenticated as that server, so
it binds the server's records to it, and records another member signed in its name are
ignored (``swarm_dht.discovery.snapshot_of``). In a closed swarm the answer must also carry a
server credential for that owner tag: a gateway or a fine-tuner that announces blocks, or a
server whose credential was revoked, is never routed to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from client.metrics import ClientMetrics
from protocol.errors import SwarmError
from protocol.latency import SimulatedLink
from protocol.membership import Membership
from protocol.rpc import RPC_INFO, InfoRequest, ServerInfo, decode_reply
from routing.costs import step_deadline_s
from routing.deadlines import SMALL_STEP_TOKENS, StepTimes
from routing.health import PeerHealth
from routing.snapshot import SwarmSnapshot

logger = logging.getLogger("swarmgate.liveness")

# A probe unanswered this long (plus the link's round trip) means hung. Servers answer
# rpc_info from their event loop in milliseconds, also while computing.
PROBE_TIMEOUT_S = 0.75
WATCH_PERIOD_S = 1.0
IDLE_PROBE_S = 5.0  # streams whose server said nothing this long are probed
MAX_BACKGROUND_PROBES = 32  # per period: a gateway facing a thousand servers stays cheap
RECHECK_S = 5.0  # a server is asked for its owner tag at most this often
IDENTIFY_CONCURRENCY = 32
MAX_IDENTIFY_PER_READ = 1024  # a swarm read asks at most this many new servers
MAX_PEERS = 10_000


class Liveness:
    """The gateway's ``Watch`` (client.hop_connection) over every hop it opens."""

    def __init__(
        self,
        health: PeerHealth,
        snapshot: Callable[[], SwarmSnapshot],
        member_pass: Callable[[], str],
        metrics: ClientMetrics,
        link: SimulatedLink,
        clock: Callable[[], float] = time.monotonic,
        membership: Membership | None = None,
    ) -> None:
        self._membership = membership
        self._health = health
        self._snapshot = snapshot
        self._member_pass = member_pass
        self._metrics = metrics
        self._link = link
        self._clock = clock
        self._times = StepTimes()
        self._heard: dict[str, float] = {}  # peer → when it last answered anything
        self._probes: dict[str, asyncio.Future[bool]] = {}
        self._owners: dict[str, tuple[str, str]] = {}  # peer → (owner tag, credential id)
        self._refused: dict[str, str] = {}  # peer → owner tag refused (said once)
        self._asked: dict[str, float] = {}  # peer → when it was last asked for it
        self._p2p: P2P | None = None
        self.on_hung: Callable[[str], None] = lambda peer_id: None

    def attach(self, p2p: P2P) -> None:
        self._p2p = p2p

    # ---- Watch ----

    def suspect_after_s(self, peer_id: str, tokens: int) -> float:
        predicted = 0.0
        record = self._snapshot().servers.get(peer_id)
        if tokens > SMALL_STEP_TOKENS and record is not None:
            predicted = step_deadline_s(record, record.length, tokens, floor_s=0.0)
        return self._times.suspect_after_s(peer_id, predicted)

    def hung(self, peer_id: str) -> bool:
        return self._health.is_hung(peer_id)

    def stepped(self, peer_id: str, seconds: float, tokens: int) -> None:
        self._times.observe(peer_id, seconds, tokens)
        self.answered(peer_id)

    def answered(self, peer_id: str) -> None:
        """The peer answered something (a step, an opening): it is not idle."""
        self._heard[peer_id] = self._clock()
        if len(self._heard) > 10_000:  # peers long gone: forget the oldest
            for stale in sorted(self._heard, key=self._heard.__getitem__)[:1000]:
                del self._heard[stale]

    async def alive(self, peer_id: str) -> bool:
        probe = self._probes.get(peer_id)
        if probe is None:
            probe = self._probes[peer_id] = asyncio.ensure_future(self._probe(peer_id))
            probe.add_done_callback(lambda _: self._probes.pop(peer_id, None))
        # Shielded: a stream cancelled while waiting must not cancel others' probe.
        return await asyncio.shield(probe)

    # ---- probes ----

    async def _probe(self, peer_id: str) -> bool:
        answered = await self._call_info(peer_id)
        if answered:
            self._heard[peer_id] = self._clock()
            if self._health.is_hung(peer_id):
                logger.warning("server %s answers again; no longer avoided", peer_id)
                self._health.on_success(peer_id)
            return True
        if not self._health.is_hung(peer_id):
            logger.warning(
                "server %s is hung: no answer to a liveness probe within %.2f s; avoided "
                "until it answers",
                peer_id,
                PROBE_TIMEOUT_S,
            )
            self._metrics.hung_servers.inc()
            self._health.on_hung(peer_id)
            self.on_hung(peer_id)
        return False

    async def _call_info(self, peer_id: str) -> bool:
        """Whether the peer answered ``rpc_info`` in time (any answer: a refusal too); the
        owner tag it states is remembered (see ``identify``)."""
        if self._p2p is None:
            return True  # not started: nothing to tell
        asked = InfoRequest(member_pass=self._member_pass())

        async def call() -> runtime_pb2.ExpertResponse:
            assert self._p2p is not None
            await self._link.outbound()
            reply: runtime_pb2.ExpertResponse = await self._p2p.call_protobuf_handler(
                PeerID.from_base58(peer_id),
                RPC_INFO,
                runtime_pb2.ExpertRequest(metadata=asked.encode()),
                runtime_pb2.ExpertResponse,
            )
            await self._link.inbound()
            return reply

        try:
            reply = await asyncio.wait_for(call(), PROBE_TIMEOUT_S + self._link.rtt_s)
        except asyncio.CancelledError:
            raise
        except Exception:  # a timeout, a dial error, a daemon error: no answer
            return False
        with contextlib.suppress(SwarmError, ValueError):  # a refusal: alive, owner unknown
            self._vouch(peer_id, decode_reply(ServerInfo, reply.metadata, peer_id))
        return True

    # ---- who signs a server's records ----

    @property
    def verifies(self) -> bool:
        """Whether records can be checked against their servers (a P2P to ask them)."""
        return self._p2p is not None

    async def identify(self, peers: Iterable[str]) -> None:
        """Ask each of ``peers`` (not asked in the last ``RECHECK_S``) which owner tag it
        signs its records with. libp2p authenticates the connection as that peer, so its
        answer binds its records to it (``swarm_dht.discovery.snapshot_of``): a member that
        stores records under another server's peer id with its own signature is ignored."""
        now = self._clock()
        due = [p for p in dict.fromkeys(peers) if now - self._asked.get(p, -math.inf) >= RECHECK_S]
        if not due:
            return
        for peer_id in due:
            self._asked[peer_id] = now
        if len(self._asked) > MAX_PEERS:
            for stale in sorted(self._asked, key=self._asked.__getitem__)[: MAX_PEERS // 10]:
                del self._asked[stale]
        limit = asyncio.Semaphore(IDENTIFY_CONCURRENCY)

        async def ask(peer_id: str) -> None:
            async with limit:
                await self._call_info(peer_id)

        await asyncio.gather(*(ask(p) for p in due[:MAX_IDENTIFY_PER_READ]))

    @property
    def owners(self) -> dict[str, str]:
        """Each server's owner tag, as it said itself, for servers whose credential is good."""
        revoked = self._membership.revocations if self._membership is not None else ()
        return {peer: tag for peer, (tag, held) in self._owners.items() if held not in revoked}

    def _vouch(self, peer_id: str, info: ServerInfo) -> None:
        """Remember the owner tag ``info`` states, if its credential makes it a server's."""
        if not info.owner:
            return
        credential_id = ""
        if self._membership is not None:
            credential = self._membership.server(info.owner, info.credential)
            if credential is None:
                self._owners.pop(peer_id, None)
                if self._refused.get(peer_id) != info.owner:
                    if len(self._refused) >= MAX_PEERS:
                        self._refused.clear()
                    self._refused[peer_id] = info.owner
                    logger.warning(
                        "ignoring the records of %s: it shows no server credential of this "
                        "swarm for the key it signs them with",
                        peer_id,
                    )
                return
            credential_id = credential.id
        self._owners.pop(peer_id, None)
        self._owners[peer_id] = (info.owner, credential_id)
        while len(self._owners) > MAX_PEERS:
            del self._owners[next(iter(self._owners))]

    async def watch_forever(self, streams: Callable[[], Iterable[str]]) -> None:
        """Probe hung servers and servers with idle streams, every ``WATCH_PERIOD_S``."""
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            now = self._clock()
            due = sorted(self._health.hung())
            for peer_id in streams():
                if now - self._heard.get(peer_id, -math.inf) > IDLE_PROBE_S:
                    due.append(peer_id)
            probes = [self.alive(p) for p in dict.fromkeys(due[:MAX_BACKGROUND_PROBES])]
            with contextlib.suppress(Exception):
                await asyncio.gather(*probes)
