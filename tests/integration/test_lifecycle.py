"""A swarm's life with real processes: a node drained by SIGTERM while it streams, and a
swarm that outlives its bootstrap `swarmgate dht` and is joined through any live peer.

One swarm for the module: the bootstrap DHT, a node for blocks [0, 2), two replicas for
[2, 4) (each with its own metrics port) and a gateway. The drain test leaves one replica;
the bootstrap test kills the DHT; so the order of the tests in this file matters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from transformers import LogitsProcessorList

from gateway.web.routes import ROUTE_HEADER
from tests.integration.conftest import (
    MODEL_ID,
    printed_initial_peers,
    start_gateway,
    start_node,
)
from tests.integration.test_swarm_chat import hf_greedy
from tests.processes import Process, free_port, http_ok, no_orphans, stop_all, wait_for
from tests.reference import LogitBias
from tests.reference import tokenizer as reference_tokenizer
from tests.tiny_model import TINY_BLOCKS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# How long a SIGTERMed replica lets its streams run: far longer than the stream, so that the
# test does not depend on this machine's speed.
DRAIN_TIMEOUT_S = 60.0
STREAM_S = 8.0  # the long stream's target length
MESSAGES = [{"role": "user", "content": "Tell me a long story about a river."}]
NO_EOS = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>: every answer runs to max_tokens
_PEER_ID = re.compile(r"serving blocks \d+:\d+ of \S+ as ([1-9A-HJ-NP-Za-km-z]+)")


@dataclass
class Lifecycle:
    logs: Path
    model: Path
    dht: Process
    head: Process  # blocks [0, 2)
    replicas: dict[str, Process]  # blocks [2, 4), by peer id
    metrics_ports: dict[str, int]  # of the replicas, by peer id
    ready_files: dict[str, Path]  # of the replicas, by peer id
    gateway: Process
    url: str
    started: list[Process] = field(default_factory=list)  # by the tests; stopped with the rest


def peer_id(node: Process) -> str:
    found = _PEER_ID.search(node.output())
    assert found, f"{node.name} printed no peer id:\n{node.output()[-2000:]}"
    return found.group(1)


def generated(model: Path, max_tokens: int) -> str:
    """What transformers' ``generate`` answers ``MESSAGES`` with, greedily under ``NO_EOS``:
    every answer of these tests is compared with it, token for token."""
    processors = LogitsProcessorList([LogitBias(NO_EOS)])
    _, ids = hf_greedy(model, MESSAGES, max_tokens, processors)
    assert len(ids) == max_tokens
    return str(reference_tokenizer(model).decode(ids, skip_special_tokens=True))


def swarm_servers(url: str) -> dict[str, dict]:
    return {s["peer_id"]: s for s in httpx.get(f"{url}/swarm", timeout=10).json()["servers"]}


@pytest.fixture(scope="module")
def life(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lifecycle]:
    logs = tmp_path_factory.mktemp("lifecycle-logs")
    half = TINY_BLOCKS // 2
    with no_orphans():
        processes: list[Process] = []
        started: list[Process] = []
        try:
            http_port = free_port()
            dht = Process("dht", ["dht", "--http-port", str(http_port)], logs)
            processes.append(dht)
            wait_for(lambda: "--initial-peers" in dht.output() or not dht.alive(), 60, "the DHT")
            peers = printed_initial_peers(dht.output())
            # The head finds the DHT by URL, as pods do through a Service name.
            head = start_node(tiny_model, [f"http://127.0.0.1:{http_port}"], logs, (0, half))
            processes.append(head)
            ports = [free_port(), free_port()]
            ready_files = [logs / f"replica-{index}.ready" for index in range(2)]
            replicas = [
                start_node(
                    tiny_model,
                    peers,
                    logs,
                    (half, TINY_BLOCKS),
                    "--metrics-port",
                    str(port),
                    "--drain-timeout",
                    str(DRAIN_TIMEOUT_S),
                    "--ready-file",
                    str(ready),
                    name=f"replica {half}:{TINY_BLOCKS} #{index}",
                )
                for index, (port, ready) in enumerate(zip(ports, ready_files, strict=True))
            ]
            processes += replicas
            gateway, url = start_gateway(tiny_model, peers, logs)
            processes.append(gateway)

            def ready() -> bool:
                for process in processes:
                    assert process.alive(), f"{process.name} died:\n{process.output()[-3000:]}"
                if not http_ok(f"{url}/health"):
                    return False
                servers = swarm_servers(url).values()
                return len(servers) == 3 and all(s["state"] == "online" for s in servers)

            wait_for(ready, 180, "three online servers behind a healthy gateway")
            ids = [peer_id(r) for r in replicas]
            yield Lifecycle(
                logs,
                tiny_model,
                dht,
                head,
                dict(zip(ids, replicas, strict=True)),
                dict(zip(ids, ports, strict=True)),
                dict(zip(ids, ready_files, strict=True)),
                gateway,
                url,
                started,
            )
        finally:
            stop_all(processes + started)


def ask(url: str, max_tokens: int, messages: list[dict] = MESSAGES) -> tuple[dict, str]:
    """A greedy chat completion that never stops early, and its route header."""
    body = {
        "model": MODEL_ID,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": NO_EOS,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json(), r.headers[ROUTE_HEADER]


class Stream(threading.Thread):
    """Reads one streamed chat completion, noting when each event arrived and whether the
    ``watched`` process was alive when the last text arrived."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.body = {
            "model": MODEL_ID,
            "messages": MESSAGES,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logit_bias": NO_EOS,
            "stream": True,
        }
        self.url = url
        self.watched: Process | None = None
        self.events: list[str] = []
        self.text: list[str] = []
        self.watched_alive_at_last_text: bool | None = None
        self.route: str | None = None
        self.done_at: float | None = None
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/chat/completions", json=self.body, timeout=60
            ) as r:
                assert r.status_code == 200, r.read()
                self.route = r.headers.get(ROUTE_HEADER)
                for event in _sse_events(r.iter_lines()):
                    self.events.append(event)
                    if event.startswith("data: {"):
                        choices = json.loads(event[len("data: ") :])["choices"]
                        content = choices[0]["delta"].get("content") if choices else None
                        if content:
                            self.text.append(content)
                            watched = self.watched
                            self.watched_alive_at_last_text = watched is None or watched.alive()
        except BaseException as e:
            self.failure = e
        finally:
            self.done_at = time.monotonic()


