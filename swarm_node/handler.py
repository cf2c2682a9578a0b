"""RPC handlers of a block server: decode and validate messages, delegate compute.

Compute runs on one worker thread, fed by the step scheduler, which batches the steps of
every open stream; the event loop (P2P, announcements) stays responsive while torch works.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from models.loading import Span
from protocol.codec import make_response, read_tensors
from protocol.errors import (
    CapacityExceeded,
    InvalidRequest,
    NotAMember,
    ProtocolMismatch,
    RequestError,
    SwarmError,
)
from protocol.logs import request_id
from protocol.membership import SwarmKey, check_pass
from protocol.rpc import (
    RPC_INFERENCE,
    RPC_INFO,
    InfoRequest,
    OpenSession,
    RpcError,
    ServerInfo,
    SessionOpened,
    Step,
    StepDone,
    decode,
    max_tokens_per_message,
)
from protocol.swarm import PROTOCOL_VERSION
from swarm_node.backend import new_session_kv
from swarm_node.batching import BatchObserver, StepScheduler
from swarm_node.kv_cache import CachedSession, SessionStore
from swarm_node.session_kv import SessionKV

logger = logging.getLogger(__name__)
T = TypeVar("T")

OPEN_TIMEOUT_S = 30.0  # a stream that never says which session it is gets dropped
STEP_TIMEOUT_S = 90.0  # an idle stream holds its session's reservation at most this long
MAX_STREAMS_PER_PEER = 256  # one gateway's concurrent sessions here, replays included
BUSY_WAIT_S = 2.0  # how long an open waits for the session's previous stream to end


def session_key(session_id: str, secret: str) -> str:
    """Where a session's cache is kept: neither the id nor the secret alone finds it, and the
    secret itself is never stored."""
    return hashlib.sha256(f"{session_id}\0{secret}".encode()).hexdigest()


def _copy_prefix(donor: SessionKV, version: int, kv: SessionKV, tokens: int) -> bool:
    """Copy ``donor``'s prefix unless a step queued before the copy rewrote it (run on the
    compute thread, in order with every forward)."""
    if donor.version != version or donor.length < tokens:
        return False
    kv.copy_prefix(donor, tokens)
    return True


class BlockHandler:
    def __init__(
        self,
        span: Span,
        sessions: SessionStore,
        info: Callable[[], ServerInfo],
        accepting: Callable[[], bool] = lambda: True,
        members: SwarmKey | None = None,
        observe_step: Callable[[int, float], None] = lambda tokens, seconds: None,
        observe_batch: BatchObserver = lambda segments, tokens: None,
        prefill_chunk: int | None = None,
    ) -> None:
        self.span = span
        self._members = members  # None: an open swarm, everyone may call
        self._refused: set[str] = set()
        self._observe_step = observe_step  # (tokens, seconds) of each completed step
        self.sessions = sessions
        self._info = info
        self._accepting = accepting  # False while draining: running streams go on, new ones wait
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="span-compute")
        chunk = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}
        self._scheduler = StepScheduler(
            span,
            self._compute,
            observe_batch=observe_batch,
            open_streams=lambda: self.active_streams,
            **chunk,
        )
        self._max_tokens = max_tokens_per_message(span.config.hidden_size)
        self._max_length = span.config.max_position_embeddings
        self.active_streams = 0
        self._streams_of: Counter[str] = Counter()  # open streams per calling peer
        self._released = asyncio.Condition()

    async def register(self, p2p: P2P) -> None:
        Request = runtime_pb2.ExpertRequest
        await p2p.add_protobuf_handler(
            RPC_INFERENCE, self.rpc_inference, Request, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, Request)

    async def unregister(self, p2p: P2P) -> None:
        await p2p.remove_protobuf_handler(RPC_INFERENCE, stream_input=True, stream_output=True)
        await p2p.remove_protobuf_handler(RPC_INFO)

    def shutdown(self) -> None:
        self._scheduler.close()
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One session's stream. Refusals and failures are answered with a typed ``RpcError``
        and end the stream; the session's state after any of them is consistent."""
        caller = str(context.remote_id) if context is not None else ""
        try:
            if self._streams_of[caller] >= MAX_STREAMS_PER_PEER:
                raise CapacityExceeded(f"{MAX_STREAMS_PER_PEER} streams from one peer at most")
            opening = await self._read_opening(requests, caller)
            request_id.set(opening.request_id)  # this stream's task: its log lines carry it
            key = session_key(opening.session_id, opening.secret)
            await self._wait_until_idle(key)
            session, cached = self.sessions.open(
                key,
                opening.start,
                opening.end,
                opening.max_length,
                opening.prefix_hashes,
                lambda: new_session_kv(self.span, opening.start, opening.end),
                keep=opening.keep,
                resume=(opening.resume_length, opening.resume_digest),
            )
            session.cache.limit = opening.max_length  # its buffers grow no further
        except (SwarmError, RequestError) as e:
            yield make_response(RpcError.of(e))
            return
        self.active_streams += 1
        self._streams_of[caller] += 1
        began, computed = time.monotonic(), 0
        try:
            if cached == 0 and session.position == 0:
                cached = await self._seed(session, opening.prefix_hashes)
            yield make_response(SessionOpened(cached_tokens=cached))
            first = True
            while (request := await self._next(requests)) is not None:
                try:
                    step = decode(Step, request.metadata)
                    hidden = self._one_tensor(request)
                    hashes = self.sessions.check_step(
                        session, step.position, hidden.shape[1], step.new_hashes
                    )
                    out = await self._step(session, step, hidden, hashes, first)
                except (SwarmError, RequestError) as e:
                    yield make_response(RpcError.of(e))
                    return
                except Exception as e:
                    logger.exception("a step of session %s failed", session.key)
                    yield make_response(RpcError.of(e))
                    return
                first = False
                computed += hidden.shape[1]
                yield make_response(StepDone(position=session.position), out)
        finally:
            # One line per stream, like an access log: with --log-format json and the
            # request id, a request can be followed across every server it touched.
            logger.info(
                "stream of %s closed: blocks %d:%d, %d cached and %d computed tokens, %.2f s",
                caller or "a local caller",
                session.start,
                session.end,
                cached,
                computed,
                time.monotonic() - began,
            )
            self.active_streams -= 1
            self._streams_of[caller] -= 1
            if not self._streams_of[caller]:
                del self._streams_of[caller]
            self.sessions.release(session)
            async with self._released:
                self._released.notify_all()

    async def _read_opening(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], caller: str
    ) -> OpenSession:
        first = await asyncio.wait_for(anext(requests), OPEN_TIMEOUT_S)
        opening = decode(OpenSession, first.metadata)
        if opening.version != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"protocol version {opening.version}, this server speaks {PROTOCOL_VERSION}"
            )
        self._check_member(opening.member_pass, caller)
        if not self._accepting():
            raise CapacityExceeded("this server is draining and takes no new sessions")
        self._check_range(opening.start, opening.end)
        if opening.max_length > self._max_length:
            raise InvalidRequest(
                f"max_length {opening.max_length} exceeds the model's {self._max_length}"
            )
        return opening

    @staticmethod
    async def _next(
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
    ) -> runtime_pb2.ExpertRequest | None:
        try:
            return await asyncio.wait_for(anext(requests), STEP_TIMEOUT_S)
        except StopAsyncIteration:
            return None

    async def _step(
        self,
        session: CachedSession,
        step: Step,
        hidden: torch.Tensor,
        hashes: list[str],
        first: bool,
    ) -> torch.Tensor:
        """All or nothing: the session records the step only once its forward completed."""
        position = step.position
        began = time.perf_counter()
        if position < session.position:
            # An edited or regenerated turn: what follows ``position`` is gone from now on,
            # so no new session is seeded from it while this step waits or runs.
            self.sessions.truncate(session, position)
            session.cache.crop(position)
        try:
            blocks = (session.start, session.end)
            out = await self._scheduler.step(session.cache, blocks, position, hidden)
        except BaseException:
            # Cancelled (the stream dropped) while the compute thread may still be writing
            # this cache, or the forward failed halfway: nobody may use this cache again.
            self.sessions.discard(session)
            raise
        self.sessions.commit_step(
            session, position, hidden.shape[1], hashes, first=first, digest=step.digest
        )
        self._observe_step(hidden.shape[1], time.perf_counter() - began)
        return out

    async def _seed(self, session: CachedSession, prefix_hashes: list[str]) -> int:
        """A new session starts from the longest prefix another session here holds (a
        conversation sharing a system prompt, say): copied, never shared, so neither
        conversation can crop or overwrite the other. How many tokens it starts with."""
        found = self.sessions.find_prefix(session, prefix_hashes)
        if found is None:
            return 0
        donor, tokens = found
        version = donor.cache.version
        try:
            copied = await self._run(_copy_prefix, donor.cache, version, session.cache, tokens)
        except BaseException:
            self.sessions.discard(session)  # the copy may be half done
            raise
        if not copied:
            return 0
        self.sessions.seed(session, donor, tokens)
        return tokens

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

    async def rpc_info(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        try:
            asked = decode(InfoRequest, request.metadata or b"{}")
            self._check_member(asked.member_pass, str(context.remote_id))
        except (SwarmError, RequestError) as e:
            return make_response(RpcError.of(e))
        return make_response(self._info())

    def _check_member(self, member_pass: str, caller: str) -> None:
        """In a closed swarm, refuse a caller without a pass for its own peer id."""
        if self._members is not None and not check_pass(self._members, member_pass, caller):
            if caller not in self._refused:  # once per peer: a stranger may keep trying
                if len(self._refused) >= 1024:
                    self._refused.clear()
                self._refused.add(caller)
                logger.warning("refused %s: it showed no valid pass of this swarm", caller)
            raise NotAMember("this server serves members of its swarm only")

    async def _run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
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
        if (
            hidden.ndim != 3
            or hidden.shape[0] != 1
            or hidden.shape[-1] != hidden_size
            or not hidden.is_floating_point()
        ):
            raise InvalidRequest(
                f"hidden states must be float [1, n, {hidden_size}], got "
                f"{hidden.dtype} {list(hidden.shape)}"
            )
        if not 0 < hidden.shape[1] <= self._max_tokens:
            raise InvalidRequest(
                f"{hidden.shape[1]} tokens in one message (max {self._max_tokens})"
            )
        return hidden
