"""A session on a chain of servers that survives servers failing under it.

Hidden states flow gateway → hop → gateway → next hop (relay), or, with ``push``, hop →
next hop directly: the gateway sends the first hop its input and tells every other hop, at
the same time, to expect its input by push; only the last hop answers with hidden states,
the others with a small acknowledgement once their push was accepted. A hop whose push
failed answers with its output instead, which the gateway relays to the next hop. A step
goes in rounds of at most one message's tokens, pushed or relayed hop by hop.

Before a step, every hop must hold the session's first ``position`` tokens. A hop that is
behind (a replacement for a dead server, or a server that lost the conversation's cache
between turns) *catches up*: the gateway rebuilds the inputs that enter it for every
earlier position (the embedding of the token history, run through the live upstream hops
in throwaway sessions) and replays them into it. A hop that fails is closed, its span alone
is re-planned over live servers (one or several replacement hops), and the step goes on
from there; a replacement whose input was pushed into the dead server rebuilds it the same
way, since the gateway never holds it. So a failure costs the client a pause, never its
answer: greedy output equals a run without it.

Bounded: at most ``MAX_FAILOVERS`` replacements per session and ``FAILOVER_BUDGET_S`` per
step; beyond, the last error goes up. A server that is full or draining is skipped for
this session only; one that failed is reported to the host, which bans it process-wide.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence, Set
from typing import Literal, Protocol

import torch

from client.hop_stream import HopStream
from protocol.errors import CapacityExceeded, NoRouteError, SwarmError
from protocol.prefix import TokenHistory
from protocol.rpc import OpenSession
from routing.planner import Hop

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 6  # replaced or re-opened hops per session
FAILOVER_BUDGET_S = 60.0  # one step's recovery, all attempts together


def hop_secret(secret: str, peer_id: str, start: int, end: int) -> str:
    """What the server ``peer_id`` gets as the secret of its hop [start, end) of a session:
    HMAC-SHA256 of the session's own secret over ``peer_id ‖ start ‖ end`` (hex).

    Each server keys its cache by the session id and the secret it was shown, so one that
    learns its own hop's secret cannot open, crop or drop the session on any other server,
    nor on another span of its own; the gateway (and any gateway sharing the conversation's
    pin) derives the same secret again for the next turn."""
    message = f"{peer_id}\0{start}\0{end}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


# ids → hidden [1, n, H] (fp32, on the host), the input of the first block: the model's
# token embedding, handed down to the session, which rebuilds a replacement hop's inputs
# with it (in a worker thread: a replay must not hold up the event loop).
Embedding = Callable[[list[int]], torch.Tensor]


class ChainHost(Protocol):
    """What a chain needs from the swarm client: routes, hops, and where to report them."""

    def plan(self, start: int, end: int, exclude: Set[str], session: ChainSession) -> list[Hop]:
        """Live servers for blocks [start, end); ``NoRouteError`` if none."""
        ...

    async def open_hop(self, hop: Hop, opening: OpenSession) -> tuple[HopStream, int]:
        """An open stream to ``hop`` and the prefix tokens it holds; ``SwarmError`` if not."""
        ...

    def failed(self, peer_id: str, error: SwarmError) -> None: ...

    def succeeded(self, peer_id: str) -> None: ...


# How a hop after the first got its input in a step: pushed by the hop before it, or
# relayed through the gateway.
InputRoute = Literal["push", "relay"]


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
        embedding: Embedding,
        on_failover: Callable[[], None] = lambda: None,
        resume: tuple[int, str] = (0, ""),
        push: bool = False,
        on_input: Callable[[InputRoute], None] = lambda route: None,
        adapter: str | None = None,
    ) -> None:
        self._host = host
        self._embedding = embedding
        self.adapter = adapter  # every hop, replacements too, must run this LoRA adapter
        self._push = push  # hops push hidden states to each other where servers can
        self._on_input = on_input
        self._resume = resume  # (length, digest) of the conversation's history, if continued
        self._on_failover = on_failover  # a failed hop was replaced mid-generation
        self.session_id = session_id
        # Proves to each server that this session is ours to resume; never sent as is, each
        # hop gets its own derivation (``hop_secret``).
        self._secret = secret
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
        rounds = [hidden]
        if self._push and len(self._hops) > 1:  # pushed steps are one message each
            rounds = list(torch.split(hidden, min(h.chunk_tokens for h in self._hops), dim=1))
        outputs, position = [], start
        for chunk in rounds:
            outputs.append(await self._round(chunk, position, history, began))
            position += chunk.shape[1]
        self._position = position
        self._known = {}
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _round(
        self, hidden: torch.Tensor, start: int, history: TokenHistory, began: float
    ) -> torch.Tensor:
        """``hidden`` [1, n, H] at ``start`` through every hop: the last hop's output."""
        end = start + hidden.shape[1]
        # This round's input into each hop; None: pushed there by the hop before it.
        inputs: dict[int, torch.Tensor | None] = {0: hidden}
        self._known = {}
        if self._pushable(start):
            await self._begin_all(hidden, history)
        index = 0
        while index < len(self._hops):
            pushed = inputs[index] is None and self._hops[index].pending
            try:
                out = await self._run_hop(index, inputs[index], start, end, history)
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
            if index > 0:
                self._on_input("push" if pushed else "relay")
            index += 1
            inputs[index] = out
        out = inputs[len(self._hops)]
        assert out is not None, "the last hop never pushes"
        return out

    def _pushable(self, start: int) -> bool:
        """Whether this round can push: every hop is at ``start`` (none has to catch up)
        and some server takes pushes."""
        hops = self._hops
        return (
            self._push
            and all(hop.position == start for hop in hops)
            and any(hop.push_target is not None for hop in hops[1:])
        )

    async def _begin_all(self, hidden: torch.Tensor, history: TokenHistory) -> None:
        """Send every hop its part of the round at once: the first its input, each hop
        that takes pushes an announcement of it, each hop before one of those its target.
        A hop that cannot be sent to is left for ``_run_hop`` to fail over."""
        hops = self._hops
        sending = []
        for k, hop in enumerate(hops):
            if k > 0 and hop.push_target is None:
                continue  # a server that predates push: stepped by relay
            target = hops[k + 1].push_target if k + 1 < len(hops) else None
            sending.append(hop.begin(hidden.shape, history, hidden if k == 0 else None, target))
        for result in await asyncio.gather(*sending, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, SwarmError):
                raise result

    async def _run_hop(
        self,
        index: int,
        hidden: torch.Tensor | None,
        start: int,
        end: int,
        history: TokenHistory,
    ) -> torch.Tensor | None:
        """Hop ``index``'s part of the round at [start, end): its output, or None if it
        pushed that to the next hop. ``hidden``: its input, None if it was pushed there."""
        hop = self._hops[index]
        if hop.pending:  # begun by _begin_all: it has its input, or awaits it
            try:
                if hop.awaits_input and hidden is not None:
                    await hop.relay(hidden)
                out = await hop.finish(self._successor(index))
            except SwarmError as e:
                raise _HopFailed(index, e) from e
            self._host.succeeded(hop.peer_id)
            return out
        if hidden is None:  # pushed into the server this one replaced: rebuilt by replay
            return (await self._catch_up(index, end, history))[:, start - end :]
        if hop.position < start:
            await self._catch_up(index, start, history)
        return await self._step_hop(index, hidden, history)

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

    def _successor(self, index: int) -> HopStream | None:
        """The hop that hop ``index`` pushes to this round, while it waits for that push:
        its answer, if it comes first, shows that the push got through (nothing else could
        have fed it), so the chain goes on without waiting for the pusher's own word."""
        if index + 1 >= len(self._hops):
            return None
        successor = self._hops[index + 1]
        if successor.pending and successor.awaits_input and successor.push_target is not None:
            return successor
        return None

    async def _catch_up(self, index: int, start: int, history: TokenHistory) -> torch.Tensor:
        """Bring hop ``index`` from its position to ``start`` by replaying its inputs; its
        output for those positions."""
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
        return out

    async def _inputs_of(self, index: int, start: int, history: TokenHistory) -> torch.Tensor:
        """What enters hop ``index`` at positions [0, start): the embedding, run through
        the hops before it in throwaway sessions (they keep their own caches intact)."""
        known = {k: v for k, v in self._known.items() if k <= index and v.shape[1] >= start}
        first = max(known, default=None)
        if first is None:
            first = 0
            hidden = await asyncio.to_thread(self._embedding, list(history.tokens[:start]))
        else:
            hidden = known[first][:, :start]
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
            secret=self._hop_secret(hop),
            start=hop.start,
            end=hop.end,
            max_length=hidden.shape[1],
            keep=False,
            adapter=self.adapter,
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
        for stream in replacements:  # one holding more of the conversation drops the rest
            stream.position = min(stream.position, self._position)
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
            secret=self._hop_secret(hop),
            start=hop.start,
            end=hop.end,
            max_length=self._max_length,
            prefix_hashes=list(prefix_hashes),
            resume_length=self._resume[0],
            resume_digest=self._resume[1],
            push_token=secrets.token_hex(16) if self._push else None,
            adapter=self.adapter,
        )

    def _hop_secret(self, hop: Hop) -> str:
        return hop_secret(self._secret, hop.peer_id, hop.start, hop.end)

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
