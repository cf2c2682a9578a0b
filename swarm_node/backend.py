"""Forward passes over a span of blocks, with or without a session's KV cache. No I/O."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask

from models.loading import Span


class CacheMismatch(RuntimeError):
    """A cache's length disagrees with the position a step claims (a bug, never data)."""


def new_cache(span: Span) -> DynamicCache:
    """An empty cache with one slot per block of the span (slot = the layer's local index)."""
    cache = DynamicCache()
    # Created up front so that a session using only part of the span can read its length
    # from its first slot instead of slot 0.
    cache.layers.extend(DynamicLayer() for _ in span.layers)  # type: ignore[no-untyped-call]
    return cache


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every block's keys and values."""
    for layer in cache.layers:
        held = layer.get_seq_length()  # type: ignore[union-attr]
        if held > length:
            layer.crop(length - held)  # type: ignore[union-attr]  # negative: tokens to drop


def copy_prefix(source: DynamicCache, target: DynamicCache, length: int) -> None:
    """Give the empty ``target`` its own copy of ``source``'s first ``length`` positions. Run
    on the compute thread: ``source`` may belong to a session whose steps run there too."""
    for mine, theirs in zip(target.layers, source.layers, strict=True):
        keys, values = getattr(theirs, "keys", None), getattr(theirs, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
            mine.update(keys[:, :, :length].clone(), values[:, :, :length].clone())  # type: ignore[union-attr]


def cache_bytes(cache: DynamicCache) -> int:
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def forward_span(
    span: Span,
    hidden: torch.Tensor,
    cache: DynamicCache | None,
    *,
    position: int = 0,
    start: int | None = None,
    end: int | None = None,
) -> torch.Tensor:
    """Run ``hidden`` through blocks ``[start, end)`` (absolute indices, default: the whole
    span) at positions ``position, position + 1, ...``, appending to ``cache`` when one is
    given. The cache must hold exactly ``position`` tokens: positions are never inferred from
    it, so a cache that lost or gained tokens is an error, not silently wrong output.

    hidden: [batch, n, hidden_size], any float dtype; returns the same shape in fp32.
    """
    first = (span.start if start is None else start) - span.start
    last = (span.end if end is None else end) - span.start
    held = cache.get_seq_length(first) if cache is not None else position
    if held != position:
        raise CacheMismatch(f"the cache holds {held} tokens, the step starts at {position}")
    x = hidden.to(span.dtype)
    # position_ids: [1, n]; every row of a batch shares one history length.
    position_ids = torch.arange(position, position + x.shape[1]).unsqueeze(0)
    mask = create_causal_mask(
        config=span.config,
        inputs_embeds=x,
        attention_mask=None,
        past_key_values=cache,
        position_ids=position_ids,
        layer_idx=first,
    )
    cos, sin = span.rotary(x, position_ids)
    position_embeddings = (cos.to(x.dtype), sin.to(x.dtype))
    for layer in span.layers[first:last]:
        x = layer(
            x,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )
    return x.float()


def inference_step(
    span: Span, hidden: torch.Tensor, cache: DynamicCache, *, position: int, start: int, end: int
) -> torch.Tensor:
    """One step of a session: drop cached tokens from ``position`` on (an edited or
    regenerated turn), then run ``hidden`` from there. Every change to a session's cache
    happens here, on the compute thread, so none races a running forward."""
    crop_cache(cache, position)
    return forward_span(span, hidden, cache, position=position, start=start, end=end)
