"""A session on a chain of servers that survives servers failing under it.

Hidden states flow gateway → hop → gateway → next hop. Before a step, every hop must
hold the session's first ``position`` tokens. A hop that is behind (a replacement for a
dead server, or a server that lost the conversation's cache between turns) *catches up*:
the gateway rebuilds the inputs that enter it for every earlier position (the embedding
of the token history, run through the live upstream hops in throwaway sessions) and
replays them into it. A hop that fails is closed, its span alone is re-planned over live
servers (one or several replacement hops), and the step goes on from there. So a failure
costs the client a pause, never its answer: greedy output equals a run without it.

Bounded: at most ``MAX_FAILOVERS`` replacements per session and ``FAILOVER_BUDGET_S`` per
step; beyond, the last error goes up. A server that is full or draining is skipped for
this session only; one that failed is reported to the host, which bans it process-wide.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence, Set
from typing import Protocol

import torch

from gateway.hop_stream import HopStream
from protocol.errors import CapacityExceeded, NoRouteError, SwarmError
from protocol.prefix import TokenHistory
from protocol.rpc import OpenSession
from routing.planner import Hop

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 6  # replaced or re-opened hops per session
FAILOVER_BUDGET_S = 60.0  # one step's recovery, all attempts together


class ChainHost(Protocol):
    """What a chain needs from the gateway's swarm client."""

    async def embed(self, ids: list[int]) -> torch.Tensor:
        """ids → hidden [1, n, H], the input of the first block."""
        ...

    def plan(self, start: int, end: int, exclude: Set[str], session: ChainSession) -> list[Hop]:
        """Live servers for blocks [start, end); ``NoRouteError`` if none."""
        ...

    async def open_hop(self, hop: Hop, opening: OpenSession) -> tuple[HopStream, int]:
        """An open stream to ``hop`` and the prefix tokens it holds; ``SwarmError`` if not."""
        ...

    def failed(self, peer_id: str, error: SwarmError) -> None: ...

    def succeeded(self, peer_id: str) -> None: ...


class _HopFailed(Exception):
    """Hop ``index`` of the chain failed with ``error``."""

    def __init__(self, index: int, error: SwarmError) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


