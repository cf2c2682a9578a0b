"""The training loop on an in-process swarm: a server that fails mid-step is reported and
avoided, the step re-runs on another chain, and the run ends exactly as one without it."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence, Set
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from models.loading import Span, block_linears, load_config, load_head, load_span
from protocol.errors import NoRouteError, PeerUnavailable, SwarmError
from protocol.rpc import LoraSpec
from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.costs import RouteCosts
from routing.planner import Hop, plan_route
from routing.snapshot import SwarmSnapshot
from swarm_node.training import LoraCall, train_backward, train_forward
from tests.tiny_model import TINY_BLOCKS
from training.data import parse_lines
from training.lora import ClientLora
from training.settings import FinetuneSettings
from training.trainer import Trainer

SPEC = LoraSpec(rank=2, alpha=4, targets=["q_proj", "v_proj"])
HALF = TINY_BLOCKS // 2


class LocalSwarm:
    """Two halves of the model, each held by two servers; ``failed`` bans a peer."""

    def __init__(self, model: ModelRecord) -> None:
        def record(start: int, end: int, throughput: float) -> ServerRecord:
            return ServerRecord(
                model=model.digest,
                state=NodeState.ONLINE,
                start=start,
                end=end,
                throughput=throughput,
            )

        servers = {
            "a-fast": record(0, HALF, 100.0),
            "a-slow": record(0, HALF, 1.0),
            "b-fast": record(HALF, TINY_BLOCKS, 100.0),
            "b-slow": record(HALF, TINY_BLOCKS, 1.0),
        }
        self._snapshot = SwarmSnapshot(model=model, servers=servers)
        self.banned: set[str] = set()
        self.refreshed = 0

    def snapshot(self) -> SwarmSnapshot:
        return self._snapshot

    def costs(self) -> RouteCosts:
        return RouteCosts(banned=frozenset(self.banned))

    def plan(self, *, avoid: Set[str] = frozenset()) -> list[Hop]:
        # As SwarmView.plan: the servers to avoid only when nobody else can take a span.
        snapshot, costs = self._snapshot, self.costs()
        try:
            return plan_route(snapshot, snapshot.num_blocks, exclude=avoid, costs=costs)
        except NoRouteError:
            return plan_route(snapshot, snapshot.num_blocks, costs=costs)

    def failed(self, peer_id: str, error: SwarmError) -> None:
        self.banned.add(peer_id)

    async def refresh(self) -> SwarmSnapshot:
        self.refreshed += 1
        return self._snapshot


class LocalClient:
    """Runs training calls on an in-process span; ``dies`` fails on its first backward."""

    def __init__(self, span: Span, dies: str | None = None) -> None:
        self._span = span
        self._linears = block_linears(span.config)
        self._dies = dies
        self.calls: list[str] = []

    def _call(self, hop: Hop) -> LoraCall:
        return LoraCall(hop.start, hop.end, SPEC.rank, SPEC.alpha, tuple(SPEC.targets))

    async def forward(
        self, hop: Hop, lora: Sequence[torch.Tensor], hidden: torch.Tensor
    ) -> torch.Tensor:
        self.calls.append(f"forward {hop.peer_id}")
        lora = [t.detach() for t in lora]
        return train_forward(self._span, self._call(hop), self._linears, lora, hidden)

    async def backward(
        self,
        hop: Hop,
        lora: Sequence[torch.Tensor],
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        *,
        input_grad: bool,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        self.calls.append(f"backward {hop.peer_id}")
        if hop.peer_id == self._dies:
            self._dies = None
            raise PeerUnavailable(f"{hop.peer_id} closed the stream", hop.peer_id)
        lora = [t.detach() for t in lora]
        return train_backward(
            self._span,
            self._call(hop),
            self._linears,
            lora,
            hidden,
            grad_out,
            input_grad=input_grad,
        )

    bytes_sent = 0
    bytes_received = 0


def run(tiny_model: Path, dies: str | None) -> tuple[list[float], float, LocalSwarm, LocalClient]:
    config = load_config(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lines = [f'{{"prompt": "Q{i}: hello?", "completion": " yes"}}' for i in range(6)]
    examples = parse_lines(lines, tokenizer, 32)
    swarm = LocalSwarm(ModelRecord.of("tiny", config))
    client = LocalClient(load_span(tiny_model, 0, TINY_BLOCKS), dies)
    lora = ClientLora(block_linears(config), TINY_BLOCKS, SPEC, seed=1)
    trainer = Trainer(
        swarm,  # type: ignore[arg-type]
        client,  # type: ignore[arg-type]
        load_head(tiny_model),
        lora,
        pad_id=int(tokenizer.eos_token_id),
    )
    settings: Any = FinetuneSettings(
        model_name="tiny",
        model_path=tiny_model,
        initial_peers=(),
        data=Path("unused"),
        out=tiny_model.parent / f"adapter-{dies}",
        steps=3,
        lr=1e-2,
        batch_size=3,
        seed=2,
    )
    result = asyncio.run(trainer.run(examples, settings, io.StringIO()))
    return result.losses, result.final_loss, swarm, client


def test_a_server_dying_mid_step_costs_a_retry_not_the_run(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("training.trainer.RETRY_DELAY_S", 0.0)
    losses, final, _, healthy = run(tiny_model, None)
    assert "backward b-fast" in healthy.calls and "forward b-slow" not in healthy.calls

    retried_losses, retried_final, swarm, client = run(tiny_model, "b-fast")
    assert swarm.banned == {"b-fast"} and swarm.refreshed >= 1
    # The step re-ran from its forward on the replica, and never touched the dead server.
    after = client.calls[client.calls.index("backward b-fast") + 1 :]
    assert after[:2] == ["forward a-fast", "forward b-slow"]
    assert "b-fast" not in " ".join(after)
    assert retried_losses == pytest.approx(losses, abs=1e-6)
    assert retried_final == pytest.approx(final, abs=1e-6)
