"""The `swarmgate` command: parse arguments, start the parts. Every flag reads an env var."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from protocol.logs import configure_logging
from protocol.swarm import LOOPBACK_MADDRS


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _env_list(name: str) -> list[str]:
    return (os.environ.get(name) or "").replace(",", " ").split()


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _flag_env(name: str) -> bool:
    """A boolean flag's default from the environment: set and not 0/false/no."""
    return (os.environ.get(name) or "").strip().lower() not in ("", "0", "false", "no")


def _blocks(value: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks wants START:END, got {value!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {value}: need 0 <= START < END")
    return start, end


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=_env("SWARMGATE_MODEL", "smollm2"),
        help="`smollm2` (embedded default), a Hugging Face folder, a .gguf file or a Hugging "
        "Face Hub id ORG/NAME[@REVISION] (downloaded to the Hugging Face cache, HF_HOME: a "
        "node fetches only its blocks' files; HF_TOKEN for gated models)",
    )
    parser.add_argument(
        "--revision",
        default=_env("SWARMGATE_REVISION"),
        help="branch, tag or commit of a Hub --model (default: main); ignored for local models",
    )
    parser.add_argument(
        "--model-name",
        default=_env("SWARMGATE_MODEL_NAME"),
        help="model id served to clients and used to find servers (default: from --model)",
    )
    parser.add_argument(
        "--namespace",
        default=_env("SWARMGATE_NAMESPACE", ""),
        help="keeps private swarms that share DHT peers apart",
    )


def _add_peers(parser: argparse.ArgumentParser, *, required: bool) -> None:
    peers = _env_list("SWARMGATE_INITIAL_PEERS")
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        default=peers,
        required=required and not peers,
        metavar="MADDR",
        help="multiaddrs of DHT peers, as printed by `swarmgate dht`, or http://HOST:PORT of a "
        "`swarmgate dht --http-port PORT` (its multiaddrs are fetched at start)",
    )
    parser.add_argument(
        "--join-timeout",
        type=_positive_float,
        default=_env("SWARMGATE_JOIN_TIMEOUT", "120"),
        help="seconds to wait for http:// bootstrap peers to answer",
    )


def _add_p2p(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host-maddrs",
        nargs="+",
        default=_env_list("SWARMGATE_HOST_MADDRS") or LOOPBACK_MADDRS,
        metavar="MADDR",
        help="where to listen (default loopback; e.g. /ip4/0.0.0.0/tcp/31337)",
    )
    parser.add_argument(
        "--announce-maddrs",
        nargs="+",
        default=_env_list("SWARMGATE_ANNOUNCE_MADDRS"),
        metavar="MADDR",
        help="addresses other machines should dial (e.g. your public IP)",
    )
    parser.add_argument(
        "--identity",
        default=_env("SWARMGATE_IDENTITY"),
        help="file holding this peer's private key, for a stable peer id (created if missing)",
    )


def _add_swarm_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--swarm-key",
        default=_env("SWARMGATE_SWARM_KEY"),
        metavar="FILE",
        help="a credential for this process's role (from `swarmgate issue`), or the swarm "
        "key itself (from `swarmgate keygen`): only processes holding one take part; without "
        "one the swarm is open to anyone who can reach it",
    )


