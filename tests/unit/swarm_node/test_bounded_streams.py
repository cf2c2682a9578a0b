"""Frames and callers before authentication (swarm_node/bounded_streams.py)."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from swarm_node.bounded_streams import (
    PROVEN_S,
    FrameRefused,
    Unproven,
    parse_request,
    read_frame,
)


def header(length: int, marker: bytes = P2P.MESSAGE_MARKER) -> bytes:
    return marker + length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)


def test_a_frame_over_its_limit_is_refused_from_its_header_alone() -> None:
    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(header(2**40))  # and nothing behind it: no byte is awaited
        with pytest.raises(FrameRefused, match="1099511627776-byte frame"):
            await asyncio.wait_for(read_frame(reader, 1024), 1.0)

    asyncio.run(scenario())


def test_a_frame_within_its_limit_is_read_whole() -> None:
    request = runtime_pb2.ExpertRequest(metadata=b'{"a": 1}')
    payload = request.SerializeToString()

    async def scenario() -> runtime_pb2.ExpertRequest | None:
        reader = asyncio.StreamReader()
        reader.feed_data(header(len(payload)) + payload + header(0, P2P.ERROR_MARKER))
        first = parse_request(*await read_frame(reader, len(payload)))
        assert parse_request(*await read_frame(reader, 0)) is None  # the caller's end of stream
        return first

    assert asyncio.run(scenario()) == request


def test_malformed_frames_are_refused() -> None:
    with pytest.raises(FrameRefused, match="unknown marker"):
        parse_request(b"\x07", b"")
    with pytest.raises(FrameRefused, match="malformed"):
        parse_request(P2P.MESSAGE_MARKER, b"\xff\xff\xff")


def test_callers_without_a_pass_are_capped_per_peer_and_in_total() -> None:
    unproven = Unproven(total=5, per_peer=2)
    assert unproven.enter("A") and unproven.enter("A")
    assert not unproven.enter("A")  # its own cap
    assert unproven.enter("B") and unproven.enter("B") and unproven.enter("C")
    assert not unproven.enter("D")  # everyone's
    unproven.leave("A")
    assert unproven.enter("D") and unproven.count == 5
    for peer in "ABBCD":
        unproven.leave(peer)
    assert unproven.count == 0 and unproven.enter("A")


def test_a_caller_that_showed_a_pass_lately_is_not_counted() -> None:
    now = [0.0]
    unproven = Unproven(total=2, per_peer=1, clock=lambda: now[0])
    assert unproven.enter("member") is True
    unproven.prove("member")  # its pass checked out
    unproven.leave("member")
    # A member's burst (a request's eight choices) is never refused...
    assert all(unproven.enter("member") is None for _ in range(8))
    assert unproven.count == 0 and unproven.enter("stranger") is True
    assert unproven.enter("stranger") is False
    # ... until it has not shown a pass for PROVEN_S.
    now[0] = PROVEN_S + 1
    assert unproven.enter("member") is True and unproven.enter("member") is False
