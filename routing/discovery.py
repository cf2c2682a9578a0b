"""The thin I/O shell of routing: read and write swarm records in the hivemind DHT.

Everything here talks to the DHT; everything that decides lives in the pure modules next
to it and takes the ``SwarmSnapshot`` built here.
"""

from __future__ import annotations

import asyncio
import logging

from hivemind import DHT
from hivemind.utils import get_dht_time

from protocol.swarm import (
    PROTOCOL_VERSION,
    ModelRecord,
    ServerRecord,
    block_key,
    model_key,
    models_key,
)
from routing.snapshot import SwarmSnapshot

logger = logging.getLogger(__name__)

DHT_TIMEOUT_S = 10.0  # hivemind calls can hang forever when a peer misbehaves


async def fetch_model(dht: DHT, prefix: str) -> ModelRecord | None:
    found = await _get(dht, model_key(prefix))
    if found is None:
        return None
    try:
        return ModelRecord.from_wire(found.value)
    except ValueError as e:
        logger.warning("ignoring %s: %s", model_key(prefix), e)
        return None


async def fetch_snapshot(dht: DHT, prefix: str, model: ModelRecord | None = None) -> SwarmSnapshot:
    """Every server record of the model; malformed records are skipped with a warning."""
    model = model or await fetch_model(dht, prefix)
    if model is None:
        return SwarmSnapshot(model=None, taken_at=get_dht_time())
    keys = [block_key(prefix, b) for b in range(model.num_blocks)]
    found = await asyncio.gather(*(_get(dht, key) for key in keys))
    servers: dict[str, ServerRecord] = {}
    for key, entry in zip(keys, found, strict=True):
        if entry is None or not isinstance(entry.value, dict):
            continue
        for peer_id, item in entry.value.items():
            if peer_id in servers:
                continue
            try:
                record = ServerRecord.from_wire(item.value)
            except ValueError as e:
                logger.warning("ignoring record of %s under %s: %s", peer_id, key, e)
                continue
            if record.version != PROTOCOL_VERSION:  # a server this gateway cannot talk to
                logger.warning("ignoring %s: protocol version %d", peer_id, record.version)
                continue
            servers[str(peer_id)] = record
    return SwarmSnapshot(model=model, servers=servers, taken_at=get_dht_time())


async def announce(
    dht: DHT,
    prefix: str,
    peer_id: str,
    record: ServerRecord,
    model: ModelRecord,
    *,
    ttl_s: float,
    namespace: str = "",
) -> None:
    """Store ``record`` under every block it holds and the model record, expiring in ``ttl_s``."""
    expiration = get_dht_time() + ttl_s
    stores = [
        dht.store(
            block_key(prefix, b), record.to_wire(), expiration, subkey=peer_id, return_future=True
        )
        for b in range(record.start, record.end)
    ]
    stores.append(dht.store(model_key(prefix), model.to_wire(), expiration, return_future=True))
    stores.append(
        dht.store(
            models_key(namespace), model.to_wire(), expiration, subkey=prefix, return_future=True
        )
    )
    await asyncio.wait_for(asyncio.gather(*stores), DHT_TIMEOUT_S)


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
