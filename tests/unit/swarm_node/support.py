"""Shared pieces of the node tests: inputs, a reference run, and a gate that holds the
compute thread inside a forward so tests can line up what waits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from models.loading import Span
from swarm_node import batching as batching_module
from swarm_node.backend import forward_span, new_kv_buffers

HIDDEN = 64  # the tiny model's


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def reference(span: Span, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each piece run after the previous ones on a session of its own, one at a time."""
    kv, position, outs = new_kv_buffers(span, span.start, span.end), 0, []
    for piece in pieces:
        outs.append(forward_span(span, piece, kv, position=position))
        position += piece.shape[1]
    return outs


class Gate:
    def __init__(self) -> None:
        self.entered = threading.Event()  # a gated forward is running
        self.open = threading.Event()  # it may finish


@contextmanager
def gated_forwards(
    monkeypatch: pytest.MonkeyPatch, when: Callable[[torch.Tensor], bool] = lambda hidden: True
) -> Iterator[Gate]:
    """Forwards whose packed input satisfies ``when`` block until the gate opens."""
    gate = Gate()
    real = batching_module.forward_packed

    def gated(span: Any, hidden: torch.Tensor, segments: Any, **kw: Any) -> torch.Tensor:
        if when(hidden):
            gate.entered.set()
            gate.open.wait(30)
        return real(span, hidden, segments, **kw)

    monkeypatch.setattr(batching_module, "forward_packed", gated)
    try:
        yield gate
    finally:
        gate.open.set()


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):  # bounded: 5 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError
