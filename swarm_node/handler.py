"""RPC handlers of a block server: decode and validate messages, delegate compute.

Compute runs on one worker thread so that sessions interleave step by step and the event
loop (P2P, announcements) stays responsive while torch works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from models.loading import Span
from protocol.codec import make_response, read_tensors
from protocol.errors import InvalidRequest, ProtocolMismatch
from protocol.rpc import (
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    Forward,
    OpenSession,
    ServerInfo,
    SessionOpened,
    Step,
    StepDone,
    decode,
    max_tokens_per_message,
)
from protocol.swarm import PROTOCOL_VERSION
from swarm_node.backend import forward_span, new_cache
from swarm_node.kv_cache import SessionStore

logger = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 30.0  # a stream that never says which session it is gets dropped
STEP_TIMEOUT_S = 600.0  # an idle session holds its reservation at most this long
BUSY_WAIT_S = 2.0  # how long an open waits for the session's previous stream to end


class BlockHandler:
    def __init__(self, span: Span, sessions: SessionStore, info: Callable[[], ServerInfo]) -> None:
        self.span = span
        self.sessions = sessions
        self._info = info
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="span-compute")
        self._max_tokens = max_tokens_per_message(span.config.hidden_size)
        self.active_streams = 0
        self._released = asyncio.Condition()

    async def register(self, p2p: P2P) -> None:
        Request = runtime_pb2.ExpertRequest
        await p2p.add_protobuf_handler(
            RPC_INFERENCE, self.rpc_inference, Request, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(RPC_FORWARD, self.rpc_forward, Request)
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, Request)

    async def unregister(self, p2p: P2P) -> None:
        await p2p.remove_protobuf_handler(RPC_INFERENCE, stream_input=True, stream_output=True)
        await p2p.remove_protobuf_handler(RPC_FORWARD)
        await p2p.remove_protobuf_handler(RPC_INFO)

    def shutdown(self) -> None:
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        first = await asyncio.wait_for(anext(requests), OPEN_TIMEOUT_S)
        opening = decode(OpenSession, first.metadata)
        if opening.version != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"protocol version {opening.version}, this server speaks {PROTOCOL_VERSION}"
            )
        self._check_range(opening.start, opening.end)
        await self._wait_until_idle(opening.session_id)
        session, cached = self.sessions.open(
            opening.session_id,
            opening.start,
            opening.end,
            opening.max_length,
            opening.prefix_hashes,
            lambda: new_cache(self.span),
        )
        self.active_streams += 1
        try:
            yield make_response(SessionOpened(cached_tokens=cached))
            steps = 0
            while True:
                try:
                    request = await asyncio.wait_for(anext(requests), STEP_TIMEOUT_S)
                except StopAsyncIteration:
                    return
                step = decode(Step, request.metadata)
                hidden = self._one_tensor(request)
                tokens = hidden.shape[1]
                self.sessions.begin_step(
                    session, step.position, tokens, step.new_hashes, first=steps == 0
                )
                out = await self._run(
                    forward_span,
                    self.span,
                    hidden,
                    session.cache,
                    start=session.start,
                    end=session.end,
                )
                self.sessions.end_step(session, tokens)
                steps += 1
                yield make_response(StepDone(position=session.position), out)
        finally:
            self.active_streams -= 1
            self.sessions.release(session)
            async with self._released:
                self._released.notify_all()

    async def _wait_until_idle(self, session_id: str) -> None:
        """A conversation's next turn can arrive before its last stream's end is processed
        here; give that stream a moment to finish rather than forking a cold cache."""
        # Still busy after that: a concurrent request, which gets a fork.
        async with self._released:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._released.wait_for(lambda: not self.sessions.in_use(session_id)),
                    BUSY_WAIT_S,
                )

    async def rpc_forward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        forward = decode(Forward, request.metadata)
        self._check_range(forward.start, forward.end)
        hidden = self._one_tensor(request)
        out = await self._run(
            forward_span, self.span, hidden, None, start=forward.start, end=forward.end
        )
        return make_response(forward, out)

    async def rpc_info(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        return make_response(self._info())

    async def _run(
        self, fn: Callable[..., torch.Tensor], *args: object, **kwargs: object
    ) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._compute, lambda: fn(*args, **kwargs))

    def _check_range(self, start: int, end: int) -> None:
        if not self.span.start <= start < end <= self.span.end:
            held = f"{self.span.start}:{self.span.end}"
            raise InvalidRequest(f"blocks {start}:{end} requested, this server holds {held}")

    def _one_tensor(self, request: runtime_pb2.ExpertRequest) -> torch.Tensor:
        tensors = read_tensors(request)
        if len(tensors) != 1:
            raise ProtocolMismatch(f"expected 1 tensor, got {len(tensors)}")
        hidden = tensors[0]
        hidden_size = self.span.config.hidden_size
        if hidden.ndim != 3 or hidden.shape[-1] != hidden_size or not hidden.is_floating_point():
            raise InvalidRequest(
                f"hidden states must be float [batch, n, {hidden_size}], got "
                f"{hidden.dtype} {list(hidden.shape)}"
            )
        if not 0 < hidden.shape[1] <= self._max_tokens:
            raise InvalidRequest(
                f"{hidden.shape[1]} tokens in one message (max {self._max_tokens})"
            )
        return hidden
