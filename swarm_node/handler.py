"""RPC handlers of a block server: decode and validate messages, delegate compute.

Compute runs on one worker thread, fed by the step scheduler, which batches the steps of
every open stream; the event loop (P2P, announcements) stays responsive while torch works.
Steps may take their inputs from, and send their outputs to, the chain's other servers
directly (``rpc_push``, see ``swarm_node/push.py``).
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
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from models.loading import Span, block_linears
from protocol.codec import (
    make_response,
    read_pieces,
    read_tensor,
    read_tensors,
    response_pieces,
)
from protocol.errors import (
    CapacityExceeded,
    InvalidRequest,
    NotAMember,
    ProtocolMismatch,
    RequestError,
    SwarmError,
)
from protocol.latency import SimulatedLink
from protocol.logs import request_id
from protocol.membership import Membership, PassChecker
from protocol.rpc import (
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    RPC_TRAIN_BACKWARD,
    RPC_TRAIN_FORWARD,
    InfoRequest,
    OpenSession,
    Push,
    PushAccepted,
    PushItem,
    Relay,
    RpcError,
    ServerInfo,
    SessionOpened,
    Step,
    StepDone,
    TrainCall,
    TrainDone,
    decode,
    decode_stream_message,
    max_tokens_per_message,
)
from protocol.swarm import PROTOCOL_VERSION
from swarm_node.backend import new_session_kv
from swarm_node.batching import BatchObserver, StepScheduler
from swarm_node.bounded_streams import BoundedStreams, Caller
from swarm_node.kv_cache import CachedSession, SessionStore
from swarm_node.push import Inbox, PushBoard, PushCall, Pusher
from swarm_node.session_kv import SessionKV
from swarm_node.training import (
    MAX_TRAIN_TOKENS,
    MAX_TRAIN_VALUES,
    LoraCall,
    train_backward,
    train_forward,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

OPEN_TIMEOUT_S = 30.0  # a stream that never says which session it is gets dropped
STEP_TIMEOUT_S = 90.0  # an idle stream holds its session's reservation at most this long
# A step waits this long for its input by push or relay; longer than a gateway's recovery
# of a failed hop before it (60 s), which ends with a relay.
INPUT_WAIT_S = 90.0
MAX_STREAMS_PER_PEER = 256  # one gateway's concurrent sessions here, replays included
BUSY_WAIT_S = 2.0  # how long an open waits for the session's previous stream to end
# Training calls in progress here (reading, waiting for or using the compute thread): each
# holds its tensors in memory until it is done, so their number is bounded.
MAX_TRAIN_CALLS = 4
TRAIN_READ_TIMEOUT_S = 60.0  # a call's header and tensors must arrive within this


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
        members: Membership | None = None,
        observe_step: Callable[[int, float], None] = lambda tokens, seconds: None,
        observe_batch: BatchObserver = lambda segments, tokens: None,
        prefill_chunk: int | None = None,
        member_pass: Callable[[], str] = lambda: "",  # this server's own, shown when pushing
        link: SimulatedLink = SimulatedLink(),  # noqa: B008 (frozen: shared safely)
        input_wait_s: float = INPUT_WAIT_S,
        adapters: frozenset[str] = frozenset(),  # LoRA adapters attached to the span
    ) -> None:
        self.span = span
        self.adapters = adapters
        self._member_pass = member_pass
        self._link = link
        self._input_wait_s = input_wait_s
        self.pushes = PushBoard(span.config.hidden_size)
        self.pusher: Pusher | None = None  # set by register(): None sends no pushes
        # None: an open swarm, everyone may call
        self._members = PassChecker(members) if members is not None else None
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
        self._linears = block_linears(span.config)  # what LoRA may target
        self._training = 0  # training calls in progress
        self._released = asyncio.Condition()
        self._streams = BoundedStreams()

    async def register(self, p2p: P2P) -> None:
        """Streams are read through ``swarm_node.bounded_streams`` (bounded frames, a
        deadline for the first, a cap on callers without a pass); the unary calls come
        through the daemon, which caps them at its message size."""
        Request = runtime_pb2.ExpertRequest
        await self._streams.add(p2p, RPC_INFERENCE, self.rpc_inference)
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, Request)
        await p2p.add_protobuf_handler(RPC_PUSH, self.rpc_push, Request)
        await self._streams.add(p2p, RPC_TRAIN_FORWARD, self.rpc_train_forward)
        await self._streams.add(p2p, RPC_TRAIN_BACKWARD, self.rpc_train_backward)
        self.pusher = Pusher(self._push_call(p2p), self._member_pass, self._link)

    async def unregister(self, p2p: P2P) -> None:
        self.pusher = None
        await p2p.remove_binary_stream_handler(RPC_INFERENCE)
        await p2p.remove_protobuf_handler(RPC_INFO)
        await p2p.remove_protobuf_handler(RPC_PUSH)
        for name in (RPC_TRAIN_FORWARD, RPC_TRAIN_BACKWARD):
            await p2p.remove_binary_stream_handler(name)

    def _push_call(self, p2p: P2P) -> PushCall:
        async def call(
            peer_id: str, request: runtime_pb2.ExpertRequest
        ) -> runtime_pb2.ExpertResponse:
            if peer_id == p2p.peer_id.to_base58():  # the next hop is this server too
                return await self.rpc_push(request, SimpleNamespace(remote_id=peer_id))
            peer = PeerID.from_base58(peer_id)
            response_type = runtime_pb2.ExpertResponse
            return await p2p.call_protobuf_handler(peer, RPC_PUSH, request, response_type)

        return call

    def shutdown(self) -> None:
        self._scheduler.close()
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: Caller | None
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One session's stream. Refusals and failures are answered with a typed ``RpcError``
        and end the stream; the session's state after any of them is consistent."""
        caller = str(context.remote_id) if context is not None else ""
        try:
            if self._streams_of[caller] >= MAX_STREAMS_PER_PEER:
                raise CapacityExceeded(f"{MAX_STREAMS_PER_PEER} streams from one peer at most")
            opening = await self._read_opening(requests, caller)
            if context is not None:
                context.admitted()  # a member: its stream no longer counts as a stranger's
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
                adapter=opening.adapter,
                caller=caller,  # seeded only from what this same peer wrote (see find_prefix)
            )
            session.cache.limit = opening.max_length  # its buffers grow no further
        except (SwarmError, RequestError) as e:
            yield make_response(RpcError.of(e))
            return
        self.active_streams += 1
        self._streams_of[caller] += 1
        began, computed = time.monotonic(), 0
        reader = _Requests(requests)
        token = opening.push_token
        inbox = self.pushes.open(token) if token is not None else None
        try:
            if cached == 0 and session.position == 0:
                cached = await self._seed(session, opening.prefix_hashes)
            yield make_response(SessionOpened(cached_tokens=cached, push=inbox is not None))
            first = True
            while (request := await reader.next(STEP_TIMEOUT_S)) is not None:
                try:
                    message = decode_stream_message(request.metadata)
                    if isinstance(message, Relay):
                        continue  # its step took the push first: exactly one input per step
                    step = message
                    hidden, hashes = await self._input(session, step, request, reader, inbox)
                    if hidden is None:
                        return  # the gateway closed the stream while the step waited
                    out = await self._step(session, step, hidden, hashes, first)
                    pushed = await self._push(step, out)
                except (SwarmError, RequestError) as e:
                    yield make_response(RpcError.of(e))
                    return
                except Exception as e:
                    logger.exception("a step of session %s failed", session.key)
                    yield make_response(RpcError.of(e))
                    return
                first = False
                computed += hidden.shape[1]
                done = StepDone(position=session.position, pushed=pushed)
                yield make_response(done) if pushed else make_response(done, out)
        finally:
            reader.close()
            if inbox is not None and token is not None:
                self.pushes.close(token, inbox)
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

    async def _input(
        self,
        session: CachedSession,
        step: Step,
        request: runtime_pb2.ExpertRequest,
        reader: _Requests,
        inbox: Inbox | None,
    ) -> tuple[torch.Tensor | None, list[str]]:
        """A step's input [1, n, H] (None: the stream ended while it waited) and the block
        hashes it completes; checked before it waits, so a bad step fails at once."""
        if not step.input_tokens:
            hidden = self._one_tensor(request)
            return hidden, self.sessions.check_step(
                session, step.position, hidden.shape[1], step.new_hashes
            )
        if inbox is None:
            raise InvalidRequest("this stream takes no pushes (it was opened without a token)")
        if request.tensors:
            raise ProtocolMismatch("a step awaiting its input by push carries a tensor")
        if step.input_tokens > self._max_tokens:
            raise InvalidRequest(f"{step.input_tokens} tokens in one step (max {self._max_tokens})")
        hashes = self.sessions.check_step(
            session, step.position, step.input_tokens, step.new_hashes
        )
        return await self._receive(step, reader, inbox), hashes

    async def _receive(self, step: Step, reader: _Requests, inbox: Inbox) -> torch.Tensor | None:
        """Wait for the step's input: the previous hop's push or the gateway's relay,
        whichever comes first, within ``input_wait_s``."""
        arrived = inbox.expect(step.position, step.input_tokens, step.digest)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._input_wait_s
        try:
            while not arrived.done():
                left = deadline - loop.time()
                if left <= 0:
                    raise InvalidRequest(
                        f"the input of the step at {step.position} came neither by push nor "
                        f"by relay within {self._input_wait_s:g} s"
                    )
                if not await reader.wait(left, arrived):
                    continue
                request = reader.take()
                if request is None:
                    return None
                message = decode_stream_message(request.metadata)
                if not isinstance(message, Relay):
                    raise ProtocolMismatch("a step came while the last one awaits its input")
                inbox.relay(message.position, self._one_tensor(request))
            return arrived.result()
        finally:
            inbox.settle()

    async def _push(self, step: Step, out: torch.Tensor) -> bool:
        """Whether the step's output went to the next hop (else it goes to the gateway)."""
        if step.push_to is None or self.pusher is None:
            return False
        return await self.pusher.push(step.push_to, step.position, step.digest, out)

    async def rpc_push(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Another server's outputs, each the input of a step of one of our streams: each
        accepted once its step took it, or refused on its own. Members only; every input
        is checked against its step before compute."""
        try:
            push = decode(Push, request.metadata)
            if push.version != PROTOCOL_VERSION:
                raise ProtocolMismatch(
                    f"protocol version {push.version}, this server speaks {PROTOCOL_VERSION}"
                )
            self._check_member(push.member_pass, str(context.remote_id))
            if len(request.tensors) != len(push.items):
                raise ProtocolMismatch(
                    f"{len(push.items)} pushed steps came with {len(request.tensors)} tensors"
                )
        except (SwarmError, RequestError) as e:
            return make_response(RpcError.of(e))
        refused = await asyncio.gather(
            *(
                self._take_push(item, tensor)
                for item, tensor in zip(push.items, request.tensors, strict=True)
            )
        )
        return make_response(PushAccepted(refused=refused))

    async def _take_push(self, item: PushItem, tensor: runtime_pb2.Tensor) -> RpcError | None:
        """Why the step of ``item`` refused its input, None once it took it."""
        try:
            hidden = self._hidden_of(read_tensor(tensor))
            await self.pushes.deliver(item.token, item.position, item.digest, hidden)
        except (SwarmError, RequestError) as e:
            return RpcError.of(e)
        return None

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
        if opening.adapter is not None and opening.adapter not in self.adapters:
            # Routed here from a stale record: another server may serve it.
            raise ProtocolMismatch(f"this server does not serve the adapter {opening.adapter!r}")
        if opening.max_length > self._max_length:
            raise InvalidRequest(
                f"max_length {opening.max_length} exceeds the model's {self._max_length}"
            )
        return opening

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
            out = await self._scheduler.step(
                session.cache, blocks, position, hidden, adapter=session.adapter
            )
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
        """A new session starts from the longest prefix another session of the same caller
        here holds (a conversation sharing a system prompt, say): copied, never shared, so
        neither conversation can crop or overwrite the other. How many tokens it starts
        with. Never another caller's: block hashes are that caller's unchecked word."""
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

    async def rpc_train_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: Caller | None
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A ``TrainCall`` and pieces of [hidden [B, n, H], LoRA tensors] → ``TrainDone``
        and pieces of the output [B, n, H]. Stateless: nothing stays here after it."""
        async for reply in self._train(requests, context, backward=False):
            yield reply

    async def rpc_train_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: Caller | None
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A ``TrainCall`` and pieces of [hidden, grad of the output (both [B, n, H]), LoRA
        tensors] → ``TrainDone`` and pieces of [grad of hidden (if ``input_grad``), grads of
        the LoRA tensors]. The forward is recomputed: nothing was kept from it."""
        async for reply in self._train(requests, context, backward=True):
            yield reply

    async def _train(
        self,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        context: Caller | None,
        *,
        backward: bool,
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        caller = str(context.remote_id) if context is not None else ""
        try:
            # The call's header, with the pass, first: a slot is taken by members only.
            call = await asyncio.wait_for(self._train_header(requests, caller), OPEN_TIMEOUT_S)
        except (SwarmError, RequestError) as e:
            yield make_response(RpcError.of(e))
            return
        except TimeoutError:
            error = InvalidRequest(f"no training call within {OPEN_TIMEOUT_S:g} s")
            yield make_response(RpcError.of(error))
            return
        if context is not None:
            context.admitted()
        if self._training >= MAX_TRAIN_CALLS:
            full = CapacityExceeded(f"{MAX_TRAIN_CALLS} training calls in progress here")
            yield make_response(RpcError.of(full))
            return
        self._training += 1
        try:
            try:
                pending = await asyncio.wait_for(
                    self._train_call(requests, call, backward), TRAIN_READ_TIMEOUT_S
                )
                # The timeout covers reading; compute waits its turn on the compute thread.
                outputs = await pending
            except (SwarmError, RequestError) as e:
                yield make_response(RpcError.of(e))
                return
            except TimeoutError:
                error = InvalidRequest(f"the call did not arrive within {TRAIN_READ_TIMEOUT_S:g} s")
                yield make_response(RpcError.of(error))
                return
            except Exception as e:
                logger.exception("a training call from %s failed", caller or "a local caller")
                yield make_response(RpcError.of(e))
                return
            yield make_response(TrainDone(values=sum(t.numel() for t in outputs)))
            for piece in response_pieces(outputs):
                yield piece
        finally:
            self._training -= 1

    async def _train_header(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], caller: str
    ) -> TrainCall:
        """A training stream's first message: the call, from a member."""
        first = await anext(requests, None)
        if first is None:
            raise ProtocolMismatch("a training stream without a call")
        call = decode(TrainCall, first.metadata)
        if call.version != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"protocol version {call.version}, this server speaks {PROTOCOL_VERSION}"
            )
        self._check_member(call.member_pass, caller)
        request_id.set(call.request_id)
        if first.tensors:
            raise ProtocolMismatch("a training call's header carries no tensors")
        return call

    async def _train_call(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], call: TrainCall, backward: bool
    ) -> asyncio.Future[list[torch.Tensor]]:
        """Check a call and read its tensors, then hand it to the compute thread: its
        result, to await."""
        if not self._accepting():
            raise CapacityExceeded("this server is draining and takes no training calls")
        lora = self._check_train_call(call)
        hidden_shape = (call.batch, call.length, self.span.config.hidden_size)
        shapes = [hidden_shape, *([hidden_shape] if backward else []), *lora.shapes(self._linears)]
        tensors = await read_pieces(requests, shapes)
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise InvalidRequest("a training call's tensors must be finite")
        loop = asyncio.get_running_loop()
        span, linears = self.span, self._linears
        if backward:
            hidden, grad, weights = tensors[0], tensors[1], tensors[2:]

            def run() -> list[torch.Tensor]:
                dx, grads = train_backward(
                    span, lora, linears, weights, hidden, grad, input_grad=call.input_grad
                )
                return grads if dx is None else [dx, *grads]

        else:
            hidden, weights = tensors[0], tensors[1:]

            def run() -> list[torch.Tensor]:
                return [train_forward(span, lora, linears, weights, hidden)]

        return loop.run_in_executor(self._compute, run)

    def _check_train_call(self, call: TrainCall) -> LoraCall:
        """Everything a call may cost, bounded before any tensor of it is read."""
        self._check_range(call.start, call.end)
        tokens = call.batch * call.length
        if tokens > MAX_TRAIN_TOKENS:
            raise InvalidRequest(f"{tokens} tokens in one training call (max {MAX_TRAIN_TOKENS})")
        if tokens * self.span.config.hidden_size > MAX_TRAIN_VALUES:
            raise InvalidRequest(
                f"{tokens} tokens of hidden states exceed {MAX_TRAIN_VALUES} values"
            )
        if call.length > self._max_length:
            raise InvalidRequest(f"length {call.length} exceeds the model's {self._max_length}")
        unknown = [t for t in call.lora.targets if t not in self._linears]
        if unknown:
            known = ", ".join(self._linears)
            raise InvalidRequest(f"no projection named {', '.join(unknown)} (known: {known})")
        spec = call.lora
        return LoraCall(call.start, call.end, spec.rank, spec.alpha, tuple(spec.targets))

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
        if self._members is not None and not self._members(member_pass, caller):
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
        return self._hidden_of(tensors[0])

    def _hidden_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """An input as every path takes it (a step's own tensor, a relay, a push): float32
        [1, n, H], all finite. A NaN or inf written into a session's cache would spoil
        every later step of it, and every session seeded from it."""
        hidden_size = self.span.config.hidden_size
        if (
            hidden.ndim != 3
            or hidden.shape[0] != 1
            or hidden.shape[-1] != hidden_size
            or hidden.dtype != torch.float32
        ):
            raise InvalidRequest(
                f"hidden states must be float32 [1, n, {hidden_size}], got "
                f"{hidden.dtype} {list(hidden.shape)}"
            )
        if not 0 < hidden.shape[1] <= self._max_tokens:
            raise InvalidRequest(
                f"{hidden.shape[1]} tokens in one message (max {self._max_tokens})"
            )
        if not bool(torch.isfinite(hidden).all()):
            raise InvalidRequest("non-finite hidden states")
        return hidden


