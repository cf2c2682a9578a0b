"""What DHT peers store under the revocation key: the swarm key's revocations, nothing else."""

from __future__ import annotations

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

from protocol.credentials import Role, revoke
from protocol.membership import Membership, SwarmKey
from routing.revocations import REVOKED_KEY, RevocationValidator

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
