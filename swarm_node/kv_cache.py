"""Per-session KV caches under a byte budget. The only place that creates or drops them.

A session reserves room for its ``max_length`` tokens when it opens, so a server never
accepts more sessions than it can finish: past the budget, opening fails with
``CapacityExceeded`` and the gateway routes elsewhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from transformers import DynamicCache

from protocol.errors import CapacityExceeded, InvalidRequest


@dataclass
class Session:
    session_id: str
    start: int
    end: int
    max_length: int
    reserved_bytes: int
    cache: DynamicCache
    position: int = 0  # tokens held in the cache
    opened_at: float = field(default_factory=time.monotonic)


class SessionStore:
    def __init__(self, budget_bytes: int, bytes_per_token_per_block: int) -> None:
        self.budget_bytes = budget_bytes
        self._per_token_block = bytes_per_token_per_block
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def reserved_bytes(self) -> int:
        return sum(s.reserved_bytes for s in self._sessions.values())

    @property
    def free_bytes(self) -> int:
        return max(0, self.budget_bytes - self.reserved_bytes)

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def open(
        self, session_id: str, start: int, end: int, max_length: int, cache: DynamicCache
    ) -> Session:
        if session_id in self._sessions:
            raise InvalidRequest(f"session {session_id} is already open on this server")
        need = max_length * (end - start) * self._per_token_block
        if need > self.free_bytes:
            raise CapacityExceeded(
                f"session needs {need} cache bytes, {self.free_bytes} of "
                f"{self.budget_bytes} are free"
            )
        session = Session(session_id, start, end, max_length, need, cache)
        self._sessions[session_id] = session
        return session

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
