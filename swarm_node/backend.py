"""Forward passes over a span of blocks for several sessions at once. No I/O.

Every session's new tokens are packed into one sequence, ``[1, total, hidden]``, so one
forward runs the projections and MLPs of all of them together (the weights are read once
per step instead of once per session), while attention runs per session over that
session's own history: positions, masks and caches are per segment, never shared. A
decode step of sixteen sessions is sixteen one-token segments; a prefill chunk is one
longer segment, and both mix freely in one forward.

The blocks are the model's own Hugging Face modules; only attention is ours, registered
with transformers' ``AttentionInterface`` so the modules call it in place of SDPA. Families
whose attention is their modules' own code (Falcon, BLOOM; see ``models/families.py``) run
each segment through the blocks on its own instead (``swarm_node/per_segment.py``), behind
the same entry point.

``forward_packed`` is the serving entry point (inference mode, caches updated);
``run_span`` is the same computation under autograd, for backward passes through a span
(segments without caches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AttentionInterface

from models.devices import to_device, to_host
from models.loading import Span
from swarm_node.kv_buffers import KVBuffers, KVShape, Segment
from swarm_node.per_segment import run_per_segment

PACKED_ATTENTION = "swarmgate_packed"


class CacheMismatch(RuntimeError):
    """A cache's length disagrees with the position a step claims (a bug, never data)."""


def new_kv_buffers(span: Span, start: int, end: int) -> KVBuffers:
    """An empty cache for a session over blocks ``[start, end)`` of the span."""
    return KVBuffers(end - start, KVShape.of(span.config, span.dtype, span.device))


class _PackedStep:
    """Handed to the blocks as their ``past_key_values``: writes each segment's new keys
    and values into its session's buffers, and attends per segment."""

    def __init__(self, segments: Sequence[Segment], first_block: int) -> None:
        self._first_block = first_block  # the model-wide index of the sessions' first block
        self._parts: list[tuple[Segment, int, int]] = []  # (segment, first token, end)
        offset = 0
        for segment in segments:
            self._parts.append((segment, offset, offset + segment.length))
            offset += segment.length

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slot = layer_idx - self._first_block
        for segment, begin, end in self._parts:
            if segment.kv is not None:
                segment.kv.write(
                    slot, segment.position, keys[:, :, begin:end], values[:, :, begin:end]
                )
        return keys, values

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scaling: float | None,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """query: [1, heads, total, head_dim] → [1, total, heads, head_dim]."""
        slot = int(getattr(module, "layer_idx")) - self._first_block  # noqa: B009
        outputs = []
        for segment, begin, end in self._parts:
            q = query[:, :, begin:end]
            if segment.kv is None:
                k, v = keys[:, :, begin:end], values[:, :, begin:end]
            else:
                k, v = segment.kv.view(slot, segment.position + segment.length)
            outputs.append(_attention(q, k, v, scaling, sliding_window))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        return out.transpose(1, 2)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """One segment: its n queries are the last n of the keys it holds."""
    n, held = q.shape[2], k.shape[2]
    offset = held - n  # keys before the first query: the history
    mask, causal = None, False
    windowed = sliding_window is not None and held > sliding_window
    if n > 1 and offset == 0 and not windowed:
        causal = True  # the same kernel as a prompt through `generate`
    elif n > 1 or windowed:
        rows = torch.arange(offset, held, device=q.device).unsqueeze(1)
        cols = torch.arange(held, device=q.device).unsqueeze(0)
        mask = cols <= rows
        if sliding_window is not None:
            mask &= cols > rows - sliding_window
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=True
    )


def _packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    *,
    packed: _PackedStep,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    return packed.attend(module, query, key, value, scaling, sliding_window), None


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)


@torch.inference_mode()
def forward_packed(
    span: Span, hidden: torch.Tensor, segments: Sequence[Segment], *, start: int, end: int
) -> torch.Tensor:
    """``run_span`` without autograd: what serving runs. ``hidden`` may be on the host; the
    result is (fp32, on the host, complete), ready for the wire."""
    return to_host(run_span(span, hidden, segments, start=start, end=end))


def run_span(
    span: Span, hidden: torch.Tensor, segments: Sequence[Segment], *, start: int, end: int
) -> torch.Tensor:
    """Run the packed tokens of ``segments`` through blocks ``[start, end)`` (absolute
    indices; every segment's session covers exactly these blocks) and append them to their
    caches. A segment's cache must hold at least ``position`` tokens; any beyond are dropped
    first (an edited or regenerated turn). Positions are never inferred from a cache, so a
    cache that lost tokens is an error, not silently wrong output.

    Not under ``torch.inference_mode`` itself: training runs it with autograd (segments
    without caches), so gradients can flow back through the blocks.

    hidden: [1, total, hidden_size], any float dtype, on the host or the span's device;
    returns the same shape in fp32 on the span's device (a differentiable copy up, so
    gradients reach a host ``hidden``).
    """
    if hidden.shape[1] != sum(s.length for s in segments):
        raise ValueError("the packed tokens and the segments disagree")
    for segment in segments:
        if segment.kv is None:
            continue
        if segment.kv.length < segment.position:
            raise CacheMismatch(
                f"the cache holds {segment.kv.length} tokens, the step starts at {segment.position}"
            )
        segment.kv.crop(segment.position)
        segment.kv.ensure(segment.position + segment.length)
    layers = span.layers[start - span.start : end - span.start]
    x = to_device(hidden, span.device).to(span.dtype)
    if span.family.attention == "packed":
        x = _run_packed(span, layers, x, segments, start)
    else:
        x = run_per_segment(span, layers, x, segments, start)
    for segment in segments:
        if segment.kv is not None:
            segment.kv.length = segment.position + segment.length
    return x.float()


def _run_packed(
    span: Span,
    layers: Sequence[torch.nn.Module],
    x: torch.Tensor,
    segments: Sequence[Segment],
    first_block: int,
) -> torch.Tensor:
    """x: [1, total, hidden_size] in the span's dtype → the same, through ``layers``."""
    span.config._attn_implementation = PACKED_ATTENTION
    position_ids = torch.cat(
        [torch.arange(s.position, s.position + s.length) for s in segments]
    ).unsqueeze(0)
    position_ids = to_device(position_ids, x.device)
    if span.rotary is None:  # every packed family has one: this is a mis-described family
        raise ValueError(f"{span.config.model_type} has no rotary table for packed attention")
    cos, sin = span.rotary(x, position_ids)
    position_embeddings = (cos.to(x.dtype), sin.to(x.dtype))
    packed = _PackedStep(segments, first_block)
    for layer in layers:
        x = layer(
            x,
            attention_mask=None,
            position_ids=position_ids,
            past_key_values=packed,
            use_cache=True,
            position_embeddings=position_embeddings,
            packed=packed,
        )
    return x


def forward_span(
    span: Span,
    hidden: torch.Tensor,
    kv: KVBuffers | None,
    *,
    position: int = 0,
    start: int | None = None,
    end: int | None = None,
) -> torch.Tensor:
    """One session alone: ``hidden`` [1, n, hidden_size] at ``position ...`` through blocks
    ``[start, end)`` (default: the whole span)."""
    segment = Segment(kv, position, hidden.shape[1])
    return forward_packed(
        span,
        hidden,
        [segment],
        start=span.start if start is None else start,
        end=span.end if end is None else end,
    )
