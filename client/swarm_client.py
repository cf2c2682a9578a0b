"""Inference over the swarm: sessions on chains of servers, opened over a ``SwarmView``.

``SwarmClient`` is the seam the gateway is written against; ``InferenceClient`` is the
real one (hivemind P2P streams over a ``SwarmView``), tests may pass any other
implementation. The view keeps what is learnt about servers across requests (failures,
opening round trips, streams per server); this client plans routes over it, opens hops
and reports how each went back to it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence, Set
from typing import Protocol

import torch

from client.chain import ChainSession, Embedding
from client.hop_connection import detach
from client.hop_stream import HopStream
from client.swarm_view import SwarmView
from protocol.errors import NoRouteError, SwarmError
from protocol.logs import request_id
from protocol.prefix import BLOCK_TOKENS, TokenHistory
from protocol.rpc import OpenSession, max_tokens_per_message
from routing.costs import PREFILL_FACTOR, step_deadline_s
from routing.planner import Hop, plan_route
from routing.snapshot import SwarmSnapshot

__all__ = ["InferenceClient", "InferenceSession", "SwarmClient", "detach"]


class InferenceSession(Protocol):
    """One conversation's state on a chain of servers."""

    @property
    def cached_tokens(self) -> int:
        """Leading prompt tokens that every server of the chain already holds."""
        ...

    @property
    def route(self) -> list[Hop]: ...

    def reuse(self, tokens: int) -> None:
        """Start the next step after the first ``tokens`` tokens the servers hold (at most
        ``cached_tokens``): the cached prompt a new generation reuses, or a rewind past
        drafts not taken. Each server drops what follows them at the next step."""
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


class InferenceClient:
    """Opens sessions on chains of servers of the swarm ``view`` sees.

    ``embedding``: the model's token embedding (ids → the first block's input), which a
    session's failover replay rebuilds a replacement hop's inputs with."""

    def __init__(
        self,
        view: SwarmView,
        embedding: Embedding,
        *,
        prefill_chunk_tokens: int | None = None,
        step_floor_s: float = 10.0,
        push: bool = True,
    ) -> None:
        self.view = view
        self._embedding = embedding
        self._push = push  # hops push hidden states to each other where servers can
        self._prefill_chunk_tokens = prefill_chunk_tokens
        self._step_floor_s = step_floor_s

    def snapshot(self) -> SwarmSnapshot:
        return self.view.snapshot()

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
        view, metrics = self.view, self.view.metrics
        held = len(prefix_hashes) * BLOCK_TOKENS
        # The pinned route's servers hold the conversation: the planner weighs that against
        # speed and load, keeps the hops that still work and re-plans only what was lost.
        costs = view.costs(
            cached_hops=tuple(prefer or ()), cached_tokens=held, prompt_tokens=held + 1
        )
        snapshot = view.snapshot().serving(adapter)
        try:
            route = plan_route(snapshot, snapshot.num_blocks, costs=costs)
        except NoRouteError:
            # A settled swarm is read only every few announcement periods: a server that
            # joined since (one holding this adapter, say) is looked for before a 503.
            if view.read_lately():
                raise
            with contextlib.suppress(Exception):  # unreadable: the 503 stands
                snapshot = (await view.refresh()).serving(adapter)
            route = plan_route(snapshot, snapshot.num_blocks, costs=costs)
        chain = ChainSession(
            self,
            session_id,
            secret,
            max_length,
            self._embedding,
            on_failover=metrics.failovers.inc,
            resume=resume,
            push=self._push,
            on_input=lambda via: metrics.hop_inputs.labels(via).inc(),
            adapter=adapter,
        )
        await chain.open(route, prefix_hashes)
        return chain

    # ---- ChainHost: what a ChainSession asks of the client ----

    def plan(self, start: int, end: int, exclude: Set[str], session: ChainSession) -> list[Hop]:
        self.view.metrics.replans.inc()
        # A server already in the chain would get a second stream for the same session
        # (a cold fork, after a wait): only when nobody else can take the span.
        in_chain = {hop.peer_id for hop in session.route}
        return self.view.plan(
            end, start=start, exclude=exclude, avoid=in_chain, adapter=session.adapter
        )

    async def open_hop(self, hop: Hop, opening: OpenSession) -> tuple[HopStream, int]:
        view = self.view
        p2p, snapshot = view.p2p, view.snapshot()
        chunk = self._prefill_chunk_tokens or max_tokens_per_message(view.model.hidden_size)
        record = snapshot.servers.get(hop.peer_id)
        blocks = hop.length

        def deadline_s(tokens: int) -> float:
            if record is None:  # gone from the DHT since the plan: it gets the floor only
                return self._step_floor_s
            # A prefill chunk costs far less than that many decode steps.
            steps = 1 + math.ceil((tokens - 1) * PREFILL_FACTOR)
            return step_deadline_s(record, blocks, steps, floor_s=self._step_floor_s)

        def closed() -> None:
            view.open_streams[hop.peer_id] -= 1
            if view.open_streams[hop.peer_id] <= 0:
                del view.open_streams[hop.peer_id]

        view.open_streams[hop.peer_id] += 1

        def stepped(seconds: float) -> None:
            view.metrics.observe_hop(hop.peer_id, seconds)

        stream = HopStream(
            p2p,
            hop,
            chunk,
            deadline_s,
            on_close=closed,
            on_step=stepped,
            link=view.link,
            watch=view.liveness,
        )
        try:
            shown = opening.model_copy(
                update={"member_pass": view.member_pass(), "request_id": request_id.get()}
            )
            cached = await stream.open(shown)
        except BaseException:
            stream.close()
            raise
        view.health.observe_rtt(hop.peer_id, stream.open_rtt_s)
        view.liveness.answered(hop.peer_id)
        return stream, cached

    def failed(self, peer_id: str, error: SwarmError) -> None:
        self.view.failed(peer_id, error)

    def succeeded(self, peer_id: str) -> None:
        self.view.succeeded(peer_id)
