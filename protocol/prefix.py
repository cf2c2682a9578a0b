"""Chained hashes of token blocks: how gateways and servers agree on a cached prefix.

Servers never see tokens, only these hashes. Block ``i``'s hash covers tokens
``[0, (i + 1) * BLOCK_TOKENS)``, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

BLOCK_TOKENS = 32
MAX_BLOCKS = 8192  # bounds an open message: 256k tokens of history
_DIGEST_BYTES = 16


def _chain(previous: str, block: Sequence[int]) -> str:
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    digest.update(previous.encode())
    digest.update(b"".join(t.to_bytes(4, "little", signed=False) for t in block))
    return digest.hexdigest()


def block_hashes(tokens: Sequence[int], salt: str = "") -> list[str]:
    """The chained hash of every full block of ``tokens``; ``salt`` separates models."""
    hashes: list[str] = []
    previous = salt
    for end in range(BLOCK_TOKENS, len(tokens) + 1, BLOCK_TOKENS):
        previous = _chain(previous, tokens[end - BLOCK_TOKENS : end])
        hashes.append(previous)
    return hashes


def common_prefix(a: Sequence[object], b: Sequence[object]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def common_blocks(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading blocks two hash lists share (chaining makes equal ⇒ equal prefix)."""
    return common_prefix(a, b)


class TokenHistory:
    """Tokens fed to a session so far, with the hashes of their full blocks kept current."""

    def __init__(self, tokens: Sequence[int] = (), salt: str = "") -> None:
        self.tokens: list[int] = []
        self.hashes: list[str] = []
        self._salt = salt
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)
        while (len(self.hashes) + 1) * BLOCK_TOKENS <= len(self.tokens):
            start = len(self.hashes) * BLOCK_TOKENS
            previous = self.hashes[-1] if self.hashes else self._salt
            self.hashes.append(_chain(previous, self.tokens[start : start + BLOCK_TOKENS]))

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (drafts not taken, an edited turn)."""
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"cannot keep {length} of {len(self.tokens)} tokens")
        del self.tokens[length:]
        del self.hashes[length // BLOCK_TOKENS :]

    def digest(self, length: int) -> str:
        """One hash of the first ``length`` tokens, partial last block included: equal digests
        mean equal token histories, where block hashes only vouch for full blocks."""
        full = min(length, len(self.tokens)) // BLOCK_TOKENS
        previous = self.hashes[full - 1] if full else self._salt
        tail = self.tokens[full * BLOCK_TOKENS : length]
        return _chain(previous, tail) if tail else previous
