"""Joining the swarm: one DHT peer for this process, and the pass it shows servers.

Every process of the swarm joins the same way (a block server, a gateway, the fine-tuner):
it starts a ``SwarmDHT`` through its initial peers, under its credential when the swarm
is closed, and shows servers' RPCs a member pass naming its own peer id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.membership import Membership, PassIssuer
from swarm_dht.dht import SwarmDHT

__all__ = ["SwarmMember", "join_swarm"]


@dataclass(frozen=True)
class SwarmMember:
    """This process in the swarm: its DHT peer and its pass (``""`` in an open swarm)."""

    dht: SwarmDHT
    membership: Membership | None  # None: an open swarm
    member_pass: Callable[[], str]

    @property
    def peer_id(self) -> str:
        return str(self.dht.peer_id.to_base58())

    def leave(self) -> None:
        """Stop this process's DHT peer."""
        self.dht.shutdown()


def join_swarm(
    initial_peers: Sequence[str],
    membership: Membership | None,
    **dht_options: Any,
) -> SwarmMember:
    """Join through ``initial_peers`` (none: start a swarm); ``dht_options`` go to
    hivemind's ``DHT`` (``client_mode``, ``host_maddrs``, ``identity_path``...).
    ``SwarmJoinError`` if none of the initial peers answered."""
    dht = SwarmDHT(
        initial_peers=list(initial_peers), start=True, membership=membership, **dht_options
    )
    member_pass: Callable[[], str] = (
        PassIssuer(membership, dht.peer_id.to_base58()).current
        if membership is not None
        else lambda: ""  # an open swarm shows none
    )
    return SwarmMember(dht, membership, member_pass)
