"""Node-to-node push: a hop's output goes straight into the next hop's waiting step.

Receiving. A stream opened with a push token gets an ``Inbox``, found on the node's
``PushBoard`` by that token. Its step without a tensor (``input_tokens=n``) ``expect``s an
input; a ``Push`` from the previous hop (``rpc_push``) or a ``Relay`` from the gateway on
the stream delivers one, whichever comes first, exactly once: the other is refused (a push)
or dropped (a relay). Nothing reaches compute unless it matches the step the gateway
announced: position, history digest, float32 ``[1, n, hidden]``, all finite (a NaN pushed
by a broken hop is refused, so its sender answers the gateway with it and gets the blame).

A push may come before its step (the previous hop was quicker than the gateway's message
to this one): it waits for the step, at most ``EARLY_WAIT_S``, and at most
``MAX_EARLY_PUSHES`` per stream; the pusher hears "accepted" only once the step took it.

Sending. ``Pusher.push`` sends an output to the next hop and says whether it was accepted;
a push that fails in any way (unreachable, refused, too slow) is answered with the output
to the gateway instead, which relays it. The outputs of one forward for the same next hop
share one call, each accepted or refused on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
from hivemind.proto import runtime_pb2

from protocol.codec import make_request
from protocol.errors import CapacityExceeded, InvalidRequest, ProtocolMismatch
from protocol.latency import SimulatedLink
from protocol.rpc import (
    MAX_PUSH_ITEMS,
    MESSAGE_BUDGET_BYTES,
    PUSH_TIMEOUT_S,
    Push,
    PushAccepted,
    PushItem,
    PushTarget,
    decode_reply,
)

logger = logging.getLogger(__name__)

MAX_EARLY_PUSHES = 2  # pushes per stream that may wait for their steps
# How long one may wait. Its step is normally milliseconds behind (the gateway announces it
# as it sends the previous hop its input), and the reply to a push call waits for its
# slowest item, so one step that never comes must not hold the others' pushers for long:
# past this, the push is refused and the gateway relays that output instead.
EARLY_WAIT_S = 2.0

# (peer id, request) → the peer's reply to rpc_push
PushCall = Callable[[str, runtime_pb2.ExpertRequest], Awaitable[runtime_pb2.ExpertResponse]]


@dataclass(eq=False)
class _Awaited:
    position: int
    tokens: int
    digest: str
    input: asyncio.Future[torch.Tensor]


@dataclass(eq=False)
class _Early:
    digest: str
    hidden: torch.Tensor
    verdict: asyncio.Future[None]  # set once its step took it, or refused it


class Inbox:
    """The inputs of one stream's steps that come by push or relay; one step at a time."""

    def __init__(self, hidden_size: int, early_wait_s: float = EARLY_WAIT_S) -> None:
        self._hidden_size = hidden_size
        self._early_wait_s = early_wait_s
        self._awaited: _Awaited | None = None
        self._early: dict[int, _Early] = {}  # position → a push that came before its step
        self._last = -1  # the position of the last step that awaited its input
        self.closed = False

    @property
    def early(self) -> int:
        return len(self._early)

    def expect(self, position: int, tokens: int, digest: str) -> asyncio.Future[torch.Tensor]:
        """The step at ``position`` waits for its input of ``tokens`` tokens: the future it
        arrives in. A push that came early for this step is taken (or refused) now."""
        if self._awaited is not None:
            raise RuntimeError("the previous step was not settled")
        if self.closed:
            raise RuntimeError("the inbox is closed")
        awaited = _Awaited(position, tokens, digest, asyncio.get_running_loop().create_future())
        self._awaited, self._last = awaited, position
        for passed in [p for p in self._early if p < position]:
            self._refuse_early(passed, InvalidRequest(f"the step at {passed} has passed"))
        early = self._early.pop(position, None)
        if early is not None:
            try:
                self._check(awaited, early.hidden, early.digest)
            except InvalidRequest as e:
                early.verdict.set_exception(e)
            else:
                awaited.input.set_result(early.hidden)
                early.verdict.set_result(None)
        return awaited.input

    async def push(self, position: int, digest: str, hidden: torch.Tensor) -> None:
        """The previous hop's output for the step at ``position``: returns once that step
        took it, raises ``RequestError`` (or ``CapacityExceeded``) if refused."""
        if self.closed:
            raise InvalidRequest("the stream this push was for has closed")
        self._check_tensor(hidden)
        awaited = self._awaited
        if awaited is not None and awaited.position == position:
            if awaited.input.done():
                raise InvalidRequest(f"the step at {position} already has its input")
            self._check(awaited, hidden, digest)
            awaited.input.set_result(hidden)
            return
        if position <= self._last:
            raise InvalidRequest(f"the step at {position} has passed")
        if position in self._early:
            raise InvalidRequest(f"a push for the step at {position} is already waiting")
        if len(self._early) >= MAX_EARLY_PUSHES:
            raise CapacityExceeded(f"{MAX_EARLY_PUSHES} pushes already wait for their steps")
        await self._wait_for_step(position, _Early(digest, hidden, _future()))

    def relay(self, position: int, hidden: torch.Tensor) -> bool:
        """The gateway's relay of the input of the step at ``position``: whether that step
        took it. A stale relay (its step took a push first, or has passed) is dropped; a
        malformed one raises ``InvalidRequest``."""
        awaited = self._awaited
        if awaited is None or awaited.position != position or awaited.input.done():
            return False
        self._check_tensor(hidden)
        self._check(awaited, hidden)
        awaited.input.set_result(hidden)
        return True

    def settle(self) -> None:
        """The awaited step is over: it took its input, failed, or was cancelled."""
        awaited, self._awaited = self._awaited, None
        if awaited is not None and not awaited.input.done():
            awaited.input.cancel()

    def close(self) -> None:
        """The stream ended: nothing waits here any more."""
        self.closed = True
        self.settle()
        for position in list(self._early):
            self._refuse_early(position, InvalidRequest("the stream this push was for has closed"))

    async def _wait_for_step(self, position: int, early: _Early) -> None:
        self._early[position] = early
        try:
            done, _ = await asyncio.wait({early.verdict}, timeout=self._early_wait_s)
        finally:
            if self._early.get(position) is early:
                del self._early[position]
            if early.verdict.done() and not done:  # cancelled just as it was decided
                early.verdict.exception()
        if not done:
            raise InvalidRequest(
                f"no step at {position} came within {self._early_wait_s:g} s of its push"
            )
        early.verdict.result()  # raises the refusal

    def _refuse_early(self, position: int, error: InvalidRequest) -> None:
        early = self._early.pop(position)
        if not early.verdict.done():
            early.verdict.set_exception(error)

    def _check_tensor(self, hidden: torch.Tensor) -> None:
        if (
            hidden.dtype != torch.float32
            or hidden.ndim != 3
            or hidden.shape[0] != 1
            or hidden.shape[1] < 1
            or hidden.shape[2] != self._hidden_size
        ):
            raise InvalidRequest(
                f"an input must be float32 [1, n, {self._hidden_size}], got "
                f"{hidden.dtype} {list(hidden.shape)}"
            )

    @staticmethod
    def _check(awaited: _Awaited, hidden: torch.Tensor, digest: str | None = None) -> None:
        """Whether ``hidden`` is the input that the gateway's step announced."""
        if hidden.shape[1] != awaited.tokens:
            raise InvalidRequest(
                f"the step at {awaited.position} takes {awaited.tokens} tokens, "
                f"got {hidden.shape[1]}"
            )
        if digest is not None and digest != awaited.digest:
            raise InvalidRequest(f"a push for another history than the step at {awaited.position}")
        if not bool(torch.isfinite(hidden).all()):
            raise InvalidRequest("non-finite hidden states")


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


