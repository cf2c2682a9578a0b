"""Test doubles for the gateway's one seam, `SwarmClient`: the model runs in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import torch

from models.adapters import attach_adapters, read_adapters, select_adapter
from models.loading import load_config, load_span
from protocol.errors import PeerUnavailable
from protocol.prefix import TokenHistory
from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.planner import Hop, plan_route
from routing.snapshot import SwarmSnapshot
from swarm_node.backend import forward_span, new_kv_buffers


class LocalSwarmClient:
    """Every block in this process, behind the same interface as the P2P client.

    ``covered=False`` announces no servers (no route); ``fail_after_steps`` makes each
    session fail like a dying server after that many steps; while ``gate`` is set to an
    unset event, every step waits for it (a swarm that is slow to answer; ``step_started``
    is set when a step begins, ``cancelled_steps`` counts those cancelled while waiting);
    ``open_gate`` does the same for opening sessions.
    """

    def __init__(
        self,
        model_path: Path,
        model_id: str,
        *,
        covered: bool = True,
        fail_after_steps: int | None = None,
        adapters: Sequence[Path] = (),
    ) -> None:
        config = load_config(model_path)
        blocks = config.num_hidden_layers
        self.span = load_span(model_path, 0, blocks)
        loaded = read_adapters(adapters, config)
        attach_adapters(self.span, loaded)
        self.fail_after_steps = fail_after_steps
        self.opened = 0
        self.opens: list[tuple[str, list[str]]] = []  # (session id, prefix hashes) per open
        self.closed = 0
        self.steps = 0  # over all sessions
        self.gate: asyncio.Event | None = None
        self.step_started = asyncio.Event()
        self.cancelled_steps = 0
        self.open_gate: asyncio.Event | None = None
        servers = (
            {
                "local-peer": ServerRecord(
                    state=NodeState.ONLINE,
                    start=0,
                    end=blocks,
                    throughput=1.0,
                    adapters=tuple(a.name for a in loaded),
                )
            }
            if covered
            else {}
        )
        model = ModelRecord(
            name=model_id,
            architecture=config.model_type,
            num_blocks=blocks,
            hidden_size=config.hidden_size,
            max_length=config.max_position_embeddings,
        )
        self._snapshot = SwarmSnapshot(model=model, servers=servers)

    def snapshot(self) -> SwarmSnapshot:
        return self._snapshot

    async def open_session(
        self,
        max_length: int,
        *,
        session_id: str,
        secret: str,
        prefix_hashes: Sequence[str] = (),
        prefer: Sequence[Hop] | None = None,
        resume: tuple[int, str] = (0, ""),
        adapter: str | None = None,
    ) -> LocalSession:
        snapshot = self._snapshot.serving(adapter)
        route = plan_route(snapshot, snapshot.num_blocks)  # NoRoute when uncovered
        if self.open_gate is not None:
            await self.open_gate.wait()
        self.opened += 1
        self.opens.append((session_id, list(prefix_hashes)))
        return LocalSession(self, route, adapter)


class LocalSession:
    cached_tokens = 0  # every session starts from scratch here

    def __init__(
        self, client: LocalSwarmClient, route: list[Hop], adapter: str | None = None
    ) -> None:
        self._client = client
        self._adapter = adapter
        self.route = route
        self._cache = new_kv_buffers(client.span, client.span.start, client.span.end)
        self._steps = 0
        self._closed = False

    def reuse(self, tokens: int) -> None:
        """The next step starts after ``tokens``: at the start none are cached here;
        later, a rewind past drafts not taken."""
        assert 0 <= tokens <= self._cache.length
        self._cache.crop(tokens)

    async def step(self, hidden: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        self._client.step_started.set()
        if self._client.gate is not None:
            try:
                await self._client.gate.wait()
            except asyncio.CancelledError:
                self._client.cancelled_steps += 1
                raise
        self._steps += 1
        self._client.steps += 1
        limit = self._client.fail_after_steps
        if limit is not None and self._steps > limit:
            raise PeerUnavailable("local-peer went away", "local-peer")
        position = self._cache.length
        select_adapter(self._client.span, self._adapter)
        return forward_span(self._client.span, hidden, self._cache, position=position)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.closed += 1
