"""Swarm records in the hivemind DHT: read them, write them.

Everything here talks to the DHT; everything that decides lives in the pure planning of
``routing/``, which takes the ``SwarmSnapshot`` built here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration, get_dht_time

from protocol.swarm import (
    PROTOCOL_VERSION,
    ModelRecord,
    NodeState,
    ServerRecord,
    block_key,
    model_key,
    models_key,
)
from routing.snapshot import SwarmSnapshot
from swarm_dht.dht import SwarmDHT

logger = logging.getLogger(__name__)

DHT_TIMEOUT_S = 10.0  # hivemind calls can hang forever when a peer misbehaves
# The planner considers at most this many servers per block (the best by state and
# throughput): its time and a gateway's memory stay bounded however many records exist.
MAX_SERVERS_PER_BLOCK = 256
MAX_PEER_ID_CHARS = 128
OWNER_MARK = "[owner:"  # hivemind's RSASignatureValidator: what follows names the writer
# In the list of models, a subkey is "{prefix}|{peer id}[owner:...]": signed by the server.
MODEL_SEPARATOR = "|"


async def fetch_model(dht: DHT, prefix: str) -> ModelRecord | None:
    """The model record of ``prefix``: the latest one a server signed (each server stores
    its own under its peer id, so no member can overwrite another's)."""
    found = await _get(dht, model_key(prefix))
    if found is None or not isinstance(found.value, dict):
        return None
    signed = [
        (item.expiration_time, item.value)
        for subkey, item in found.value.items()
        if _peer_and_owner(subkey)[1] is not None
    ]
    for _, value in sorted(signed, key=lambda pair: pair[0], reverse=True):
        try:
            return ModelRecord.from_wire(value)
        except ValueError as e:
            _ignore(model_key(prefix), str(e))
    return None


@dataclass(frozen=True)
class Candidate:
    """One server record as read from the DHT: who it names, who signed it, what it says."""

    peer_id: str  # the peer the subkey names
    owner: str  # the owner tag whose key signed it (hivemind's RSASignatureValidator)
    expiration: float
    record: ServerRecord


async def fetch_candidates(dht: DHT, prefix: str, model: ModelRecord) -> list[Candidate]:
    """Every usable server record of ``model``: well-formed, signed, of this protocol and
    this very model, one per (peer, signer) however many blocks it was stored under."""
    keys = [block_key(prefix, b) for b in range(model.num_blocks)]
    found = await _get_many(dht, keys)
    # A server's one announcement stores the same record under each of its blocks: parsed
    # once. The expiration tells announcements apart.
    parsed_once: dict[tuple[object, float], Candidate | None] = {}
    for key in keys:
        entry = found.get(key)
        if entry is None or not isinstance(entry.value, dict):
            continue
        for subkey, item in entry.value.items():
            memo = (subkey, item.expiration_time) if isinstance(subkey, str) else None
            if memo is not None and memo in parsed_once:
                continue
            parsed = _parse(key, subkey, item.value, model, item.expiration_time)
            if memo is not None:
                parsed_once[memo] = parsed
    return [c for c in parsed_once.values() if c is not None]


def snapshot_of(
    model: ModelRecord,
    candidates: Sequence[Candidate],
    owners: Mapping[str, str] | None = None,
    taken_at: float | None = None,
) -> SwarmSnapshot:
    """The servers of ``candidates``, at most ``MAX_SERVERS_PER_BLOCK`` per block.

    ``owners``: each peer's owner tag as the peer itself stated it over an authenticated
    connection (``ServerInfo.owner``); a record is used only if that peer signed it, so a
    member cannot speak for another server (say it is draining, or move it elsewhere).
    None: every signed record is taken at its word, the latest per peer (for block choice
    and `status`, which route no traffic)."""
    latest: dict[str, Candidate] = {}
    for candidate in candidates:
        if owners is not None and owners.get(candidate.peer_id) != candidate.owner:
            continue
        held = latest.get(candidate.peer_id)
        # A restarted server may have left a record under an older signing key.
        if held is None or candidate.expiration > held.expiration:
            latest[candidate.peer_id] = candidate
    per_block: dict[int, list[Candidate]] = {}
    for candidate in latest.values():
        for block in range(candidate.record.start, min(candidate.record.end, model.num_blocks)):
            per_block.setdefault(block, []).append(candidate)
    servers: dict[str, ServerRecord] = {}
    expires: dict[str, float] = {}
    for block in sorted(per_block):
        ranked = sorted(per_block[block], key=lambda c: _rank(c.record), reverse=True)
        for candidate in ranked[:MAX_SERVERS_PER_BLOCK]:
            servers.setdefault(candidate.peer_id, candidate.record)
            expires[candidate.peer_id] = candidate.expiration
    return SwarmSnapshot(model, servers, get_dht_time() if taken_at is None else taken_at, expires)


async def fetch_snapshot(dht: DHT, prefix: str, model: ModelRecord) -> SwarmSnapshot:
    """The server records of ``model``, each signed record taken at its word (see
    ``snapshot_of``; gateways verify who signed what)."""
    return snapshot_of(model, await fetch_candidates(dht, prefix, model))


def _parse(
    key: str, subkey: object, value: object, model: ModelRecord, expiration: float
) -> Candidate | None:
    """The candidate of one DHT entry, or None (logged) if it cannot be used."""
    peer_id, owner = _peer_and_owner(subkey)
    if peer_id is None:
        _ignore(f"a record under {key}", "its subkey is not a peer id")
        return None
    if owner is None:  # hivemind stores these unsigned: anyone could have written it
        _ignore(f"a record of {peer_id}", "it is not signed by its writer")
        return None
    try:
        record = ServerRecord.from_wire(value)
    except ValueError as e:
        _ignore(peer_id, str(e))
        return None
    if record.version != PROTOCOL_VERSION:  # a server this process cannot talk to
        _ignore(peer_id, f"protocol version {record.version}, not {PROTOCOL_VERSION}")
        return None
    if record.model != model.digest:
        _ignore(
            peer_id, f"it serves another model named {model.name!r} (another shape or revision)"
        )
        return None
    return Candidate(peer_id, owner, expiration, record)


_ignored: set[tuple[str, str]] = set()  # said once: snapshots are re-read every few seconds


def _ignore(what: str, why: str) -> None:
    if (what, why) in _ignored:
        return
    if len(_ignored) >= 4096:
        _ignored.clear()
    _ignored.add((what, why))
    logger.warning("ignoring %s: %s", what, why)


def _peer_and_owner(subkey: object) -> tuple[str | None, str | None]:
    """The peer id a subkey names (``{peer id}[owner:{key}]``), if it is a valid one, and
    its owner tag (None without one)."""
    if not isinstance(subkey, str):
        return None, None
    text, mark, rest = subkey.partition(OWNER_MARK)
    owner = mark + rest if mark else None
    if not 0 < len(text) <= MAX_PEER_ID_CHARS:
        return None, None
    try:
        return PeerID.from_base58(text).to_base58(), owner
    except (ValueError, TypeError):
        return None, None


def _rank(record: ServerRecord) -> tuple[bool, float]:
    return record.state is NodeState.ONLINE, record.throughput


def warn_if_model_differs(found: ModelRecord | None, local: ModelRecord) -> None:
    """Warn when the swarm describes this model differently from the local files: servers
    of the other shape are then never used (their records carry its digest)."""
    if found is not None and (diff := local.disagreement(found)):
        logger.warning(
            "the swarm's record of %s disagrees with the local model: %s", local.name, diff
        )


async def announce(
    dht: SwarmDHT,
    prefix: str,
    peer_id: str,
    record: ServerRecord,
    model: ModelRecord,
    *,
    ttl_s: float,
    namespace: str = "",
) -> None:
    """Store ``record`` under every block it holds and the model record, expiring in ``ttl_s``.

    The subkey carries this process's owner tag: nobody else can overwrite the record.
    """
    expiration = get_dht_time() + ttl_s
    subkey = peer_id + dht.owner_tag
    wire, model_wire = record.to_wire(), model.to_wire()
    stores: list[tuple[str, object, str | None]] = [
        *((block_key(prefix, b), wire, subkey) for b in range(record.start, record.end)),
        (model_key(prefix), model_wire, subkey),
        (models_key(namespace), model_wire, f"{prefix}{MODEL_SEPARATOR}{subkey}"),
    ]
    keys, values, subkeys = (list(column) for column in zip(*stores, strict=True))
    call = partial(
        _store_many_here, keys=keys, values=values, subkeys=subkeys, expiration=expiration
    )
    await asyncio.wait_for(dht.run_coroutine(call, return_future=True), DHT_TIMEOUT_S)


async def fetch_models(dht: DHT, namespace: str = "") -> dict[str, ModelRecord]:
    """Every model announced in the swarm, by DHT prefix."""
    found = await _get(dht, models_key(namespace))
    models: dict[str, ModelRecord] = {}
    if found is None or not isinstance(found.value, dict):
        return models
    newest: dict[str, float] = {}
    for subkey, item in found.value.items():
        prefix, _, writer = str(subkey).partition(MODEL_SEPARATOR)
        if _peer_and_owner(writer)[1] is None or item.expiration_time <= newest.get(prefix, 0):
            continue  # unsigned (anyone's), or older than one already read
        try:
            models[prefix] = ModelRecord.from_wire(item.value)
            newest[prefix] = item.expiration_time
        except ValueError as e:
            _ignore(f"model record {prefix}", str(e))
    return models


async def _get(dht: DHT, key: str):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(dht.get(key, latest=True, return_future=True), DHT_TIMEOUT_S)


async def _get_many(dht: DHT, keys: Sequence[str]) -> dict[str, ValueWithExpiration | None]:
    """The latest value of each key, in one call into the DHT process and one traversal of
    the DHT: a call per key cost a gateway ~30 ms of CPU and ~150 ms of its DHT's time for a
    30-block model every refresh, which stalled the streams it was serving."""
    call = partial(_get_many_here, keys=tuple(keys))
    found: dict[str, ValueWithExpiration | None] = await asyncio.wait_for(
        dht.run_coroutine(call, return_future=True), DHT_TIMEOUT_S
    )
    return found


# These two run inside the DHT's process (hivemind's run_coroutine pickles them there).


async def _get_many_here(
    _dht: DHT, node: DHTNode, keys: tuple[str, ...]
) -> dict[str, ValueWithExpiration | None]:
    # An infinite sufficient expiration is hivemind's ``latest=True``: the newest value.
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    return dict(found)


async def _store_many_here(
    _dht: DHT,
    node: DHTNode,
    keys: list[str],
    values: list[object],
    subkeys: list[str | None],
    expiration: float,
) -> None:
    await node.store_many(keys, values, expiration, subkeys=subkeys)
