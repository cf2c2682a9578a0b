"""ChainSession over an in-process swarm: failover, catch-up, cache reuse and cleanup.

Each fake server runs its span of the tiny model through the real ``CacheStore`` and
``forward_span``, as ``swarm_node/handler.py`` does, so the chain's output can be held to
the whole model's (fp32, 1e-4) whatever fails under it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
from collections import Counter
from collections.abc import Callable, Iterator, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from client import chain as chain_module
from client.chain import MAX_FAILOVERS, ChainSession
from client.hop_stream import check_cached, check_hidden
from models.loading import Span, load_span
from protocol.errors import (
    BadReply,
    CapacityExceeded,
    NoRouteError,
    PeerUnavailable,
    ProtocolMismatch,
    SwarmError,
)
from protocol.prefix import BLOCK_TOKENS, TokenHistory
from protocol.rpc import OpenSession, PushTarget
from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.planner import Hop, plan_route
from routing.snapshot import SwarmSnapshot
from swarm_node.backend import forward_span, new_kv_buffers
from swarm_node.cache_store import CachedSession, CacheStore
from tests.tiny_model import TINY_BLOCKS

HIDDEN = 64
VOCAB = 1000  # the chain never looks up a token: any deterministic table will do
MAX_LENGTH = 256
SESSION = "conv"
SECRET = "5e" * 16
EMBEDDING = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))
TOKENS: list[int] = torch.randint(
    VOCAB, (120,), generator=torch.Generator().manual_seed(1)
).tolist()
PROMPT = 40
DECODE = 8
# What generation.py feeds a chain: the prompt, then one token per step.
STEPS = [TOKENS[:PROMPT], *([t] for t in TOKENS[PROMPT : PROMPT + DECODE])]
FED = PROMPT + DECODE
ROUTE = [Hop("a", 0, 2), Hop("b", 2, 4)]
CHUNK = 16  # tokens per message: pushed prompts go in rounds of this many
MODEL = ModelRecord(
    name="tiny", architecture="llama", num_blocks=TINY_BLOCKS, hidden_size=HIDDEN, max_length=1024
)

Fault = Callable[[str], Exception]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Matrices this small gain nothing from a second thread, and lose a lot on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gone(peer_id: str) -> Exception:
    return PeerUnavailable(f"{peer_id} went away", peer_id)


def full(peer_id: str) -> Exception:
    return CapacityExceeded(f"{peer_id}: capacity", peer_id)


def garbled(peer_id: str) -> Exception:
    return ProtocolMismatch(f"{peer_id} sent a bad StepDone", peer_id)


def embed(ids: Sequence[int]) -> torch.Tensor:
    return EMBEDDING[list(ids)].unsqueeze(0)


@functools.cache
def span_of(model: Path, start: int, end: int) -> Span:
    return load_span(model, start, end)  # spans hold no state: servers may share one


class FakeServer:
    """One block server: a span of the tiny model and the real per-session cache store.

    Faults: ``down`` fails every open and step from now on; ``refuse`` fails new opens
    only; ``fail_at(k, fault)`` brings the server down at its k-th step of a kept session;
    ``nan_at`` answers that step with NaNs; the ``*_gate`` events hang until set.
    Push: ``takes_pushes`` (else it answers an opening's push token as an old server);
    ``refuse_pushes`` refuses every push to it; ``die_after_push_at`` brings it down at
    that step just after its push was accepted.
    """

    def __init__(self, peer_id: str, span: Span, inboxes: dict[str, FakeStream]) -> None:
        self.peer_id = peer_id
        self.span = span
        self.inboxes = inboxes  # every server's streams that take pushes, by token
        self.takes_pushes = True
        self.refuse_pushes = False
        self.die_after_push_at: int | None = None
        self.store = CacheStore(1 << 40, 1)
        self.openings: list[OpenSession] = []
        self.streams: list[FakeStream] = []
        self.kept_steps = 0
        self.down: Fault | None = None
        self.refuse: Fault | None = None
        self.fail_step: tuple[int, Fault] | None = None
        self.nan_at: int | None = None
        self.claim_extra = 0  # tokens to claim beyond what the store holds
        self.open_gate: asyncio.Event | None = None
        self.step_gate: asyncio.Event | None = None  # the chain's own sessions
        self.replay_gate: asyncio.Event | None = None  # throwaway ones
        self.waiting = 0  # opens and steps hanging on a gate now

    def fail_at(self, step: int, fault: Fault = gone) -> None:
        self.fail_step = (step, fault)

    async def open(self, hop: Hop, opening: OpenSession) -> tuple[FakeStream, int]:
        assert (hop.start, hop.end) == (opening.start, opening.end)
        assert self.span.start <= hop.start < hop.end <= self.span.end
        self.openings.append(opening)
        # Like InferenceClient.open_hop: the stream exists before it opens, and closes if not.
        stream = FakeStream(self, hop, opening)
        self.streams.append(stream)
        try:
            await self._gate(self.open_gate)
            fault = self.down or self.refuse
            if fault is not None:
                raise fault(self.peer_id)
            stream.session, cached = self.store.open(
                opening.session_id,
                hop.start,
                hop.end,
                opening.max_length,
                opening.prefix_hashes,
                lambda: new_kv_buffers(self.span, hop.start, hop.end),
                keep=opening.keep,
                resume=(opening.resume_length, opening.resume_digest),
            )
            token = opening.push_token
            if token is not None and self.takes_pushes:
                stream.push_token = token
                self.inboxes[token] = stream
            return stream, check_cached(
                cached + self.claim_extra,
                opening.prefix_hashes,
                hop.peer_id,
                opening.resume_length,
            )
        except BaseException:
            stream.close()
            raise

    async def _gate(self, gate: asyncio.Event | None) -> None:
        if gate is not None:
            self.waiting += 1
            try:
                await gate.wait()
            finally:
                self.waiting -= 1

    def kept(self) -> list[FakeStream]:
        """Streams of the chain's own sessions that opened, oldest first."""
        return [s for s in self.streams if s.opening.keep and s.session is not None]

    def replays(self) -> list[FakeStream]:
        return [s for s in self.streams if not s.opening.keep]


@dataclass
class Pending:
    shape: torch.Size
    history: TokenHistory
    input: torch.Tensor | None  # sent with the step, relayed or pushed; None: awaited
    push_to: PushTarget | None
    sent: bool = False  # the gateway sent the input (with the step, or relayed)


class FakeStream:
    """What HopStream does, over a FakeServer: ``position`` is where the next step starts.

    Pushed steps (``begin``/``relay``/``finish``) behave as a node's: the first input to
    arrive counts (a later relay is dropped), and a push goes into the target stream's
    pending step if that stream is open, its server up and taking pushes."""

    chunk_tokens = CHUNK

    def __init__(self, server: FakeServer, hop: Hop, opening: OpenSession) -> None:
        self.server = server
        self.hop = hop
        self.opening = opening
        self.position = 0
        self.session: CachedSession | None = None
        self.steps: list[tuple[int, int]] = []  # (position, tokens) of each step done
        self.closed = False
        self.push_token: str | None = None
        self._pending: Pending | None = None
        self.relayed = 0  # inputs the gateway relayed to a pending step
        self.pushed_in = 0  # inputs pushed in by the previous hop
        self.returned = 0  # outputs sent back to the gateway

    @property
    def peer_id(self) -> str:
        return self.hop.peer_id

    @property
    def push_target(self) -> PushTarget | None:
        if self.push_token is None:
            return None
        return PushTarget(peer_id=self.peer_id, token=self.push_token)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    @property
    def awaits_input(self) -> bool:  # as far as the gateway knows
        return self._pending is not None and not self._pending.sent

    async def step(self, hidden: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        assert self._pending is None, "a step while another is pending"
        out = await self._compute(hidden, history)
        self.returned += 1
        return check_hidden(out, hidden.shape, self.peer_id)

    async def begin(
        self,
        shape: torch.Size,
        history: TokenHistory,
        hidden: torch.Tensor | None = None,
        push_to: PushTarget | None = None,
    ) -> None:
        assert self._pending is None and not self.closed, "begin on a busy or closed stream"
        assert shape[1] <= self.chunk_tokens, "a pushed step is one message"
        self._pending = Pending(shape, history, hidden, push_to, sent=hidden is not None)

    async def relay(self, hidden: torch.Tensor) -> None:
        pending = self._pending
        assert pending is not None and not pending.sent and hidden.shape == pending.shape
        pending.sent = True
        self.relayed += 1
        if pending.input is None:  # else it took a push first: the node drops the relay
            pending.input = hidden

    async def finish(self, successor: FakeStream | None = None) -> torch.Tensor | None:
        # The successor computes only when it is finished itself: it never answers first.
        pending, self._pending = self._pending, None
        assert pending is not None, "finish without a pending step"
        if pending.input is None and self.server.down is None:
            raise AssertionError(f"{self.peer_id} would wait forever: no input pushed or relayed")
        position = self.position
        out = await self._compute(
            pending.input if pending.input is not None else torch.zeros(pending.shape),
            pending.history,
        )
        target = pending.push_to and self.server.inboxes.get(pending.push_to.token)
        if target is not None and target.take_push(position, out):
            if self.server.kept_steps == self.server.die_after_push_at:
                self.server.down = gone
                raise gone(self.peer_id)  # pushed, then died before acknowledging
            return None
        self.returned += 1
        return check_hidden(out, pending.shape, self.peer_id)

    def take_push(self, position: int, hidden: torch.Tensor) -> bool:
        """A push into this stream's pending step: whether the node would accept it."""
        pending = self._pending
        if (
            self.closed
            or self.server.down is not None
            or self.server.refuse_pushes
            or pending is None
            or pending.input is not None
            or self.position != position
            or hidden.shape != pending.shape
            or not bool(torch.isfinite(hidden).all())
        ):
            return False
        pending.input = hidden
        self.pushed_in += 1
        return True

    async def _compute(self, hidden: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        hashes = history.hashes
        server, session = self.server, self.session
        assert session is not None and not self.closed, "step on a stream that is not open"
        await server._gate(server.step_gate if self.opening.keep else server.replay_gate)
        if self.opening.keep:
            server.kept_steps += 1
            if server.fail_step is not None and server.kept_steps == server.fail_step[0]:
                server.down = server.fail_step[1]
        if server.down is not None:
            server.store.discard(session)
            raise server.down(self.peer_id)
        position, tokens = self.position, hidden.shape[1]
        new = hashes[position // BLOCK_TOKENS : (position + tokens) // BLOCK_TOKENS]
        held = server.store.check_step(session, position, tokens, new)  # InvalidRequest: a bug
        out = forward_span(
            server.span,
            hidden,
            session.kv,
            position=position,
            start=self.hop.start,
            end=self.hop.end,
        )
        digest = history.digest(position + tokens)
        server.store.commit_step(
            session, position, tokens, held, first=not self.steps, digest=digest
        )
        self.steps.append((position, tokens))
        self.position = position + tokens
        if self.opening.keep and server.kept_steps == server.nan_at:
            out = torch.full_like(out, float("nan"))
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.push_token is not None:
                self.server.inboxes.pop(self.push_token, None)
            if self.session is not None:
                self.server.store.release(self.session)


class FakeSwarm:
    """The ChainHost: servers in this process, planned over with the real planner."""

    def __init__(self, model: Path, spans: dict[str, tuple[int, int]]) -> None:
        self.inboxes: dict[str, FakeStream] = {}
        self.servers = {
            p: FakeServer(p, span_of(model, *span), self.inboxes) for p, span in spans.items()
        }
        self.failures: list[tuple[str, SwarmError]] = []
        self.successes: Counter[str] = Counter()
        self.embedded: list[int] = []  # tokens per embed call
        self.opened: list[str] = []  # peer ids, in the order the chain asked for them

    def __getitem__(self, peer_id: str) -> FakeServer:
        return self.servers[peer_id]

    def snapshot(self) -> SwarmSnapshot:
        servers = {
            p: ServerRecord(
                state=NodeState.ONLINE, start=s.span.start, end=s.span.end, throughput=10.0
            )
            for p, s in self.servers.items()
        }
        return SwarmSnapshot(model=MODEL, servers=servers)

    @property
    def streams(self) -> list[FakeStream]:
        return [s for server in self.servers.values() for s in server.streams]

    def open_streams(self) -> list[FakeStream]:
        return [s for s in self.streams if not s.closed]

    def failed_peers(self) -> list[str]:
        return [p for p, _ in self.failures]

    def embedding(self, ids: list[int]) -> torch.Tensor:
        """The model's embedding, as the session is handed it; counts the tokens of each call."""
        self.embedded.append(len(ids))
        return embed(ids)

    # ---- ChainHost ----

    def plan(self, start: int, end: int, exclude: Set[str], session: ChainSession) -> list[Hop]:
        # As InferenceClient.plan: servers already in the chain only when nobody else can.
        snapshot, in_chain = self.snapshot(), {hop.peer_id for hop in session.route}
        try:
            return plan_route(snapshot, end, start=start, exclude=exclude | in_chain)
        except NoRouteError:
            return plan_route(snapshot, end, start=start, exclude=exclude)

    async def open_hop(self, hop: Hop, opening: OpenSession) -> tuple[FakeStream, int]:
        self.opened.append(hop.peer_id)
        return await self.servers[hop.peer_id].open(hop, opening)

    def failed(self, peer_id: str, error: SwarmError) -> None:
        self.failures.append((peer_id, error))

    def succeeded(self, peer_id: str) -> None:
        self.successes[peer_id] += 1


def reference(model: Path, steps: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The whole model's output for each step, fed the same way."""
    span = span_of(model, 0, TINY_BLOCKS)
    cache = new_kv_buffers(span, span.start, span.end)
    outputs, position = [], 0
    for tokens in steps:
        outputs.append(forward_span(span, embed(tokens), cache, position=position))
        position += len(tokens)
    return outputs


def assert_matches(outputs: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> None:
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


async def feed(
    session: ChainSession, history: TokenHistory, steps: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Step the chain as generation.py does: extend the history, then send the new tokens."""
    outputs = []
    for tokens in steps:
        history.extend(tokens)
        outputs.append(await session.step(embed(tokens), history))
    return outputs


async def opened(
    swarm: FakeSwarm,
    route: Sequence[Hop] = ROUTE,
    prefix_hashes: Sequence[str] = (),
    push: bool = False,
    on_input: Callable[[str], None] = lambda route: None,
) -> ChainSession:
    session = ChainSession(
        swarm,  # type: ignore[arg-type]  # duck-typed
        SESSION,
        SECRET,
        MAX_LENGTH,
        swarm.embedding,
        push=push,
        on_input=on_input,
    )
    await session.open(route, prefix_hashes)
    return session


async def until(condition: Callable[[], bool]) -> None:
    # Loop turns first; then real time, since a replay embeds in a worker thread.
    for turn in range(2100):
        if condition():
            return
        await asyncio.sleep(0 if turn < 100 else 0.001)
    raise AssertionError("the condition never held")


def run_chain(
    swarm: FakeSwarm,
    route: Sequence[Hop] = ROUTE,
    push: bool = False,
    on_input: Callable[[str], None] = lambda route: None,
) -> tuple[ChainSession, list[torch.Tensor]]:
    """Open ``route``, feed STEPS, close; the session and its outputs."""

    async def scenario() -> tuple[ChainSession, list[torch.Tensor]]:
        session = await opened(swarm, route, push=push, on_input=on_input)
        try:
            return session, await feed(session, TokenHistory(), STEPS)
        finally:
            await session.close()

    return asyncio.run(scenario())


def fails(swarm: FakeSwarm, error: type[SwarmError], route: Sequence[Hop] = ROUTE) -> SwarmError:
    """Open ``route`` and feed STEPS until the chain raises ``error``; then close it."""

    async def scenario() -> SwarmError:
        session = ChainSession(swarm, SESSION, SECRET, MAX_LENGTH, swarm.embedding)  # type: ignore[arg-type]
        try:
            with pytest.raises(error) as raised:
                await session.open(route, ())
                await feed(session, TokenHistory(), STEPS)
            return raised.value
        finally:
            await session.close()

    return asyncio.run(scenario())


# ---- the happy path ----


def test_two_hops_give_the_whole_models_output(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4)})
    session, outputs = run_chain(swarm)

    assert_matches(outputs, reference(tiny_model, STEPS))
    assert session.route == ROUTE
    assert session.failovers == 0 and swarm.failures == []
    for peer in "ab":
        (stream,) = swarm[peer].streams  # one stream each, no replay
        assert stream.opening.keep and stream.closed
        assert stream.steps == [(0, PROMPT), *((p, 1) for p in range(PROMPT, FED))]
        assert swarm[peer].store.cache_keys() == [SESSION]  # kept for the next turn
    assert swarm.embedded == []  # nothing was rebuilt
    assert swarm.successes == Counter(a=1 + len(STEPS), b=1 + len(STEPS))  # open, steps


def test_the_planner_route_over_one_server_per_block(tiny_model: Path) -> None:
    spans = {f"s{b}": (b, b + 1) for b in range(TINY_BLOCKS)}
    swarm = FakeSwarm(tiny_model, spans)
    route = plan_route(swarm.snapshot(), TINY_BLOCKS)
    assert len(route) == TINY_BLOCKS

    session, outputs = run_chain(swarm, route)

    assert_matches(outputs, reference(tiny_model, STEPS))
    assert session.route == route


# ---- a server fails mid-generation: a replica takes its span ----


def fail(server: FakeServer, step: int, how: str) -> type[SwarmError]:
    """Make ``server`` fail at its ``step``-th step; the error the chain will see."""
    if how == "nan":
        server.nan_at = step
        return BadReply
    server.fail_at(step, {"gone": gone, "garbled": garbled}[how])
    return {"gone": PeerUnavailable, "garbled": ProtocolMismatch}[how]


@pytest.mark.parametrize("how", ["gone", "nan", "garbled"])
@pytest.mark.parametrize("at_step", [1, 4])
@pytest.mark.parametrize(("dead", "replica"), [("a", "a2"), ("b", "b2")])
def test_a_replica_takes_over_mid_generation(
    tiny_model: Path, dead: str, replica: str, at_step: int, how: str
) -> None:
    spans = {"a": (0, 2), "b": (2, 4), replica: dict(a=(0, 2), b=(2, 4))[dead]}
    swarm = FakeSwarm(tiny_model, spans)
    error = fail(swarm[dead], at_step, how)

    session, outputs = run_chain(swarm)

    assert_matches(outputs, reference(tiny_model, STEPS))
    ((peer, reported),) = swarm.failures  # reported once, as what it was
    assert peer == dead and type(reported) is error and getattr(reported, "peer_id", None) == dead
    assert session.failovers == 1
    assert session.route == [
        Hop(replica if h.peer_id == dead else h.peer_id, h.start, h.end) for h in ROUTE
    ]
    (stream,) = swarm[replica].kept()
    assert stream.session is not None and stream.session.position == FED  # every position
    held = sum(len(s) for s in STEPS[: at_step - 1])  # what the dead server held
    expected_steps = [(0, held)] if held else []  # the catch-up, then the failed step on
    expected_steps += [(held, len(STEPS[at_step - 1]))]
    expected_steps += [(p, 1) for p in range(held + len(STEPS[at_step - 1]), FED)]
    assert stream.steps == expected_steps
    assert all(s.closed for s in swarm.streams)


def test_the_last_hops_replacement_is_rebuilt_from_a_throwaway_replay(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), "c": (2, 4)})
    swarm["b"].fail_at(4)  # the 3rd decode step: 42 tokens held by then
    held = PROMPT + 2

    run_chain(swarm)

    (replay,) = swarm["a"].replays()
    assert replay.opening.session_id.startswith(f"{SESSION}/")
    assert replay.opening.session_id != SESSION
    assert replay.opening.max_length == held and replay.opening.prefix_hashes == []
    assert replay.steps == [(0, held)] and replay.closed
    assert swarm["a"].store.cache_keys() == [SESSION]  # the server dropped the replay
    (own,) = swarm["a"].kept()  # the chain's own session on a never moved back
    assert own.steps == [(0, PROMPT), *((p, 1) for p in range(PROMPT, FED))]
    assert swarm.embedded == [held]  # rebuilt once, from the token history


def derived(peer_id: str, start: int, end: int) -> str:
    """HMAC-SHA256(the session's secret, peer id ‖ start ‖ end), in hex."""
    message = f"{peer_id}\0{start}\0{end}".encode()
    return hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()


def test_each_hop_is_shown_its_own_secret_derived_from_its_peer_and_span(
    tiny_model: Path,
) -> None:
    """No server learns a secret that opens the session on another server: every opening,
    replacements and throwaway replays included, shows its own hop's derivation; and the
    derivation is the same on the next turn, so the conversation still resumes."""
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), "c": (2, 4)})
    swarm["b"].fail_at(4)  # c replaces b, and a replays b's inputs for it

    run_chain(swarm)

    for stream in swarm.streams:
        hop = stream.hop
        assert stream.opening.secret == derived(hop.peer_id, hop.start, hop.end)
    kept = {s.peer_id: s.opening.secret for s in swarm.streams if s.opening.keep}
    assert sorted(kept) == ["a", "b", "c"] and len(set(kept.values())) == 3
    assert SECRET not in kept.values()
    (replay,) = swarm["a"].replays()
    assert replay.opening.secret == kept["a"]

    async def next_turn() -> None:
        session = await opened(swarm, [Hop("a", 0, 2), Hop("c", 2, 4)])
        await session.close()

    asyncio.run(next_turn())
    assert swarm["a"].openings[-1].secret == kept["a"]
    assert swarm["c"].openings[-1].secret == kept["c"]
    assert derived("a", 0, 1) != derived("a", 1, 2) != derived("b", 1, 2)


def test_a_first_hop_replacement_needs_no_replay(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), "a2": (0, 2)})
    swarm["a"].fail_at(4)

    run_chain(swarm)

    assert all(s.opening.keep for s in swarm.streams)  # the embedding is its input
    assert swarm.embedded == [PROMPT + 2]


def test_a_failed_span_is_replanned_onto_two_smaller_servers(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), "p": (0, 1), "q": (1, 2)})
    swarm["a"].fail_at(3)

    session, outputs = run_chain(swarm)

    assert_matches(outputs, reference(tiny_model, STEPS))
    assert session.route == [Hop("p", 0, 1), Hop("q", 1, 2), Hop("b", 2, 4)]
    assert session.failovers == 1 and swarm.failed_peers() == ["a"]
    for peer in "pq":
        (stream,) = swarm[peer].kept()
        assert stream.steps[0] == (0, PROMPT + 1)  # caught up
        assert stream.session is not None and stream.session.position == FED
    # q's inputs came from p's catch-up: no server replayed anything.
    assert [s for s in swarm.streams if not s.opening.keep] == []


def test_a_middle_span_is_replanned_onto_two_smaller_servers(tiny_model: Path) -> None:
    spans = {"a": (0, 1), "m": (1, 3), "z": (3, 4), "p": (1, 2), "q": (2, 3)}
    swarm = FakeSwarm(tiny_model, spans)
    swarm["m"].fail_at(5)
    route = [Hop("a", 0, 1), Hop("m", 1, 3), Hop("z", 3, 4)]

    session, outputs = run_chain(swarm, route)

    assert_matches(outputs, reference(tiny_model, STEPS))
    assert session.route == [Hop("a", 0, 1), Hop("p", 1, 2), Hop("q", 2, 3), Hop("z", 3, 4)]
    assert len(swarm["a"].replays()) == 1  # p's inputs; q's come from p's catch-up


def test_a_replacement_that_fails_while_catching_up_is_replaced_too(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), "c": (2, 4), "d": (2, 4)})
    swarm["b"].fail_at(3)
    swarm["c"].fail_at(1)  # its catch-up step
    # The planner breaks the tie between c and d by peer id: c comes first.

    session, outputs = run_chain(swarm)

    assert_matches(outputs, reference(tiny_model, STEPS))
    assert swarm.failed_peers() == ["b", "c"]
    assert session.failovers == 2
    assert session.route == [Hop("a", 0, 2), Hop("d", 2, 4)]


