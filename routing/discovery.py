"""The thin I/O shell of routing: read and write swarm records in the hivemind DHT.

Everything here talks to the DHT; everything that decides lives in the pure modules next
to it and takes the ``SwarmSnapshot`` built here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
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
from routing.dht import SwarmDHT
from routing.snapshot import SwarmSnapshot

logger = logging.getLogger(__name__)

DHT_TIMEOUT_S = 10.0  # hivemind calls can hang forever when a peer misbehaves
# The planner considers at most this many servers per block (the best by state and
# throughput): its time and a gateway's memory stay bounded however many records exist.
MAX_SERVERS_PER_BLOCK = 256
MAX_PEER_ID_CHARS = 128
OWNER_MARK = "[owner:"  # hivemind's RSASignatureValidator: what follows names the writer


async def fetch_model(dht: DHT, prefix: str) -> ModelRecord | None:
    found = await _get(dht, model_key(prefix))
    if found is None:
        return None
    try:
        return ModelRecord.from_wire(found.value)
    except ValueError as e:
        logger.warning("ignoring %s: %s", model_key(prefix), e)
        return None


async def fetch_snapshot(dht: DHT, prefix: str, model: ModelRecord) -> SwarmSnapshot:
    """The server records of ``model``: those that are well-formed, speak this protocol and
    serve this very model, at most ``MAX_SERVERS_PER_BLOCK`` per block."""
    keys = [block_key(prefix, b) for b in range(model.num_blocks)]
    found = await _get_many(dht, keys)
    servers: dict[str, ServerRecord] = {}
    expires: dict[str, float] = {}
    # A server's one announcement stores the same record under each of its blocks: parsed
    # once. The subkey names (and hivemind's signature binds) the writer, the expiration
    # the announcement.
    parsed_once: dict[tuple[object, float], tuple[str, ServerRecord] | None] = {}
    for key in keys:
        entry = found.get(key)
        if entry is None or not isinstance(entry.value, dict):
            continue
        candidates: dict[str, tuple[float, ServerRecord]] = {}
        for subkey, item in entry.value.items():
            memo = (subkey, item.expiration_time) if isinstance(subkey, str) else None
            if memo is not None and memo in parsed_once:
                parsed = parsed_once[memo]
            else:
                parsed = _parse(key, subkey, item.value, model)
                if memo is not None:
                    parsed_once[memo] = parsed
            if parsed is None:
                continue
            peer_id, record = parsed
            # A restarted server may have left a record under an older signing key.
            if peer_id not in candidates or item.expiration_time > candidates[peer_id][0]:
                candidates[peer_id] = (item.expiration_time, record)
        best = sorted(candidates.items(), key=lambda kv: _rank(kv[1][1]), reverse=True)
        for peer_id, (expiration, record) in best[:MAX_SERVERS_PER_BLOCK]:
            servers.setdefault(peer_id, record)
            expires[peer_id] = max(expires.get(peer_id, 0.0), expiration)
    return SwarmSnapshot(model, servers, get_dht_time(), expires)


def _parse(
    key: str, subkey: object, value: object, model: ModelRecord
) -> tuple[str, ServerRecord] | None:
    """(peer id, record) of one DHT entry, or None (logged) if it cannot be used."""
    peer_id = _peer_id_of(subkey)
    if peer_id is None:
        _ignore(f"a record under {key}", "its subkey is not a peer id")
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
    return peer_id, record


_ignored: set[tuple[str, str]] = set()  # said once: snapshots are re-read every few seconds


def _ignore(what: str, why: str) -> None:
    if (what, why) in _ignored:
        return
    if len(_ignored) >= 4096:
        _ignored.clear()
    _ignored.add((what, why))
    logger.warning("ignoring %s: %s", what, why)


def _peer_id_of(subkey: object) -> str | None:
    """The peer id a subkey names (``{peer id}[owner:{key}]``), if it is a valid one."""
    if not isinstance(subkey, str):
        return None
    text = subkey.split(OWNER_MARK, 1)[0]
    if not 0 < len(text) <= MAX_PEER_ID_CHARS:
        return None
    try:
        return PeerID.from_base58(text).to_base58()  # type: ignore[no-any-return]
    except (ValueError, TypeError):
        return None


def _rank(record: ServerRecord) -> tuple[bool, float]:
    return record.state is NodeState.ONLINE, record.throughput


def check_model(found: ModelRecord | None, local: ModelRecord) -> None:
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
        (model_key(prefix), model_wire, None),
        (models_key(namespace), model_wire, prefix),
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
    for prefix, item in found.value.items():
        try:
            models[str(prefix)] = ModelRecord.from_wire(item.value)
        except ValueError as e:
            logger.warning("ignoring model record %s: %s", prefix, e)
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
