"""One swarm's DHT and block servers shared by a module's chaos tests, each test with a
gateway of its own.

Starting a swarm costs 25-40 s, most of it the nodes; a test that kills or freezes a server
needs only that server replaced. So a module keeps one DHT and a pool of nodes: a test
asks for the spans it wants (`gateway(spans)`), the pool starts what is missing and stops
what is extra, and hands the test a fresh gateway once that gateway sees exactly the pool's
live servers online. The fresh gateway matters: bans, caches and counters of an earlier
test's gateway would carry into the next test and make it depend on the order.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.integration.conftest import (
    MODEL_ID,
    PREFILL_CHUNK_TOKENS,
    Swarm,
    printed_initial_peers,
    start_gateway,
    start_node,
)
from tests.processes import Process, http_ok, no_orphans, node_identity, stop_all, wait_for

Span = tuple[int, int]


class NodePool:
    """A DHT and the block servers a test holds now (``live``); every process it ever
    started is stopped with it."""

    def __init__(self, model: Path, logs: Path, node_flags: Sequence[str] = ()) -> None:
        self.model = model
        self.logs = logs
        self.node_flags = tuple(node_flags)
        self.started: list[Process] = []
        self.live: list[Process] = []
        self._names = Counter[str]()
        dht = self._track(Process("dht", ["dht"], logs))
        try:
            wait_for(lambda: "--initial-peers" in dht.output() or not dht.alive(), 60, "the DHT")
            self.peers = printed_initial_peers(dht.output())
        except BaseException:
            dht.stop()
            raise

    def _track(self, process: Process) -> Process:
        self.started.append(process)
        return process

    def _name(self, base: str) -> str:
        self._names[base] += 1
        return f"{base} #{self._names[base]}"

    def start(
        self,
        span: Span,
        *extra: str,
        name: str = "node",
        module: str = "swarmgate",
        env: dict[str, str] | None = None,
    ) -> Process:
        """One more server for ``span``; it is live (counted, and expected online) until
        ``lost`` says otherwise."""
        process = start_node(
            self.model,
            self.peers,
            self.logs,
            span,
            *self.node_flags,
            *extra,
            name=self._name(f"{name} {span[0]}-{span[1]}"),
            module=module,
            env=env,
        )
        self.live.append(self._track(process))
        return process

    def kill(self, process: Process, *, replace: bool) -> None:
        """`kill -9` of ``process``'s whole group (a machine dying); with ``replace``, a
        new server for its span starts now, so that it boots while the test goes on."""
        process.kill_group()
        self.lost(process)
        if replace:
            self.start(self.span_of(process))

    def lost(self, process: Process) -> None:
        """``process`` was killed, frozen or stopped by the test: no longer counted."""
        if process in self.live:
            self.live.remove(process)

    def span_of(self, process: Process) -> Span:
        start, end = process.name.rsplit(" ", 2)[-2].split("-")
        return int(start), int(end)

    def hold(self, spans: Sequence[Span]) -> None:
        """Exactly one live server per entry of ``spans``: dead ones forgotten, missing
        ones started, extra ones stopped (a SIGTERM, so their records say draining)."""
        for process in [p for p in self.live if not p.alive()]:
            self.lost(process)
        wanted = Counter(spans)
        extra = []
        for process in list(self.live):
            span = self.span_of(process)
            if wanted[span] > 0:
                wanted[span] -= 1
            else:
                self.lost(process)
                extra.append(process)
        for span, missing in wanted.items():
            for _ in range(missing):
                self.start(span)
        stop_all(extra)

    @contextmanager
    def gateway(self, spans: Sequence[Span], *flags: str, name: str = "gateway") -> Iterator[Swarm]:
        """A fresh gateway on the pool once it holds ``spans``, and once that gateway sees
        the live servers online and no other; stopped on exit."""
        self.hold(spans)
        process, url = start_gateway(
            self.model,
            self.peers,
            self.logs,
            "--prefill-chunk-tokens",
            str(PREFILL_CHUNK_TOKENS),
            *flags,
            name=self._name(name),
        )
        try:

            def settled() -> bool:
                for node in [*self.live, process]:
                    assert node.alive(), f"{node.name} died:\n{node.output()[-3000:]}"
                if not http_ok(f"{url}/health"):
                    return False
                try:
                    expected = {node_identity(node)[0] for node in self.live}
                except AssertionError:  # a node not serving yet has printed no peer id
                    return False
                listed = httpx.get(f"{url}/swarm", timeout=5).json()["servers"]
                return {s["peer_id"] for s in listed if s["state"] == "online"} == expected

            wait_for(settled, 180, "the pool's servers, and only they, online", poll_s=0.5)
            yield Swarm(url, MODEL_ID, self.model, self.peers, list(self.live), process)
        finally:
            process.stop()


@contextmanager
def node_pool(model: Path, logs: Path, node_flags: Sequence[str] = ()) -> Iterator[NodePool]:
    """A `NodePool` whose processes (p2pd daemons included) are all stopped on exit."""
    with no_orphans():
        pool: NodePool | None = None
        try:
            pool = NodePool(model, logs, node_flags)
            yield pool
        finally:
            if pool is not None:
                for process in pool.started:  # a frozen group would never hear SIGTERM
                    thaw_quietly(process)
                stop_all(pool.started)


def thaw_quietly(process: Process) -> None:
    if process.alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.popen.pid, signal.SIGCONT)