class PushBoard:
    """The node's inboxes by push token."""

    def __init__(self, hidden_size: int) -> None:
        self._hidden_size = hidden_size
        self._inboxes: dict[str, Inbox] = {}

    def __len__(self) -> int:
        return len(self._inboxes)

    def open(self, token: str) -> Inbox | None:
        """An inbox for a stream opened with ``token``; None if another stream holds that
        token (a gateway's bug or replay): this one then takes its inputs by relay only."""
        if token in self._inboxes:
            return None
        inbox = self._inboxes[token] = Inbox(self._hidden_size)
        return inbox

    def close(self, token: str, inbox: Inbox) -> None:
        if self._inboxes.get(token) is inbox:
            del self._inboxes[token]
        inbox.close()

    async def deliver(self, token: str, position: int, digest: str, hidden: torch.Tensor) -> None:
        inbox = self._inboxes.get(token)
        if inbox is None:
            raise InvalidRequest("no stream here takes pushes with this token")
        await inbox.push(position, digest, hidden)


@dataclass(eq=False)
class _Outgoing:
    item: PushItem
    output: torch.Tensor
    accepted: asyncio.Future[bool]

    @property
    def size(self) -> int:
        return self.output.numel() * self.output.element_size()


class Pusher:
    """Sends steps' outputs to their next hops, over ``call`` (rpc_push on that peer).

    Pushes to one peer made in the same turn of the event loop travel in one call. The
    steps of a batched forward finish together and their streams push one after another
    without waiting in between, so one forward's outputs for the next hop become one
    message: on loopback, sixteen unary calls through the daemons took ~4 ms, one call
    carrying sixteen ~1.6 ms, and the next hop starts its forward once the last arrives.

    ``link``: the simulated network (benchmarks only); a call crosses one link, so it waits
    half a round trip each way, as the gateway's messages do.
    """

    def __init__(
        self,
        call: PushCall,
        member_pass: Callable[[], str] = lambda: "",
        link: SimulatedLink = SimulatedLink(),  # noqa: B008 (frozen: shared safely)
        timeout_s: float = PUSH_TIMEOUT_S,
    ) -> None:
        self._call = call
        self._member_pass = member_pass
        self._link = link
        self._timeout_s = timeout_s
        self._outboxes: dict[str, list[_Outgoing]] = {}  # peer id → pushes not yet sent
        self._sending: set[asyncio.Task[None]] = set()

    async def push(self, target: PushTarget, position: int, digest: str, out: torch.Tensor) -> bool:
        """Whether the hop at ``target`` accepted ``out`` [1, n, H] as the input of its
        step at ``position``. Never raises: a push that fails in any way (unreachable,
        refused, too slow) is False, and its stream answers the gateway with ``out``."""
        loop = asyncio.get_running_loop()
        item = PushItem(token=target.token, position=position, digest=digest)
        outgoing = _Outgoing(item, out, loop.create_future())
        outbox = self._outboxes.get(target.peer_id)
        if outbox is None:
            outbox = self._outboxes[target.peer_id] = []
            loop.call_soon(self._flush, target.peer_id)
        outbox.append(outgoing)
        return await outgoing.accepted

    def _flush(self, peer_id: str) -> None:
        """Send what waits for ``peer_id``, in as few calls as the message budget allows."""
        waiting = [o for o in self._outboxes.pop(peer_id, []) if not o.accepted.done()]
        calls: list[list[_Outgoing]] = []
        size = 0
        for outgoing in waiting:
            full = bool(calls) and len(calls[-1]) >= MAX_PUSH_ITEMS
            if not calls or full or size + outgoing.size > MESSAGE_BUDGET_BYTES:
                calls.append([])
                size = 0
            calls[-1].append(outgoing)
            size += outgoing.size
        for pushes in calls:
            task = asyncio.get_running_loop().create_task(self._send(peer_id, pushes))
            self._sending.add(task)  # held: the loop keeps only weak references to tasks
            task.add_done_callback(self._sending.discard)

    async def _send(self, peer_id: str, pushes: list[_Outgoing]) -> None:
        refused: list[str | None] = ["the push was cancelled"] * len(pushes)
        try:
            push = Push(member_pass=self._member_pass(), items=[o.item for o in pushes])
            request = make_request(push, *(o.output for o in pushes))
            reply = await asyncio.wait_for(
                self._exchange(peer_id, request), self._timeout_s + self._link.rtt_s
            )
            answer = decode_reply(PushAccepted, reply.metadata, peer_id)
            if len(answer.refused) != len(pushes):
                raise ProtocolMismatch(
                    f"{peer_id} answered {len(answer.refused)} of {len(pushes)} pushes", peer_id
                )
            refused = [None if r is None else r.message or r.error.value for r in answer.refused]
        except Exception as e:  # unreachable, refused, too slow: the gateway relays them
            refused = [str(e) or type(e).__name__] * len(pushes)
        finally:
            failed = [reason for reason in refused if reason is not None]
            if failed:
                logger.warning(
                    "%d of %d pushes to %s failed (%s); answering the gateway instead",
                    len(failed),
                    len(pushes),
                    peer_id,
                    failed[0],
                )
            for outgoing, reason in zip(pushes, refused, strict=True):
                if not outgoing.accepted.done():  # else its stream was cancelled meanwhile
                    outgoing.accepted.set_result(reason is None)

    async def _exchange(
        self, peer_id: str, request: runtime_pb2.ExpertRequest
    ) -> runtime_pb2.ExpertResponse:
        await self._link.outbound()
        reply = await self._call(peer_id, request)
        await self._link.inbound()
        return reply
