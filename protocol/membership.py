"""Membership of a closed swarm: whoever holds the swarm key is a member, nobody else.

The swarm key is an RSA private key that every member holds (``swarmgate keygen``). It
signs short-lived access tokens, hivemind's pattern for moderated networks, in two places:

- The DHT. Every DHT request and response carries a token that binds the sender's own
  request-signing key to the swarm (``SwarmAuthorizer``, a hivemind ``TokenAuthorizerBase``).
  A peer without the key can neither store, find nor even ping through a member, and
  members ignore whatever it answers, so its records never reach a gateway or a node.
- Block RPC. A gateway opening a session shows a *pass*: a token naming its own libp2p
  peer id. libp2p has already proven that id (the connection's handshake), so a stolen
  pass is useless from any other peer, and a node refuses everything else before it reads
  a tensor or reserves a byte.

What the key proves is possession, nothing more: every member can mint tokens, so a member
is trusted to run the model honestly. A leaked key admits its holder until the swarm moves
to a new key (README, "Security model").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.timed_storage import get_dht_time

logger = logging.getLogger(__name__)

TOKEN_TTL_S = 3600.0  # tokens are minted locally, so short lives cost nothing
REFRESH_BEFORE_S = 600.0  # re-mint a token once it has less than this left
CLOCK_SKEW_S = 300.0  # members' clocks may differ this much (run NTP)
MAX_PASS_CHARS = 4096  # a pass is ~600 characters; anything longer is refused unread
MAX_REMEMBERED_PASSES = 1024  # verified passes a server keeps (one per caller, mostly)

_DHT, _RPC = "dht", "rpc"  # what a token is for: one cannot be replayed as the other


class SwarmKeyError(ValueError):
    """A swarm key file that is missing, unreadable or not a swarm key."""


@dataclass(frozen=True)
class SwarmKey:
    """The shared secret of a closed swarm, and what it signs."""

    private: RSAPrivateKey

    @classmethod
    def generate(cls) -> SwarmKey:
        return cls(RSAPrivateKey())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SwarmKey:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SwarmKeyError(f"cannot read the swarm key {path}: {e.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise SwarmKeyError(
                f"{path} is not a swarm key (make one with `swarmgate keygen FILE`)"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SwarmKeyError(f"{path} holds a {type(key).__name__}, not an RSA swarm key")
        info = path.stat()
        mode = info.st_mode
        # A group this process belongs to is fine: Kubernetes mounts secrets 0440 with the
        # pod's fsGroup. Other users, or another group, could read the key.
        foreign_group = info.st_gid not in {os.getgid(), *os.getgroups()}
        if mode & stat.S_IROTH or (mode & stat.S_IRGRP and foreign_group):
            logger.warning(
                "the swarm key %s can be read by other users of this machine (mode %03o); "
                "anyone holding it can join the swarm: `chmod 600` it",
                path,
                stat.S_IMODE(mode),
            )
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        # hivemind's key class has no loader; its pickle state is the DER key it restores.
        private = RSAPrivateKey.__new__(RSAPrivateKey)
        private.__setstate__({"_private_key": der})
        return cls(private)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as PEM, readable by its owner only; never overwrites a file."""
        pem = serialization.load_der_private_key(self.private.to_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    @property
    def public(self) -> RSAPublicKey:
        return self.private.get_public_key()

    @property
    def fingerprint(self) -> str:
        """Names the swarm in logs without revealing anything: a digest of the public key."""
        return "SHA256:" + hashlib.sha256(self.public.to_bytes()).hexdigest()[:16]

    def mint(self, purpose: str, username: str, public_key: bytes = b"") -> AccessToken:
        expiration = f"{get_dht_time() + TOKEN_TTL_S:.3f}"
        token = AccessToken(username=username, public_key=public_key, expiration_time=expiration)
        token.signature = self.private.sign(_signed_part(purpose, token))
        return token

    def is_valid(self, purpose: str, token: AccessToken) -> bool:
        """Signed by this swarm for ``purpose`` and not expired."""
        try:
            expiration = float(token.expiration_time)
        except ValueError:
            return False
        if expiration < get_dht_time() - CLOCK_SKEW_S:
            return False
        if expiration > get_dht_time() + TOKEN_TTL_S + CLOCK_SKEW_S:
            return False  # minted to outlive a key rotation: never honoured
        return bool(self.public.verify(_signed_part(purpose, token), token.signature))


def _signed_part(purpose: str, token: AccessToken) -> bytes:
    """What a token's signature covers; the purpose keeps a DHT token from passing as an
    RPC pass and the other way round."""
    fields = (purpose, token.username, token.public_key.hex(), token.expiration_time)
    return "\0".join(("swarmgate-token", *fields)).encode()


def _needs_refresh(token: AccessToken) -> bool:
    return bool(float(token.expiration_time) - get_dht_time() < REFRESH_BEFORE_S)


class SwarmAuthorizer(TokenAuthorizerBase):  # type: ignore[misc]
    """Signs and checks every DHT request and response with swarm-key tokens.

    Each process signs its requests with a key of its own; its token binds that key to the
    swarm, so a member's token cannot be reused by anyone without the member's own key.
    """

    def __init__(self, swarm_key: SwarmKey) -> None:
        super().__init__(RSAPrivateKey())
        self._swarm_key = swarm_key

    async def get_token(self) -> AccessToken:
        return self._swarm_key.mint(_DHT, "", self.local_public_key.to_bytes())

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return self._swarm_key.is_valid(_DHT, access_token)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return _needs_refresh(access_token)


class PassIssuer:
    """This process's pass to members' block RPCs, re-minted before it expires."""

    def __init__(self, swarm_key: SwarmKey, peer_id: str) -> None:
        self._swarm_key = swarm_key
        self._peer_id = peer_id
        self._token = swarm_key.mint(_RPC, peer_id)
        self._encoded = _encode(self._token)

    def current(self) -> str:
        if _needs_refresh(self._token):
            self._token = self._swarm_key.mint(_RPC, self._peer_id)
            self._encoded = _encode(self._token)
        return self._encoded


def check_pass(swarm_key: SwarmKey, encoded: str, caller: str) -> bool:
    """Whether ``encoded`` is this swarm's pass for the peer that libp2p says is calling."""
    return _valid_pass(swarm_key, encoded, caller) is not None


def _valid_pass(swarm_key: SwarmKey, encoded: str, caller: str) -> AccessToken | None:
    if not encoded or len(encoded) > MAX_PASS_CHARS:
        return None
    try:
        token = AccessToken.FromString(base64.b64decode(encoded, validate=True))
    except (binascii.Error, DecodeError, ValueError):
        return None
    if token.username != caller or not swarm_key.is_valid(_RPC, token):
        return None
    return token


class PassChecker:
    """``check_pass`` for a server, remembering the passes it has verified until they
    expire. A gateway or a node shows the same pass with every push for up to an hour,
    and checking its RSA signature again each time cost ~50 us of every token's path.
    Only valid passes are remembered (a stranger cannot fill the memory), at most
    ``MAX_REMEMBERED_PASSES`` at once."""

    def __init__(self, swarm_key: SwarmKey) -> None:
        self._swarm_key = swarm_key
        self._verified: dict[tuple[str, str], float] = {}  # (pass, caller) → expiration

    def __call__(self, encoded: str, caller: str) -> bool:
        expiration = self._verified.get((encoded, caller))
        if expiration is not None:
            if expiration >= get_dht_time() - CLOCK_SKEW_S:
                return True
            del self._verified[(encoded, caller)]
            return False
        token = _valid_pass(self._swarm_key, encoded, caller)
        if token is None:
            return False
        if len(self._verified) >= MAX_REMEMBERED_PASSES:
            self._verified.clear()  # passes are re-verified, never wrongly accepted
        self._verified[(encoded, caller)] = float(token.expiration_time)
        return True


def _encode(token: AccessToken) -> str:
    return base64.b64encode(token.SerializeToString()).decode()