def test_a_server_already_in_the_chain_takes_the_span_when_nobody_else_can(
    tiny_model: Path,
) -> None:
    swarm = FakeSwarm(tiny_model, {"x": (0, 4), "b": (2, 4)})
    swarm["b"].fail_at(3)

    session, outputs = run_chain(swarm, [Hop("x", 0, 2), Hop("b", 2, 4)])

    assert_matches(outputs, reference(tiny_model, STEPS))
    assert session.route == [Hop("x", 0, 2), Hop("x", 2, 4)]


# ---- between turns: the servers kept the conversation, or some of it ----

FIRST_TURN = [TOKENS[:PROMPT], *([t] for t in TOKENS[PROMPT:70])]  # 70 tokens: 2 full blocks


def second_turn(
    swarm: FakeSwarm,
    prompt: Sequence[int],
    decode: Sequence[int],
    between: Callable[[], None] = lambda: None,
    reuse: Callable[[int], int] = lambda cached: cached,
) -> tuple[ChainSession, list[torch.Tensor], int]:
    """FIRST_TURN on ROUTE, ``between``, then the next turn as generation.py runs it: open
    ROUTE with ``prompt``'s hashes, reuse what ``reuse(cached_tokens)`` says, step the rest
    of ``prompt`` and then each of ``decode``. The session, its outputs, the tokens reused."""

    async def scenario() -> tuple[ChainSession, list[torch.Tensor], int]:
        session = await opened(swarm)
        await feed(session, TokenHistory(), FIRST_TURN)
        await session.close()
        between()
        session = await opened(swarm, ROUTE, TokenHistory(prompt).hashes)
        reused = reuse(session.cached_tokens)
        session.reuse(reused)
        steps = [prompt[reused:], *([t] for t in decode)]
        try:
            return session, await feed(session, TokenHistory(prompt[:reused]), steps), reused
        finally:
            await session.close()

    return asyncio.run(scenario())


