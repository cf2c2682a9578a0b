"""RPC metadata messages and tensor framing between gateways and block servers."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from protocol.codec import make_request, make_response, read_tensors
from protocol.errors import ProtocolMismatch, SwarmError
from protocol.prefix import MAX_BLOCKS
from protocol.rpc import (
    MAX_MESSAGE_BYTES,
    MAX_PUSH_ITEMS,
    MESSAGE_BUDGET_BYTES,
    ErrorCode,
    OpenSession,
    Push,
    PushAccepted,
    PushItem,
    PushTarget,
    Relay,
    RpcError,
    RpcMessage,
    ServerInfo,
    SessionOpened,
    Step,
    StepDone,
    decode,
    decode_stream_message,
    max_tokens_per_message,
)
from protocol.swarm import PROTOCOL_VERSION

MESSAGES: list[RpcMessage] = [
    OpenSession(secret="5e" * 16, session_id="sess-1", start=0, end=4, max_length=256),
    OpenSession(
        secret="5e" * 64,
        session_id="s" * 128,
        start=3,
        end=9,
        max_length=1,
        prefix_hashes=["ab" * 16, "cd" * 16],
    ),
    SessionOpened(),
    SessionOpened(cached_tokens=64),
    Step(position=0),
    Step(position=17, new_hashes=["ff" * 16]),
    StepDone(position=18),
    OpenSession(
        secret="5e" * 16, session_id="s", start=0, end=4, max_length=8, push_token="7a" * 16
    ),
    SessionOpened(cached_tokens=3, push=True),
    Step(position=4, input_tokens=2, push_to=PushTarget(peer_id="12D3KooWAbc", token="7a" * 16)),
    StepDone(position=6, pushed=True),
    Relay(relay=True, position=4),
    Push(
        member_pass="pass",
        items=[
            PushItem(token="7a" * 16, position=4, digest="d1" * 16),
            PushItem(token="b3" * 16, position=9),
        ],
    ),
    PushAccepted(refused=[None, RpcError(error=ErrorCode.INVALID_REQUEST, message="passed")]),
    ServerInfo(
        start=0,
        end=12,
        state="online",
        sessions=3,
        load=1.5,
        cache_bytes_free=1 << 20,
        throughput=42.0,
        evictions=2,
        tokens_computed=1000,
        tokens_reused=200,
    ),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(message: RpcMessage) -> None:
    data = message.encode()
    assert isinstance(data, bytes)
    assert decode(type(message), data) == message
    # The metadata is plain JSON.
    assert json.loads(data) == message.model_dump(mode="json")


def test_open_session_carries_the_protocol_version() -> None:
    data = json.loads(
        OpenSession(secret="5e" * 16, session_id="x", start=0, end=1, max_length=8).encode()
    )
    assert data["version"] == PROTOCOL_VERSION


def test_unknown_fields_are_ignored() -> None:
    assert decode(Step, b'{"position": 5, "from_the_future": true}') == Step(position=5)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"{",
        b"null",
        b"[]",
        b'"position"',
        b"42",
    ],
)
def test_garbage_bytes_are_a_protocol_mismatch(garbage: bytes) -> None:
    with pytest.raises(ProtocolMismatch):
        decode(Step, garbage)


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (Step, {}),
        (Step, {"position": -1}),
        (Step, {"position": "first"}),
        (Step, {"position": 0, "new_hashes": "abc"}),
        (StepDone, {"position": None}),
        (OpenSession, {"session_id": "", "start": 0, "end": 1, "max_length": 8}),
        (OpenSession, {"session_id": "x" * 129, "start": 0, "end": 1, "max_length": 8}),
        (OpenSession, {"session_id": "x", "start": 0, "end": 1, "max_length": 0}),
        (OpenSession, {"start": 0, "end": 1, "max_length": 8}),
        (
            OpenSession,
            {
                "session_id": "x",
                "start": 0,
                "end": 1,
                "max_length": 8,
                "prefix_hashes": ["h"] * (MAX_BLOCKS + 1),
            },
        ),
        (ServerInfo, {"start": 0, "end": 1}),
        (Step, {"position": 0, "input_tokens": -1}),
        (Step, {"position": 0, "push_to": {"peer_id": "0OIl", "token": "7a" * 16}}),
        (Step, {"position": 0, "push_to": {"peer_id": "Qm", "token": "secret"}}),
        (
            OpenSession,
            {
                "session_id": "x",
                "start": 0,
                "end": 1,
                "max_length": 8,
                "secret": "5e" * 16,
                "push_token": "7A" * 16,
            },
        ),
        (Push, {"items": [{"token": "7a" * 16}]}),
        (Push, {"items": []}),  # a call pushes something
        (Push, {"items": [{"token": "7a" * 16, "position": 0}] * (MAX_PUSH_ITEMS + 1)}),
        (Relay, {"position": 3}),
    ],
)
def test_wrong_fields_are_a_protocol_mismatch(kind: type[RpcMessage], payload: object) -> None:
    with pytest.raises(ProtocolMismatch) as info:
        decode(kind, json.dumps(payload).encode())
    assert kind.__name__ in str(info.value)
    assert isinstance(info.value, SwarmError)


def test_a_stream_carries_steps_and_relays_told_apart_by_their_key() -> None:
    assert decode_stream_message(Step(position=3).encode()) == Step(position=3)
    relay = Relay(relay=True, position=3)
    assert decode_stream_message(relay.encode()) == relay
    with pytest.raises(ProtocolMismatch):
        decode_stream_message(b'{"relay": tru')


def test_older_servers_answers_mean_no_push() -> None:
    """A server that predates push leaves ``push`` out: the gateway relays its hop."""
    assert decode(SessionOpened, b'{"cached_tokens": 3}').push is False
    assert decode(StepDone, b'{"position": 3}').pushed is False


def test_decoding_as_the_wrong_kind_fails() -> None:
    with pytest.raises(ProtocolMismatch):
        decode(OpenSession, Step(position=3).encode())


def test_messages_are_frozen() -> None:
    step = Step(position=1)
    with pytest.raises(ValidationError):
        step.position = 2  # type: ignore[misc]
    assert step.position == 1


# ---- message size ----


@pytest.mark.parametrize("hidden_size", [8, 64, 576, 2048, 4096, 5120, 8192, 16384])
def test_max_tokens_per_message_respects_the_budget(hidden_size: int) -> None:
    n = max_tokens_per_message(hidden_size)
    assert n >= 1
    assert n * hidden_size * 4 <= MESSAGE_BUDGET_BYTES < MAX_MESSAGE_BYTES
    # ... and it is the largest such count.
    assert (n + 1) * hidden_size * 4 > MESSAGE_BUDGET_BYTES


def test_max_tokens_per_message_with_smaller_values_fits_more() -> None:
    assert max_tokens_per_message(4096, bytes_per_value=2) == 2 * max_tokens_per_message(4096)


@pytest.mark.parametrize("hidden_size", [576, 4096])
def test_a_full_serialized_message_stays_under_the_cap(hidden_size: int) -> None:
    n = max_tokens_per_message(hidden_size)
    hidden = torch.zeros(1, n, hidden_size)
    step = Step(position=123456, new_hashes=["ab" * 16] * 8)
    for message in (make_request(step, hidden), make_response(StepDone(position=n), hidden)):
        assert message.ByteSize() < MAX_MESSAGE_BYTES


def test_bfloat16_messages_also_stay_under_the_cap() -> None:
    # hivemind may widen bfloat16 on the wire, so the float32 budget must still hold.
    hidden_size = 4096
    n = max_tokens_per_message(hidden_size)
    message = make_request(Step(position=0), torch.zeros(1, n, hidden_size, dtype=torch.bfloat16))
    assert message.ByteSize() < MAX_MESSAGE_BYTES


# ---- tensor framing ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7])
def test_tensors_round_trip_exactly(dtype: torch.dtype, n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    tensor = (torch.randn(1, n, 16, generator=generator) * 100).to(dtype)
    request = make_request(Step(position=4), tensor)
    response = make_response(StepDone(position=4 + n), tensor)
    for message in (request, response):
        [back] = read_tensors(message)
        assert back.dtype == dtype
        assert back.shape == (1, n, 16)
        assert torch.equal(back, tensor)
    assert decode(Step, request.metadata) == Step(position=4)
    assert decode(StepDone, response.metadata) == StepDone(position=4 + n)


def test_special_float_values_survive() -> None:
    tensor = torch.tensor([[[0.0, -0.0, float("inf"), -float("inf"), 1e-38, 3.4e38]]])
    [back] = read_tensors(make_request(Step(position=0), tensor))
    assert torch.equal(back, tensor)
    assert torch.signbit(back[0, 0, 1])


def test_several_tensors_keep_their_order_and_a_message_may_have_none() -> None:
    a = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    b = torch.full((1, 1, 3), 7.0, dtype=torch.bfloat16)
    back = read_tensors(make_response(StepDone(position=2), a, b))
    assert len(back) == 2
    assert torch.equal(back[0], a) and torch.equal(back[1], b)
    assert read_tensors(make_request(SessionOpened())) == []


def test_read_tensors_returns_independent_tensors() -> None:
    tensor = torch.ones(1, 2, 4)
    message = make_request(Step(position=0), tensor)
    [back] = read_tensors(message)
    tensor.add_(1.0)  # the message holds a copy, not a view of the sender's tensor
    assert torch.equal(back, torch.ones(1, 2, 4))


@pytest.mark.parametrize("damage", ["short buffer", "unknown dtype"])
def test_a_tensor_that_cannot_be_read_is_a_protocol_mismatch(damage: str) -> None:
    message = make_request(Step(position=0), torch.ones(1, 2, 4))
    if damage == "short buffer":
        message.tensors[0].buffer = message.tensors[0].buffer[:-4]
    else:
        message.tensors[0].dtype = "float99"
    with pytest.raises(ProtocolMismatch, match="malformed tensor"):
        read_tensors(message)


def test_pieces_round_trip_under_the_message_cap() -> None:
    import asyncio

    import torch

    from protocol.codec import read_pieces, request_pieces, tensor_pieces
    from protocol.rpc import MAX_MESSAGE_BYTES

    tensors = [torch.randn(3, 700_000), torch.randn(5), torch.randn(2, 2, 2)]
    pieces = tensor_pieces(tensors)
    assert sum(p.numel() for p in pieces) == sum(t.numel() for t in tensors)
    requests = request_pieces(tensors)
    assert len(requests) > 1 and all(r.ByteSize() < MAX_MESSAGE_BYTES for r in requests)

    async def read() -> list[torch.Tensor]:
        async def stream():  # type: ignore[no-untyped-def]
            for r in requests:
                yield r

        return await read_pieces(stream(), [tuple(t.shape) for t in tensors])

    for got, want in zip(asyncio.run(read()), tensors, strict=True):
        assert torch.equal(got, want)
