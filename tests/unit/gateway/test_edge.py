"""The HTTP edge (in-process swarm): admission that refuses no honest client on its
defaults, caps per API key from the key file with a short wait before a 429, and, with API
keys, a key for everything but the health probes (/metrics unkeyed on a port of its own)."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.testclient import TestClient
from starlette.types import Message

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.fakes import LocalSwarmClient
from tests.unit.gateway.test_abuse import bearer, running, until

MODEL_ID = "tiny"
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
URL = "/v1/chat/completions"
BOUND = 10.0  # seconds any wait below may take before the test fails


def settings(tiny_model: Path, **overrides: Any) -> GatewaySettings:
    return GatewaySettings(model_id=MODEL_ID, model_path=tiny_model, **overrides)


@pytest.fixture
def swarm(tiny_model: Path) -> LocalSwarmClient:
    return LocalSwarmClient(tiny_model, MODEL_ID)


async def stream(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[int, str]:
    body = {**CHAT, "stream": True}
    async with client.stream("POST", URL, json=body, headers=headers) as r:
        return r.status_code, (await r.aread()).decode()


# ---- admission: one honest client is never refused on the defaults ----


@pytest.mark.parametrize("keys", [(), ("sk-harness",)], ids=["no-keys", "one-key"])
def test_eight_concurrent_streams_from_one_client_all_run_on_the_defaults(
    tiny_model: Path, swarm: LocalSwarmClient, keys: tuple[str, ...]
) -> None:
    """An evaluation harness or an agent's parallel tool calls: 8 streams at once from one
    client (one key, or none) all run together (the gateway runs 16)."""
    app = create_app(settings(tiny_model, api_keys=keys), swarm)
    headers = bearer(keys[0]) if keys else {}

    async def scenario() -> None:
        async with running(app) as client:
            swarm.gate = asyncio.Event()  # every generation waits: all eight must hold slots
            streams = [asyncio.create_task(stream(client, headers)) for _ in range(8)]
            await until(lambda: swarm.opened == 8, "all eight streams to run at once")
            assert app.state.admission.waiting == 0
            swarm.gate.set()
            results = await asyncio.wait_for(asyncio.gather(*streams), BOUND)
            assert [status for status, _ in results] == [200] * 8
            assert all(text.rstrip().endswith("data: [DONE]") for _, text in results)
            assert "error" not in "".join(text for _, text in results)

    asyncio.run(scenario())


class ThreadGate:
    """``LocalSwarmClient.gate`` opened from another thread than the server's loop."""

    def __init__(self) -> None:
        self.open = threading.Event()

    async def wait(self) -> None:
        while not self.open.is_set():
            await asyncio.sleep(0.01)


def test_eight_concurrent_streams_on_a_real_uvicorn_server(
    tiny_model: Path, swarm: LocalSwarmClient
) -> None:
    """As `swarmgate gateway` serves it: uvicorn on a socket, eight clients' connections."""
    gate = ThreadGate()
    swarm.gate = gate  # type: ignore[assignment]
    # The socket is bound here and handed over: a port picked, closed and bound again by
    # uvicorn later could be taken in between (by p2pd's ephemeral ports, say).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    config = uvicorn.Config(create_app(settings(tiny_model), swarm), log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    results: list[tuple[int, str]] = []

    def one_stream() -> None:
        body = {**CHAT, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}{URL}", json=body, timeout=60) as r:
            results.append((r.status_code, r.read().decode()))

    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        clients = [threading.Thread(target=one_stream) for _ in range(8)]
        for client in clients:
            client.start()
        while swarm.opened < 8:  # all eight hold a slot at once, none refused
            assert time.monotonic() < deadline, f"{swarm.opened} streams opened; {results}"
            time.sleep(0.05)
        gate.open.set()
        for client in clients:
            client.join(60)
    finally:
        gate.open.set()
        server.should_exit = True
        thread.join(30)
    assert [status for status, _ in results] == [200] * 8
    assert all(text.rstrip().endswith("data: [DONE]") for _, text in results)


def test_a_keys_cap_from_the_key_file_makes_its_next_request_wait_for_a_slot(
    tiny_model: Path, swarm: LocalSwarmClient
) -> None:
    app = create_app(
        settings(tiny_model, api_keys=("sk-small", "sk-big"), key_limits={"sk-small": 2}),
        swarm,
    )

    async def scenario() -> None:
        async with running(app) as client:
            swarm.gate = asyncio.Event()

            def post(key: str) -> asyncio.Task[httpx.Response]:
                return asyncio.create_task(client.post(URL, json=CHAT, headers=bearer(key)))

            held = [post("sk-small"), post("sk-small")]
            await until(lambda: swarm.opened == 2, "the key's two requests to run")
            third = post("sk-small")
            await until(lambda: app.state.admission.waiting == 1, "the third to wait")
            # The key's cap is its own: another key runs as many as the gateway does.
            others = [post("sk-big") for _ in range(4)]
            await until(lambda: swarm.opened == 6, "the other key's requests to run")
            assert not third.done() and app.state.admission.in_flight("sk-small") == 2
            swarm.gate.set()  # the held ones finish: the waiting one gets their slot
            responses = await asyncio.wait_for(asyncio.gather(*held, third, *others), BOUND)
            assert [r.status_code for r in responses] == [200] * 7
            assert swarm.opened == 7

    asyncio.run(scenario())


