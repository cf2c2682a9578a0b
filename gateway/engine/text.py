"""Turning a token stream into a text stream: UTF-8-safe increments and stop sequences."""

from __future__ import annotations

from typing import Any, Protocol


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> Any: ...


class IncrementalDetokenizer:
    """Emits text as tokens arrive, never half a character or half a merged word.

    Decoding each token alone breaks multi-byte characters and the spaces that tokenizers
    attach to neighbours, so each step decodes a short window of recent tokens and emits
    only what the window added once it no longer ends in an incomplete character.
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: context for decoding the new tokens
        self._read_offset = 0  # tokens already turned into emitted text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._prefix_offset, self._read_offset)
        after = self._decode(self._prefix_offset, len(self._ids))
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # an incomplete character: wait for the next token
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is left at the end of the stream, even if it is not valid UTF-8."""
        before = self._decode(self._prefix_offset, self._read_offset)
        after = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return after[len(before) :]

    def _decode(self, start: int, end: int) -> str:
        return str(self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True))


class StopMatcher:
    """Cuts text at the first stop sequence, holding back what might begin one."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text that is safe to emit now; sets ``stopped`` when a stop sequence appears."""
        if self.stopped:
            return ""
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buffer[: min(hits)]
        keep = self._longest_partial_stop(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_stop(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
