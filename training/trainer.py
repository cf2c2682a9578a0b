"""``train_lora``: fine-tune a LoRA adapter through the swarm.

The client holds the tokenizer, the frozen embedding, final norm and LM head (the
gateway's part of the model) and the adapter's tensors. Each step:

    embed the batch → train_forward through each hop of a chain covering every block
    → cross-entropy on the client → train_backward hop by hop in reverse (each hop's
    gradient of its input is the previous hop's gradient of its output) → AdamW on the
    LoRA tensors

Servers keep nothing between calls, so a step that fails (a server died, or refused)
is simply run again on a re-planned chain, up to ``max_retries`` times; the optimizer
moves only once a step's gradients are all in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from client.swarm_view import Hop, SwarmView
from models.devices import Placement, to_host
from models.families import family_of
from models.loading import Head, block_linears, load_config, load_head, load_tokenizer
from protocol.errors import SwarmError
from protocol.latency import SimulatedLink
from protocol.rpc import LoraSpec
from protocol.swarm import ModelRecord, dht_prefix
from training.data import IGNORE, Example, batches, collate, read_examples, token_loss
from training.lora import ClientLora
from training.remote import TrainClient
from training.settings import FinetuneSettings

logger = logging.getLogger("swarmgate.finetune")

RETRY_DELAY_S = 1.0
EVAL_EXAMPLES = 256  # the final loss is measured on the first examples of the data
SWARM_WAIT_S = 60.0  # how long to wait for a full chain at the start


@dataclass
class TrainResult:
    losses: list[float]  # each step's mean loss per trained token
    final_loss: float  # with the saved adapter, over the first EVAL_EXAMPLES examples
    adapter_dir: Path
    seconds_per_step: float
    # Over every hop's calls, forward and backward, retries included (not the evaluation).
    bytes_sent_per_step: float = 0.0
    bytes_received_per_step: float = 0.0
    retries: int = 0
    routes: list[list[Hop]] = field(default_factory=list)  # each step's chain


def train_lora(settings: FinetuneSettings, *, progress: TextIO | None = None) -> TrainResult:
    """Train, save the adapter to ``settings.out`` and say how it went; progress lines
    (step, loss, seconds per step) go to ``progress`` (default stderr)."""
    return asyncio.run(_train(settings, progress if progress is not None else sys.stderr))


async def _train(settings: FinetuneSettings, progress: TextIO) -> TrainResult:
    torch.manual_seed(settings.seed)
    config = load_config(settings.model_path)
    tokenizer = load_tokenizer(settings.model_path)
    examples = read_examples(settings.data, tokenizer, settings.max_length)
    placement = Placement.of(settings.device, settings.dtype)
    logger.info("head and loss on %s", placement.describe())
    head = load_head(settings.model_path, placement.device, placement.dtype)
    linears = block_linears(config)
    spec = LoraSpec(rank=settings.rank, alpha=settings.alpha, targets=list(settings.targets))
    blocks_path = family_of(config).blocks_path
    lora = ClientLora(
        linears, config.num_hidden_layers, spec, seed=settings.seed, blocks_path=blocks_path
    )
    swarm = SwarmView.join(
        settings.initial_peers,
        settings.membership,
        dht_prefix(settings.model_name, settings.namespace),
        ModelRecord.of(settings.model_name, config, revision=settings.model_revision),
        link=SimulatedLink.from_env(),  # its probes cross the link a benchmark simulates
    )
    try:
        await swarm.start()
        client = TrainClient(
            swarm.p2p,
            config.hidden_size,
            linears,
            spec,
            member_pass=swarm.member_pass,
            timeout_s=settings.call_timeout_s,
        )
        pad = tokenizer.pad_token_id
        pad = tokenizer.eos_token_id if pad is None else pad
        trainer = Trainer(swarm, client, head, lora, pad_id=int(pad or 0))
        return await trainer.run(examples, settings, progress)
    finally:
        await swarm.aclose()


class Trainer:
    """The training loop over a view of the swarm (plans, health) and a ``TrainClient``."""

    def __init__(
        self,
        swarm: SwarmView,
        client: TrainClient,
        head: Head,
        lora: ClientLora,
        *,
        pad_id: int,
    ) -> None:
        self._swarm = swarm
        self._client = client
        self._head = head
        self._lora = lora
        self._pad_id = pad_id
        self.retries = 0
        self.routes: list[list[Hop]] = []
        self._failed: set[str] = set()  # servers that failed a call of this run

    async def run(
        self, examples: Sequence[Example], settings: FinetuneSettings, progress: TextIO
    ) -> TrainResult:
        optimizer = torch.optim.AdamW(self._lora.parameters(), lr=settings.lr, weight_decay=0.0)
        await self._wait_for_chain()
        losses = []
        began = time.monotonic()
        plan = batches(len(examples), settings.batch_size, settings.steps, settings.seed)
        for step, indices in enumerate(plan, start=1):
            started = time.monotonic()
            ids, labels = collate([examples[i] for i in indices], self._pad_id)
            loss = await self._retrying(
                functools.partial(self.step, ids, labels), settings.max_retries
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            took = time.monotonic() - started
            sent = self._client.bytes_sent / step / 1e6
            print(
                f"step {step}/{settings.steps}  loss {loss:.4f}  {took:.2f} s/step  "
                f"{sent:.2f} MB sent/step",
                file=progress,
                flush=True,
            )
        seconds = (time.monotonic() - began) / max(1, len(plan))
        sent, received = self._client.bytes_sent, self._client.bytes_received
        final = await self.evaluate(examples[:EVAL_EXAMPLES], settings)
        self._lora.save(settings.out, settings.model_name)
        print(f"final loss {final:.4f}; adapter saved to {settings.out}", file=progress, flush=True)
        return TrainResult(
            losses=losses,
            final_loss=final,
            adapter_dir=settings.out,
            seconds_per_step=seconds,
            bytes_sent_per_step=sent / max(1, len(plan)),
            bytes_received_per_step=received / max(1, len(plan)),
            retries=self.retries,
            routes=self.routes,
        )

    async def step(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        """One batch forward and backward through a fresh chain; the LoRA tensors' grads
        are set (not accumulated: a retried step starts over). The mean loss."""
        route = self._plan()
        self.routes.append(route)
        hidden = self._embed(ids)
        inputs = []
        for hop in route:
            inputs.append(hidden)
            hidden = await self._client.forward(hop, self._span(hop), hidden)
        final = hidden.detach().requires_grad_(True)
        logits = self._logits(final)
        total, count = token_loss(logits, labels.to(logits.device))
        loss = total / max(count, 1)
        (grad,) = torch.autograd.grad(loss, [final])
        grads: dict[int, torch.Tensor] = {}
        for index in reversed(range(len(route))):
            hop = route[index]
            params = self._span(hop)
            dx, dlora = await self._client.backward(
                hop, params, inputs[index], grad, input_grad=index > 0
            )
            for param, g in zip(params, dlora, strict=True):
                grads[id(param)] = g
            if dx is not None:
                grad = dx
        for param in self._lora.parameters():
            param.grad = grads[id(param)]
        return float(loss.detach())

    async def evaluate(self, examples: Sequence[Example], settings: FinetuneSettings) -> float:
        """Mean loss per trained token over ``examples`` with the current adapter."""
        total, count = 0.0, 0
        for begin in range(0, len(examples), settings.batch_size):
            ids, labels = collate(examples[begin : begin + settings.batch_size], self._pad_id)

            async def forward(ids: torch.Tensor = ids, labels: torch.Tensor = labels) -> float:
                hidden = self._embed(ids)
                for hop in self._plan():
                    hidden = await self._client.forward(hop, self._span(hop), hidden)
                with torch.no_grad():
                    logits = self._logits(hidden)
                    part, _ = token_loss(logits, labels.to(logits.device))
                return float(part)

            total += await self._retrying(forward, settings.max_retries)
            count += int((labels[:, 1:] != IGNORE).sum())
        return total / max(count, 1)

    async def _retrying(self, attempt: Callable[[], Awaitable[float]], retries: int) -> float:
        for tries in range(retries + 1):
            try:
                return await attempt()
            except SwarmError as e:
                peer = getattr(e, "peer_id", None)
                if peer is not None:
                    self._swarm.failed(peer, e)
                    self._failed.add(peer)
                if tries == retries:
                    raise
                self.retries += 1
                logger.warning("step failed (%s); re-planning, retry %d/%d", e, tries + 1, retries)
                await asyncio.sleep(RETRY_DELAY_S)
                with contextlib.suppress(Exception):  # the old snapshot serves until it answers
                    await self._swarm.refresh()
        raise AssertionError("unreachable")

    async def _wait_for_chain(self) -> None:
        deadline = time.monotonic() + SWARM_WAIT_S
        while True:
            try:
                self._plan()
                return
            except SwarmError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await self._swarm.refresh()

    def _plan(self) -> list[Hop]:
        """A chain without the servers that failed this run, unless none exists without
        them (a ban alone only makes a server expensive: a fast one would be picked again)."""
        return self._swarm.plan(avoid=self._failed)

    def _span(self, hop: Hop) -> list[torch.nn.Parameter]:
        return self._lora.span(hop.start, hop.end)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, n] → the blocks' input [B, n, hidden] (fp32, on the host: for the wire)."""
        with torch.no_grad():
            return to_host(self._head.embed(ids.to(self._head.device)).float())

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, n, hidden] on the host → logits on the head's device; differentiable
        back to ``hidden`` (the copy up is a plain ``to``, which autograd follows)."""
        head = self._head
        rows = hidden.to(head.device, head.dtype)
        return head.lm_head(head.norm(rows))  # type: ignore[no-any-return]
