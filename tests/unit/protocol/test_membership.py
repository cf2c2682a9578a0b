"""Swarm keys and what they sign: DHT tokens and RPC passes."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import pytest
from hivemind.proto.auth_pb2 import AccessToken

from protocol import membership
from protocol.membership import (
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


def test_a_saved_key_loads_back_readable_by_its_owner_only(key: SwarmKey, tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = SwarmKey.load(path)
    assert loaded.fingerprint == key.fingerprint
    assert check_pass(loaded, PassIssuer(key, PEER).current(), PEER)
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
    ours = PassIssuer(key, PEER).current()
    assert check_pass(key, ours, PEER)
    assert not check_pass(key, ours, "QmPeerB")  # stolen: libp2p says the caller is B
    assert not check_pass(other, ours, PEER)  # another swarm
    assert not check_pass(key, PassIssuer(other, PEER).current(), PEER)
    for garbage in ("", "not base64!", "aGVsbG8=", "A" * 5000):
        assert not check_pass(key, garbage, PEER)


class CountingKey(SwarmKey):
    """A swarm key that counts the signatures it checks."""

    checks = 0

    def is_valid(self, purpose: str, token: AccessToken) -> bool:
        type(self).checks += 1
        return super().is_valid(purpose, token)


def test_a_server_checks_a_pass_signature_once_until_it_expires(
    key: SwarmKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = CountingKey(key.private)
    CountingKey.checks = 0
    check = PassChecker(counting)
    ours = PassIssuer(key, PEER).current()
    assert all(check(ours, PEER) for _ in range(5))
    assert CountingKey.checks == 1
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
    check = PassChecker(key)
    peers = [f"QmPeer{i}" for i in range(5)]
    passes = [PassIssuer(key, peer).current() for peer in peers]
    for encoded, peer in zip(passes, peers, strict=True):
        assert check(encoded, peer)
        assert len(check._verified) <= 2
    assert all(check(encoded, peer) for encoded, peer in zip(passes, peers, strict=True))


def test_a_dht_token_is_no_rpc_pass(key: SwarmKey) -> None:
    token = key.mint("dht", PEER)
    assert key.is_valid("dht", token) and not key.is_valid("rpc", token)


def test_expired_and_far_future_tokens_are_refused(
    key: SwarmKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = key.mint("rpc", PEER)
    now = float(token.expiration_time) - membership.TOKEN_TTL_S
    later = now + membership.TOKEN_TTL_S + membership.CLOCK_SKEW_S + 1
    monkeypatch.setattr(membership, "get_dht_time", lambda: later)
    assert not key.is_valid("rpc", token)

    forever = AccessToken(username=PEER, expiration_time=f"{now + 10 * 365 * 86400:.3f}")
    forever.signature = key.private.sign(membership._signed_part("rpc", forever))
    monkeypatch.setattr(membership, "get_dht_time", lambda: now)
    assert not key.is_valid("rpc", forever)


def test_a_pass_is_reminted_before_it_expires(
    key: SwarmKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    issuer = PassIssuer(key, PEER)
    first = issuer.current()
    assert issuer.current() == first
    soon = membership.get_dht_time() + membership.TOKEN_TTL_S - membership.REFRESH_BEFORE_S + 1
    monkeypatch.setattr(membership, "get_dht_time", lambda: soon)
    second = issuer.current()
    assert second != first and check_pass(key, second, PEER)


def test_dht_requests_of_another_swarm_are_refused(key: SwarmKey, other: SwarmKey) -> None:
    from hivemind.proto import dht_pb2

    async def check() -> None:
        ours, theirs, peer = SwarmAuthorizer(key), SwarmAuthorizer(other), SwarmAuthorizer(key)
        for signer, accepted in ((peer, True), (theirs, False)):
            request = dht_pb2.PingRequest()
            await signer.sign_request(request, None)
            assert await ours.validate_request(request) is accepted

    asyncio.run(check())
