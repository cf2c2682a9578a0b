"""join_swarm: every process joins the DHT the same way and shows servers a pass naming
its own peer id (none in an open swarm)."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.credentials import Role
from protocol.membership import Membership, SwarmKey
from swarm_dht import join as join_module
from swarm_dht.join import join_swarm

PEER = "QmPeer"


class FakePeerID:
    def to_base58(self) -> str:
        return PEER


class FakeDHT:
    """What join_swarm asks of ``SwarmDHT``: its arguments are kept, nothing starts."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.peer_id = FakePeerID()
        self.shut_down = False

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture(autouse=True)
def fake_dht(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(join_module, "SwarmDHT", FakeDHT)


def test_an_open_swarm_is_joined_with_no_pass() -> None:
    member = join_swarm(("/ip4/1.2.3.4/tcp/1/p2p/QmX",), None, client_mode=True)
    dht: FakeDHT = member.dht  # type: ignore[assignment]
    assert dht.kwargs == {
        "initial_peers": ["/ip4/1.2.3.4/tcp/1/p2p/QmX"],
        "start": True,
        "membership": None,
        "client_mode": True,
    }
    assert member.peer_id == PEER and member.member_pass() == ""
    member.leave()
    assert dht.shut_down


def test_a_closed_swarm_is_joined_with_a_pass_naming_this_peer() -> None:
    membership = Membership.of(SwarmKey.generate(), Role.GATEWAY)
    member = join_swarm((), membership)
    assert member.membership is membership
    shown = member.member_pass()
    assert shown and shown == member.member_pass()  # signed once, reused until it nears expiry
