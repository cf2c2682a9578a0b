"""ServerRecord / ModelRecord: what servers publish in the DHT, validated on read."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from protocol.swarm import (
    PROTOCOL_VERSION,
    ModelRecord,
    NodeState,
    ServerRecord,
    block_key,
    dht_prefix,
    model_key,
    models_key,
)

SERVER: dict[str, Any] = {"state": "online", "start": 2, "end": 6, "throughput": 12.5}
MODEL: dict[str, Any] = {
    "name": "m",
    "architecture": "llama",
    "num_blocks": 30,
    "hidden_size": 576,
    "max_length": 8192,
}


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


# ---- ServerRecord ----


def test_server_record_defaults() -> None:
    record = ServerRecord.from_wire(SERVER)
    assert record.state is NodeState.ONLINE
    assert (record.start, record.end, record.length) == (2, 6, 4)
    assert record.version == PROTOCOL_VERSION
    assert record.load == 0.0 and record.adapters == ()


def test_server_record_round_trips() -> None:
    record = ServerRecord(
        state=NodeState.DRAINING,
        start=0,
        end=4,
        throughput=3.5,
        load=2.0,
        cache_bytes_free=1 << 30,
        dtype="bfloat16",
        quant="nf4",
        adapters=("lora-a", "lora-b"),
        cached_sessions=7,
        evictions=3,
    )
    wire = record.to_wire()
    assert wire["state"] == "draining"  # plain JSON values, not enums
    assert "sessions" not in wire  # how many, never which
    back = ServerRecord.from_wire(wire)
    assert back == record
    assert back.to_wire() == wire


def test_server_record_wire_form_is_json_serializable() -> None:
    import json

    wire = ServerRecord.from_wire(SERVER).to_wire()
    assert json.loads(json.dumps(wire)) == wire


def test_unknown_fields_are_ignored() -> None:
    record = ServerRecord.from_wire({**SERVER, "from_the_future": {"x": 1}, "gpu": "h100"})
    assert record == ServerRecord.from_wire(SERVER)
    assert "from_the_future" not in record.to_wire()


def test_session_ids_sent_by_an_old_server_are_never_kept() -> None:
    record = ServerRecord.from_wire({**SERVER, "sessions": ["victim-session"]})
    assert "victim-session" not in str(record.to_wire())


def test_a_throughput_meant_to_win_every_route_is_rejected() -> None:
    with pytest.raises(ValueError):
        ServerRecord.from_wire({**SERVER, "throughput": 1e12})


@pytest.mark.parametrize(
    "value",
    [
        None,
        "online",
        42,
        [SERVER],
        (("state", "online"),),
    ],
)
def test_non_dict_server_records_are_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="must be a dict"):
        ServerRecord.from_wire(value)


@pytest.mark.parametrize("field", ["state", "start", "end", "throughput"])
def test_missing_required_fields_are_rejected(field: str) -> None:
    with pytest.raises(ValueError, match="malformed ServerRecord"):
        ServerRecord.from_wire(without(SERVER, field))


@pytest.mark.parametrize(
    "changes",
    [
        {"start": -1},
        {"end": 0},
        {"start": 4, "end": 4},
        {"start": 5, "end": 3},
        {"throughput": -0.1},
        {"load": -1.0},
        {"cache_bytes_free": -1},
        {"cached_sessions": -1},
        {"evictions": -5},
    ],
)
def test_out_of_range_values_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerRecord.from_wire({**SERVER, **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {"state": "sleeping"},
        {"state": 1},
        {"state": None},
        {"start": "zero"},
        {"start": 1.5},
        {"start": None},
        {"end": [6]},
        {"throughput": "fast"},
        {"throughput": None},
        {"adapters": [None]},
        {"dtype": 16},
    ],
)
def test_wrong_types_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerRecord.from_wire({**SERVER, **changes})


def test_from_wire_raises_plain_value_error_without_chaining() -> None:
    with pytest.raises(ValueError) as info:
        ServerRecord.from_wire({**SERVER, "start": -1})
    # ValidationError is itself a ValueError; from_wire hides pydantic's type.
    assert not isinstance(info.value, ValidationError)
    assert info.value.__cause__ is None


def test_records_are_frozen() -> None:
    record = ServerRecord.from_wire(SERVER)
    with pytest.raises(ValidationError):
        record.start = 0  # type: ignore[misc]


def test_direct_construction_checks_the_span() -> None:
    with pytest.raises(ValidationError):
        ServerRecord(state=NodeState.ONLINE, start=3, end=3, throughput=1.0)


# ---- ModelRecord ----


def test_model_record_round_trips() -> None:
    record = ModelRecord.from_wire({**MODEL, "dtype": "bfloat16"})
    assert record.num_blocks == 30 and record.dtype == "bfloat16"
    assert ModelRecord.from_wire(record.to_wire()) == record


def test_model_record_ignores_unknown_fields() -> None:
    assert ModelRecord.from_wire({**MODEL, "vocab": 32000}) == ModelRecord.from_wire(MODEL)


@pytest.mark.parametrize("value", [None, "m", [MODEL], 3.0])
def test_non_dict_model_records_are_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="must be a dict"):
        ModelRecord.from_wire(value)


@pytest.mark.parametrize(
    "field", ["name", "architecture", "num_blocks", "hidden_size", "max_length"]
)
def test_model_record_missing_fields_are_rejected(field: str) -> None:
    with pytest.raises(ValueError, match="malformed ModelRecord"):
        ModelRecord.from_wire(without(MODEL, field))


@pytest.mark.parametrize(
    "changes",
    [
        {"name": ""},
        {"name": None},
        {"architecture": 7},
        {"num_blocks": 0},
        {"num_blocks": -3},
        {"num_blocks": "many"},
        {"hidden_size": 0},
        {"max_length": 0},
        {"max_length": 1.5},
    ],
)
def test_model_record_bad_values_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ModelRecord.from_wire({**MODEL, **changes})


# ---- keys ----


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain", "plain"),
        ("meta-llama/Llama-3.1-8B", "meta-llama-Llama-3-1-8B"),
        ("Qwen/Qwen2.5 0.5B Instruct", "Qwen-Qwen2-5-0-5B-Instruct"),
        ("/leading/and/trailing/", "leading-and-trailing"),
        ("a//..b", "a-b"),
        ("under_score", "under_score"),
        ("///", "model"),
        ("", "model"),
        ("модель", "model"),
    ],
)
def test_dht_prefix_sanitizes_names(name: str, expected: str) -> None:
    assert dht_prefix(name) == expected


def test_dht_prefix_never_contains_key_separators() -> None:
    for name in ("a.b", "x:y", "p q", "m/n.o:p"):
        prefix = dht_prefix(name)
        assert "." not in prefix and ":" not in prefix and " " not in prefix


def test_dht_prefix_adds_the_namespace() -> None:
    assert dht_prefix("org/model", "team") == "team:org-model"
    assert dht_prefix("org/model", "") == "org-model"
    assert dht_prefix("org/model", "a") != dht_prefix("org/model", "b")


def test_keys_built_from_the_prefix() -> None:
    prefix = dht_prefix("org/model", "ns")
    assert block_key(prefix, 3) == "ns:org-model.3"
    assert model_key(prefix) == "ns:org-model._model"
    assert models_key("ns") == "ns:_swarmgate.models"
    assert models_key() == "_swarmgate.models"
