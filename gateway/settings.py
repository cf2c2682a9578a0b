"""Settings of one gateway process, read once at startup.

A field set from the command line carries its flag in its metadata, as plain data (see
swarm_node/settings.py). A flag that a node's settings already declare (`--device`,
`--namespace`, ...) is named here without help: declared once, it fills both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from protocol.membership import Membership

# --speculate: no drafts, prompt lookup's (gateway/engine/drafting.py), or a draft model's
# (gateway/engine/draft_model.py).
SPECULATE_MODES = ("off", "lookup", "draft")
# --draft-quantization: as a node's --quant (models/quantization.py).
DRAFT_QUANTIZATIONS = ("none", "int8", "nf4")


@dataclass(frozen=True)
class GatewaySettings:
    model_id: str  # the id clients send as `model`; also names the DHT prefix
    model_path: Path  # local Hugging Face folder: tokenizer, embedding, norm, LM head
    model_revision: str = ""  # the commit of a Hub model (servers' records carry it); "" local
    initial_peers: tuple[str, ...] = field(default=(), metadata={"flag": "--initial-peers"})
    membership: Membership | None = field(default=None, repr=False)  # None: an open swarm
    # Where the embeddings, final norm and LM head compute, and in which dtype
    # (models/devices.py: auto is CUDA in bfloat16 where there is one, else the CPU in fp32).
    device: str = field(default="auto", metadata={"flag": "--device"})
    dtype: str = field(default="auto", metadata={"flag": "--dtype"})
    host: str = field(
        default="127.0.0.1",
        metadata={
            "flag": "--host",
            "help": "address the API listens on; one other than loopback needs API keys or "
            "--allow-open",
        },
    )
    port: int = field(default=8000, metadata={"flag": "--port", "help": "port of the API"})
    # /metrics alone, without an API key, on a port of its own (None: none); for Prometheus
    # inside a cluster, while the API port needs keys for everything but /health.
    metrics_port: int | None = field(default=None, metadata={"flag": "--metrics-port"})
    metrics_host: str = field(default="127.0.0.1", metadata={"flag": "--metrics-host"})
    namespace: str = field(default="", metadata={"flag": "--namespace"})
    # Shared affinity; None: kept in this process. May hold a password: never in a repr.
    redis_url: str | None = field(
        default=None,
        repr=False,
        metadata={
            "flag": "--redis-url",
            "env": "REDIS_URL",
            "secret": True,
            "help": "Redis for affinity shared by gateways (better: the REDIS_URL env var, "
            "which other users of the machine cannot read from the process list)",
        },
    )
    # False: every request on a fresh session (for comparisons)
    affinity: bool = field(
        default=True,
        metadata={
            "flag": "--no-affinity",
            "help": "start every request on a fresh session (no KV cache reuse across requests)",
        },
    )
    # Servers send hidden states straight to the next hop; False: all through the gateway.
    push: bool = field(
        default=True,
        metadata={
            "flag": "--no-push",
            "help": "relay every hop's hidden states through the gateway instead of letting "
            "servers push them to the next hop (for comparisons)",
        },
    )
    # From --api-key and --api-key-file together (swarmgate/commands.py).
    api_keys: tuple[str, ...] = field(
        default=(),
        repr=False,
        metadata={
            "flag": "--api-key",
            "repeat": True,
            "secret": True,
            "help": "require `Authorization: Bearer KEY` (repeat for several keys; better: "
            "SWARMGATE_API_KEY or --api-key-file, which stay off the process list)",
        },
    )
    # How often the swarm snapshot is re-read from the DHT: every refresh_period_s while
    # the swarm changes, backing off to max_refresh_period_s while it stays the same.
    refresh_period_s: float = 2.0
    max_refresh_period_s: float = 10.0
    # A hop's reply to one step may take this long, plus what its announced throughput
    # allows for the step's size; later it counts as failed and the session fails over.
    step_floor_s: float = field(
        default=10.0,
        metadata={
            "flag": "--step-floor",
            "help": "seconds any server may take for one step, plus what its announced "
            "throughput allows, before it counts as failed and the session moves on without it",
        },
    )
    prefill_chunk_tokens: int | None = field(  # None: as many as fit one P2P message
        default=None,
        metadata={
            "flag": "--prefill-chunk-tokens",
            "help": "tokens per prefill message (default: as many as fit)",
        },
    )
    max_concurrent: int = field(  # generations at once (n choices or prompts count n)
        default=16,
        metadata={
            "flag": "--max-concurrent",
            "help": "generations running at once (a request with n choices or several "
            "prompts runs that many)",
        },
    )
    max_queue: int = field(  # requests waiting for a slot; beyond, 429 with Retry-After
        default=64,
        metadata={
            "flag": "--max-queue",
            "help": "requests waiting for a slot; beyond this, 429 with Retry-After",
        },
    )
    # Generations one API key may have running or queued. None: with API keys, as many as
    # max_concurrent; without, no cap (anyone can send any bearer token: the global limits
    # apply). A given value applies to every key (without keys: per bearer token).
    max_concurrent_per_key: int | None = field(
        default=None,
        metadata={
            "flag": "--max-concurrent-per-key",
            "check": "positive",
            "help": "generations one API key may have running or queued (a request asking for "
            "more takes them all), unless the key file gives the key its own max_concurrent "
            "(default: with API keys, --max-concurrent; without, no cap, or if given, per "
            "bearer token and all requests without one together)",
        },
    )
    # Caps of their own for some keys (from the key file's `max_concurrent=N`), over the one
    # above. Keys are secrets: never in a repr.
    key_limits: dict[str, int] = field(default_factory=dict, repr=False, hash=False)
    # How long a request over its key's cap waits for one of the key's own generations to
    # finish before it is refused (429); 0: refused at once.
    queue_timeout_s: float = field(
        default=5.0,
        metadata={
            "flag": "--queue-timeout",
            "check": "non_negative",
            "help": "seconds a request over its key's cap waits for one of the key's own "
            "generations to finish; then 429 with Retry-After (0: at once)",
        },
    )
    max_body_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata={
            "flag": "--max-body-bytes",
            "check": "positive",
            "help": "largest request body read; a larger one is refused (413) before it is "
            "read whole",
        },
    )
    # A stream whose client reads nothing this long is cancelled.
    send_timeout_s: float = field(
        default=30.0,
        metadata={
            "flag": "--send-timeout",
            "check": "positive",
            "help": "seconds a stream may wait for its client to read; then it is cancelled "
            "and its slot freed",
        },
    )
    default_max_tokens: int = field(  # for chat requests that set none (completions: 16)
        default=1024,
        metadata={
            "flag": "--default-max-tokens",
            "check": "positive",
            "help": "tokens a chat completion may generate when the request sets no "
            "max_tokens (completions default to 16, as OpenAI's)",
        },
    )
    # Then a request's generation ends, finish_reason "length".
    max_generation_s: float = field(
        default=600.0,
        metadata={
            "flag": "--max-generation-seconds",
            "check": "positive",
            "help": "a request generating this long ends with finish_reason `length`",
        },
    )
    # Structured outputs: compiled grammars kept, and how long a request waits for its own
    # (past that, a 400 when its compile had begun: the schema is too complex).
    grammar_cache_size: int = field(
        default=256,
        metadata={
            "flag": "--grammar-cache-size",
            "check": "positive",
            "help": "compiled response formats (JSON schemas, tool grammars) kept for reuse",
        },
    )
    grammar_compile_timeout_s: float = field(
        default=5.0,
        metadata={
            "flag": "--grammar-compile-timeout",
            "check": "positive",
            "help": "seconds a request waits for its response format to compile; then 400 "
            "(the schema is too complex)",
        },
    )
    # Greedy tokens through a bf16 copy of an fp32 LM head on a CPU, checked in fp32
    # (gateway/engine/greedy_head.py): on, off, or auto (where it is timed faster at start).
    greedy_screen: str = field(
        default="auto",
        metadata={
            "flag": "--greedy-screen",
            "choices": ("on", "off", "auto"),
            "help": "greedy tokens through a bf16 copy of an fp32 LM head on a CPU, checked in "
            "fp32: auto where it is faster on this machine (timed at start), on wherever it "
            "can (its bound checked at start), off never",
        },
    )
    # Speculative decoding (gateway/engine/drafting.py): drafts verified in one chain pass.
    speculate: str = field(
        default="off",
        metadata={
            "flag": "--speculate",
            "choices": SPECULATE_MODES,
            "help": "draft tokens and verify them in one pass of the chain, with output "
            "identical to decoding without: lookup proposes the continuation of an earlier "
            "occurrence of the last tokens in the conversation (pays on edits, code and "
            "quotes, and most across slow links); draft runs --draft-model on the gateway",
        },
    )
    # --speculate draft: a whole small model on the gateway (device and dtype as the head's)
    # guesses each stream's next tokens greedily (gateway/engine/draft_model.py).
    draft_model: str | None = field(
        default=None,
        metadata={
            "flag": "--draft-model",
            "help": "with --speculate draft: a small model sharing the served model's "
            "tokenizer, e.g. smollm2 over a bigger model of its family; smollm2, a folder or "
            "a Hub id ORG/NAME",
        },
    )
    draft_layers: int | None = field(
        default=None,
        metadata={
            "flag": "--draft-layers",
            "check": "positive",
            "help": "run only the draft model's first N blocks: faster drafts, fewer of them "
            "right (default: all)",
        },
    )
    draft_quantization: str = field(
        default="none",
        metadata={
            "flag": "--draft-quantization",
            "choices": DRAFT_QUANTIZATIONS,
            "help": "the draft model's blocks through bitsandbytes: int8 or nf4 (less memory; "
            "drafts right a little less often, the output stays the same)",
        },
    )
    speculate_tokens: int = field(
        default=8,
        metadata={
            "flag": "--speculate-tokens",
            "check": "positive",
            "help": "most draft tokens one pass verifies (each stream adapts its own drafts "
            "to what it accepts, and stops drafting where they do not pay)",
        },
    )
    speculate_max_streams: int = field(
        default=8,
        metadata={
            "flag": "--speculate-max-streams",
            "check": "positive",
            "help": "above this many streams decoding at once, no stream drafts: the servers "
            "have rows enough to compute, and drafts' rows would cost more than the round "
            "trips they save",
        },
    )
    # How long a stored response (`store: true`) is kept.
    response_ttl_s: float = field(
        default=86400.0,
        metadata={
            "flag": "--response-ttl",
            "check": "positive",
            "help": "seconds a stored response (/v1/responses with store) is kept, for "
            "previous_response_id and GET /v1/responses/{id}",
        },
    )