def expected_second_turn(
    model: Path, prompt: Sequence[int], decode: Sequence[int], reused: int
) -> list[torch.Tensor]:
    return reference(model, [prompt[:reused], prompt[reused:], *([t] for t in decode)])[1:]


@pytest.mark.parametrize(("dead", "new"), [("b", "c"), ("a", "c")])
def test_only_the_lost_hop_is_replaced_and_rebuilt(tiny_model: Path, dead: str, new: str) -> None:
    new_span = dict(a=(0, 2), b=(2, 4))[dead]
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), new: new_span})
    prompt, decode = TOKENS[:80], TOKENS[80:84]

    def kill() -> None:
        swarm[dead].down = gone

    session, outputs, reused = second_turn(swarm, prompt, decode, kill)

    assert reused == 2 * BLOCK_TOKENS  # the live hop's whole blocks
    assert_matches(outputs, expected_second_turn(tiny_model, prompt, decode, reused))
    assert swarm.failed_peers() == [dead] and session.failovers == 1
    live = "a" if dead == "b" else "b"
    assert session.route == [
        Hop(new if h.peer_id == dead else h.peer_id, h.start, h.end) for h in ROUTE
    ]
    kept = swarm[live].kept()
    assert len(kept) == 2  # one per turn: the live hop was opened once in turn 2
    assert kept[1].steps == [(64, 16), (80, 1), (81, 1), (82, 1), (83, 1)]  # nothing recomputed
    assert kept[1].session is kept[0].session  # the same cache, not a fork
    (rebuilt,) = swarm[new].kept()
    assert rebuilt.steps[0] == (0, 64)
    replays = [s for s in swarm.streams if not s.opening.keep]
    if dead == "b":  # c's inputs: the embedding through a, in a throwaway session
        assert [(s.peer_id, s.steps) for s in replays] == [("a", [(0, 64)])]
    else:  # c is the first hop: the embedding is its input
        assert replays == []
    assert all(s.closed for s in swarm.streams)


