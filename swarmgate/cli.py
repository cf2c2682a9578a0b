"""The `swarmgate` command: parse arguments, start the parts. Every flag reads an env var
(swarmgate/options.py declares which flags each command takes, swarmgate/flags.py how)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from protocol.logs import configure_logging
from swarmgate.flags import add_flags
from swarmgate.options import COMMANDS, LOG

HELP = {
    "keygen": "write a new swarm key to FILE",
    "issue": "write a credential for one role, signed by the swarm key, to FILE",
    "revoke": "revoke a credential before it expires (members refuse it within 10 s)",
    "up": "a whole local swarm: DHT, nodes and gateway",
    "dht": "a bootstrap DHT peer; prints its multiaddrs",
    "node": "a block server",
    "gateway": "the OpenAI-compatible HTTP gateway",
    "finetune": "train a LoRA adapter through the swarm (servers keep their weights)",
    "status": "print the swarm's coverage",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser, with defaults read from the environment as it is now."""
    parser = argparse.ArgumentParser(
        prog="swarmgate", description="Serve a language model from a swarm of machines."
    )
    add_flags(parser, LOG)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in HELP.items():
        command = commands.add_parser(name, help=text)
        add_flags(command, COMMANDS.get(name, []))
        if name in ("keygen", "issue"):
            command.add_argument("file", metavar="FILE", help="where to write it (must not exist)")
        if name == "revoke":
            command.add_argument(
                "credential",
                nargs="?",  # after --initial-peers, argparse takes it as a peer: found there
                metavar="ID_OR_FILE",
                help="the id `issue` printed, or the credential file",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    from models.devices import DeviceError
    from swarm_dht.dht import SwarmJoinError
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
