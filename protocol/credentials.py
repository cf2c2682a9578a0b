"""Credentials: what the swarm key grants to a process, by role, until a date.

The swarm key (``swarmgate keygen``) is the root of a closed swarm. Operators keep it
offline and issue each process a *credential*: the swarm key's signature over a role, an
expiry, an id and the public half of a key the process holds (the *holder* key). The
credential file a process is given (``swarmgate issue``) holds the credential, the holder's
private key and the swarm's public key, so a process that holds one can prove what it may
do and check everyone else, but can grant nothing.

- ``server`` may store records in the DHT (announce blocks) and serve them;
- ``gateway`` and ``finetune`` may read the DHT and call servers, never announce.

A credential can be revoked before it expires: the swarm key signs a revocation naming its
id, stored in the DHT, which every member reads (``swarm_dht.revocations``).

Everything here is pure: parsing, signing, checking. Files and the DHT are elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

MAX_CREDENTIAL_CHARS = 2048  # an encoded credential is ~1,200 characters
MAX_REVOCATION_CHARS = 1024
MAX_NAME_CHARS = 64
MAX_DAYS = 3660  # ten years: beyond that, rotate the swarm key instead
_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._@:/-]*$")


class Role(StrEnum):
    SERVER = "server"  # announces blocks and serves them
    GATEWAY = "gateway"  # reads the swarm and opens inference sessions
    FINETUNE = "finetune"  # reads the swarm and trains adapters through it

    @property
    def announces(self) -> bool:
        return self is Role.SERVER


class CredentialError(ValueError):
    """A credential, revocation or credential file that cannot be used."""


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _b64decode(text: str, limit: int, what: str) -> dict[str, Any]:
    if not text or len(text) > limit:
        raise CredentialError(f"not a {what}: empty or longer than {limit} characters")
    try:
        fields = json.loads(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise CredentialError(f"not a {what}: not base64 of JSON") from None
    if not isinstance(fields, dict):
        raise CredentialError(f"not a {what}: not a JSON object")
    return fields


@dataclass(frozen=True)
class Credential:
    """The swarm key's grant of ``role`` to whoever holds the private half of ``holder``."""

    id: str  # 16 hex digits, what a revocation names
    role: Role
    holder: str  # the holder's RSA public key, OpenSSH format (hivemind's ``to_bytes``)
    not_after: int  # unix seconds
    name: str  # the operator's label: "gateway-eu-1"
    signature: str = ""  # by the swarm key, base64 (hivemind's ``sign``)

    def _signed_part(self) -> bytes:
        fields = {
            "v": 1,
            "id": self.id,
            "role": self.role.value,
            "holder": self.holder,
            "not_after": self.not_after,
            "name": self.name,
        }
        return b"swarmgate-credential\0" + _canonical(fields)

    def encode(self) -> str:
        fields = json.loads(self._signed_part().partition(b"\0")[2])
        fields["sig"] = self.signature
        return base64.b64encode(_canonical(fields)).decode()

    @classmethod
    def decode(cls, text: str) -> Credential:
        """The credential ``text`` encodes (signature unchecked): raises CredentialError."""
        fields = _b64decode(text, MAX_CREDENTIAL_CHARS, "credential")
        try:
            credential = cls(
                id=str(fields["id"]),
                role=Role(fields["role"]),
                holder=str(fields["holder"]),
                not_after=int(fields["not_after"]),
                name=str(fields["name"]),
                signature=str(fields["sig"]),
            )
        except (KeyError, ValueError, TypeError):
            raise CredentialError("not a credential: missing or malformed fields") from None
        if fields.get("v") != 1 or not _ID_RE.match(credential.id):
            raise CredentialError("not a credential of this version")
        return credential

    def signed_by(self, swarm: RSAPublicKey) -> bool:
        return bool(swarm.verify(self._signed_part(), self.signature.encode()))

    def holder_key(self) -> RSAPublicKey:
        try:
            return RSAPublicKey.from_bytes(self.holder.encode())
        except ValueError:
            raise CredentialError("the credential's holder key is not an RSA key") from None

    @property
    def owner_tag(self) -> str:
        """The owner tag of DHT records its holder signs (hivemind's RSASignatureValidator)."""
        return f"[owner:{self.holder}]"

    def describe(self) -> str:
        named = f" {self.name!r}" if self.name else ""
        return f"{self.role.value} credential {self.id}{named}"


def issue(
    swarm_key: RSAPrivateKey,
    role: Role,
    holder: RSAPublicKey,
    *,
    not_after: float,
    name: str = "",
) -> Credential:
    """A new credential for ``holder``, signed by the swarm key."""
    if len(name) > MAX_NAME_CHARS or not _NAME_RE.match(name):
        raise CredentialError(
            f"a credential name is at most {MAX_NAME_CHARS} letters, digits and ._@:/-"
        )
    unsigned = Credential(
        id=secrets.token_hex(8),
        role=role,
        holder=holder.to_bytes().decode(),
        not_after=int(not_after),
        name=name,
    )
    return replace(unsigned, signature=swarm_key.sign(unsigned._signed_part()).decode())