def test_a_hop_holding_less_of_the_prefix_catches_up_from_where_it_stands(
    tiny_model: Path,
) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4)})
    prompt, decode = TOKENS[:80], TOKENS[80:82]

    def forget_a_block() -> None:
        swarm["b"].claim_extra = -BLOCK_TOKENS  # b owns up to one block only

    session, outputs, reused = second_turn(swarm, prompt, decode, forget_a_block)

    assert reused == 64
    assert_matches(outputs, expected_second_turn(tiny_model, prompt, decode, reused))
    assert session.failovers == 0
    assert swarm["b"].kept()[1].steps == [(32, 32), (64, 16), (80, 1), (81, 1)]
    assert [(s.peer_id, s.steps) for s in swarm["a"].replays()] == [("a", [(0, 64)])]


def test_reusing_fewer_tokens_than_cached_recomputes_the_rest(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4)})
    prompt, decode = TOKENS[:64], TOKENS[64:66]  # a regenerated answer: the prompt is cached

    # generation.py always sends the prompt's last token again: its logits start the answer.
    session, outputs, reused = second_turn(swarm, prompt, decode, reuse=lambda cached: cached - 1)

    assert reused == 63
    assert_matches(outputs, expected_second_turn(tiny_model, prompt, decode, reused))
    for peer in "ab":
        assert swarm[peer].kept()[1].steps == [(63, 1), (64, 1), (65, 1)]
    with pytest.raises(ValueError):
        session.reuse(session.cached_tokens + 1)


