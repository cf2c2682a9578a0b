"""Every flag of `swarmgate`, each declared once, and the flags each command takes.

A node's, a gateway's and a fine-tuning run's flags are declared on their settings fields
(swarm_node/settings.py, gateway/settings.py, training/settings.py); the rest, which fill no
process's settings as they are (the swarm key, the log, `up`'s own), here. `swarmgate up`
takes the node's and the gateway's flags that make sense on one machine, from the same
declarations.
"""

from __future__ import annotations

from gateway.settings import GatewaySettings
from swarm_node.settings import NodeSettings
from swarmgate.flags import (
    Flag,
    flag_fields,
    positive_float,
    positive_int,
    settings_flags,
    unique,
)
from training.settings import DEFAULT_TARGETS, FinetuneSettings

NODE_FLAGS = settings_flags(NodeSettings)
GATEWAY_FLAGS = settings_flags(GatewaySettings)

LOG = [
    Flag("--log-level", "DEBUG, INFO, WARNING or ERROR", default="INFO"),
    Flag(
        "--log-format",
        "json: one object per line with the request id, for log collectors",
        default="text",
        choices=("text", "json"),
    ),
]
SWARM_KEY = Flag(
    "--swarm-key",
    "a credential for this process's role (from `swarmgate issue`), or the swarm key itself "
    "(from `swarmgate keygen`): only processes holding one take part; without one the swarm "
    "is open to anyone who can reach it",
    metavar="FILE",
    secret=True,
)
JOIN_TIMEOUT = Flag(
    "--join-timeout",
    "seconds to wait for http:// bootstrap peers to answer",
    default=120.0,
    parse=positive_float,
)
# What a gateway takes besides its settings: its keys' file and whether it may serve open.
GATEWAY_ACCESS = [
    Flag(
        "--api-key-file",
        "file with one accepted API key per line, optionally followed by `max_concurrent=N` "
        "(that key's own cap); # comments (readable by its owner only)",
    ),
    Flag(
        "--allow-open",
        "serve without API keys on an address other than loopback (--host): anyone who "
        "reaches it may use the model; without keys or this flag such a gateway refuses to "
        "start",
        switch=True,
    ),
]
DHT = [
    Flag(
        "--http-port",
        "serve GET /maddrs and /health here, so that others can use --initial-peers "
        "http://HOST:PORT without knowing this peer's id",
        env="SWARMGATE_DHT_HTTP_PORT",
        parse=int,
    ),
    Flag(
        "--http-host",
        "address for --http-port (0.0.0.0 in a container)",
        default="127.0.0.1",
        env="SWARMGATE_DHT_HTTP_HOST",
    ),
]
UP = [
    Flag(
        "--nodes",
        "block servers that split the model's blocks evenly (with --device auto or cuda on a "
        "machine with several GPUs, one per GPU in turn)",
        default=2,
        parse=int,
    ),
    Flag(
        "--ready-timeout",
        "seconds to wait for the swarm to become healthy",
        default=600.0,
        env=None,
        parse=float,
    ),
]
ISSUE = [
    Flag(
        "--role",
        "the role it lets its holder take",
        env=None,
        choices=("server", "gateway", "finetune"),
        required=True,
    ),
    Flag("--days", "how long it is valid", default=30, env=None, parse=positive_int),
    Flag("--name", "a label for logs, e.g. gateway-eu-1", default="", env=None),
]
# `finetune`'s own flags are declared on its settings; its targets are a spec the model's
# projections resolve (training/settings.py), so that flag is declared here.
FINETUNE = [
    *settings_flags(FinetuneSettings),
    Flag(
        "--targets",
        "comma-separated projections to adapt, or `all`",
        default=",".join(DEFAULT_TARGETS),
        env=None,
    ),
]
STATUS = [Flag("--json", "print JSON instead of a table", env=None, switch=True)]


def _registry(*groups: list[Flag]) -> dict[str, Flag]:
    flags: dict[str, Flag] = {}
    for flag in (f for group in groups for f in group):
        if flag.name in flags:
            raise TypeError(f"{flag.name} is declared twice")
        flags[flag.name] = flag
    return flags


# Every flag by name, each declared once.
FLAGS = _registry(
    NODE_FLAGS,
    GATEWAY_FLAGS,
    LOG,
    [SWARM_KEY, JOIN_TIMEOUT],
    GATEWAY_ACCESS,
    DHT,
    UP,
    ISSUE,
    FINETUNE,
    STATUS,
)


def _named(*names: str) -> list[Flag]:
    return [FLAGS[name] for name in names]


def _of(settings: type) -> list[Flag]:
    """The flags that fill a settings class's fields, declared there or not."""
    return [FLAGS[name] for name in flag_fields(settings).values()]


MODEL = _named("--model", "--revision", "--model-name", "--namespace")
PEERS = [FLAGS["--initial-peers"].needed(), JOIN_TIMEOUT]
P2P = _named("--host-maddrs", "--announce-maddrs", "--identity")
# What `up` hands its nodes and its gateway: all their flags but each process's own.
UP_NODE = [flag for flag in _of(NodeSettings) if flag.local]
UP_GATEWAY = [flag for flag in [*_of(GatewaySettings), *GATEWAY_ACCESS] if flag.local]
SWARM_KEY_ITSELF = SWARM_KEY.with_help("the swarm key (from `swarmgate keygen`)")

COMMANDS: dict[str, list[Flag]] = {
    "issue": [SWARM_KEY_ITSELF, *ISSUE],
    "revoke": [SWARM_KEY_ITSELF, *PEERS],
    "up": list(
        unique(
            [
                *MODEL,
                SWARM_KEY.with_help("the swarm's key (default: a new one for this swarm only)"),
                *UP_GATEWAY,
                *UP_NODE,
                *UP,
            ]
        )
    ),
    "dht": [FLAGS["--initial-peers"], JOIN_TIMEOUT, *P2P, SWARM_KEY, *DHT],
    "node": list(unique([*MODEL, *PEERS, *P2P, SWARM_KEY, *_of(NodeSettings)])),
    "gateway": list(unique([*MODEL, *PEERS, SWARM_KEY, *_of(GatewaySettings), *GATEWAY_ACCESS])),
    "finetune": list(unique([*MODEL, *PEERS, SWARM_KEY, *_of(FinetuneSettings), *FINETUNE])),
    "status": [*PEERS, SWARM_KEY, FLAGS["--namespace"], *STATUS],
}