@dataclass(frozen=True)
class Revocation:
    """The swarm key's word that credential ``id`` is no longer good (until ``not_after``,
    when it would have expired anyway)."""

    id: str
    not_after: int
    signature: str = ""

    def _signed_part(self) -> bytes:
        fields = {"v": 1, "id": self.id, "not_after": self.not_after}
        return b"swarmgate-revocation\0" + _canonical(fields)

    def encode(self) -> str:
        fields = {"v": 1, "id": self.id, "not_after": self.not_after, "sig": self.signature}
        return base64.b64encode(_canonical(fields)).decode()

    @classmethod
    def decode(cls, text: str) -> Revocation:
        fields = _b64decode(text, MAX_REVOCATION_CHARS, "revocation")
        try:
            revocation = cls(str(fields["id"]), int(fields["not_after"]), str(fields["sig"]))
        except (KeyError, ValueError, TypeError):
            raise CredentialError("not a revocation: missing or malformed fields") from None
        if fields.get("v") != 1 or not _ID_RE.match(revocation.id):
            raise CredentialError("not a revocation of this version")
        return revocation

    def signed_by(self, swarm: RSAPublicKey) -> bool:
        return bool(swarm.verify(self._signed_part(), self.signature.encode()))


def revoke(swarm_key: RSAPrivateKey, credential_id: str, not_after: float) -> Revocation:
    if not _ID_RE.match(credential_id):
        raise CredentialError(f"{credential_id!r} is not a credential id (16 hex digits)")
    unsigned = Revocation(credential_id, int(not_after))
    return replace(unsigned, signature=swarm_key.sign(unsigned._signed_part()).decode())


# ---- the credential file: the credential, the holder's key, the swarm's public key ----

_CREDENTIAL_PEM = "SWARMGATE CREDENTIAL"
_BLOCK_RE = re.compile(r"-----BEGIN ([A-Z ]+)-----\n(.*?)\n-----END \1-----", re.S)


@dataclass(frozen=True)
class CredentialFile:
    credential: Credential
    holder: RSAPrivateKey
    swarm: RSAPublicKey

    def dumps(self) -> str:
        c = self.credential
        body = "\n".join(_wrap(c.encode()))
        holder_pem = (
            serialization.load_der_private_key(self.holder.to_bytes(), None)
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            .decode()
        )
        swarm_pem = (
            serialization.load_ssh_public_key(self.swarm.to_bytes())
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        return (
            f"# swarmgate {c.describe()}, valid until {utc_date(c.not_after)}\n"
            f"-----BEGIN {_CREDENTIAL_PEM}-----\n{body}\n-----END {_CREDENTIAL_PEM}-----\n"
            f"{swarm_pem}{holder_pem}"
        )

    @classmethod
    def loads(cls, text: str) -> CredentialFile:
        """Parse a credential file; CredentialError says what is wrong with it."""
        blocks = {kind: body for kind, body in _BLOCK_RE.findall(text)}
        if _CREDENTIAL_PEM not in blocks:
            raise CredentialError("no credential in it")
        credential = Credential.decode("".join(blocks[_CREDENTIAL_PEM].split()))
        try:
            swarm = serialization.load_pem_public_key(_pem("PUBLIC KEY", blocks))
            holder = serialization.load_pem_private_key(
                _pem("RSA PRIVATE KEY", blocks), password=None
            )
        except (ValueError, TypeError):
            raise CredentialError("its keys cannot be read") from None
        if not isinstance(swarm, rsa.RSAPublicKey) or not isinstance(holder, rsa.RSAPrivateKey):
            raise CredentialError("its keys are not RSA keys")
        swarm_key = RSAPublicKey(swarm)
        holder_key = hivemind_private_key(holder)
        if not credential.signed_by(swarm_key):
            raise CredentialError("its credential is not signed by the swarm key it names")
        if holder_key.get_public_key().to_bytes().decode() != credential.holder:
            raise CredentialError("its private key is not the one the credential names")
        return cls(credential, holder_key, swarm_key)


def utc_date(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M UTC")


def looks_like_credential_file(text: str) -> bool:
    return f"-----BEGIN {_CREDENTIAL_PEM}-----" in text


def _pem(kind: str, blocks: dict[str, str]) -> bytes:
    if kind not in blocks:
        raise CredentialError(f"no {kind.lower()} in it")
    return f"-----BEGIN {kind}-----\n{blocks[kind]}\n-----END {kind}-----\n".encode()


def _wrap(text: str, width: int = 64) -> list[str]:
    return [text[i : i + width] for i in range(0, len(text), width)]


def hivemind_private_key(key: rsa.RSAPrivateKey) -> RSAPrivateKey:
    """hivemind's key class has no loader; its pickle state is the DER key it restores."""
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    private = RSAPrivateKey.__new__(RSAPrivateKey)
    private.__setstate__({"_private_key": der})
    return private