@pytest.mark.parametrize("how", ["gone", "lies"])
def test_an_open_time_failure_replaces_that_hop_only(tiny_model: Path, how: str) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), "c": (2, 4)})
    if how == "gone":
        swarm["b"].down = gone
    else:  # claims a cached prefix it cannot hold: check_cached says BadReply
        swarm["b"].claim_extra = 1

    session, outputs = run_chain(swarm)

    assert_matches(outputs, reference(tiny_model, STEPS))
    ((peer, error),) = swarm.failures
    assert peer == "b" and isinstance(error, PeerUnavailable) and error.peer_id == "b"
    assert type(error) is (PeerUnavailable if how == "gone" else BadReply)
    assert session.route == [Hop("a", 0, 2), Hop("c", 2, 4)]
    assert len(swarm["a"].streams) == 1 and swarm.embedded == []


# ---- when failover cannot help, the error goes up and nothing stays open ----


@pytest.mark.parametrize("when", ["open", "step"])
def test_no_replacement_is_a_no_route_error_naming_the_blocks(tiny_model: Path, when: str) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4)})
    if when == "open":
        swarm["b"].down = gone
    else:
        swarm["b"].fail_at(3)

    error = fails(swarm, NoRouteError)

    assert "blocks 2:4" in str(error)
    assert swarm.failed_peers() == ["b"]
    assert swarm.open_streams() == []


