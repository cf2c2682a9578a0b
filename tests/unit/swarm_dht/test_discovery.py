"""What a snapshot is built from: DHT entries are parsed, checked and bounded here."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import base58
import pytest

from protocol.swarm import ModelRecord, NodeState, ServerRecord, block_key
from swarm_dht.discovery import (
    MAX_SERVERS_PER_BLOCK,
    fetch_candidates,
    fetch_snapshot,
    snapshot_of,
    warn_if_model_differs,
)

MODEL = ModelRecord(name="m", architecture="llama", num_blocks=2, hidden_size=64, max_length=256)
OWNER = "[owner:ssh-rsa AAAAfake]"  # hivemind's validator checked it before we see it


@dataclass
class Item:
    value: Any
    expiration_time: float = 100.0


class FakeDHT:
    """The DHT process as hivemind runs a coroutine there: with a node whose ``get_many``
    answers each key with a dictionary of subkey → value with expiration (or None)."""

    def __init__(self, entries: dict[str, dict[object, Item]]) -> None:
        self.entries = entries
        self.calls: list[tuple[str, ...]] = []

    def run_coroutine(self, coro: Any, return_future: bool) -> Any:
        assert return_future
        return asyncio.ensure_future(coro(self, self))

    async def get_many(self, keys: tuple[str, ...], sufficient_expiration_time: float) -> Any:
        assert sufficient_expiration_time == float("inf")  # the latest values
        self.calls.append(keys)
        return {key: Item(self.entries[key]) if key in self.entries else None for key in keys}


def peer(n: int) -> str:
    return "Qm" + base58.b58encode(n.to_bytes(4, "big")).decode()


def record(**changes: Any) -> dict:
    fields = {"model": MODEL.digest, "state": "online", "start": 0, "end": 2, "throughput": 10.0}
    return ServerRecord.model_validate({**fields, **changes}).to_wire()


def servers(entries: dict[object, Item]) -> dict[str, ServerRecord]:
    """The snapshot's servers when every block holds ``entries``."""
    dht = FakeDHT({block_key("m", b): entries for b in range(MODEL.num_blocks)})
    return dict(asyncio.run(fetch_snapshot(dht, "m", MODEL)).servers)  # type: ignore[arg-type]


def test_only_well_formed_records_of_this_very_model_count() -> None:
    other_shape = ModelRecord(**{**MODEL.model_dump(), "num_blocks": 3})
    entries: dict[object, Item] = {
        peer(1) + OWNER: Item(record()),
        peer(2) + OWNER: Item(record(model=other_shape.digest)),  # same name, other model
        peer(3) + OWNER: Item(record(version=1)),
        peer(4) + OWNER: Item({"state": "online"}),
        peer(5) + OWNER: Item("garbage"),
        "0OIl-not-base58" + OWNER: Item(record()),
        ("a", "tuple"): Item(record()),
        "Qm" + "z" * 200: Item(record()),
    }
    assert set(servers(entries)) == {peer(1)}


def test_a_restarted_server_counts_once_with_its_newest_record() -> None:
    entries: dict[object, Item] = {
        peer(1) + "[owner:old]": Item(record(state="draining"), expiration_time=50.0),
        peer(1) + "[owner:new]": Item(record(throughput=20.0), expiration_time=90.0),
    }
    found = servers(entries)
    assert list(found) == [peer(1)]
    assert found[peer(1)].state is NodeState.ONLINE and found[peer(1)].throughput == 20.0


def test_the_planner_considers_a_bounded_number_of_the_best_servers() -> None:
    total = MAX_SERVERS_PER_BLOCK + 50
    entries: dict[object, Item] = {
        peer(n) + OWNER: Item(record(throughput=float(n + 1))) for n in range(total)
    }
    found = servers(entries)
    assert len(found) == MAX_SERVERS_PER_BLOCK
    assert min(r.throughput for r in found.values()) == total - MAX_SERVERS_PER_BLOCK + 1


