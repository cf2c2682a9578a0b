"""Swarm keys, the credentials they issue, and what those prove: DHT tokens and RPC passes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
import stat
from pathlib import Path

import pytest
from hivemind.proto import dht_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.crypto import RSAPrivateKey

from protocol import membership
from protocol.credentials import CredentialFile, Role, revoke
from protocol.membership import (
    Membership,
    PassChecker,
    PassIssuer,
    SwarmAuthorizer,
    SwarmKey,
    SwarmKeyError,
    check_pass,
)

PEER = "QmPeerA"


@pytest.fixture(scope="module")
def key() -> SwarmKey:
    return SwarmKey.generate()


@pytest.fixture(scope="module")
def other() -> SwarmKey:
    return SwarmKey.generate()


def member(key: SwarmKey, role: Role = Role.GATEWAY) -> Membership:
    return Membership.of(key, role)


def credential_file(
    key: SwarmKey, role: Role, path: Path, seconds: float = 30 * 86400.0
) -> CredentialFile:
    holder = RSAPrivateKey()
    held = CredentialFile(
        key.issue(role, holder.get_public_key(), seconds=seconds), holder, key.public
    )
    membership.write_private(path, held.dumps().encode())
    return held


def test_a_saved_key_loads_back_readable_by_its_owner_only(key: SwarmKey, tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = SwarmKey.load(path)
    assert loaded.fingerprint == key.fingerprint
    server = Membership.load(path, Role.SERVER)
    assert check_pass(server, PassIssuer(member(key), PEER).current(), PEER)
    with pytest.raises(FileExistsError):
        SwarmKey.generate().save(path)  # a key is never overwritten


@pytest.mark.parametrize("content", [b"", b"not a key", b"-----BEGIN RSA PRIVATE KEY-----\nxx"])
def test_anything_but_a_key_is_refused_with_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(SwarmKeyError, match="swarmgate keygen"):
        SwarmKey.load(path)


def test_a_missing_key_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(SwarmKeyError, match=r"missing\.key"):
        SwarmKey.load(tmp_path / "missing.key")


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o604, True), (0o640, False)])
def test_a_key_others_can_read_is_warned_about(
    key: SwarmKey, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    path = tmp_path / "swarm.key"
    key.save(path)
    path.chmod(mode)  # the file's group is ours: group-readable is how Kubernetes mounts it
    with caplog.at_level(logging.WARNING):
        SwarmKey.load(path)
    assert ("chmod 600" in caplog.text) is warned


def test_a_pass_admits_only_the_peer_it_names_in_its_own_swarm(
    key: SwarmKey, other: SwarmKey
) -> None:
    server = member(key, Role.SERVER)
    ours = PassIssuer(member(key), PEER).current()
    assert check_pass(server, ours, PEER)
    assert not check_pass(server, ours, "QmPeerB")  # stolen: libp2p says the caller is B
    assert not check_pass(member(other, Role.SERVER), ours, PEER)  # another swarm
    assert not check_pass(server, PassIssuer(member(other), PEER).current(), PEER)
    for garbage in ("", "not base64!", "aGVsbG8=", "A" * 5000):
        assert not check_pass(server, garbage, PEER)


def test_a_credential_is_useless_without_its_holder_key(key: SwarmKey) -> None:
    """A pass carrying someone else's credential but signed by another key is refused."""
    victim, thief = member(key), member(key)
    token = AccessToken(
        username=PEER,
        public_key=victim.credential().encode().encode(),
        expiration_time=f"{membership.get_dht_time() + 60:.3f}",
    )
    token.signature = thief.holder.sign(membership._signed_part("rpc", token))
    assert not check_pass(member(key, Role.SERVER), membership._encode(token), PEER)