@pytest.mark.parametrize("when", ["open", "step"])
def test_every_replica_full_is_capacity_exceeded_for_the_gateway(
    tiny_model: Path, when: str
) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), "c": (2, 4), "d": (2, 4)})
    swarm["c"].refuse = swarm["d"].refuse = full
    if when == "open":
        swarm["b"].refuse = full
    else:
        swarm["b"].fail_at(3)

    error = fails(swarm, CapacityExceeded)

    assert isinstance(error, CapacityExceeded) and error.peer_id is None  # the gateway's 429
    assert "2:4" in str(error)
    assert swarm.failed_peers() == ([] if when == "open" else ["b"])  # full is not broken
    assert swarm.open_streams() == []


def test_a_failed_open_closes_the_replacements_already_opened(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "a2": (0, 2), "b": (2, 4)})
    swarm["a"].down = swarm["b"].down = gone  # a2 replaces a, then b has no replacement

    error = fails(swarm, NoRouteError)

    assert "blocks 2:4" in str(error)
    assert swarm.opened == ["a", "b", "a2"] and swarm["a2"].kept()
    assert swarm.open_streams() == []


def replicas_that_all_fail(model: Path) -> FakeSwarm:
    spans = {"a": (0, 2), "b": (2, 4)} | {f"r{i}": (2, 4) for i in range(MAX_FAILOVERS + 2)}
    swarm = FakeSwarm(model, spans)
    swarm["b"].fail_at(3)
    for i in range(MAX_FAILOVERS + 2):
        swarm[f"r{i}"].down = gone
    return swarm


def test_failures_beyond_max_failovers_go_up(tiny_model: Path) -> None:
    swarm = replicas_that_all_fail(tiny_model)

    error = fails(swarm, PeerUnavailable)

    tried = [p for p in swarm.opened if p.startswith("r")]
    assert len(tried) == MAX_FAILOVERS  # b, then six replicas: the seventh failure goes up
    assert isinstance(error, PeerUnavailable) and error.peer_id == tried[-1]
    assert swarm.open_streams() == []


def test_the_failure_that_exhausts_the_budget_is_reported_too(tiny_model: Path) -> None:
    swarm = replicas_that_all_fail(tiny_model)

    error = fails(swarm, PeerUnavailable)

    assert isinstance(error, PeerUnavailable)
    assert swarm.failed_peers()[-1] == error.peer_id


def test_a_step_past_the_failover_budget_raises_the_servers_error(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chain_module, "FAILOVER_BUDGET_S", -1.0)
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), "c": (2, 4)})
    swarm["b"].fail_at(3)

    error = fails(swarm, PeerUnavailable)

    assert isinstance(error, PeerUnavailable) and error.peer_id == "b"
    assert swarm["c"].openings == []
    assert swarm.open_streams() == []


def test_an_unexpected_open_error_closes_the_hops_that_opened(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), "c": (2, 4)})
    swarm["b"].down = lambda peer_id: RuntimeError("a bug, not a failed server")

    with pytest.raises(RuntimeError):
        asyncio.run(opened(swarm))

    assert swarm.open_streams() == [] and swarm["c"].openings == []


def test_no_route_stays_no_route_after_an_unrelated_server_was_full(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "a2": (0, 2), "b": (2, 4)})
    swarm["a"].refuse = full  # replaced by a2 at open
    swarm["b"].fail_at(3)  # nobody else holds blocks 2:4

    fails(swarm, NoRouteError)


# ---- the upstream replay fails while later hops already ran the step ----


def test_an_upstream_replay_failure_does_not_step_a_hop_twice(tiny_model: Path) -> None:
    spans = {"a": (0, 1), "m": (1, 2), "b": (2, 4), "a2": (0, 1), "c": (2, 4)}
    swarm = FakeSwarm(tiny_model, spans)
    route = [Hop("a", 0, 1), Hop("m", 1, 2), Hop("b", 2, 4)]
    swarm["b"].fail_at(3)

    async def scenario() -> list[torch.Tensor]:
        session = await opened(swarm, route)
        swarm["a"].refuse = full  # c's catch-up cannot replay through a
        try:
            return await feed(session, TokenHistory(), STEPS)
        finally:
            await session.close()

    outputs = asyncio.run(scenario())

    (middle,) = swarm["m"].kept()
    assert middle.steps == [(0, PROMPT), *((p, 1) for p in range(PROMPT, FED))]
    assert_matches(outputs, reference(tiny_model, STEPS))


# ---- cancellation: whatever is in flight, nothing stays open ----


