"""Settings of one block server, read once at startup.

A field set from the command line carries its flag in its metadata, as plain data: the
flag's name, its help, and how to check a value (`swarmgate/flags.py` reads it; the env
var is SWARMGATE_ and the name, unless `env` says otherwise). `local: False` keeps a flag
out of `swarmgate up`, whose processes would share it (one port, one identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.membership import Membership


@dataclass(frozen=True)
class NodeSettings:
    model: str = field(
        metadata={
            "flag": "--model",
            "default": "smollm2",
            "help": "`smollm2` (embedded default), a Hugging Face folder, a .gguf file or a "
            "Hugging Face Hub id ORG/NAME[@REVISION] (downloaded to the Hugging Face cache, "
            "HF_HOME: a node fetches only its blocks' files; HF_TOKEN for gated models)",
        }
    )
    initial_peers: tuple[str, ...] = field(  # multiaddrs of any DHT peer of the swarm
        default=(),
        metadata={
            "flag": "--initial-peers",
            "metavar": "MADDR",
            "local": False,  # `up` runs its own DHT
            "help": "multiaddrs of DHT peers, as printed by `swarmgate dht`, or "
            "http://HOST:PORT of a `swarmgate dht --http-port PORT` (its multiaddrs are "
            "fetched at start)",
        },
    )
    # [start, end); None: the least-covered span
    blocks: tuple[int, int] | None = field(
        default=None,
        metadata={
            "flag": "--blocks",
            "check": "blocks",
            "metavar": "START:END",
            "local": False,
            "help": "blocks to serve (default: the least-covered)",
        },
    )
    # How many blocks to take when `blocks` is None (None: all).
    num_blocks: int | None = field(
        default=None,
        metadata={
            "flag": "--num-blocks",
            "local": False,
            "help": "how many blocks to take when --blocks is not given (default: all)",
        },
    )
    model_name: str | None = field(  # the model id; default: derived from `model`
        default=None,
        metadata={
            "flag": "--model-name",
            "help": "model id served to clients and used to find servers (default: from --model)",
        },
    )
    revision: str | None = field(  # branch, tag or commit of a Hub `model` (None: main)
        default=None,
        metadata={
            "flag": "--revision",
            "help": "branch, tag or commit of a Hub --model (default: main); ignored for "
            "local models",
        },
    )
    device: str = field(  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
        default="auto",
        metadata={
            "flag": "--device",
            "check": "device",
            "help": "where this process computes (a node: its blocks and their KV cache; a "
            "gateway: its embeddings, final norm and LM head; finetune: those and the loss): "
            "auto (CUDA, then MPS, then CPU; the log says which), cpu, cuda, cuda:N or mps",
        },
    )
    dtype: str = field(  # auto: bfloat16 on CUDA (float16 without bf16), float32 on CPU
        default="auto",
        metadata={
            "flag": "--dtype",
            "choices": ("auto", "float32", "bfloat16", "float16"),
            "help": "the compute dtype of what --device computes: auto is bfloat16 on CUDA "
            "(float16 on GPUs without bf16, and on MPS), float32 on CPU",
        },
    )
    quant: str = field(
        default="none",
        metadata={
            "flag": "--quant",
            "choices": ("none", "int8", "nf4"),
            "help": "weight quantization of the served blocks through bitsandbytes: int8 "
            "(outputs close to unquantized) or nf4 (a quarter of fp16's memory, approximate: "
            "it changes greedy answers); computed in --dtype",
        },
    )
    # peft LoRA adapter folders, served as BASE:FOLDER_NAME
    adapters: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "--adapters",
            "metavar": "DIR",
            "help": "peft LoRA adapter folders to serve beside the base model; each is "
            "requested as model BASE:FOLDER_NAME (a node serves its span of each)",
        },
    )
    # KV cache budget; None: on a GPU, 90% of its free memory once the blocks are loaded;
    # on the CPU, a quarter of available memory
    cache_bytes: int | None = field(
        default=None,
        metadata={
            "flag": "--cache-bytes",
            "help": "KV cache budget in bytes (default: on a GPU, 90%% of its memory left free "
            "by the blocks; on CPU, a quarter of free memory)",
        },
    )
    # Prompt tokens per batched forward; None: the batcher's default.
    prefill_per_batch: int | None = field(
        default=None,
        metadata={
            "flag": "--batch-prefill-tokens",
            "check": "positive",
            "help": "prompt tokens per batched forward, run alongside every stream's decode "
            "step: smaller keeps other streams' tokens flowing during a long prompt "
            "(default: 128)",
        },
    )
    cache_ttl_s: float = field(  # an idle session's cache is dropped after this long
        default=600.0,
        metadata={
            "flag": "--cache-ttl",
            "help": "seconds an idle session's KV cache is kept for its next turn",
        },
    )
    host_maddrs: tuple[str, ...] = field(
        default=("/ip4/127.0.0.1/tcp/0",),
        metadata={
            "flag": "--host-maddrs",
            "metavar": "MADDR",
            "local": False,
            "help": "where to listen (default loopback; e.g. /ip4/0.0.0.0/tcp/31337)",
        },
    )
    announce_maddrs: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "--announce-maddrs",
            "metavar": "MADDR",
            "local": False,
            "help": "addresses other machines should dial (e.g. your public IP)",
        },
    )
    identity_path: str | None = field(
        default=None,
        metadata={
            "flag": "--identity",
            "local": False,
            "help": "file holding this peer's private key, for a stable peer id (created if "
            "missing)",
        },
    )
    announce_period_s: float = field(  # records expire after 3 periods
        default=10.0,
        metadata={
            "flag": "--announce-period",
            "help": "seconds between DHT announcements (records expire after 3)",
        },
    )
    drain_timeout_s: float = field(  # how long open sessions may finish after SIGTERM
        default=10.0,
        metadata={
            "flag": "--drain-timeout",
            "help": "on SIGTERM, seconds that running streams may take to finish before the "
            "server leaves (a second signal leaves at once)",
        },
    )
    namespace: str = field(  # separates private swarms that share a DHT
        default="",
        metadata={
            "flag": "--namespace",
            "help": "keeps private swarms that share DHT peers apart",
        },
    )
    metrics_port: int | None = field(  # Prometheus /metrics; None: not served
        default=None,
        metadata={
            "flag": "--metrics-port",
            "local": False,
            "help": "serve Prometheus /metrics on this port (a node: cache, evictions, tokens; "
            "a gateway: its /metrics without an API key, while with keys /metrics on --port "
            "needs one: for Prometheus inside a cluster)",
        },
    )
    metrics_host: str = field(
        default="127.0.0.1",
        metadata={
            "flag": "--metrics-host",
            "local": False,
            "help": "address for --metrics-port (0.0.0.0 in a container)",
        },
    )
    # Exists while serving and announced (readiness probes).
    ready_file: str | None = field(
        default=None,
        metadata={
            "flag": "--ready-file",
            "local": False,
            "help": "a file that exists while the node serves its span and has announced it "
            "(for readiness probes: `test -f FILE`)",
        },
    )
    membership: Membership | None = field(default=None, repr=False)  # None: an open swarm
