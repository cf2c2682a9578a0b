"""Caches no member can poison or steal (issue 24 §4), on real processes.

A member holds the swarm key, so it can dial any node with a valid pass. It may write what
it likes into sessions of its own, under any block hashes; no one else's session may ever
be seeded from them. And a server on a chain learns only its own hop's secret, which opens
nothing on the chain's other servers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Set

import openai
import pytest
import torch
from hivemind.p2p import P2P

from client.chain import ChainSession
from client.hop_stream import HopStream
from models.loading import load_config
from protocol.errors import BadReply, NoRouteError, PeerUnavailable, SwarmError
from protocol.membership import PassIssuer
from protocol.prefix import BLOCK_TOKENS, TokenHistory
from protocol.rpc import OpenSession
from routing.planner import Hop
from tests.integration.conftest import MODEL_ID, Swarm, session_member
from tests.integration.test_membership import Dialer, _node_address
from tests.integration.test_swarm_chat import _reference, hf_greedy
from tests.processes import node_identity

pytestmark = pytest.mark.integration

MAX_TOKENS = 8
POISONED = 2 * BLOCK_TOKENS  # the prompt's prefix the poisoner writes garbage under


async def member_p2p(swarm: Swarm) -> tuple[P2P, str]:
    """A fresh peer of the swarm (it holds the key) that can dial every node; its pass."""
    addresses = [a for node in swarm.nodes for a in _node_address(node)]
    p2p = await P2P.create(initial_peers=addresses)
    return p2p, PassIssuer(session_member(), p2p.peer_id.to_base58()).current()


def test_a_members_garbage_under_a_prompts_hashes_never_reaches_another_callers_session(
    swarm: Swarm,
) -> None:
    messages = [
        {
            "role": "user",
            "content": "Poison check: name the winds of the northern sea, one by one. " * 3,
        }
    ]
    prompt, expected = hf_greedy(swarm.model_path, messages, MAX_TOKENS)
    assert len(prompt) > POISONED
    # The gateway's hashes of the prompt's first blocks (salted with the model's name).
    prefix = TokenHistory(prompt[:POISONED], salt=f"{MODEL_ID}\0")
    hidden_size = load_config(swarm.model_path).hidden_size
    generator = torch.Generator().manual_seed(0)

    async def poison() -> None:
        p2p, member_pass = await member_p2p(swarm)
        try:
            for node in swarm.nodes:
                dialer = Dialer(p2p, node, hidden_size)
                hashes = tuple(prefix.hashes)
                # NaN is refused outright: nothing of it is kept under any hash.
                nan_id = f"nan-{uuid.uuid4().hex}"
                stream, _ = await dialer.open(member_pass, nan_id, hashes=hashes)
                with pytest.raises(PeerUnavailable, match="non-finite") as refused:
                    await stream.step(torch.full((1, POISONED, hidden_size), float("nan")), prefix)
                stream.close()
                # The node's refusal, not its NaN answer (which HopStream would refuse too).
                assert not isinstance(refused.value, BadReply)
                again, cached = await dialer.open(member_pass, nan_id, hashes=hashes)
                again.close()
                assert cached == 0
                # Huge random values are hidden states like any other: they are kept.
                stream, _ = await dialer.open(member_pass, f"poison-{uuid.uuid4().hex}")
                garbage = 1e3 * torch.randn(1, POISONED, hidden_size, generator=generator)
                await stream.step(garbage, prefix)
                stream.close()
                # The poisoner's own next session would start from them: they are indexed.
                probe, cached = await dialer.open(member_pass, uuid.uuid4().hex, hashes=hashes)
                probe.close()
                assert cached == POISONED
        finally:
            await p2p.shutdown()

    asyncio.run(poison())

    client = openai.OpenAI(base_url=f"{swarm.base_url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model=swarm.model_id, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    tokenizer = _reference(swarm.model_path)[1]
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # computed afresh


class DirectHost:
    """A gateway's side of a chain over the swarm's nodes, in this process: what each hop
    was shown is recorded, as a server on the route would learn it."""

    def __init__(self, p2p: P2P, member_pass: str, hidden_size: int) -> None:
        self.p2p = p2p
        self.member_pass = member_pass
        self.hidden_size = hidden_size
        self.shown: dict[str, OpenSession] = {}  # peer id → its hop's latest opening
        self.cached: dict[str, int] = {}  # peer id → the tokens its hop held when opened

    def embedding(self, ids: list[int]) -> torch.Tensor:
        return torch.randn(1, len(ids), self.hidden_size)

    def plan(self, start: int, end: int, exclude: Set[str], session: ChainSession) -> list[Hop]:
        raise NoRouteError("no replacements here")

    async def open_hop(self, hop: Hop, opening: OpenSession) -> tuple[HopStream, int]:
        opening = opening.model_copy(update={"member_pass": self.member_pass})
        self.shown[hop.peer_id] = opening
        stream = HopStream(self.p2p, hop, 64, lambda tokens: 30.0)
        try:
            self.cached[hop.peer_id] = await stream.open(opening)
        except BaseException:
            stream.close()
            raise
        return stream, self.cached[hop.peer_id]

    def failed(self, peer_id: str, error: SwarmError) -> None:
        raise AssertionError(f"{peer_id} failed: {error}")

    def succeeded(self, peer_id: str) -> None:
        pass


def test_a_server_cannot_resume_the_session_on_another_hop_with_its_own_secret(
    swarm: Swarm,
) -> None:
    hidden_size = load_config(swarm.model_path).hidden_size
    route = [Hop(peer, *span) for peer, span in map(node_identity, swarm.nodes)]
    assert len(route) == 2
    session_id, secret = uuid.uuid4().hex, "ab" * 16
    history = TokenHistory(list(range(500, 500 + BLOCK_TOKENS)))

    async def scenario() -> None:
        p2p, member_pass = await member_p2p(swarm)
        thief_p2p, thief_pass = await member_p2p(swarm)  # the first hop's server, say
        try:
            host = DirectHost(p2p, member_pass, hidden_size)
            chain = ChainSession(host, session_id, secret, 64, host.embedding)
            await chain.open(route, history.hashes)
            await chain.step(torch.randn(1, BLOCK_TOKENS, hidden_size), history)
            await chain.close()
            learned = host.shown[route[0].peer_id].secret  # what the first server saw

            # The first hop's server dials the second with the session id, the secret it
            # learned and the prompt's hashes: a fresh session, nothing of the chain's.
            node = next(n for n in swarm.nodes if node_identity(n)[0] == route[1].peer_id)
            thief = Dialer(thief_p2p, node, hidden_size)
            stream, cached = await thief.open(
                thief_pass, session_id, learned, hashes=tuple(history.hashes)
            )
            stream.close()
            assert cached == 0

            # The conversation's next turn, on the same servers, resumes everywhere.
            again = ChainSession(host, session_id, secret, 64, host.embedding)
            await again.open(route, history.hashes)
            await again.close()
            assert [host.cached[hop.peer_id] for hop in route] == [BLOCK_TOKENS] * 2
        finally:
            await p2p.shutdown()
            await thief_p2p.shutdown()

    asyncio.run(scenario())