def test_a_cancelled_step_then_close_leaves_nothing_open(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4)})

    async def scenario() -> None:
        session = await opened(swarm)
        history = TokenHistory()
        await feed(session, history, STEPS[:2])
        swarm["b"].step_gate = asyncio.Event()
        history.extend(STEPS[2])
        task = asyncio.create_task(session.step(embed(STEPS[2]), history))
        await until(lambda: swarm["b"].waiting == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await session.close()

    asyncio.run(scenario())

    assert len(swarm.streams) == 2 and swarm.open_streams() == []


@pytest.mark.parametrize("hangs", ["replay open", "replay step", "replacement open"])
def test_a_step_cancelled_during_failover_leaves_nothing_open(tiny_model: Path, hangs: str) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4), "c": (2, 4)})
    swarm["b"].fail_at(3)
    server = swarm["c"] if hangs == "replacement open" else swarm["a"]

    async def scenario() -> None:
        session = await opened(swarm)
        history = TokenHistory()
        await feed(session, history, STEPS[:2])
        gate = asyncio.Event()  # never set
        if hangs == "replay step":
            server.replay_gate = gate
        else:
            server.open_gate = gate
        task = asyncio.create_task(feed(session, history, STEPS[2:3]))
        await until(lambda: server.waiting == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await session.close()
        await until(lambda: server.waiting == 0)  # a cancelled open cleans up on its own

    asyncio.run(scenario())

    assert swarm.opened == ["a", "b", "c"] + ([] if hangs == "replacement open" else ["a"])
    assert swarm.open_streams() == []


def test_cancelling_open_closes_the_hops_that_opened(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4)})

    async def scenario() -> ChainSession:
        swarm["b"].open_gate = asyncio.Event()
        session = ChainSession(swarm, SESSION, SECRET, MAX_LENGTH, swarm.embedding)  # type: ignore[arg-type]
        task = asyncio.create_task(session.open(ROUTE, ()))
        await until(lambda: swarm["b"].waiting == 1 and bool(swarm["a"].kept()))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: swarm["b"].waiting == 0)
        return session

    session = asyncio.run(scenario())

    assert [s.peer_id for s in swarm.streams] == ["a", "b"]
    assert swarm.open_streams() == []
    assert session.route == []


# ---- push: hops send hidden states straight to the next hop ----

# What a pushed step is made of: the prompt in rounds of one message, then one token each.
PUSHED_STEPS = [
    *((p, min(CHUNK, PROMPT - p)) for p in range(0, PROMPT, CHUNK)),
    *((p, 1) for p in range(PROMPT, FED)),
]
ROUNDS = len(PUSHED_STEPS)


def counting(inputs: Counter[str]) -> Callable[[str], None]:
    """An ``on_input`` that counts how the hops' inputs went: "push" or "relay"."""
    return lambda via: inputs.update([via])


def test_pushed_hops_give_the_whole_models_output_and_only_the_last_answers(
    tiny_model: Path,
) -> None:
    spans = {f"s{b}": (b, b + 1) for b in range(TINY_BLOCKS)}
    swarm = FakeSwarm(tiny_model, spans)
    route = plan_route(swarm.snapshot(), TINY_BLOCKS)
    inputs: Counter[str] = Counter()

    _, outputs = run_chain(swarm, route, push=True, on_input=counting(inputs))

    assert_matches(outputs, reference(tiny_model, STEPS))
    streams = [swarm[hop.peer_id].kept()[0] for hop in route]
    for k, stream in enumerate(streams):
        assert stream.steps == PUSHED_STEPS
        assert stream.relayed == 0
        assert stream.pushed_in == (ROUNDS if k else 0)
        assert stream.returned == (ROUNDS if k == len(streams) - 1 else 0)
    assert inputs == Counter(push=ROUNDS * (len(route) - 1))
    assert swarm.inboxes == {} and swarm.open_streams() == []


def test_the_same_chain_with_and_without_push_gives_the_same_output(tiny_model: Path) -> None:
    spans = {"a": (0, 2), "b": (2, 4)}
    _, relayed = run_chain(FakeSwarm(tiny_model, spans))
    _, pushed = run_chain(FakeSwarm(tiny_model, spans), push=True)

    assert_matches(pushed, relayed)


@pytest.mark.parametrize("old", ["refuses pushes", "predates push"])
def test_a_hop_that_gets_no_push_is_relayed_while_the_others_push(
    tiny_model: Path, old: str
) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 1), "m": (1, 3), "b": (3, 4)})
    route = [Hop("a", 0, 1), Hop("m", 1, 3), Hop("b", 3, 4)]
    if old == "refuses pushes":
        swarm["m"].refuse_pushes = True  # every push fails: its sender answers instead
    else:
        swarm["m"].takes_pushes = False  # it never gets a token: nobody pushes to it
    inputs: Counter[str] = Counter()

    session, outputs = run_chain(swarm, route, push=True, on_input=counting(inputs))

    assert_matches(outputs, reference(tiny_model, STEPS))
    a, m, b = (swarm[p].kept()[0] for p in "amb")
    assert (a.returned, m.pushed_in) == (ROUNDS, 0)  # a's pushes failed, or it made none
    if old == "refuses pushes":  # m was relayed its input, and pushes onward
        assert (m.relayed, m.returned, b.pushed_in) == (ROUNDS, 0, ROUNDS)
        assert inputs == Counter(relay=ROUNDS, push=ROUNDS)
    else:  # m is stepped as before push: input and output through the gateway
        assert (m.relayed, m.returned, b.pushed_in, b.relayed) == (0, ROUNDS, 0, ROUNDS)
        assert inputs == Counter(relay=2 * ROUNDS)
    assert swarm.failures == [] and session.failovers == 0