def test_a_request_over_its_keys_cap_gets_429_after_the_queue_timeout(
    tiny_model: Path, swarm: LocalSwarmClient
) -> None:
    app = create_app(
        settings(tiny_model, api_keys=("sk-a",), max_concurrent_per_key=1, queue_timeout_s=0.3),
        swarm,
    )

    async def scenario() -> None:
        async with running(app) as client:
            swarm.gate = asyncio.Event()
            held = asyncio.create_task(client.post(URL, json=CHAT, headers=bearer("sk-a")))
            await until(lambda: swarm.opened == 1, "the first request to run")
            started = asyncio.get_running_loop().time()
            refused = await client.post(URL, json=CHAT, headers=bearer("sk-a"))
            waited = asyncio.get_running_loop().time() - started
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert "waited 0.3 s for one to finish" in refused.json()["error"]["message"]
            assert 0.25 <= waited < 5
            assert app.state.admission.waiting == 0
            swarm.gate.set()
            assert (await held).status_code == 200

    asyncio.run(scenario())


class LeavingClient:
    """One ASGI request whose client disconnects when told to."""

    def __init__(self, body: dict[str, Any], key: str) -> None:
        self.body = json.dumps(body).encode()
        self.key = key
        self.sent = False
        self.gone = asyncio.Event()
        self.messages: list[Message] = []

    async def receive(self) -> Message:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    def call(self, app: FastAPI) -> Any:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": URL,
            "raw_path": URL.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"host", b"gateway"),
                (b"authorization", f"Bearer {self.key}".encode()),
            ],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        return app(scope, self.receive, self.send)


def test_a_client_that_leaves_while_over_its_cap_frees_its_place(
    tiny_model: Path, swarm: LocalSwarmClient
) -> None:
    app = create_app(
        settings(tiny_model, api_keys=("sk-a",), max_concurrent_per_key=1, queue_timeout_s=30),
        swarm,
    )

    async def scenario() -> None:
        async with running(app) as client:
            swarm.gate = asyncio.Event()
            held = asyncio.create_task(client.post(URL, json=CHAT, headers=bearer("sk-a")))
            await until(lambda: swarm.opened == 1, "the first request to run")
            leaving = LeavingClient(CHAT, "sk-a")
            call = asyncio.create_task(leaving.call(app))
            await until(lambda: app.state.admission.waiting == 1, "the second to wait")
            # As many wait as the key may run (1): a third is refused at once.
            refused = await client.post(URL, json=CHAT, headers=bearer("sk-a"))
            assert refused.status_code == 429
            leaving.gone.set()  # its client disconnects while it waits
            await asyncio.wait_for(call, BOUND)
            assert app.state.admission.waiting == 0
            assert app.state.admission.in_flight("sk-a") == 1  # the running one's, alone
            waiting = asyncio.create_task(client.post(URL, json=CHAT, headers=bearer("sk-a")))
            await until(lambda: app.state.admission.waiting == 1, "its place to be taken")
            swarm.gate.set()
            assert (await held).status_code == 200
            assert (await asyncio.wait_for(waiting, BOUND)).status_code == 200
            assert swarm.opened == 2  # the one that left never opened a session
            assert app.state.admission.in_flight("sk-a") == 0

    asyncio.run(scenario())


# ---- with API keys, only the health probes are open ----

OPERATOR_PATHS = ["/swarm", "/metrics", "/docs", "/redoc", "/openapi.json"]


def test_with_api_keys_everything_but_the_probes_needs_a_key(
    tiny_model: Path, swarm: LocalSwarmClient
) -> None:
    app = create_app(settings(tiny_model, api_keys=("sk-a", "sk-b")), swarm)
    with TestClient(app) as client:
        for path in [*OPERATOR_PATHS, "/v1/models", "/no-such-path"]:
            for headers in ({}, bearer("wrong"), {"Authorization": "sk-a"}):
                r = client.get(path, headers=headers)
                assert r.status_code == 401, (path, headers, r.status_code)
                assert r.json()["error"]["code"] == "invalid_api_key"
        for path in OPERATOR_PATHS:
            assert client.get(path, headers=bearer("sk-b")).status_code == 200, path
        assert "swarmgate_requests_total" in client.get("/metrics", headers=bearer("sk-a")).text
        for path in ("/health", "/health/live"):
            assert client.get(path).status_code == 200, path  # probes send no key


def test_without_api_keys_the_operator_routes_stay_open(
    tiny_model: Path, swarm: LocalSwarmClient
) -> None:
    with TestClient(create_app(settings(tiny_model), swarm)) as client:
        for path in [*OPERATOR_PATHS, "/health", "/health/live", "/v1/models"]:
            assert client.get(path).status_code == 200, path


@contextmanager
def started_on_free_port(
    make_app: Callable[[int], FastAPI], tries: int = 5
) -> Iterator[tuple[TestClient, int]]:
    """A TestClient of ``make_app(port)``, whose app binds ``port`` itself when it starts
    (so no socket can be handed over): a port taken between its choice and the bind, by
    p2pd's ephemeral ports say, is a retry with another, not a failed test."""
    for attempt in range(tries):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        client = TestClient(make_app(port))
        try:
            client.__enter__()
        except OSError as error:
            if error.errno != errno.EADDRINUSE or attempt == tries - 1:
                raise
            continue
        try:
            yield client, port
        finally:
            client.__exit__(None, None, None)
        return


def test_metrics_port_serves_metrics_without_a_key(
    tiny_model: Path, swarm: LocalSwarmClient
) -> None:
    with started_on_free_port(
        lambda port: create_app(settings(tiny_model, api_keys=("sk-a",), metrics_port=port), swarm)
    ) as (client, port):
        assert client.post(URL, json=CHAT, headers=bearer("sk-a")).status_code == 200
        assert client.get("/metrics").status_code == 401  # the API port wants a key
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert scraped.status_code == 200
        assert 'swarmgate_requests_total{outcome="401"} 1.0' in scraped.text  # the refusal
    with pytest.raises(httpx.ConnectError):  # closed with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
