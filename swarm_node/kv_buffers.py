"""One session's keys and values, in buffers it owns. No I/O, no model code.

A session's history lives in two preallocated tensors, keys and values, each
``[blocks, kv_heads, capacity, head_dim]``: a step writes its new tokens in place and
attention reads a view of the first ``length`` positions, so no step copies the history
(``DynamicCache`` concatenates every block's whole history on every token). Capacity grows
geometrically, and never past the tokens the session's stream reserved, so growth copies
are amortized and the bytes held are exactly ``nbytes``. Truncation (an edited turn) only
moves ``length``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.devices import CPU
from models.families import cache_heads

ALIGN_TOKENS = 64  # capacity grows in multiples of this: few, cheap reallocations
GROWTH = 1.5


@dataclass(frozen=True)
class KVShape:
    """What one token costs in one block: ``kv_heads`` heads of ``head_dim``, in ``dtype``.
    ``kv_heads`` counts what the blocks' cache update receives, which is not always the
    config's key/value heads (Falcon's new decoder architecture hands over every head)."""

    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device = CPU  # where the buffers live: the blocks' device

    @classmethod
    def of(cls, config: object, dtype: torch.dtype, device: torch.device = CPU) -> KVShape:
        heads = getattr(config, "num_attention_heads")  # noqa: B009 - configs are untyped
        kv_heads = cache_heads(config)
        head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size") // heads  # noqa: B009
        return cls(int(kv_heads), int(head_dim), dtype, device)

    @property
    def bytes_per_token_per_block(self) -> int:
        """Keys and values of one token in one block."""
        return 2 * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


class KVBuffers:
    """Keys and values of ``blocks`` consecutive blocks; slot ``i`` is the session's i-th."""

    def __init__(self, blocks: int, shape: KVShape) -> None:
        self.blocks = blocks
        self.shape = shape
        self.length = 0  # positions held, in every slot
        # Bumped whenever held positions are given up: a copy planned from this session's
        # prefix checks it, since the positions it planned to copy may have been rewritten.
        self.version = 0
        self.limit = 0  # growth stops here (the reserved tokens); needs past it still fit
        self._keys = self._empty(0)
        self._values = self._empty(0)

    @property
    def capacity(self) -> int:
        return self._keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self._keys.numel() * self._keys.element_size()

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (O(1): the rest is overwritten later)."""
        if length < self.length:
            self.length = length
            self.version += 1

    def ensure(self, tokens: int) -> None:
        """Room for ``tokens`` positions; held ones are kept."""
        if tokens <= self.capacity:
            return
        grown = max(tokens, int(self.capacity * GROWTH))
        grown = -(-grown // ALIGN_TOKENS) * ALIGN_TOKENS
        capacity = min(grown, max(self.limit, tokens))
        keys, values = self._empty(capacity), self._empty(capacity)
        keys[:, :, : self.length] = self._keys[:, :, : self.length]
        values[:, :, : self.length] = self._values[:, :, : self.length]
        self._keys, self._values = keys, values

    def write(self, slot: int, position: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: [1, kv_heads, n, head_dim] for positions ``position ...``."""
        end = position + keys.shape[2]
        self._keys[slot, :, position:end] = keys[0]
        self._values[slot, :, position:end] = values[0]

    def view(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of a slot: [1, kv_heads, length, head_dim] each."""
        return (
            self._keys[slot, :, :length].unsqueeze(0),
            self._values[slot, :, :length].unsqueeze(0),
        )

    def copy_prefix(self, donor: KVBuffers, tokens: int) -> None:
        """Hold a copy of ``donor``'s first ``tokens`` positions (this session is empty)."""
        self.ensure(tokens)
        self._keys[:, :, :tokens] = donor._keys[:, :, :tokens]
        self._values[:, :, :tokens] = donor._values[:, :, :tokens]
        self.length = tokens

    def _empty(self, capacity: int) -> torch.Tensor:
        shape = self.shape
        return torch.empty(
            (self.blocks, shape.kv_heads, capacity, shape.head_dim),
            dtype=shape.dtype,
            device=shape.device,
        )


@dataclass(frozen=True)
class Segment:
    """One session's tokens in a packed forward: ``length`` tokens at ``position ...``.

    ``kv`` None: no cache, the tokens attend causally to each other only (probes, training)."""

    kv: KVBuffers | None
    position: int
    length: int