@pytest.mark.parametrize(
    ("dead", "when"),
    [
        ("a", "before its push"),
        ("a", "after its push"),
        ("m", "before its push"),
        ("m", "after its push"),
        ("b", "before its push"),  # the last hop never pushes
    ],
)
def test_a_pushing_chain_survives_a_hop_dying_and_stays_exact(
    tiny_model: Path, dead: str, when: str
) -> None:
    spans = {"a": (0, 1), "m": (1, 3), "b": (3, 4), "a2": (0, 1), "m2": (1, 3), "b2": (3, 4)}
    swarm = FakeSwarm(tiny_model, spans)
    route = [Hop("a", 0, 1), Hop("m", 1, 3), Hop("b", 3, 4)]
    at = 5  # a decode step: the prompt took rounds 1 to 3
    if when == "before its push":
        swarm[dead].fail_at(at)
    else:
        swarm[dead].die_after_push_at = at
    inputs: Counter[str] = Counter()

    session, outputs = run_chain(swarm, route, push=True, on_input=counting(inputs))

    assert_matches(outputs, reference(tiny_model, STEPS))
    assert [p for p, _ in swarm.failures] == [dead] and session.failovers == 1
    assert session.route == [
        Hop(f"{dead}2" if h.peer_id == dead else h.peer_id, h.start, h.end) for h in route
    ]
    (replacement,) = swarm[f"{dead}2"].kept()
    assert replacement.session is not None and replacement.session.position == FED
    if when == "after its push":  # its successor had its input: the relay was dropped
        nxt = swarm["m" if dead == "a" else "b"].kept()[0]
        assert nxt.relayed == 1 and nxt.pushed_in == ROUNDS
    # Every round after the failure pushed again, the replacement included.
    assert inputs["push"] >= (ROUNDS - at) * (len(route) - 1) + (at - 1) * (len(route) - 1)
    assert swarm.open_streams() == [] and swarm.inboxes == {}


def test_a_pushing_hop_that_answers_nan_is_blamed_not_the_hop_after_it(tiny_model: Path) -> None:
    spans = {"a": (0, 2), "b": (2, 4), "a2": (0, 2)}
    swarm = FakeSwarm(tiny_model, spans)
    swarm["a"].nan_at = 4  # its push is refused (non-finite): it answers, and is caught

    _, outputs = run_chain(swarm, push=True)

    assert_matches(outputs, reference(tiny_model, STEPS))
    ((peer, error),) = swarm.failures
    assert peer == "a" and isinstance(error, BadReply)


def test_a_cancelled_pushed_step_then_close_leaves_nothing_open(tiny_model: Path) -> None:
    swarm = FakeSwarm(tiny_model, {"a": (0, 2), "b": (2, 4)})

    async def scenario() -> None:
        session = await opened(swarm, push=True)
        history = TokenHistory()
        await feed(session, history, STEPS[:2])
        swarm["b"].step_gate = asyncio.Event()
        history.extend(STEPS[2])
        task = asyncio.create_task(session.step(embed(STEPS[2]), history))
        await until(lambda: swarm["b"].waiting == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await session.close()

    asyncio.run(scenario())

    assert len(swarm.streams) == 2 and swarm.open_streams() == [] and swarm.inboxes == {}


# ---- speculative steps: a token and its drafts in one step, then a rewind ----

# (tokens fed in one step, how many of them the conversation keeps): the gateway feeds a
# token and its drafts, keeps the token and the drafts taken, and rewinds past the rest.
# The chain never looks at the tokens: any will do.
SPECULATIVE = [
    (TOKENS[:PROMPT], PROMPT),
    (TOKENS[PROMPT : PROMPT + 4], 2),  # one draft of three taken
    (TOKENS[60:63], 3),  # both drafts taken
    (TOKENS[70:73], 1),  # none taken
    (TOKENS[80:82], 2),
    ([TOKENS[90]], 1),  # no drafts
]


def speculative_reference(model: Path) -> list[torch.Tensor]:
    """The whole model's output for each step, its cache cropped as the chain rewinds."""
    span = span_of(model, 0, TINY_BLOCKS)
    cache = new_kv_buffers(span, span.start, span.end)
    outputs, position = [], 0
    for tokens, kept in SPECULATIVE:
        outputs.append(forward_span(span, embed(tokens), cache, position=position))
        position += kept
        cache.crop(position)
    return outputs


def run_speculative(swarm: FakeSwarm, push: bool) -> tuple[ChainSession, list[torch.Tensor]]:
    async def scenario() -> tuple[ChainSession, list[torch.Tensor]]:
        session = await opened(swarm, push=push)
        history, outputs = TokenHistory(), []
        try:
            for tokens, kept in SPECULATIVE:
                history.extend(tokens)
                outputs.append(await session.step(embed(tokens), history))
                history.truncate(len(history) - (len(tokens) - kept))
                session.reuse(len(history))
            return session, outputs
        finally:
            await session.close()

    return asyncio.run(scenario())


@pytest.mark.parametrize("push", [False, True], ids=["relay", "push"])
@pytest.mark.parametrize("at_step", [None, 2, 3, 4])
@pytest.mark.parametrize("dead", ["a", "b"])
def test_speculative_steps_and_rewinds_stay_exact_through_a_failover(
    tiny_model: Path, dead: str, at_step: int | None, push: bool
) -> None:
    """Servers crop what the chain rewinds past (a step below what they hold drops the
    rest first); a replacement is rebuilt from the history as rewound, never from drafts
    that were not taken, whether the hop dies on the step after a rewind or on the one
    that fed the drafts."""
    replica = f"{dead}2"
    spans = {"a": (0, 2), "b": (2, 4), replica: dict(a=(0, 2), b=(2, 4))[dead]}
    swarm = FakeSwarm(tiny_model, spans)
    if at_step is not None:
        swarm[dead].fail_at(at_step)

    session, outputs = run_speculative(swarm, push)

    assert_matches(outputs, speculative_reference(tiny_model))
    assert session.failovers == (0 if at_step is None else 1)
    # Every live hop holds what the conversation kept, nothing it rewound past.
    live = {"a", "b"} if at_step is None else {"a", "b", replica} - {dead}
    for peer in live:
        (stream,) = swarm[peer].kept()
        assert stream.session is not None
        assert stream.session.position == sum(kept for _, kept in SPECULATIVE)
