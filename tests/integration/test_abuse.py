"""Clients that stop reading or leave give their slot back, on a real uvicorn over sockets."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration.conftest import Swarm, running_gateway
from tests.processes import wait_for

pytestmark = pytest.mark.integration

SEND_TIMEOUT_S = 2
# Long and wide: EOS banned, and 20 alternatives per token make each event ~2 KB, so a
# reader that stops fills the socket buffers long before the generation could end.
LONG = {
    "messages": [{"role": "user", "content": "Go on."}],
    "max_tokens": 900,
    "temperature": 0,
    "logit_bias": {"2": -100},
    "logprobs": True,
    "top_logprobs": 20,
}


@pytest.fixture(scope="module")
def gateway(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two slots and no queue: a slot held by a gone client would be plain to see."""
    with running_gateway(
        swarm,
        tmp_path_factory.mktemp("abuse"),
        "--max-concurrent",
        "2",
        "--max-queue",
        "0",
        "--send-timeout",
        str(SEND_TIMEOUT_S),
        name="gateway-abuse",
    ) as url:
        yield url


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def active(url: str) -> float:
    return metrics(url)["swarmgate_active_generations"]


CANCELLED = 'swarmgate_requests_total{outcome="cancelled"}'
GENERATED = "swarmgate_generated_tokens_total"


def send_raw(url: str, path: str, body: dict) -> socket.socket:
    """A POST on a bare socket that then reads nothing. Its receive window and segments
    are tiny (Linux sizes the server's send buffer from them), so a few hundred KB of
    unread response fill every buffer on the way."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if hasattr(socket, "TCP_MAXSEG"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.connect((parts.hostname, parts.port))
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


@contextmanager
def leaving(sock: socket.socket) -> Iterator[socket.socket]:
    """The client leaves at the end of the block: its connection ends (FIN both ways), not
    merely this descriptor, so a copy of it held anywhere cannot keep the request alive."""
    try:
        yield sock
    finally:
        with suppress(OSError):  # the server already closed it
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def test_a_stream_nobody_reads_is_cancelled_after_the_send_timeout(
    swarm: Swarm, gateway: str
) -> None:
    before = metrics(gateway)
    body = {"model": swarm.model_id, "stream": True, **LONG}
    with leaving(send_raw(gateway, "/v1/chat/completions", body)):
        wait_for(lambda: active(gateway) == 1, 60, "the unread stream to start generating")
        # The gateway serves others meanwhile, on its other slot.
        short = {"model": swarm.model_id, "messages": LONG["messages"], "max_tokens": 3}
        r = httpx.post(f"{gateway}/v1/chat/completions", json=short, timeout=60)
        assert r.status_code == 200, r.text
        # The client is still connected; only the send timeout can end its generation.
        wait_for(lambda: active(gateway) == 0, 120, "the send timeout to cancel the stream")
        after = metrics(gateway)
    assert after[CANCELLED] - before.get(CANCELLED, 0) == 1
    assert after[GENERATED] - before[GENERATED] < 900 + 3
    both = [httpx.post(f"{gateway}/v1/chat/completions", json=short, timeout=60) for _ in range(2)]
    assert [r.status_code for r in both] == [200, 200]


def test_a_client_that_leaves_a_json_request_frees_its_slot(swarm: Swarm, gateway: str) -> None:
    before = metrics(gateway)
    body = {"model": swarm.model_id, "n": 8, **LONG}  # 8 x 900 tokens: minutes if let run
    with leaving(send_raw(gateway, "/v1/chat/completions", body)):
        wait_for(lambda: active(gateway) >= 1, 60, "the request to start generating")

    def stopped() -> bool:
        now = metrics(gateway)
        cancelled = now.get(CANCELLED, 0) > before.get(CANCELLED, 0)
        return cancelled and now["swarmgate_active_generations"] == 0

    # Generous for a loaded machine (it took over 30 s once, in CI beside another swarm).
    wait_for(stopped, 90, "the generations to stop once their client left")
    after = metrics(gateway)
    # The first choice, and those that had started after it: each of them was cancelled.
    assert 1 <= after[CANCELLED] - before.get(CANCELLED, 0) <= 8
    assert after[GENERATED] - before[GENERATED] < 8 * 900
    short = {"model": swarm.model_id, "messages": LONG["messages"], "max_tokens": 3}
    assert httpx.post(f"{gateway}/v1/chat/completions", json=short, timeout=60).status_code == 200


def test_one_client_cannot_take_every_slot(swarm: Swarm, tmp_path: Path) -> None:
    """Per key: a second stream of the same key waits --queue-timeout for the first, then is
    refused, while another key gets in."""
    with running_gateway(
        swarm,
        tmp_path,
        "--api-key",
        "key-a",
        "--api-key",
        "key-b",
        "--max-concurrent-per-key",
        "1",
        "--queue-timeout",
        "0.5",
        name="gateway-per-key",
    ) as url:
        body = {"model": swarm.model_id, "stream": True, **LONG}
        short = {"model": swarm.model_id, "messages": LONG["messages"], "max_tokens": 2}
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=a, timeout=60
        ) as busy:
            lines = busy.iter_lines()  # kept: dropping it would close the stream
            assert next(lines).startswith("data: ")
            r = httpx.post(f"{url}/v1/chat/completions", json=short, headers=a, timeout=30)
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            r = httpx.post(f"{url}/v1/chat/completions", json=short, headers=b, timeout=30)
            assert r.status_code == 200
