"""`swarmgate issue` and `swarmgate revoke`: what an operator does with the swarm key."""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from pathlib import Path

from hivemind.utils.crypto import RSAPrivateKey

from protocol.credentials import (
    MAX_DAYS,
    CredentialError,
    CredentialFile,
    Role,
    looks_like_credential_file,
    utc_date,
)
from protocol.credentials import (
    revoke as sign_revocation,
)
from protocol.membership import Membership, SwarmKey, SwarmKeyError, write_private
from swarm_dht.dht import SwarmDHT
from swarm_dht.revocations import fetch_revocations, publish_revocations


def _swarm_key(args: argparse.Namespace, command: str) -> SwarmKey:
    if not args.swarm_key:
        raise SystemExit(f"swarmgate {command}: --swarm-key FILE (the swarm key) is required")
    path = Path(args.swarm_key)
    try:
        if path.is_file() and looks_like_credential_file(path.read_text(errors="replace")):
            raise SystemExit(
                f"swarmgate {command}: {path} is a credential; only the swarm key itself "
                "(from `swarmgate keygen`) can issue or revoke"
            )
        return SwarmKey.load(path)
    except SwarmKeyError as e:
        raise SystemExit(f"swarmgate {command}: {e}") from None


def issue(args: argparse.Namespace) -> int:
    key = _swarm_key(args, "issue")
    if not 0 < args.days <= MAX_DAYS:
        raise SystemExit(f"swarmgate issue: --days must be between 1 and {MAX_DAYS}")
    holder = RSAPrivateKey()
    role = Role(args.role)
    try:
        credential = key.issue(
            role, holder.get_public_key(), seconds=args.days * 86400.0, name=args.name
        )
    except CredentialError as e:
        raise SystemExit(f"swarmgate issue: --name: {e}") from None
    text = CredentialFile(credential, holder, key.public).dumps()
    try:
        write_private(args.file, text.encode())
    except FileExistsError:
        raise SystemExit(f"swarmgate issue: {args.file} exists; not overwriting it") from None
    except OSError as e:
        raise SystemExit(f"swarmgate issue: cannot write {args.file}: {e.strerror}") from None
    print(
        f"swarmgate issue: wrote a {credential.describe()} of swarm {key.fingerprint} to "
        f"{args.file} (mode 600), valid until {utc_date(credential.not_after)}.\n"
        f"Give it to the {role.value} process(es) as --swarm-key {args.file} "
        f"(or SWARMGATE_SWARM_KEY). Revoke it with: swarmgate revoke --swarm-key "
        f"{args.swarm_key} {credential.id} --initial-peers ..."
    )
    return 0


def revoke(args: argparse.Namespace) -> int:
    from swarmgate.commands import initial_peers

    key = _swarm_key(args, "revoke")
    if args.credential is None:  # `--initial-peers A B ID`: the last one is no address
        last = args.initial_peers[-1] if args.initial_peers else ""
        if not (Path(last).is_file() or re.fullmatch(r"[0-9a-f]{16}", last)):
            raise SystemExit("swarmgate revoke: name the credential (its id, or its file)")
        args.credential = args.initial_peers.pop()
    credential_id, not_after = _what_to_revoke(args.credential)
    try:
        revocation = sign_revocation(key.private, credential_id, not_after)
    except CredentialError as e:
        raise SystemExit(f"swarmgate revoke: {e}") from None
    dht = SwarmDHT(
        initial_peers=initial_peers(args),
        client_mode=True,
        start=True,
        membership=Membership.of(key, Role.SERVER),
    )

    async def store() -> bool:
        if not await publish_revocations(dht, [revocation]):
            return False
        return any(r.id == credential_id for r in await fetch_revocations(dht))

    try:
        stored = asyncio.run(store())
    finally:
        dht.shutdown()
    if not stored:
        print(f"swarmgate revoke: no peer stored the revocation of {credential_id}; try again")
        return 1
    print(
        f"swarmgate revoke: credential {credential_id} is revoked. Members refuse it within "
        "10 s; servers keep the revocation stored until the credential would have expired."
    )
    return 0


def _what_to_revoke(given: str) -> tuple[str, float]:
    """A credential id and until when to keep its revocation, from an id or a credential
    file (whose expiry bounds it; an id alone is kept as long as any credential lives)."""
    path = Path(given)
    if path.is_file():
        try:
            credential = CredentialFile.loads(path.read_text()).credential
        except (CredentialError, UnicodeDecodeError) as e:
            raise SystemExit(f"swarmgate revoke: {given} is not a credential file: {e}") from None
        return credential.id, float(credential.not_after)
    return given, time.time() + MAX_DAYS * 86400.0
