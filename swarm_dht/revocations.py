"""Revoked credentials, carried by the DHT.

``swarmgate revoke`` stores the swarm key's signed revocation under one DHT key, with the
credential's id as subkey. Every member reads that key every ``REFRESH_S`` and refuses the
credential from then on (its DHT requests, its passes, its server's records); servers
store what they know again with each announcement, so a revocation outlives the peers
that first held it. Only revocations the swarm key signed are stored by any member
(``RevocationValidator``): a member cannot overwrite or fake one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from functools import partial

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from protocol.credentials import CredentialError, Revocation
from protocol.membership import EXPIRY_WARNING_S, Membership, SwarmAuthorizer

logger = logging.getLogger(__name__)

REVOKED_KEY = "swarmgate_revoked"
REFRESH_S = 10.0  # how long a revoked credential may still be taken, at most (one DHT read)
DHT_TIMEOUT_S = 10.0
MAX_REVOCATION_TTL_S = 366 * 86_400.0  # hivemind keeps nothing forever; stored again yearly


class RevocationValidator(RecordValidatorBase):  # type: ignore[misc]
    """Lets a DHT peer store under ``REVOKED_KEY`` only revocations the swarm key signed,
    each under its own credential's id."""

    def __init__(self, membership: Membership) -> None:
        self._membership = membership
        self._key = DHTID.generate(source=REVOKED_KEY).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key:
            return True
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            revocation = Revocation.decode(MSGPackSerializer.loads(record.value))
        except (CredentialError, ValueError, TypeError):
            return False
        except Exception:  # msgpack's own errors on garbage
            return False
        return subkey == revocation.id and revocation.signed_by(self._membership.swarm)

    def sign_value(self, record: DHTRecord) -> bytes:
        return bytes(record.value)

    def strip_value(self, record: DHTRecord) -> bytes:
        return bytes(record.value)

    @property
    def priority(self) -> int:
        return 0  # after hivemind's signature validator, which strips its signatures first

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


async def fetch_revocations(dht: DHT) -> list[Revocation]:
    """The revocations stored in the swarm (not yet checked: ``Membership.learn`` does)."""
    found = await asyncio.wait_for(
        dht.get(REVOKED_KEY, latest=True, return_future=True), DHT_TIMEOUT_S
    )
    if found is None or not isinstance(found.value, dict):
        return []
    revocations = []
    for item in found.value.values():
        with contextlib.suppress(CredentialError, TypeError):
            revocations.append(Revocation.decode(item.value))
    return revocations


async def publish_revocations(dht: DHT, revocations: list[Revocation]) -> bool:
    """Store ``revocations``; True if every one was stored on some peer."""
    if not revocations:
        return True
    now = get_dht_time()
    stored = await asyncio.wait_for(
        dht.run_coroutine(
            partial(
                _store_here,
                subkeys=[r.id for r in revocations],
                values=[r.encode() for r in revocations],
                expirations=[min(r.not_after, now + MAX_REVOCATION_TTL_S) for r in revocations],
            ),
            return_future=True,
        ),
        DHT_TIMEOUT_S,
    )
    return bool(stored)


async def learn_revocations(dht: DHT, membership: Membership, handed: set[str]) -> int:
    """Read the swarm's revocations into this process and its DHT's; how many were news.

    ``handed``: the ids the DHT's process already has. Whatever this process knows beyond
    them is handed over, so a hand-over that failed or was cancelled is made next time
    (the news would not be news again)."""
    news = [r for r in await fetch_revocations(dht) if membership.learn(r)]
    for revocation in news:
        logger.warning("credential %s is revoked: refused from now on", revocation.id)
    due = [r for r in membership.revocations.all() if r.id not in handed]
    if due:
        await asyncio.wait_for(
            dht.run_coroutine(
                partial(_learn_here, encoded=[r.encode() for r in due]), return_future=True
            ),
            DHT_TIMEOUT_S,
        )
        handed.update(r.id for r in due)
    return len(news)


async def watch_revocations(
    dht: DHT, membership: Membership, handed: set[str] | None = None
) -> None:
    """``learn_revocations`` every ``REFRESH_S``, for as long as the process runs; and a
    daily reminder in the log once this process's own credential nears its expiry."""
    handed = set() if handed is None else handed
    warned_at = -math.inf
    while True:
        try:
            await learn_revocations(dht, membership, handed)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the DHT is briefly unreachable: read again next time
            logger.debug("could not read revocations: %r", e)
        credential = membership.credential()
        left = credential.not_after - time.time()
        due = not membership.renews and left < EXPIRY_WARNING_S
        if due and time.monotonic() - warned_at > 86_400:
            warned_at = time.monotonic()
            logger.warning(
                "this process's %s expires in %.1f days: issue a new one (`swarmgate issue`) "
                "and restart with it",
                credential.describe(),
                max(left, 0.0) / 86_400,
            )
        await asyncio.sleep(REFRESH_S)


# These run inside the DHT's process (hivemind's run_coroutine pickles them there).


async def _store_here(
    _dht: DHT, node: DHTNode, subkeys: list[str], values: list[str], expirations: list[float]
) -> bool:
    keys = [REVOKED_KEY] * len(subkeys)
    results = await node.store_many(keys, values, expirations, subkeys=subkeys)
    return all(results.values())


async def _learn_here(_dht: DHT, node: DHTNode, encoded: list[str]) -> None:
    authorizer = node.protocol.authorizer
    if isinstance(authorizer, SwarmAuthorizer):
        for text in encoded:
            authorizer.membership.learn(Revocation.decode(text))
