"""How fast this server decodes: measured once at startup, announced in its record."""

from __future__ import annotations

import time

import torch

from models.loading import Span
from swarm_node.backend import forward_span, new_kv_buffers

WARMUP_STEPS = 2
MEASURED_STEPS = 4


def measure_decode_throughput(span: Span) -> float:
    """Single-token decode steps per second through the whole span (a short cache)."""
    cache = new_kv_buffers(span, span.start, span.end)
    hidden = torch.randn(1, 8, span.config.hidden_size)
    forward_span(span, hidden, cache)
    step = hidden[:, :1]
    position = hidden.shape[1]
    for _ in range(WARMUP_STEPS):
        forward_span(span, step, cache, position=position)
        position += 1
    began = time.perf_counter()
    for _ in range(MEASURED_STEPS):
        forward_span(span, step, cache, position=position)
        position += 1
    return MEASURED_STEPS / max(time.perf_counter() - began, 1e-9)
