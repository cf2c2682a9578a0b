"""The gateway's side of the swarm: a live snapshot and inference sessions over P2P.

``SwarmClient`` is the seam the rest of the gateway is written against; ``P2PSwarmClient``
is the real one (hivemind DHT + P2P streams), tests may pass any other implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, Protocol

import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from protocol.codec import make_request, read_tensors
from protocol.errors import PeerUnavailable, ProtocolMismatch
from protocol.prefix import BLOCK_TOKENS
from protocol.rpc import (
    RPC_INFERENCE,
    OpenSession,
    SessionOpened,
    Step,
    StepDone,
    decode_reply,
    max_tokens_per_message,
)
from routing.discovery import fetch_model, fetch_snapshot
from routing.planner import Hop, plan_route, route_is_usable
from routing.snapshot import SwarmSnapshot

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0  # how long a closing stream may take to say goodbye

_detached: set[asyncio.Task[None]] = set()  # strong references until each task finishes


def detach(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutine`` outside the current task, so cancelling the caller cannot stop it."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _detached.add(task)
    task.add_done_callback(_detached.discard)


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

    async def step(self, hidden: torch.Tensor, hashes: Sequence[str]) -> torch.Tensor:
        """hidden: [1, n, hidden_size] for the next n positions → the chain's output, same
        shape. ``hashes``: block hashes of every token fed so far, these included."""
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
        prefix_hashes: Sequence[str] = (),
        prefer: Sequence[Hop] | None = None,
    ) -> InferenceSession:
        """A session with room for ``max_length`` tokens, on ``prefer`` if that route still
        works; servers report how much of ``prefix_hashes`` they already hold."""
        ...


class _HopStream:
    """One bidirectional ``rpc_inference`` stream to one server of the chain."""

    def __init__(self, p2p: P2P, hop: Hop, timeout_s: float, chunk_tokens: int) -> None:
        self.hop = hop
        self._p2p = p2p
        self._timeout_s = timeout_s
        self._chunk_tokens = chunk_tokens
        self._inputs: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._outputs: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self.position = 0
        self._closed = False

    async def open(self, session_id: str, max_length: int, prefix_hashes: Sequence[str]) -> int:
        peer = PeerID.from_base58(self.hop.peer_id)
        self._outputs = await self._p2p.iterate_protobuf_handler(
            peer, RPC_INFERENCE, self._requests(), runtime_pb2.ExpertResponse
        )
        opening = OpenSession(
            session_id=session_id,
            start=self.hop.start,
            end=self.hop.end,
            max_length=max_length,
            prefix_hashes=list(prefix_hashes),
        )
        reply = await self._exchange(make_request(opening))
        return decode_reply(SessionOpened, reply.metadata, self.hop.peer_id).cached_tokens

    async def step(self, hidden: torch.Tensor, hashes: Sequence[str]) -> torch.Tensor:
        outputs = []
        for chunk in torch.split(hidden, self._chunk_tokens, dim=1):
            end = self.position + chunk.shape[1]
            # The server keeps the hashes of the blocks it holds: send those this chunk completes.
            new = hashes[self.position // BLOCK_TOKENS : end // BLOCK_TOKENS]
            step = Step(position=self.position, new_hashes=list(new))
            reply = await self._exchange(make_request(step, chunk))
            done = decode_reply(StepDone, reply.metadata, self.hop.peer_id)
            self.position += chunk.shape[1]
            if done.position != self.position:
                raise ProtocolMismatch(
                    f"server at {done.position} tokens, expected {self.position}"
                )
            tensors = read_tensors(reply)
            if len(tensors) != 1 or tensors[0].shape != chunk.shape:
                raise ProtocolMismatch("server returned hidden states of the wrong shape")
            outputs.append(tensors[0])
        return torch.cat(outputs, dim=1)

    def close(self) -> None:
        """End the stream; the server frees the session when it sees the end.

        Synchronous on purpose: it runs while a disconnected client's request is being
        cancelled, where any await would be cancelled too and leave the stream open.
        """
        if self._closed:
            return
        self._closed = True
        self._inputs.put_nowait(None)  # hivemind's writer task sends END_OF_STREAM
        if self._outputs is not None:
            detach(self._wait_for_end(self._outputs))

    async def _wait_for_end(self, outputs: AsyncIterator[runtime_pb2.ExpertResponse]) -> None:
        try:
            await asyncio.wait_for(anext(outputs), CLOSE_TIMEOUT_S)  # the server ends the stream
        except (StopAsyncIteration, Exception):
            pass
        finally:
            with contextlib.suppress(Exception):
                await outputs.aclose()  # type: ignore[attr-defined]

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (request := await self._inputs.get()) is not None:
            yield request

    async def _exchange(self, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        assert self._outputs is not None
        self._inputs.put_nowait(request)
        try:
            return await asyncio.wait_for(anext(self._outputs), self._timeout_s)
        except StopAsyncIteration:
            raise PeerUnavailable(
                f"{self.hop.peer_id} closed the stream", self.hop.peer_id
            ) from None
        except TimeoutError:
            raise PeerUnavailable(f"{self.hop.peer_id} timed out", self.hop.peer_id) from None
        except Exception as e:  # P2PHandlerError, P2PDaemonError, connection resets
            raise PeerUnavailable(f"{self.hop.peer_id}: {e}", self.hop.peer_id) from e


class ChainSession:
    """A session on every hop of a route; hidden states flow gateway → hop → gateway → ..."""

    def __init__(self, hops: list[_HopStream], cached: list[int]) -> None:
        self._hops = hops
        # A hop can only skip positions whose inputs it never needs again: the chain as a
        # whole reuses what its least-informed server holds.
        self._cached = min(cached, default=0)

    @property
    def cached_tokens(self) -> int:
        return self._cached

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    def reuse(self, tokens: int) -> None:
        if not 0 <= tokens <= self._cached:
            raise ValueError(f"cannot reuse {tokens} tokens, {self._cached} are cached")
        for hop in self._hops:
            hop.position = tokens

    async def step(self, hidden: torch.Tensor, hashes: Sequence[str]) -> torch.Tensor:
        for hop in self._hops:
            hidden = await hop.step(hidden, hashes)
        return hidden

    async def close(self) -> None:
        for hop in self._hops:  # no await: see _HopStream.close
            hop.close()


class P2PSwarmClient:
    """Keeps a fresh snapshot of one model's swarm and opens sessions on it."""

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        *,
        refresh_period_s: float = 2.0,
        step_timeout_s: float = 60.0,
        prefill_chunk_tokens: int | None = None,
    ) -> None:
        self._dht = dht
        self._prefix = prefix
        self._refresh_period_s = refresh_period_s
        self._step_timeout_s = step_timeout_s
        self._prefill_chunk_tokens = prefill_chunk_tokens
        self._snapshot = SwarmSnapshot(model=None)
        self._p2p: P2P | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._p2p = await self._dht.replicate_p2p()
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher

    def snapshot(self) -> SwarmSnapshot:
        return self._snapshot

    async def refresh(self) -> SwarmSnapshot:
        model = self._snapshot.model or await fetch_model(self._dht, self._prefix)
        self._snapshot = await fetch_snapshot(self._dht, self._prefix, model)
        return self._snapshot

    async def open_session(
        self,
        max_length: int,
        *,
        session_id: str,
        prefix_hashes: Sequence[str] = (),
        prefer: Sequence[Hop] | None = None,
    ) -> ChainSession:
        assert self._p2p is not None, "start() first"
        snapshot = self._snapshot
        failed: set[str] = set()
        for _attempt in range(3):  # a server that fails to open is skipped, once per attempt
            if prefer and route_is_usable(snapshot, prefer, snapshot.num_blocks, exclude=failed):
                route = list(prefer)
            else:
                route = plan_route(snapshot, snapshot.num_blocks, exclude=failed)
            try:
                return await self._open_route(route, max_length, session_id, prefix_hashes)
            except PeerUnavailable as e:
                logger.warning("opening a session failed: %s", e)
                if e.peer_id is None:
                    raise
                failed.add(e.peer_id)
        raise PeerUnavailable(f"could not open a session (failed servers: {sorted(failed)})")

    async def _open_route(
        self, route: list[Hop], max_length: int, session_id: str, prefix_hashes: Sequence[str]
    ) -> ChainSession:
        model = self._snapshot.model
        assert model is not None
        chunk = self._prefill_chunk_tokens or max_tokens_per_message(model.hidden_size)
        assert self._p2p is not None, "start() first"
        hops = [_HopStream(self._p2p, hop, self._step_timeout_s, chunk) for hop in route]
        try:
            cached = await asyncio.gather(
                *(hop.open(session_id, max_length, prefix_hashes) for hop in hops)
            )
        except BaseException:
            for hop in hops:
                hop.close()
            raise
        return ChainSession(hops, list(cached))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_period_s)
            try:
                await self.refresh()
            except Exception as e:  # the last snapshot stays in use until the DHT answers
                logger.warning("swarm refresh failed: %s", e)
