"""What DHT peers store under the revocation key: the swarm key's revocations, nothing else."""

from __future__ import annotations

import asyncio
from functools import partial

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import ValueWithExpiration
from hivemind.utils.serializer import MSGPackSerializer

from protocol.credentials import Role, revoke
from protocol.membership import Membership, SwarmKey
from swarm_dht.revocations import REVOKED_KEY, RevocationValidator, learn_revocations

ID = "0123456789abcdef"


@pytest.fixture(scope="module")
def key() -> SwarmKey:
    return SwarmKey.generate()


def record(subkey: object, value: object, key: str = REVOKED_KEY) -> DHTRecord:
    return DHTRecord(
        key=DHTID.generate(source=key).to_bytes(),
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(value),
        expiration_time=2e9,
    )


def test_only_revocations_the_swarm_key_signed_are_stored_under_their_own_id(
    key: SwarmKey,
) -> None:
    validator = RevocationValidator(Membership.of(key, Role.SERVER))
    ours = revoke(key.private, ID, 2e9).encode()
    assert validator.validate(record(ID, ours))
    refused = {
        "another swarm's": record(ID, revoke(SwarmKey.generate().private, ID, 2e9).encode()),
        "under another id": record("fedcba9876543210", ours),
        "garbage": record(ID, "not a revocation"),
        "not a string": record(ID, {"id": ID}),
    }
    for why, wrong in refused.items():
        assert not validator.validate(wrong), why
    # Every other key is none of its business.
    assert validator.validate(record("anything", "anything", key="swarmgate_model"))


class FlakyDHT:
    """The revocation key's value, and a DHT process whose first hand-over fails."""

    def __init__(self, value: dict[str, object]) -> None:
        self.value = value
        self.handed: list[list[str]] = []
        self.fail_next = True

    def get(self, key: str, latest: bool, return_future: bool) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        future.set_result(ValueWithExpiration(self.value, 2e9))
        return future

    def run_coroutine(self, call: partial[object], return_future: bool) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_next:
            self.fail_next = False
            future.set_exception(TimeoutError("the DHT process is busy"))
        else:
            self.handed.append(call.keywords["encoded"])
            future.set_result(None)
        return future


def test_a_revocation_whose_hand_over_failed_is_handed_over_next_time(key: SwarmKey) -> None:
    """The first read learns it but cannot tell the DHT's process; the next read, with no
    news, still must (else the DHT would take the revoked credential forever)."""
    member = Membership.of(key, Role.GATEWAY)
    revocation = revoke(key.private, ID, 2e9)
    dht = FlakyDHT({ID: ValueWithExpiration(revocation.encode(), 2e9)})
    handed: set[str] = set()

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            await learn_revocations(dht, member, handed)  # type: ignore[arg-type]
        assert ID in member.revocations and not handed
        assert await learn_revocations(dht, member, handed) == 0  # type: ignore[arg-type]
        assert handed == {ID} and dht.handed == [[revocation.encode()]]
        await learn_revocations(dht, member, handed)  # type: ignore[arg-type]
        assert len(dht.handed) == 1  # handed over once

    asyncio.run(scenario())