def test_a_server_checks_a_pass_signature_once_until_it_expires(
    key: SwarmKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = []
    real = membership._valid_pass
    monkeypatch.setattr(membership, "_valid_pass", lambda *a: checks.append(a) or real(*a))
    server = member(key, Role.SERVER)
    check = PassChecker(server)
    ours = PassIssuer(member(key), PEER).current()
    assert all(check(ours, PEER) for _ in range(5))
    assert len(checks) == 1
    assert not check(ours, "QmPeerB")  # remembered for A only: B is checked, and refused
    assert not check("garbage", PEER)
    later = membership.get_dht_time() + membership.TOKEN_TTL_S + membership.CLOCK_SKEW_S + 1
    monkeypatch.setattr(membership, "get_dht_time", lambda: later)
    assert not check(ours, PEER)  # remembered, but expired
    assert not check(ours, PEER)


def test_a_server_remembers_a_bounded_number_of_passes(
    key: SwarmKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(membership, "MAX_REMEMBERED_PASSES", 2)
    check = PassChecker(member(key, Role.SERVER))
    caller = member(key)
    peers = [f"QmPeer{i}" for i in range(5)]
    passes = [PassIssuer(caller, peer).current() for peer in peers]
    for encoded, peer in zip(passes, peers, strict=True):
        assert check(encoded, peer)
        assert len(check._verified) <= 2
    assert all(check(encoded, peer) for encoded, peer in zip(passes, peers, strict=True))


def test_expired_and_far_future_passes_are_refused(
    key: SwarmKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, caller = member(key, Role.SERVER), member(key)
    ours = PassIssuer(caller, PEER).current()
    now = membership.get_dht_time()
    later = now + membership.TOKEN_TTL_S + membership.CLOCK_SKEW_S + 1
    monkeypatch.setattr(membership, "get_dht_time", lambda: later)
    assert not check_pass(server, ours, PEER)

    forever = AccessToken(
        username=PEER,
        public_key=caller.credential().encode().encode(),
        expiration_time=f"{now + 10 * 365 * 86400:.3f}",
    )
    forever.signature = caller.holder.sign(membership._signed_part("rpc", forever))
    monkeypatch.setattr(membership, "get_dht_time", lambda: now)
    assert not check_pass(server, membership._encode(forever), PEER)


def test_a_pass_is_signed_again_before_it_expires(
    key: SwarmKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    caller = member(key)
    issuer = PassIssuer(caller, PEER)
    first = issuer.current()
    assert issuer.current() == first
    soon = membership.get_dht_time() + membership.TOKEN_TTL_S - membership.REFRESH_BEFORE_S + 1
    monkeypatch.setattr(membership, "get_dht_time", lambda: soon)
    second = issuer.current()
    assert second != first and check_pass(member(key, Role.SERVER), second, PEER)


def test_a_process_holding_the_swarm_key_renews_its_own_credential(
    key: SwarmKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = member(key)
    first = held.credential()
    assert held.credential() == first
    soon = first.not_after - membership.REFRESH_BEFORE_S + 1
    monkeypatch.setattr(membership.time, "time", lambda: soon)
    renewed = held.credential()
    assert renewed.id != first.id and renewed.not_after > first.not_after
    assert renewed.holder == first.holder  # the same key: its DHT records stay its own


def test_dht_requests_of_another_swarm_are_refused(key: SwarmKey, other: SwarmKey) -> None:
    async def check() -> None:
        ours = SwarmAuthorizer(member(key, Role.SERVER))
        for signer, accepted in ((member(key), True), (member(other), False)):
            request = dht_pb2.PingRequest()
            await SwarmAuthorizer(signer).sign_request(request, None)
            assert await ours.validate_request(request) is accepted

    asyncio.run(check())


@pytest.mark.parametrize(
    ("role", "may_store"), [(Role.SERVER, True), (Role.GATEWAY, False), (Role.FINETUNE, False)]
)
def test_only_servers_may_store_in_the_dht(key: SwarmKey, role: Role, may_store: bool) -> None:
    async def check() -> tuple[bool, bool]:
        peer = SwarmAuthorizer(member(key, Role.SERVER))
        signer = SwarmAuthorizer(member(key, role))
        store, find = dht_pb2.StoreRequest(), dht_pb2.FindRequest()
        await signer.sign_request(store, None)
        await signer.sign_request(find, None)
        return await peer.validate_request(store), await peer.validate_request(find)

    assert asyncio.run(check()) == (may_store, True)


def test_a_revoked_credential_is_refused_everywhere_at_once(key: SwarmKey) -> None:
    server, caller = member(key, Role.SERVER), member(key)
    authorizer, check = SwarmAuthorizer(server), PassChecker(server)
    ours = PassIssuer(caller, PEER).current()
    assert check(ours, PEER)  # remembered from now on

    async def ping() -> bool:
        request = dht_pb2.PingRequest()
        await SwarmAuthorizer(caller).sign_request(request, None)
        return bool(await authorizer.validate_request(request))

    assert asyncio.run(ping())
    credential = caller.credential()
    assert not server.learn(revoke(SwarmKey.generate().private, credential.id, 2e9))
    assert server.learn(revoke(key.private, credential.id, credential.not_after))
    assert not check(ours, PEER)
    assert not check_pass(server, ours, PEER)
    assert not asyncio.run(ping())
    assert server.verify(credential.encode()) is None


def test_servers_are_told_apart_by_credential_and_owner_key(key: SwarmKey) -> None:
    verifier = member(key)
    server, gateway = member(key, Role.SERVER), member(key)
    tag = server.credential().owner_tag
    assert verifier.server(tag, server.credential().encode()) == server.credential()
    # A gateway announcing with its own key, or showing a server's credential for its key.
    assert verifier.server(gateway.credential().owner_tag, gateway.credential().encode()) is None
    assert verifier.server(gateway.credential().owner_tag, server.credential().encode()) is None
    assert verifier.server(tag, "") is None


def test_a_credential_file_makes_a_member_of_its_role_only(key: SwarmKey, tmp_path: Path) -> None:
    path = tmp_path / "gateway.cred"
    held = credential_file(key, Role.GATEWAY, path)
    gateway = Membership.load(path, Role.GATEWAY)
    assert gateway.role is Role.GATEWAY and not gateway.renews
    assert gateway.fingerprint == key.fingerprint
    assert gateway.credential() == held.credential
    assert check_pass(member(key, Role.SERVER), PassIssuer(gateway, PEER).current(), PEER)
    with pytest.raises(SwarmKeyError, match="server credential"):
        Membership.load(path, Role.SERVER)
    # A server credential may do what a gateway does.
    credential_file(key, Role.SERVER, tmp_path / "server.cred")
    assert Membership.load(tmp_path / "server.cred", Role.GATEWAY).role is Role.SERVER


def test_expired_and_tampered_credential_files_are_refused(key: SwarmKey, tmp_path: Path) -> None:
    credential_file(key, Role.GATEWAY, tmp_path / "old.cred", seconds=-1)
    with pytest.raises(SwarmKeyError, match="expired"):
        Membership.load(tmp_path / "old.cred", Role.GATEWAY)
    text = credential_file(key, Role.GATEWAY, tmp_path / "gw.cred").dumps()
    # Its role rewritten to server: the swarm key's signature no longer holds.
    held = CredentialFile.loads(text)
    forged = CredentialFile(
        dataclasses.replace(held.credential, role=Role.SERVER), held.holder, held.swarm
    )
    (tmp_path / "forged.cred").write_text(forged.dumps())
    with pytest.raises(SwarmKeyError, match="not signed by the swarm key"):
        Membership.load(tmp_path / "forged.cred", Role.SERVER)
    # Someone else's private key beside it.
    stranger = CredentialFile(held.credential, RSAPrivateKey(), held.swarm)
    (tmp_path / "stranger.cred").write_text(stranger.dumps())
    with pytest.raises(SwarmKeyError, match="private key is not the one"):
        Membership.load(tmp_path / "stranger.cred", Role.GATEWAY)


def test_a_membership_survives_the_trip_to_the_dht_process(key: SwarmKey) -> None:
    gateway = member(key)
    copy = pickle.loads(pickle.dumps(gateway))
    assert copy.verify(gateway.credential().encode()) == gateway.credential()
    assert copy.holder.get_public_key().to_bytes() == gateway.holder.get_public_key().to_bytes()
