from __future__ import annotations

import pytest
import torch

from protocol.codec import make_request, make_response, read_tensors
from protocol.errors import ProtocolMismatch
from protocol.rpc import MAX_MESSAGE_BYTES, OpenSession, Step, decode, max_tokens_per_message
from protocol.swarm import MAX_SESSIONS_LISTED, ModelRecord, NodeState, ServerRecord, dht_prefix

RECORD = {"state": "online", "start": 0, "end": 4, "throughput": 12.5}


def test_server_record_round_trips_through_the_wire_form() -> None:
    record = ServerRecord.from_wire({**RECORD, "sessions": ["s1"], "future_field": 1})
    assert record.state is NodeState.ONLINE and record.sessions == ("s1",)
    assert ServerRecord.from_wire(record.to_wire()) == record


@pytest.mark.parametrize(
    "value",
    [
        None,
        [1, 2],
        {**RECORD, "state": "sleeping"},
        {**RECORD, "start": -1},
        {**RECORD, "end": 0},
        {**RECORD, "start": 4, "end": 4},
        {**RECORD, "throughput": "fast"},
        {**RECORD, "sessions": [f"s{i}" for i in range(MAX_SESSIONS_LISTED + 1)]},
        {k: v for k, v in RECORD.items() if k != "state"},
    ],
)
def test_malformed_server_records_are_rejected(value: object) -> None:
    with pytest.raises(ValueError):
        ServerRecord.from_wire(value)


def test_model_record_validation() -> None:
    good = {
        "name": "m",
        "architecture": "llama",
        "num_blocks": 30,
        "hidden_size": 576,
        "max_length": 8192,
    }
    assert ModelRecord.from_wire(good).num_blocks == 30
    with pytest.raises(ValueError):
        ModelRecord.from_wire({**good, "num_blocks": 0})


def test_dht_prefix_is_safe_and_namespaced() -> None:
    assert dht_prefix("SmolLM2 135M/Instruct") == "SmolLM2-135M-Instruct"
    assert dht_prefix("m", "team") == "team:m"


def test_rpc_messages_round_trip_and_reject_garbage() -> None:
    opening = OpenSession(session_id="abc", start=0, end=4, max_length=100)
    assert decode(OpenSession, opening.encode()) == opening
    for garbage in (b"not json", b'{"position": -1}', b"{}"):
        with pytest.raises(ProtocolMismatch):
            decode(Step, garbage)


def test_a_full_message_of_hidden_states_stays_under_the_cap() -> None:
    for hidden in (64, 576, 4096, 8192):
        n = max_tokens_per_message(hidden)
        message = make_request(Step(position=0), torch.zeros(1, n, hidden))
        assert message.ByteSize() < MAX_MESSAGE_BYTES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_round_trip_exactly(dtype: torch.dtype) -> None:
    tensor = torch.randn(1, 5, 16).to(dtype)
    for message in (
        make_request(Step(position=3), tensor),
        make_response(Step(position=3), tensor),
    ):
        [back] = read_tensors(message)
        assert back.dtype == dtype and torch.equal(back, tensor)
        assert decode(Step, message.metadata).position == 3