def _sse_events(lines: Iterator[str]) -> Iterator[str]:
    event: list[str] = []
    for line in lines:
        if line:
            event.append(line)
        elif event:
            if not event[0].startswith(":"):  # a ping
                yield "\n".join(event)
            event = []


def open_streams(port: int) -> float:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return -1.0
    return metric(text, "swarmgate_node_open_streams")


def metric(text: str, name: str) -> float:
    """The value of one sample (``name`` with its labels) in a Prometheus exposition."""
    [value] = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return value


def test_a_request_can_be_followed_through_readiness_metrics_and_logs(life: Lifecycle) -> None:
    assert all(ready.exists() for ready in life.ready_files.values())
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    r = httpx.post(
        f"{life.url}/v1/chat/completions",
        json=body,
        headers={"X-Request-ID": "trace-lifecycle-1"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-lifecycle-1"
    [serving] = [p for p in life.replicas if p in r.headers[ROUTE_HEADER]]

    gateway = httpx.get(f"{life.url}/metrics", timeout=10).text
    assert metric(gateway, f'swarmgate_hop_step_seconds_count{{peer="{serving}"}}') >= 4
    node = httpx.get(f"http://127.0.0.1:{life.metrics_ports[serving]}/metrics", timeout=10).text
    assert metric(node, 'swarmgate_node_step_seconds_count{phase="prefill"}') >= 1
    assert metric(node, 'swarmgate_node_step_seconds_count{phase="decode"}') >= 3

    # Each server of the route logs the request's id when its stream closes.
    for process in (life.head, life.replicas[serving]):
        wait_for(
            lambda p=process: "[request trace-lifecycle-1]" in p.output(),
            15,
            f"{process.name} to log the request id",
        )


def test_sigterm_drains_a_node_while_its_stream_finishes(life: Lifecycle) -> None:
    before, _ = ask(life.url, 16)
    assert before["choices"][0]["message"]["content"] == generated(life.model, 16)
    began = time.monotonic()
    calibration, _ = ask(life.url, 100)
    rate = 100 / (time.monotonic() - began)  # tokens per second, prefill included
    room = 1024 - calibration["usage"]["prompt_tokens"] - 8  # the tiny model's context
    max_tokens = min(room, max(400, round(rate * STREAM_S)))

    stream = Stream(life.url, max_tokens)
    stream.start()
    wait_for(lambda: bool(stream.text) or stream.done_at is not None, 30, "the first text")
    # The route header names the replica that serves the stream; that replica says so too.
    assert stream.route is not None, stream.failure
    [draining] = [p for p in life.replicas if f"{p}:2-4" in stream.route]
    [other] = [p for p in life.replicas if p != draining]
    wait_for(
        lambda: open_streams(life.metrics_ports[draining]) == 1.0,
        10,
        "the serving replica to count the stream",
    )
    node = life.replicas[draining]
    stream.watched = node
    p2pd = [p for p in node.descendants() if "p2pd" in p.name()]
    assert p2pd, "the node runs its own p2pd"
    assert stream.done_at is None, "the stream ended before the node was asked to stop"

    node.popen.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    # (1) Gateways learn that it drains.
    wait_for(
        lambda: swarm_servers(life.url).get(draining, {}).get("state") == "draining",
        15,
        "/swarm to show the node draining",
    )
    assert node.alive() and stream.done_at is None, "the stream still runs on the node"
    assert not life.ready_files[draining].exists(), "a draining node is not ready"

    # (2) A new request runs on the other replica and answers as before the drain.
    during, route = ask(life.url, 16)
    assert during["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]
    assert f"{other}:2-4" in route and draining not in route

    # (3) The running stream ends normally, on the node that drains.
    stream.join(timeout=DRAIN_TIMEOUT_S)
    assert not stream.is_alive() and stream.failure is None, stream.failure
    assert stream.done_at is not None
    assert not any(e.startswith("event: error") for e in stream.events), stream.events[-3:]
    assert stream.events[-1] == "data: [DONE]"
    finish = json.loads(stream.events[-2][len("data: ") :])["choices"][0]["finish_reason"]
    assert finish == "length"
    assert stream.watched_alive_at_last_text, "the node left before the stream's last text"
    assert f"{draining} failed" not in life.gateway.output(), "the stream failed over"

    # (4) The node then leaves on its own, promptly, and takes its p2pd along.
    wait_for(lambda: not node.alive(), 15, "the drained node to exit")
    exited = time.monotonic()
    assert node.popen.returncode == 0, node.output()[-3000:]
    assert exited - stream.done_at < 5.0, "the node outlived its last stream"
    assert exited - signalled < DRAIN_TIMEOUT_S
    wait_for(lambda: not any(p.is_running() for p in p2pd), 10, "the node's p2pd to exit")
    assert "draining: 1 open streams" in node.output()
    wait_for(lambda: draining not in swarm_servers(life.url), 15, "the node's record to expire")
    assert http_ok(f"{life.url}/health")
    # Last: computing generate's answer takes seconds, which must not count against the
    # node's exit times above.
    assert "".join(stream.text) == generated(life.model, max_tokens)


def test_the_swarm_outlives_its_bootstrap_peer_and_is_joined_through_a_node(
    life: Lifecycle,
) -> None:
    before, _ = ask(life.url, 16)
    assert before["choices"][0]["message"]["content"] == generated(life.model, 16)
    dead_bootstrap = printed_initial_peers(life.dht.output())
    alive_node = printed_initial_peers(life.head.output())  # the node says how to join it
    assert alive_node and alive_node != dead_bootstrap
    pgid = life.dht.popen.pid

    os.killpg(pgid, signal.SIGKILL)  # the machine under it died: the DHT and its p2pd
    wait_for(lambda: not life.dht.alive(), 10, "the bootstrap DHT to die")
    wait_for(lambda: not _group_alive(pgid), 10, "the bootstrap's p2pd to die")

    # The running gateway keeps answering, and the nodes keep announcing (a new
    # conversation's caches show up in their records) without the bootstrap peer.
    again, route = ask(life.url, 16)
    assert again["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]
    sessions = {
        p: s["cached_sessions"]
        for p, s in swarm_servers(life.url).items()
        if s["state"] == "online" and f"{p}:" in route
    }
    assert len(sessions) == 2, (route, sessions)
    ask(life.url, 4, [{"role": "user", "content": "A new conversation about mountains."}])

    def announced() -> bool:
        servers = swarm_servers(life.url)
        return all(p in servers and servers[p]["cached_sessions"] > n for p, n in sessions.items())

    wait_for(announced, 20, "announcements made after the bootstrap died to reach the gateway")

    # A gateway started now joins through the node, its dead bootstrap listed first.
    late, url = start_gateway(
        life.model, [*dead_bootstrap, *alive_node], life.logs, name="late-gateway"
    )
    life.started.append(late)

    def late_ready() -> bool:
        assert late.alive(), f"the late gateway died:\n{late.output()[-3000:]}"
        return http_ok(f"{url}/health")

    wait_for(late_ready, 120, "the late gateway to become healthy")
    answer, route = ask(url, 16)
    assert answer["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]
    assert route.startswith(f"{peer_id(life.head)}:0-2,") and route.endswith(":2-4")
    late.stop()


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in process group ``pgid``."""
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != "zombie":
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False