class _Requests:
    """A stream's requests, read by a task that outlives a wait for something else (a
    push): cancelling a read of hivemind's request iterator would end the stream."""

    def __init__(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
        self._requests = requests
        self._reading: asyncio.Task[runtime_pb2.ExpertRequest | None] | None = None

    async def next(self, timeout_s: float) -> runtime_pb2.ExpertRequest | None:
        """The next request; None once the stream has ended; ``TimeoutError`` if none."""
        if not await self.wait(timeout_s):
            raise TimeoutError(f"no message for {timeout_s:g} s")
        return self.take()

    async def wait(self, timeout_s: float, *also: asyncio.Future[Any]) -> bool:
        """Wait until a request (or the end) can be taken, one of ``also`` is done, or
        ``timeout_s`` passed; whether a request can be taken."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        reading = self._reading
        await asyncio.wait({reading, *also}, timeout=timeout_s, return_when="FIRST_COMPLETED")
        return reading.done()

    def take(self) -> runtime_pb2.ExpertRequest | None:
        reading, self._reading = self._reading, None
        assert reading is not None and reading.done(), "take() only after wait() said so"
        return reading.result()

    def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()

    async def _read(self) -> runtime_pb2.ExpertRequest | None:
        try:
            return await anext(self._requests)
        except StopAsyncIteration:
            return None
