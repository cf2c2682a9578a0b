"""Forward passes for families whose attention is their modules' own code (Falcon, BLOOM).

Their blocks call ``layer_past.update(keys, values, layer_idx)`` and apply the 4D mask and
ALiBi bias they are handed, so tokens of different sessions cannot share one sequence:
each segment runs through the blocks on its own (batch 1), with a cache adapter over its
``KVBuffers`` and the mask and bias HF's own model would build for it. The projections of
different sessions are therefore not batched together; decode steps of many sessions cost
one small forward each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from models.devices import to_device
from models.loading import Span
from swarm_node.kv_buffers import KVBuffers, Segment


class _SegmentCache:
    """Handed to the blocks as their ``layer_past``: writes the new keys and values into
    the session's buffers and returns views of its whole history (no copy of it)."""

    def __init__(self, kv: KVBuffers | None, position: int, first_block: int) -> None:
        self._kv = kv
        self._position = position
        self._first_block = first_block

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: [1, heads, n, head_dim] → [1, heads, position + n, head_dim] each."""
        if self._kv is None:
            return keys, values
        slot = layer_idx - self._first_block
        self._kv.write(slot, self._position, keys, values)
        return self._kv.view(slot, self._position + keys.shape[2])


def run_per_segment(
    span: Span,
    layers: Sequence[torch.nn.Module],
    x: torch.Tensor,
    segments: Sequence[Segment],
    first_block: int,
) -> torch.Tensor:
    """x: [1, total, hidden_size] in the span's dtype → the same, each segment alone."""
    outputs, offset = [], 0
    for segment in segments:
        piece = x[:, offset : offset + segment.length]
        outputs.append(_run_segment(span, layers, piece, segment, first_block))
        offset += segment.length
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _run_segment(
    span: Span,
    layers: Sequence[torch.nn.Module],
    x: torch.Tensor,
    segment: Segment,
    first_block: int,
) -> torch.Tensor:
    """x: [1, n, hidden_size], one session's tokens at ``segment.position ...``."""
    segment_inputs = span.family.segment_inputs
    if segment_inputs is None:
        raise ValueError(f"{span.config.model_type} has no per-segment inputs")
    n = segment.length
    held = n if segment.kv is None else segment.position + n
    # Built on the host (small: a mask and a bias over the held keys), used on the device.
    inputs = {
        name: to_device(value, x.device) if isinstance(value, torch.Tensor) else value
        for name, value in segment_inputs(span.config, n, held, x.dtype).items()
    }
    if span.rotary is not None:
        position_ids = torch.arange(segment.position, segment.position + n).unsqueeze(0)
        position_ids = to_device(position_ids, x.device)
        cos, sin = span.rotary(x, position_ids)
        inputs.update(
            position_ids=position_ids, position_embeddings=(cos.to(x.dtype), sin.to(x.dtype))
        )
    cache = _SegmentCache(segment.kv, segment.position, first_block)
    for layer in layers:
        out = layer(x, layer_past=cache, use_cache=True, **inputs)
        x = out[0] if isinstance(out, tuple) else out
    return x
