"""Settings of one block server, read once at startup."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.membership import Membership


@dataclass(frozen=True)
class NodeSettings:
    model: str  # `smollm2`, a Hugging Face folder or a .gguf file
    initial_peers: tuple[str, ...] = ()  # multiaddrs of any DHT peer of the swarm
    blocks: tuple[int, int] | None = None  # [start, end); None: the least-covered span
    num_blocks: int | None = None  # how many blocks to take when `blocks` is None (None: all)
    model_name: str | None = None  # the model id; default: derived from `model`
    revision: str | None = None  # branch, tag or commit of a Hub `model` (None: main)
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto: bfloat16 on CUDA (float16 without bf16), float32 on CPU
    quant: str = "none"
    adapters: tuple[str, ...] = ()  # peft LoRA adapter folders, served as BASE:FOLDER_NAME
    # KV cache budget; None: on a GPU, 90% of its free memory once the blocks are loaded;
    # on the CPU, a quarter of available memory
    cache_bytes: int | None = None
    prefill_per_batch: int | None = None  # prompt tokens per batched forward; None: default
    cache_ttl_s: float = 600.0  # an idle session's cache is dropped after this long
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    identity_path: str | None = None
    announce_period_s: float = 10.0  # records expire after 3 periods
    drain_timeout_s: float = 10.0  # how long open sessions may finish after SIGTERM
    namespace: str = ""  # separates private swarms that share a DHT
    metrics_port: int | None = None  # Prometheus /metrics; None: not served
    metrics_host: str = "127.0.0.1"
    ready_file: str | None = None  # exists while serving and announced (readiness probes)
    membership: Membership | None = field(default=None, repr=False)  # None: an open swarm
