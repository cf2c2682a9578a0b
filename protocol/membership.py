"""Membership of a closed swarm: only holders of a credential from the swarm key take part.

The swarm key is an RSA private key (``swarmgate keygen``). A process holds either a
*credential* issued from it (``swarmgate issue``: a role, an expiry and a key of the
process's own, ``protocol.credentials``) or the swarm key itself, which then issues the
process a credential for its role in memory (``swarmgate up``, tests, small swarms).

What a process shows, hivemind's pattern for moderated networks, in two places:

- The DHT. Every DHT request and response carries a token: the sender's credential, whose
  holder key signs the request (``SwarmAuthorizer``, a hivemind ``TokenAuthorizerBase``).
  A peer without a credential can neither store, find nor even ping through a member, and
  members ignore whatever it answers. Only a ``server`` credential may store: a gateway or
  a fine-tuner that tries is refused.
- Block RPC. A caller opening a session shows a *pass*: its credential and, signed by its
  holder key, its own libp2p peer id. libp2p has already proven that id (the connection's
  handshake), so a stolen pass is useless from any other peer, and a node refuses
  everything else before it reads a tensor or reserves a byte.

A revoked credential (``Revocations``, read from the DHT by ``swarm_dht.revocations``) is
refused in both places, and its server's records are no longer used by gateways.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.proto import dht_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import AuthorizedRequestBase, TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.timed_storage import get_dht_time

from protocol.credentials import (
    Credential,
    CredentialError,
    CredentialFile,
    Revocation,
    Role,
    hivemind_private_key,
    issue,
    looks_like_credential_file,
)

logger = logging.getLogger(__name__)

TOKEN_TTL_S = 3600.0  # passes are signed locally, so short lives cost nothing
REFRESH_BEFORE_S = 600.0  # re-sign a pass (or re-issue a root credential) this long before
CLOCK_SKEW_S = 300.0  # members' clocks may differ this much (run NTP)
MAX_PASS_CHARS = 4096  # a pass is ~2,000 characters; anything longer is refused unread
MAX_REMEMBERED_PASSES = 1024  # verified passes a server keeps (one per caller, mostly)
MAX_REMEMBERED_CREDENTIALS = 1024  # verified credentials a process keeps
MAX_REVOCATIONS = 10_000
ROOT_CREDENTIAL_TTL_S = 86_400.0  # what a process holding the swarm key issues itself
EXPIRY_WARNING_S = 7 * 86_400.0

_RPC = "rpc"  # what a pass is for (DHT tokens carry no signature of their own)


class SwarmKeyError(ValueError):
    """A swarm key or credential file that is missing, unreadable, expired or not one."""


def _warn_if_readable(path: Path, what: str) -> None:
    info = path.stat()
    mode = info.st_mode
    # A group this process belongs to is fine: Kubernetes mounts secrets 0440 with the
    # pod's fsGroup. Other users, or another group, could read the key.
    foreign_group = info.st_gid not in {os.getgid(), *os.getgroups()}
    if mode & stat.S_IROTH or (mode & stat.S_IRGRP and foreign_group):
        logger.warning(
            "the %s %s can be read by other users of this machine (mode %03o); "
            "anyone holding it can join the swarm: `chmod 600` it",
            what,
            path,
            stat.S_IMODE(mode),
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SwarmKeyError(f"cannot read the {what} {path}: {e.strerror}") from None


def _fingerprint(public: RSAPublicKey) -> str:
    """Names the swarm in logs without revealing anything: a digest of the public key."""
    return "SHA256:" + hashlib.sha256(public.to_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class SwarmKey:
    """The root of a closed swarm: it issues and revokes credentials."""

    private: RSAPrivateKey

    @classmethod
    def generate(cls) -> SwarmKey:
        return cls(RSAPrivateKey())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SwarmKey:
        path = Path(path)
        data = _read(path, "swarm key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise SwarmKeyError(
                f"{path} is not a swarm key (make one with `swarmgate keygen FILE`)"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SwarmKeyError(f"{path} holds a {type(key).__name__}, not an RSA swarm key")
        _warn_if_readable(path, "swarm key")
        return cls(hivemind_private_key(key))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as PEM, readable by its owner only; never overwrites a file."""
        pem = serialization.load_der_private_key(self.private.to_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        write_private(path, pem)

    @property
    def public(self) -> RSAPublicKey:
        return self.private.get_public_key()

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.public)

    def issue(
        self, role: Role, holder: RSAPublicKey, *, seconds: float, name: str = ""
    ) -> Credential:
        return issue(self.private, role, holder, not_after=time.time() + seconds, name=name)


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` readable by its owner only; never overwrites a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class Revocations:
    """The credentials the swarm key has revoked, as far as this process has heard."""

    def __init__(self) -> None:
        self._known: dict[str, Revocation] = {}

    def add(self, revocation: Revocation) -> bool:
        """Remember a verified revocation; True if it is news."""
        if revocation.id in self._known or revocation.not_after < time.time():
            return False
        if len(self._known) >= MAX_REVOCATIONS:
            self._forget_expired()
            if len(self._known) >= MAX_REVOCATIONS:
                logger.error("more than %d revocations: rotate the swarm key", MAX_REVOCATIONS)
                return False
        self._known[revocation.id] = revocation
        return True

    def __contains__(self, credential_id: str) -> bool:
        return credential_id in self._known

    def all(self) -> list[Revocation]:
        self._forget_expired()
        return list(self._known.values())

    def _forget_expired(self) -> None:
        now = time.time()
        for stale in [i for i, r in self._known.items() if r.not_after < now]:
            del self._known[stale]


class Membership:
    """This process's standing in a closed swarm: the swarm's public key (to check others),
    its own holder key and credential (to prove itself), and the revocations it has heard.

    ``root`` is the swarm key when the process was given it rather than a credential: it
    then issues itself short-lived credentials for ``role`` and renews them."""

    def __init__(
        self,
        swarm: RSAPublicKey,
        holder: RSAPrivateKey,
        credential: Credential,
        root: SwarmKey | None = None,
    ) -> None:
        self._swarm_bytes = swarm.to_bytes()
        self._swarm: RSAPublicKey | None = swarm
        self.holder = holder
        self._credential = credential
        self._root = root
        self.revocations = Revocations()
        self._verified: dict[str, Credential] = {}
        self._holder_keys: dict[str, RSAPublicKey] = {}

    @classmethod
    def of(cls, swarm_key: SwarmKey, role: Role) -> Membership:
        holder = RSAPrivateKey()
        credential = swarm_key.issue(
            role, holder.get_public_key(), seconds=ROOT_CREDENTIAL_TTL_S, name="root-issued"
        )
        return cls(swarm_key.public, holder, credential, root=swarm_key)

    @classmethod
    def load(cls, path: str | os.PathLike[str], role: Role) -> Membership:
        """The membership a swarm key or credential file at ``path`` gives a process that
        acts as ``role``; SwarmKeyError says why it cannot."""
        path = Path(path)
        data = _read(path, "credential")
        if not looks_like_credential_file(data.decode(errors="replace")):
            return cls.of(SwarmKey.load(path), role)
        try:
            held = CredentialFile.loads(data.decode())
        except CredentialError as e:
            raise SwarmKeyError(f"{path} is not a usable credential: {e}") from None
        _warn_if_readable(path, "credential")
        credential = held.credential
        left = credential.not_after - time.time()
        if left <= 0:
            raise SwarmKeyError(
                f"{path}: the {credential.describe()} has expired; issue a new one "
                "(`swarmgate issue`)"
            )
        if role.announces and not credential.role.announces:
            raise SwarmKeyError(
                f"{path} holds a {credential.describe()}, which may not serve blocks: "
                "a node needs a server credential (`swarmgate issue --role server`)"
            )
        if left < EXPIRY_WARNING_S:
            logger.warning("the %s expires in %.1f days", credential.describe(), left / 86400)
        return cls(held.swarm, held.holder, credential)

    def __getstate__(self) -> dict[str, Any]:
        # Sent to the DHT's process: cryptography's public keys do not pickle, caches need not.
        state = self.__dict__.copy()
        state.update(_swarm=None, _verified={}, _holder_keys={})
        return state

    @property
    def swarm(self) -> RSAPublicKey:
        if self._swarm is None:
            self._swarm = RSAPublicKey.from_bytes(self._swarm_bytes)
        return self._swarm

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.swarm)

    @property
    def role(self) -> Role:
        return self._credential.role

    def credential(self) -> Credential:
        """This process's credential, renewed first when it holds the swarm key."""
        if self._root is not None and self._credential.not_after - time.time() < REFRESH_BEFORE_S:
            self._credential = self._root.issue(
                self.role, self.holder.get_public_key(), seconds=ROOT_CREDENTIAL_TTL_S
            )
        return self._credential

    @property
    def renews(self) -> bool:
        return self._root is not None

    def verify(self, encoded: str) -> Credential | None:
        """The credential ``encoded`` if the swarm key signed it, unexpired and unrevoked."""
        credential = self._verified.get(encoded)
        if credential is None:
            try:
                credential = Credential.decode(encoded)
            except CredentialError:
                return None
            if not credential.signed_by(self.swarm):
                return None
            if len(self._verified) >= MAX_REMEMBERED_CREDENTIALS:
                self._verified.clear()  # verified again, never wrongly accepted
            self._verified[encoded] = credential
        if credential.not_after < get_dht_time() - CLOCK_SKEW_S:
            return None
        if credential.id in self.revocations:
            return None
        return credential

    def holder_key(self, credential: Credential) -> RSAPublicKey | None:
        key = self._holder_keys.get(credential.holder)
        if key is None:
            try:
                key = credential.holder_key()
            except CredentialError:
                return None
            if len(self._holder_keys) >= MAX_REMEMBERED_CREDENTIALS:
                self._holder_keys.clear()
            self._holder_keys[credential.holder] = key
        return key

    def server(self, owner_tag: str, encoded: str) -> Credential | None:
        """The credential of a server that signs its DHT records with ``owner_tag``, if
        ``encoded`` is a good server credential for exactly that key."""
        credential = self.verify(encoded)
        if credential is None or not credential.role.announces:
            return None
        return credential if credential.owner_tag == owner_tag else None

    def learn(self, revocation: Revocation) -> bool:
        """Take a revocation read from the swarm if the swarm key signed it; True if news."""
        return revocation.signed_by(self.swarm) and self.revocations.add(revocation)


class SwarmAuthorizer(TokenAuthorizerBase):  # type: ignore[misc]
    """Signs and checks every DHT request and response with credentials.

    A token is the sender's credential, with its holder key as the key hivemind checks the
    request's signature with: a credential is useless to anyone without its private key.
    """

    def __init__(self, membership: Membership) -> None:
        super().__init__(membership.holder)
        self.membership = membership
        self._refused: set[str] = set()

    async def get_token(self) -> AccessToken:
        credential = self.membership.credential()
        return AccessToken(
            username=credential.encode(),
            public_key=self.local_public_key.to_bytes(),
            expiration_time=str(credential.not_after),
        )

    def is_token_valid(self, access_token: AccessToken) -> bool:
        credential = self.membership.verify(access_token.username)
        return credential is not None and credential.holder.encode() == access_token.public_key

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        left = float(access_token.expiration_time) - get_dht_time()
        return self.membership.renews and left < REFRESH_BEFORE_S

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        if not await super().validate_request(request):
            return False
        if not isinstance(request, dht_pb2.StoreRequest):
            return True
        credential = self.membership.verify(request.auth.client_access_token.username)
        if credential is not None and credential.role.announces:
            return True
        if credential is not None and credential.id not in self._refused:
            self._refused.add(credential.id)
            logger.warning(
                "refused a DHT store by a %s: only servers announce", credential.describe()
            )
        return False


class PassIssuer:
    """This process's pass to members' block RPCs, signed again before it expires."""

    def __init__(self, membership: Membership, peer_id: str) -> None:
        self._membership = membership
        self._peer_id = peer_id
        self._expiration = 0.0
        self._encoded = ""

    def current(self) -> str:
        if self._expiration - get_dht_time() < REFRESH_BEFORE_S:
            credential = self._membership.credential()
            expiration = min(get_dht_time() + TOKEN_TTL_S, float(credential.not_after))
            token = AccessToken(
                username=self._peer_id,
                public_key=credential.encode().encode(),
                expiration_time=f"{expiration:.3f}",
            )
            token.signature = self._membership.holder.sign(_signed_part(_RPC, token))
            self._expiration, self._encoded = expiration, _encode(token)
        return self._encoded


def _signed_part(purpose: str, token: AccessToken) -> bytes:
    """What a pass's signature covers; the purpose keeps it from passing as anything else."""
    fields = (purpose, token.username, token.public_key.hex(), token.expiration_time)
    return "\0".join(("swarmgate-token", *fields)).encode()


def check_pass(membership: Membership, encoded: str, caller: str) -> bool:
    """Whether ``encoded`` is a member's pass for the peer that libp2p says is calling."""
    return _valid_pass(membership, encoded, caller) is not None


def _valid_pass(
    membership: Membership, encoded: str, caller: str
) -> tuple[float, Credential] | None:
    if not encoded or len(encoded) > MAX_PASS_CHARS:
        return None
    try:
        token = AccessToken.FromString(base64.b64decode(encoded, validate=True))
        expiration = float(token.expiration_time)
        credential_text = token.public_key.decode()
    except (binascii.Error, DecodeError, ValueError):
        return None
    now = get_dht_time()
    if token.username != caller or expiration < now - CLOCK_SKEW_S:
        return None
    if expiration > now + TOKEN_TTL_S + CLOCK_SKEW_S:
        return None  # signed to live longer than any pass: never honoured
    credential = membership.verify(credential_text)
    if credential is None or expiration > credential.not_after + CLOCK_SKEW_S:
        return None
    holder = membership.holder_key(credential)
    if holder is None or not holder.verify(_signed_part(_RPC, token), token.signature):
        return None
    return expiration, credential


class PassChecker:
    """``check_pass`` for a server, remembering the passes it has verified until they
    expire. A gateway or a node shows the same pass with every push for up to an hour,
    and checking its RSA signatures again each time cost ~100 us of every token's path.
    Only valid passes are remembered (a stranger cannot fill the memory), at most
    ``MAX_REMEMBERED_PASSES`` at once; a revocation applies to remembered ones at once."""

    def __init__(self, membership: Membership) -> None:
        self._membership = membership
        self._verified: dict[tuple[str, str], tuple[float, str]] = {}  # → (expiration, id)

    def __call__(self, encoded: str, caller: str) -> bool:
        remembered = self._verified.get((encoded, caller))
        if remembered is not None:
            expiration, credential_id = remembered
            if expiration >= get_dht_time() - CLOCK_SKEW_S:
                return credential_id not in self._membership.revocations
            del self._verified[(encoded, caller)]
            return False
        valid = _valid_pass(self._membership, encoded, caller)
        if valid is None:
            return False
        if len(self._verified) >= MAX_REMEMBERED_PASSES:
            self._verified.clear()  # passes are re-verified, never wrongly accepted
        self._verified[(encoded, caller)] = (valid[0], valid[1].id)
        return True


def _encode(token: AccessToken) -> str:
    return base64.b64encode(token.SerializeToString()).decode()