def test_a_model_record_of_another_shape_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    poisoned = ModelRecord(**{**MODEL.model_dump(), "num_blocks": 1})
    with caplog.at_level(logging.WARNING):
        warn_if_model_differs(MODEL, MODEL)
        assert not caplog.text
        warn_if_model_differs(poisoned, MODEL)
    assert "num_blocks 1 (here 2)" in caplog.text


def test_the_digest_ignores_precision_but_not_shape() -> None:
    assert ModelRecord(**{**MODEL.model_dump(), "dtype": "bfloat16"}).digest == MODEL.digest
    assert ModelRecord(**{**MODEL.model_dump(), "hidden_size": 32}).digest != MODEL.digest


def test_every_block_is_read_in_one_call_and_each_announcement_parsed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import swarm_dht.discovery

    parsed: list[object] = []
    real = swarm_dht.discovery._parse

    def counting(key: str, subkey: object, *rest: Any) -> Any:
        parsed.append(subkey)
        return real(key, subkey, *rest)

    monkeypatch.setattr(swarm_dht.discovery, "_parse", counting)
    model = ModelRecord(**{**MODEL.model_dump(), "num_blocks": 6})
    wide = ServerRecord.model_validate(
        {"model": model.digest, "state": "online", "start": 0, "end": 6, "throughput": 1.0}
    )
    half = wide.model_copy(update={"end": 3})
    entries = {
        block_key("m", b): {
            peer(1) + OWNER: Item(wide.to_wire()),
            **({peer(2) + OWNER: Item(half.to_wire())} if b < 3 else {}),
        }
        for b in range(6)
    }
    # A stale copy of peer 1's record (an older announcement) under one block is its own.
    entries[block_key("m", 5)][peer(1) + OWNER] = Item(wide.to_wire(), expiration_time=40.0)
    dht = FakeDHT(entries)
    snapshot = asyncio.run(fetch_snapshot(dht, "m", model))  # type: ignore[arg-type]
    assert dht.calls == [tuple(block_key("m", b) for b in range(6))]
    assert set(snapshot.servers) == {peer(1), peer(2)}
    assert sorted(map(str, parsed)) == sorted([peer(1) + OWNER] * 2 + [peer(2) + OWNER])


def test_unsigned_records_are_refused() -> None:
    # hivemind stores a subkey without an owner mark unsigned: anyone could have written it.
    entries: dict[object, Item] = {peer(1): Item(record()), peer(2) + OWNER: Item(record())}
    assert set(servers(entries)) == {peer(2)}


def test_records_count_only_when_signed_by_the_peer_they_name() -> None:
    honest, insider = "[owner:honest]", "[owner:insider]"
    entries: dict[object, Item] = {
        peer(1) + honest: Item(record(), expiration_time=50.0),
        # A member speaking for peer 1, later: "draining", so that gateways avoid it.
        peer(1) + insider: Item(record(state="draining"), expiration_time=90.0),
        peer(2) + insider: Item(record()),  # its own record: fine
    }
    dht = FakeDHT({block_key("m", b): entries for b in range(MODEL.num_blocks)})
    candidates = asyncio.run(fetch_candidates(dht, "m", MODEL))  # type: ignore[arg-type]
    trusting = snapshot_of(MODEL, candidates).servers
    assert trusting[peer(1)].state is NodeState.DRAINING  # the latest, taken at its word
    # What each peer said it signs with, over its own authenticated connection:
    owners = {peer(1): honest, peer(2): insider}
    checked = snapshot_of(MODEL, candidates, owners).servers
    assert checked[peer(1)].state is NodeState.ONLINE and set(checked) == {peer(1), peer(2)}
    # A peer not yet asked is left out until it has answered.
    assert set(snapshot_of(MODEL, candidates, {peer(2): insider}).servers) == {peer(2)}
