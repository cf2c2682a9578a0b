"""Settings of one gateway process, read once at startup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GatewaySettings:
    model_id: str  # the id clients send as `model`; also names the DHT prefix
    model_path: Path  # local Hugging Face folder: tokenizer, embedding, norm, LM head
    initial_peers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    namespace: str = ""
    redis_url: str | None = None  # shared affinity; None: kept in this process
    affinity: bool = True  # False: every request on a fresh session (for comparisons)
    api_keys: tuple[str, ...] = ()
    refresh_period_s: float = 2.0  # how often the swarm snapshot is re-read from the DHT
    # A hop's reply to one step may take this long, plus what its announced throughput
    # allows for the step's size; later it counts as failed and the session fails over.
    step_floor_s: float = 10.0
    prefill_chunk_tokens: int | None = None  # None: as many as fit one P2P message
    max_concurrent: int = 16  # generations running at once
    max_queue: int = 64  # requests waiting for a slot; beyond, 429 with Retry-After
    max_body_bytes: int = 4 * 1024 * 1024
