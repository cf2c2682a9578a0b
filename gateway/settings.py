"""Settings of one gateway process, read once at startup."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from protocol.membership import Membership


@dataclass(frozen=True)
class GatewaySettings:
    model_id: str  # the id clients send as `model`; also names the DHT prefix
    model_path: Path  # local Hugging Face folder: tokenizer, embedding, norm, LM head
    model_revision: str = ""  # the commit of a Hub model (servers' records carry it); "" local
    initial_peers: tuple[str, ...] = ()
    membership: Membership | None = field(default=None, repr=False)  # None: an open swarm
    # Where the embeddings, final norm and LM head compute, and in which dtype
    # (models/devices.py: auto is CUDA in bfloat16 where there is one, else the CPU in fp32).
    device: str = "auto"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    # /metrics alone, without an API key, on a port of its own (None: none); for Prometheus
    # inside a cluster, while the API port needs keys for everything but /health.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    namespace: str = ""
    # Shared affinity; None: kept in this process. May hold a password: never in a repr.
    redis_url: str | None = field(default=None, repr=False)
    affinity: bool = True  # False: every request on a fresh session (for comparisons)
    # Servers send hidden states straight to the next hop; False: all through the gateway.
    push: bool = True
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # How often the swarm snapshot is re-read from the DHT: every refresh_period_s while
    # the swarm changes, backing off to max_refresh_period_s while it stays the same.
    refresh_period_s: float = 2.0
    max_refresh_period_s: float = 10.0
    # A hop's reply to one step may take this long, plus what its announced throughput
    # allows for the step's size; later it counts as failed and the session fails over.
    step_floor_s: float = 10.0
    prefill_chunk_tokens: int | None = None  # None: as many as fit one P2P message
    max_concurrent: int = 16  # generations at once (n choices or prompts count n)
    max_queue: int = 64  # requests waiting for a slot; beyond, 429 with Retry-After
    # Generations one API key may have running or queued. None: with API keys, as many as
    # max_concurrent; without, no cap (anyone can send any bearer token: the global limits
    # apply). A given value applies to every key (without keys: per bearer token).
    max_concurrent_per_key: int | None = None
    # Caps of their own for some keys (from the key file's `max_concurrent=N`), over the one
    # above. Keys are secrets: never in a repr.
    key_limits: dict[str, int] = field(default_factory=dict, repr=False, hash=False)
    # How long a request over its key's cap waits for one of the key's own generations to
    # finish before it is refused (429); 0: refused at once.
    queue_timeout_s: float = 5.0
    max_body_bytes: int = 4 * 1024 * 1024
    send_timeout_s: float = 30.0  # a stream whose client reads nothing this long is cancelled
    default_max_tokens: int = 1024  # for chat requests that set none (completions: 16)
    max_generation_s: float = 600.0  # then a request's generation ends, finish_reason "length"
    # Structured outputs: compiled grammars kept, and how long a request waits for its own
    # (past that, a 400 when its compile had begun: the schema is too complex).
    grammar_cache_size: int = 256
    grammar_compile_timeout_s: float = 5.0
    response_ttl_s: float = 86400.0  # how long a stored response (`store: true`) is kept
