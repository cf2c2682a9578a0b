"""The step protocol with one server of the chain: open the session, step it, and nothing
the server sends back is used before it is checked. The stream under it, which stays failed
once broken and is watched for a hung server, is ``client.hop_connection``.

Every way a hop can fail surfaces as a ``SwarmError`` naming the peer, so the chain above
can route around it: ``CapacityExceeded`` for "full or draining, try a replica",
``PeerUnavailable`` (and ``BadReply``) or ``ProtocolMismatch`` for "broken, ban it".

A step is either one call (``step``: send the input, read the output) or, when servers push
to each other, split in two: ``begin`` sends it (with its input, or awaiting it by push),
``relay`` sends the input later if its push failed, ``finish`` reads the answer. Either way
it is one protocol: the same message (``_request``) and the same checks of the answer
(``_check``). A pushed step's acknowledgement need not be read before the next step is sent:
once the hop it pushed to has answered, the push evidently got through
(``finish(successor=...)``), and the acknowledgement is checked when the next answer is read.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from client.hop_connection import NO_DELAY, OPEN_TIMEOUT_S, HopConnection, Watch
from protocol.codec import make_request, read_tensors
from protocol.errors import BadReply, SwarmError
from protocol.latency import SimulatedLink
from protocol.prefix import BLOCK_TOKENS, TokenHistory
from protocol.rpc import (
    PUSH_TIMEOUT_S,
    OpenSession,
    PushTarget,
    Relay,
    SessionOpened,
    Step,
    StepDone,
    decode_reply,
)
from routing.planner import Hop


def check_hidden(tensor: torch.Tensor, shape: torch.Size, peer_id: str) -> torch.Tensor:
    """A server's hidden states, if usable: fp32, the shape that was sent, all finite.

    A NaN from a broken server would otherwise become token 0 (argmax of NaNs) or a 500.
    """
    if tensor.dtype != torch.float32 or tensor.shape != shape:
        raise BadReply(
            f"{peer_id} returned {tensor.dtype} {list(tensor.shape)}, expected float32 "
            f"{list(shape)}",
            peer_id,
        )
    if not bool(torch.isfinite(tensor).all()):
        raise BadReply(f"{peer_id} returned non-finite hidden states", peer_id)
    return tensor


@dataclass
class _Pending:
    """A step sent by ``begin`` whose answer has not been read yet."""

    shape: torch.Size  # of its input and output, [1, n, H]
    end: int  # the position after it
    has_input: bool  # sent with it or relayed since; else it waits for a push
    pushes: bool  # told to push its output onward
    began: float
    done: bool = False  # known to have pushed: its acknowledgement is read later


def check_cached(cached: int, prefix_hashes: Sequence[str], peer_id: str, resumed: int = 0) -> int:
    """A server cannot hold more of a prompt than the blocks it was told about, or the
    whole history of the conversation it was asked to resume."""
    if not 0 <= cached <= max(len(prefix_hashes) * BLOCK_TOKENS, resumed):
        raise BadReply(f"{peer_id} claims {cached} cached tokens", peer_id)
    return cached


class HopStream(HopConnection):
    """The step protocol with one server of the chain, over its stream (``HopConnection``).

    ``position``: tokens this server's session holds (and the next step starts at).
    ``deadline_s(tokens)``: how long the server may take to answer a step of that many
    tokens before it counts as failed (derived from its advertised throughput).
    ``link``: a simulated network delay on every message of the stream (benchmarks only,
    injected by whoever starts the process; none by default).
    ``watch``: past a step's soft deadline (``Watch.suspect_after_s``) the hop is probed,
    and a hop that leaves the probe unanswered fails at once as hung, long before the hard
    deadline ``deadline_s``; None: the hard deadline alone.
    """

    def __init__(
        self,
        p2p: P2P,
        hop: Hop,
        chunk_tokens: int,
        deadline_s: Callable[[int], float],
        on_close: Callable[[], None] = lambda: None,
        on_step: Callable[[float], None] = lambda seconds: None,
        link: SimulatedLink = NO_DELAY,
        watch: Watch | None = None,
    ) -> None:
        super().__init__(p2p, hop.peer_id, link, watch, on_close)
        self.hop = hop
        self._on_step = on_step  # the seconds each completed step took
        self._chunk_tokens = chunk_tokens
        self._deadline_s = deadline_s
        self.position = 0
        self.open_rtt_s = 0.0  # the opening round trip: no compute, mostly network
        self._push_token: str | None = None  # accepted by the server: it takes pushes
        self._unanswered: deque[_Pending] = deque()  # begun steps, oldest first

    @property
    def chunk_tokens(self) -> int:
        """The most tokens one step message may carry."""
        return self._chunk_tokens

    @property
    def push_target(self) -> PushTarget | None:
        """Where the previous hop may push this hop's inputs; None: relay them."""
        if self._push_token is None:
            return None
        return PushTarget(peer_id=self.peer_id, token=self._push_token)

    @property
    def _current(self) -> _Pending | None:
        """The step begun and not finished, if any."""
        if self._unanswered and not self._unanswered[-1].done:
            return self._unanswered[-1]
        return None

    @property
    def pending(self) -> bool:
        """A step was begun and not finished."""
        return self._current is not None

    @property
    def awaits_input(self) -> bool:
        """The pending step has no input yet: it waits for a push (or a relay)."""
        current = self._current
        return current is not None and not current.has_input

    async def open(self, opening: OpenSession) -> int:
        """Open the session; how many of ``opening.prefix_hashes``' tokens the server holds."""
        began = time.monotonic()
        await self._dial()
        reply = await self._exchange(make_request(opening), OPEN_TIMEOUT_S)
        self.open_rtt_s = time.monotonic() - began
        opened = decode_reply(SessionOpened, reply.metadata, self.peer_id)
        if opened.push and opening.push_token is not None:
            self._push_token = opening.push_token
        cached = opened.cached_tokens
        return check_cached(cached, opening.prefix_hashes, self.peer_id, opening.resume_length)

    async def step(self, hidden: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        """hidden: [1, n, H] for positions ``position ..`` → this hop's output, same shape.
        ``history``: the whole history, these tokens included."""
        self._streams()  # a broken stream says so first
        if self.pending:
            raise RuntimeError(f"a step of {self.peer_id} is still pending")
        await self._settle()
        began = time.monotonic()
        outputs = []
        for chunk in torch.split(hidden, self._chunk_tokens, dim=1):
            request, end = self._request(chunk.shape, history, chunk)
            reply = await self._exchange(
                request, self._deadline_s(chunk.shape[1]), tokens=chunk.shape[1]
            )
            pending = _Pending(chunk.shape, end, has_input=True, pushes=False, began=began)
            out = self._check(pending, reply)
            assert out is not None, "a step that does not push answers with its output"
            outputs.append(out)
            self.position = end
        self._observe(time.monotonic() - began, hidden.shape[1])
        return torch.cat(outputs, dim=1)

    async def begin(
        self,
        shape: torch.Size,
        history: TokenHistory,
        hidden: torch.Tensor | None = None,
        push_to: PushTarget | None = None,
    ) -> None:
        """Send a step of ``shape`` [1, n, H] at ``position``, one message's worth: with
        its input ``hidden``, or (None) awaiting it by push. ``push_to``: the next hop,
        which then gets the output instead of us (if the push works). ``finish`` reads the
        answer; until then no other step may begin."""
        self._streams()  # a broken stream says so first
        if self.pending:
            raise RuntimeError(f"a step of {self.peer_id} is still pending")
        if hidden is not None and hidden.shape != shape:
            raise ValueError(f"an input of {list(hidden.shape)} for a step of {list(shape)}")
        request, end = self._request(shape, history, hidden, push_to)
        began = time.monotonic()
        self._read_ahead()
        await self._send(request)
        pending = _Pending(shape, end, hidden is not None, push_to is not None, began)
        self._unanswered.append(pending)

    async def relay(self, hidden: torch.Tensor) -> None:
        """The pending step's input [1, n, H], which the previous hop could not push."""
        current = self._current
        if current is None or current.has_input or hidden.shape != current.shape:
            raise RuntimeError(f"no step of {self.peer_id} awaits an input of this shape")
        await self._send(make_request(Relay(relay=True, position=self.position), hidden))
        current.has_input = True

    async def finish(self, successor: HopStream | None = None) -> torch.Tensor | None:
        """The pending step's output [1, n, H], or None if it went to the next hop.

        ``successor``: the hop this step pushes to, while its step waits for that push.
        Should it answer first (and not with an error), our push got through: None at once,
        our acknowledgement is checked when our next answer is read."""
        current = self._current
        if current is None:
            raise RuntimeError(f"no step of {self.peer_id} is pending")
        self._streams()  # found hung meanwhile (by a probe): fail now, not at a deadline
        # Its deadline runs from now: a step awaiting a push had no input until the hop
        # before it answered, which the chain reads first.
        timeout_s = self._deadline_s(current.shape[1]) + self._link.rtt_s
        if current.pushes:
            timeout_s += PUSH_TIMEOUT_S

        async def answer() -> runtime_pb2.ExpertResponse | None:
            if successor is not None and current.pushes and await self._outrun_by(successor):
                return None
            await self._settle(keep=1)
            return await self._next_reply()

        watched = successor if successor is not None and current.pushes else None
        with self._failures(timeout_s):
            reply = await self._watched(answer(), timeout_s, current.shape[1], also=watched)
        if reply is None:
            current.done = True
            self._stepped(current)
            return None
        self._unanswered.popleft()
        return self._answer(current, reply)

    def _request(
        self,
        shape: torch.Size,
        history: TokenHistory,
        hidden: torch.Tensor | None,
        push_to: PushTarget | None = None,
    ) -> tuple[runtime_pb2.ExpertRequest, int]:
        """The message of a step of ``shape`` [1, n, H] at ``position`` (with its input
        ``hidden``, or None: awaiting it by push), and the position after it. Every step,
        whether ``step`` or ``begin`` sends it, is built here and checked by ``_check``."""
        end = self.position + shape[1]
        step = Step(
            position=self.position,
            # The server keeps the hashes of the blocks it holds: those this step completes.
            new_hashes=list(history.hashes[self.position // BLOCK_TOKENS : end // BLOCK_TOKENS]),
            digest=history.digest(end),
            input_tokens=shape[1] if hidden is None else 0,
            push_to=push_to,
        )
        request = make_request(step) if hidden is None else make_request(step, hidden)
        return request, end

    def _answer(self, pending: _Pending, reply: runtime_pb2.ExpertResponse) -> torch.Tensor | None:
        """What a begun step's answer says: its output, or None if it pushed it."""
        out = self._check(pending, reply)
        if not pending.done:
            self._stepped(pending)
        return out

    def _check(self, pending: _Pending, reply: runtime_pb2.ExpertResponse) -> torch.Tensor | None:
        """A step's answer, checked against what was sent: its output, or None if it
        pushed it (only a step told to push may say so, and then with no tensor)."""
        done = decode_reply(StepDone, reply.metadata, self.peer_id)
        if done.position != pending.end:
            raise BadReply(
                f"{self.peer_id} is at {done.position}, expected {pending.end}", self.peer_id
            )
        out = None
        if done.pushed:
            if not pending.pushes or reply.tensors:
                raise BadReply(f"{self.peer_id} says it pushed what it was not told", self.peer_id)
        elif pending.done:
            raise BadReply(f"{self.peer_id} answered a step it had pushed", self.peer_id)
        else:
            out = self._output(reply, pending.shape)
        return out

    def _stepped(self, pending: _Pending) -> None:
        self.position = pending.end
        self._observe(time.monotonic() - pending.began, pending.shape[1])

    def _observe(self, seconds: float, tokens: int) -> None:
        self._on_step(seconds)
        if self._watch is not None:
            self._watch.stepped(self.peer_id, seconds, tokens)

    async def _outrun_by(self, successor: HopStream) -> bool:
        """Wait until our answer or ``successor``'s is there; whether the successor's came
        first and says its step is done (so it took our push: nothing else could feed it)."""
        mine = asyncio.ensure_future(self._ready(len(self._unanswered)))
        theirs = asyncio.ensure_future(successor._ready(len(successor._unanswered)))
        try:
            while True:
                await asyncio.wait({mine, theirs}, return_when=asyncio.FIRST_COMPLETED)
                if mine.done():
                    return False
                if successor._answers_ok(theirs.result()):
                    return True
                await mine  # it failed: ours decides
                return False
        finally:
            mine.cancel()
            theirs.cancel()

    def _answers_ok(self, reply: runtime_pb2.ExpertResponse | None) -> bool:
        current = self._current
        if reply is None or current is None:
            return False
        try:
            done = decode_reply(StepDone, reply.metadata, self.peer_id)
        except SwarmError:
            return False
        return done.position == current.end

    async def _settle(self, keep: int = 0) -> None:
        """Read the acknowledgements of pushed steps, leaving the ``keep`` newest steps."""
        while len(self._unanswered) > keep:
            pending = self._unanswered[0]
            timeout_s = self._deadline_s(pending.shape[1]) + PUSH_TIMEOUT_S + self._link.rtt_s
            with self._failures(timeout_s):
                reply = await self._watched(self._next_reply(), timeout_s, pending.shape[1])
            self._unanswered.popleft()
            self._answer(pending, reply)

    def _output(self, reply: runtime_pb2.ExpertResponse, shape: torch.Size) -> torch.Tensor:
        tensors = read_tensors(reply)
        if len(tensors) != 1:
            raise BadReply(f"{self.peer_id} returned {len(tensors)} tensors", self.peer_id)
        return check_hidden(tensors[0], shape, self.peer_id)