class ChainSession:
    def __init__(
        self,
        host: ChainHost,
        session_id: str,
        secret: str,
        max_length: int,
        on_failover: Callable[[], None] = lambda: None,
        resume: tuple[int, str] = (0, ""),
    ) -> None:
        self._host = host
        self._resume = resume  # (length, digest) of the conversation's history, if continued
        self._on_failover = on_failover  # a failed hop was replaced mid-generation
        self.session_id = session_id
        self._secret = secret  # proves to each server that this session is ours to resume
        self._max_length = max_length
        self._hops: list[HopStream] = []
        self._position = 0  # tokens every hop holds before the next step
        self._excluded: set[str] = set()  # failed or full: never again in this session
        self._full: list[Hop] = []  # hops refused for lack of room
        self.failovers = 0
        self._known: dict[int, torch.Tensor] = {}  # hop index → its inputs [1, position, H]

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    @property
    def cached_tokens(self) -> int:
        """Leading prompt tokens the chain can skip: hops holding fewer catch up from the
        others' inputs, which costs less than recomputing the prefix everywhere."""
        return max((h.position for h in self._hops), default=0)

    def reuse(self, tokens: int) -> None:
        if not 0 <= tokens <= self.cached_tokens:
            raise ValueError(f"cannot reuse {tokens} tokens, {self.cached_tokens} are cached")
        self._position = tokens
        for hop in self._hops:
            hop.position = min(hop.position, tokens)

    async def open(self, route: Sequence[Hop], prefix_hashes: Sequence[str]) -> None:
        """Open every hop of ``route``; a hop that cannot be opened is replaced."""
        self._hops = await self._open_hops(route, prefix_hashes, time.monotonic())

    async def step(self, hidden: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        """hidden: [1, n, H] for the history's last n tokens → the chain's output, same shape."""
        start = self._position
        began = time.monotonic()
        inputs = {0: hidden}  # this step's input into each hop
        self._known = {}
        index = 0
        while index < len(self._hops):
            try:
                if self._hops[index].position < start:
                    await self._catch_up(index, start, history)
                out = await self._step_hop(index, inputs[index], history)
            except _HopFailed as failure:
                failed = failure.index
                added = await self._replace(failure, began) - 1
                if failed < index:
                    # An upstream hop failed while replaying inputs for this one. The hops
                    # up to here already ran this step and must not run it twice: go on
                    # from here; the upstream replacement catches up at the next step.
                    index += added
                    inputs = {(k + added if k > failed else k): v for k, v in inputs.items()}
                else:
                    inputs = {k: v for k, v in inputs.items() if k <= index}
                continue
            index += 1
            inputs[index] = out
        self._position = start + hidden.shape[1]
        self._known = {}
        return inputs[len(self._hops)]

    async def close(self) -> None:
        """Release the session on every server; never suspends (see HopStream.close)."""
        for hop in self._hops:
            hop.close()

    async def _step_hop(
        self, index: int, hidden: torch.Tensor, history: TokenHistory
    ) -> torch.Tensor:
        hop = self._hops[index]
        try:
            out = await hop.step(hidden, history)
        except SwarmError as e:
            raise _HopFailed(index, e) from e
        self._host.succeeded(hop.peer_id)
        return out

    async def _catch_up(self, index: int, start: int, history: TokenHistory) -> None:
        """Bring hop ``index`` from its position to ``start`` by replaying its inputs."""
        hop = self._hops[index]
        behind = hop.position
        inputs = await self._inputs_of(index, start, history)
        logger.info(
            "session %s: replaying %d tokens into %s (blocks %d:%d)",
            self.session_id,
            start - behind,
            hop.peer_id,
            hop.hop.start,
            hop.hop.end,
        )
        out = await self._step_hop(index, inputs[:, behind:start], history)
        if behind == 0:
            self._known[index + 1] = out  # the next hop's inputs, should it need them

    async def _inputs_of(self, index: int, start: int, history: TokenHistory) -> torch.Tensor:
        """What enters hop ``index`` at positions [0, start): the embedding, run through
        the hops before it in throwaway sessions (they keep their own caches intact)."""
        first = max((k for k in self._known if k <= index), default=None)
        if first is None:
            first, hidden = 0, await self._host.embed(history.tokens[:start])
        else:
            hidden = self._known[first]
        for k in range(first, index):
            hidden = await self._replay(k, hidden, history)
            self._known[k + 1] = hidden
        return hidden

    async def _replay(
        self, index: int, hidden: torch.Tensor, history: TokenHistory
    ) -> torch.Tensor:
        hop = self._hops[index].hop
        opening = OpenSession(
            session_id=f"{self.session_id}/replay-{uuid.uuid4().hex[:8]}",
            secret=self._secret,
            start=hop.start,
            end=hop.end,
            max_length=hidden.shape[1],
            keep=False,
        )
        stream: HopStream | None = None
        try:
            stream, _ = await self._host.open_hop(hop, opening)
            return await stream.step(hidden, history)
        except SwarmError as e:
            raise _HopFailed(index, e) from e
        finally:
            if stream is not None:
                stream.close()

    async def _replace(self, failure: _HopFailed, began: float) -> int:
        """Close the failed hop and splice in fresh hops for its span (behind: they catch up);
        how many hops took its place."""
        failed = self._hops[failure.index]
        failed.close()
        self._note_failure(failed.hop, failure.error, began)
        route = self._plan(failed.hop.start, failed.hop.end, failure.error)
        logger.warning(
            "session %s: %s failed (%s); blocks %d:%d now on %s",
            self.session_id,
            failed.peer_id,
            failure.error,
            failed.hop.start,
            failed.hop.end,
            ", ".join(h.peer_id for h in route),
        )
        replacements = await self._open_hops(route, (), began)
        self._hops[failure.index : failure.index + 1] = replacements
        self._known = {}
        self._on_failover()
        return len(replacements)

    async def _open_hops(
        self, route: Sequence[Hop], prefix_hashes: Sequence[str], began: float
    ) -> list[HopStream]:
        """Streams to every hop of ``route``, in order; each one that fails is replaced by
        a plan for its own span. Nothing stays open if this raises or is cancelled."""
        tasks = [
            asyncio.ensure_future(self._host.open_hop(hop, self._opening(hop, prefix_hashes)))
            for hop in route
        ]
        opened: list[HopStream] = []
        try:
            await asyncio.wait(tasks)
            for hop, task in zip(route, tasks, strict=True):
                error = task.exception()
                if error is None:
                    stream, cached = task.result()
                    stream.position = cached
                    opened.append(stream)
                    self._host.succeeded(hop.peer_id)
                    continue
                if not isinstance(error, SwarmError):
                    raise error
                self._note_failure(hop, error, began)
                sub = self._plan(hop.start, hop.end, error)
                opened += await self._open_hops(sub, prefix_hashes, began)
        except BaseException:
            for task in tasks:
                task.cancel()
                if task.done() and not task.cancelled() and task.exception() is None:
                    task.result()[0].close()
            for stream in opened:
                stream.close()
            raise
        return opened

    def _opening(self, hop: Hop, prefix_hashes: Sequence[str]) -> OpenSession:
        return OpenSession(
            session_id=self.session_id,
            secret=self._secret,
            start=hop.start,
            end=hop.end,
            max_length=self._max_length,
            prefix_hashes=list(prefix_hashes),
            resume_length=self._resume[0],
            resume_digest=self._resume[1],
        )

    def _note_failure(self, hop: Hop, error: SwarmError, began: float) -> None:
        self.failovers += 1
        self._excluded.add(hop.peer_id)
        if isinstance(error, CapacityExceeded):
            self._full.append(hop)  # busy, not broken: no ban
        else:
            self._host.failed(hop.peer_id, error)
        if self.failovers > MAX_FAILOVERS or time.monotonic() - began > FAILOVER_BUDGET_S:
            raise error

    def _plan(self, start: int, end: int, cause: SwarmError) -> list[Hop]:
        try:
            return self._host.plan(start, end, self._excluded, self)
        except NoRouteError as e:
            if any(full.start < end and start < full.end for full in self._full):
                raise CapacityExceeded(
                    f"every server that can run blocks {start}:{end} is full or leaving"
                ) from cause
            raise NoRouteError(f"{cause}; no other server for blocks {start}:{end}: {e}") from cause
