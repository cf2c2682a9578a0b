"""A stranger's block server for tests: the real `swarmgate` CLI, made as pushy as it gets.

    python -m tests.rogue_node node --model ... --blocks 0:4 ...

Its DHT keeps running when no initial peer answers (a real node gives up), and it announces
the highest throughput a record may carry, so that it would win every route it could get
into. Whether it has a swarm key or a credential (and which) is up to its
``SWARMGATE_SWARM_KEY``: a gateway's credential is taken as if it could serve, as a
gateway whose holder turned hostile would.
"""

from __future__ import annotations

from typing import Any

from protocol.credentials import Role
from protocol.membership import Membership
from protocol.swarm import MAX_THROUGHPUT, ServerRecord
from swarm_dht import join as join_module
from swarm_dht.dht import SwarmDHT
from swarm_node import node as node_module
from swarmgate import commands
from swarmgate.cli import main


class StubbornDHT(SwarmDHT):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, ensure_bootstrap_success=False, **kwargs)


class BoastfulServer(node_module.BlockServer):
    def record(self) -> ServerRecord:
        return super().record().model_copy(update={"throughput": MAX_THROUGHPUT})


def any_role(args: Any, role: Role) -> Membership | None:
    """The CLI refuses to serve with a gateway's credential; a hostile holder does not."""
    return Membership.load(args.swarm_key, Role.GATEWAY) if args.swarm_key else None


if __name__ == "__main__":
    commands.membership = any_role  # type: ignore[assignment]
    join_module.SwarmDHT = StubbornDHT  # type: ignore[misc]  # every process joins there
    node_module.BlockServer = BoastfulServer  # type: ignore[misc]
    main()