def _add_http(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=_env("SWARMGATE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(_env("SWARMGATE_PORT", "8000") or 8000))
    parser.add_argument(
        "--redis-url",
        default=_env("REDIS_URL"),
        help="Redis for affinity shared by gateways (better: the REDIS_URL env var, which "
        "other users of the machine cannot read from the process list)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=_env_list("SWARMGATE_API_KEY"),
        help="require `Authorization: Bearer KEY` (repeat for several keys; better: "
        "SWARMGATE_API_KEY or --api-key-file, which stay off the process list)",
    )
    parser.add_argument(
        "--api-key-file",
        default=_env("SWARMGATE_API_KEY_FILE"),
        help="file with one accepted API key per line, optionally followed by "
        "`max_concurrent=N` (that key's own cap); # comments (readable by its owner only)",
    )
    parser.add_argument(
        "--allow-open",
        action="store_true",
        default=_flag_env("SWARMGATE_ALLOW_OPEN"),
        help="serve without API keys on an address other than loopback (--host): anyone "
        "who reaches it may use the model; without keys or this flag such a gateway refuses "
        "to start",
    )


def _add_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-push",
        action="store_true",
        default=_env("SWARMGATE_NO_PUSH", "") not in ("", "0", "false"),
        help="relay every hop's hidden states through the gateway instead of letting "
        "servers push them to the next hop (for comparisons)",
    )


def _one_of(*choices: str) -> Callable[[str], str]:
    """A `type` that checks the value: argparse runs `type`, not `choices`, on a default
    that came from an environment variable, so a typo there would only fail at load time."""

    def check(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


def _device(value: str) -> str:
    """A ``--device`` spelled as torch spells devices; whether this machine has it is
    checked when the process starts (models/devices.py), with a message saying why not."""
    spec = value.strip().lower()
    kind, _, index = spec.partition(":")
    if spec in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit()):
        return spec
    raise argparse.ArgumentTypeError(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")


def _add_device(parser: argparse.ArgumentParser, what: str) -> None:
    dtypes = ("auto", "float32", "bfloat16", "float16")
    parser.add_argument(
        "--device",
        type=_device,
        default=_env("SWARMGATE_DEVICE", "auto"),
        help=f"where {what} compute: auto (CUDA, then MPS, then CPU; the log says which), "
        "cpu, cuda, cuda:N or mps",
    )
    parser.add_argument(
        "--dtype",
        type=_one_of(*dtypes),
        choices=dtypes,
        default=_env("SWARMGATE_DTYPE", "auto"),
        help=f"the compute dtype of {what}: auto is bfloat16 on CUDA (float16 on GPUs "
        "without bf16, and on MPS), float32 on CPU",
    )


def _add_node_options(parser: argparse.ArgumentParser) -> None:
    quants = ("none", "int8", "nf4")
    _add_device(parser, "the served blocks (and their KV cache)")
    parser.add_argument(
        "--quant",
        type=_one_of(*quants),
        choices=quants,
        default=_env("SWARMGATE_QUANT", "none"),
        help="weight quantization of the served blocks through bitsandbytes: int8 (outputs "
        "close to unquantized) or nf4 (a quarter of fp16's memory, approximate: it changes "
        "greedy answers); computed in --dtype",
    )
    parser.add_argument(
        "--cache-bytes",
        type=int,
        default=_env("SWARMGATE_CACHE_BYTES"),
        help="KV cache budget in bytes (default: on a GPU, 90%% of its memory left free by the "
        "blocks; on CPU, a quarter of free memory)",
    )
    parser.add_argument(
        "--cache-ttl",
        type=float,
        default=float(_env("SWARMGATE_CACHE_TTL", "600") or 600),
        help="seconds an idle session's KV cache is kept for its next turn",
    )
    parser.add_argument(
        "--batch-prefill-tokens",
        type=_positive_int,
        default=_env("SWARMGATE_BATCH_PREFILL_TOKENS"),
        help="prompt tokens per batched forward, run alongside every stream's decode step: "
        "smaller keeps other streams' tokens flowing during a long prompt (default: 128)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=float(_env("SWARMGATE_DRAIN_TIMEOUT", "10") or 10),
        help="on SIGTERM, seconds that running streams may take to finish before the "
        "server leaves (a second signal leaves at once)",
    )
    parser.add_argument(
        "--adapters",
        nargs="+",
        metavar="DIR",
        default=_env_list("SWARMGATE_ADAPTERS"),
        help="peft LoRA adapter folders to serve beside the base model; each is requested as "
        "model BASE:FOLDER_NAME (a node serves its span of each)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarmgate", description="Serve a language model from a swarm of machines."
    )
    parser.add_argument("--log-level", default=_env("SWARMGATE_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=_env("SWARMGATE_LOG_FORMAT", "text"),
        help="json: one object per line with the request id, for log collectors",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    keygen = commands.add_parser("keygen", help="write a new swarm key to FILE")
    keygen.add_argument("file", metavar="FILE", help="where to write it (must not exist)")

    issue = commands.add_parser(
        "issue", help="write a credential for one role, signed by the swarm key, to FILE"
    )
    issue.add_argument("--swarm-key", default=_env("SWARMGATE_SWARM_KEY"), metavar="KEY")
    issue.add_argument("--role", required=True, choices=["server", "gateway", "finetune"])
    issue.add_argument(
        "--days", type=_positive_int, default=30, help="how long it is valid (default 30)"
    )
    issue.add_argument("--name", default="", help="a label for logs, e.g. gateway-eu-1")
    issue.add_argument("file", metavar="FILE", help="where to write it (must not exist)")

    revoke = commands.add_parser(
        "revoke", help="revoke a credential before it expires (members refuse it within 10 s)"
    )
    revoke.add_argument("--swarm-key", default=_env("SWARMGATE_SWARM_KEY"), metavar="KEY")
    _add_peers(revoke, required=True)
    revoke.add_argument(
        "credential",
        nargs="?",  # after --initial-peers, argparse takes it as a peer: found there
        metavar="ID_OR_FILE",
        help="the id `issue` printed, or the credential file",
    )

    up = commands.add_parser("up", help="a whole local swarm: DHT, nodes and gateway")
    _add_model(up)
    up.add_argument(
        "--swarm-key",
        default=_env("SWARMGATE_SWARM_KEY"),
        metavar="FILE",
        help="the swarm's key (default: a new one for this swarm only)",
    )
    _add_http(up)
    _add_push(up)
    _add_node_options(up)
    up.add_argument(
        "--nodes",
        type=int,
        default=int(_env("SWARMGATE_NODES", "2") or 2),
        help="block servers that split the model's blocks evenly (with --device auto or "
        "cuda on a machine with several GPUs, one per GPU in turn)",
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the swarm to become healthy",
    )

    dht = commands.add_parser("dht", help="a bootstrap DHT peer; prints its multiaddrs")
    _add_peers(dht, required=False)
    _add_p2p(dht)
    _add_swarm_key(dht)
    dht.add_argument(
        "--http-port",
        type=int,
        default=_env("SWARMGATE_DHT_HTTP_PORT"),
        help="serve GET /maddrs and /health here, so that others can use "
        "--initial-peers http://HOST:PORT without knowing this peer's id",
    )
    dht.add_argument(
        "--http-host",
        default=_env("SWARMGATE_DHT_HTTP_HOST", "127.0.0.1"),
        help="address for --http-port (0.0.0.0 in a container)",
    )

    node = commands.add_parser("node", help="a block server")
    _add_model(node)
    _add_peers(node, required=True)
    _add_p2p(node)
    _add_swarm_key(node)
    _add_node_options(node)
    node.add_argument(
        "--blocks",
        type=_blocks,
        default=_env("SWARMGATE_BLOCKS"),
        metavar="START:END",
        help="blocks to serve (default: the least-covered)",
    )
    node.add_argument(
        "--announce-period",
        type=float,
        default=float(_env("SWARMGATE_ANNOUNCE_PERIOD", "10") or 10),
        help="seconds between DHT announcements (records expire after 3)",
    )
    node.add_argument(
        "--metrics-port",
        type=int,
        default=_env("SWARMGATE_METRICS_PORT"),
        help="serve Prometheus metrics (cache, evictions, tokens) on this port",
    )
    node.add_argument(
        "--metrics-host",
        default=_env("SWARMGATE_METRICS_HOST", "127.0.0.1"),
        help="address for --metrics-port (0.0.0.0 in a container)",
    )
    node.add_argument(
        "--ready-file",
        default=_env("SWARMGATE_READY_FILE"),
        help="a file that exists while the node serves its span and has announced it "
        "(for readiness probes: `test -f FILE`)",
    )
    node.add_argument(
        "--num-blocks",
        type=int,
        default=_env("SWARMGATE_NUM_BLOCKS"),
        help="how many blocks to take when --blocks is not given (default: all)",
    )

    gateway = commands.add_parser("gateway", help="the OpenAI-compatible HTTP gateway")
    _add_model(gateway)
    _add_device(gateway, "its embeddings, final norm and LM head")
    _add_peers(gateway, required=True)
    _add_swarm_key(gateway)
    _add_http(gateway)
    gateway.add_argument(
        "--max-concurrent",
        type=int,
        default=int(_env("SWARMGATE_MAX_CONCURRENT", "16") or 16),
        help="generations running at once (a request with n choices or several prompts runs "
        "that many)",
    )
    gateway.add_argument(
        "--max-queue",
        type=int,
        default=int(_env("SWARMGATE_MAX_QUEUE", "64") or 64),
        help="requests waiting for a slot; beyond this, 429 with Retry-After",
    )
    gateway.add_argument(
        "--max-concurrent-per-key",
        type=_positive_int,
        default=_env("SWARMGATE_MAX_CONCURRENT_PER_KEY"),
        help="generations one API key may have running or queued (a request asking for "
        "more takes them all), unless the key file gives the key its own max_concurrent "
        "(default: with API keys, --max-concurrent; without, no cap, or if given, per bearer "
        "token and all requests without one together)",
    )
    gateway.add_argument(
        "--queue-timeout",
        type=_non_negative_float,
        default=_env("SWARMGATE_QUEUE_TIMEOUT", "5"),
        help="seconds a request over its key's cap waits for one of the key's own "
        "generations to finish; then 429 with Retry-After (0: at once)",
    )
    gateway.add_argument(
        "--metrics-port",
        type=int,
        default=_env("SWARMGATE_METRICS_PORT"),
        help="also serve /metrics on this port, without an API key (with keys, /metrics on "
        "--port needs one): for Prometheus inside a cluster",
    )
    gateway.add_argument(
        "--metrics-host",
        default=_env("SWARMGATE_METRICS_HOST", "127.0.0.1"),
        help="address for --metrics-port (0.0.0.0 in a container)",
    )
    gateway.add_argument(
        "--send-timeout",
        type=_positive_float,
        default=_env("SWARMGATE_SEND_TIMEOUT", "30"),
        help="seconds a stream may wait for its client to read; then it is cancelled and "
        "its slot freed",
    )
    gateway.add_argument(
        "--default-max-tokens",
        type=_positive_int,
        default=_env("SWARMGATE_DEFAULT_MAX_TOKENS", "1024"),
        help="tokens a chat completion may generate when the request sets no max_tokens "
        "(completions default to 16, as OpenAI's)",
    )
    gateway.add_argument(
        "--max-generation-seconds",
        type=_positive_float,
        default=_env("SWARMGATE_MAX_GENERATION_SECONDS", "600"),
        help="a request generating this long ends with finish_reason `length`",
    )
    gateway.add_argument(
        "--response-ttl",
        type=_positive_float,
        default=_env("SWARMGATE_RESPONSE_TTL", "86400"),
        help="seconds a stored response (/v1/responses with store) is kept, for "
        "previous_response_id and GET /v1/responses/{id}",
    )
    gateway.add_argument(
        "--no-affinity",
        action="store_true",
        default=_env("SWARMGATE_NO_AFFINITY", "") not in ("", "0", "false"),
        help="start every request on a fresh session (no KV cache reuse across requests)",
    )
    _add_push(gateway)
    gateway.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=_env("SWARMGATE_PREFILL_CHUNK_TOKENS"),
        help="tokens per prefill message (default: as many as fit)",
    )
    gateway.add_argument(
        "--step-floor",
        type=float,
        default=float(_env("SWARMGATE_STEP_FLOOR", "10") or 10),
        help="seconds any server may take for one step, plus what its announced throughput "
        "allows, before it counts as failed and the session moves on without it",
    )

    finetune = commands.add_parser(
        "finetune", help="train a LoRA adapter through the swarm (servers keep their weights)"
    )
    _add_model(finetune)
    _add_device(finetune, "the embeddings, final norm, LM head and loss")
    _add_peers(finetune, required=True)
    _add_swarm_key(finetune)
    finetune.add_argument(
        "--data",
        required=True,
        help='JSONL: {"messages": [...]}, {"prompt", "completion"} or {"text"} per line',
    )
    finetune.add_argument("--out", required=True, help="folder for the peft adapter")
    finetune.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (max 64)")
    finetune.add_argument("--alpha", type=_positive_int, default=16, help="LoRA alpha")
    finetune.add_argument(
        "--targets",
        default="q_proj,k_proj,v_proj,o_proj",
        help="comma-separated projections to adapt, or `all`",
    )
    finetune.add_argument("--steps", type=_positive_int, default=100)
    finetune.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate")
    finetune.add_argument("--batch-size", type=_positive_int, default=4)
    finetune.add_argument(
        "--max-length", type=_positive_int, default=256, help="tokens per example (cut beyond)"
    )
    finetune.add_argument("--seed", type=int, default=0)

    status = commands.add_parser("status", help="print the swarm's coverage")
    _add_peers(status, required=True)
    _add_swarm_key(status)
    status.add_argument("--namespace", default=_env("SWARMGATE_NAMESPACE", ""))
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    from models.devices import DeviceError
    from routing.dht import SwarmJoinError
    from swarmgate import commands, credential_commands

    handler = {
        "keygen": commands.keygen,
        "issue": credential_commands.issue,
        "revoke": credential_commands.revoke,
        "up": commands.up,
        "dht": commands.dht,
        "node": commands.node,
        "gateway": commands.gateway,
        "status": commands.status,
        "finetune": commands.finetune,
    }[args.command]
    try:
        code = handler(args)
    except SwarmJoinError as e:
        sys.exit(f"swarmgate {args.command}: could not join the swarm: {e}")
    except DeviceError as e:
        sys.exit(f"swarmgate {args.command}: {e}")
    sys.exit(code or 0)
