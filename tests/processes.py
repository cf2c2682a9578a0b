"""Start and always stop the real processes that integration and e2e tests need."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port that nothing holds now, for a child process to listen on.

    A child binds it later, so the port must not be one the kernel hands out meanwhile:
    port 0 binds, p2pd's connections and modules that pick a port at import time all draw
    from the ephemeral range, and a port drawn from it here could be taken before the child
    binds it. So the port comes from below that range, where only explicit binds land, and
    is checked free by binding it (retried while taken)."""
    low, _ = _ephemeral_range()
    chooser = random.Random()  # not the tests' seeded global generator
    for _ in range(100):
        port = chooser.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


# Every process a test run starts carries this in its environment, and so do the p2pd
# daemons they spawn: a run checks for its own leftovers, not another run's on the machine.
RUN_MARKER = "SWARMGATE_TEST_RUN"
RUN_ID = os.environ.setdefault(RUN_MARKER, uuid.uuid4().hex)  # in-process DHTs' p2pd too


def p2pd_pids() -> set[int]:
    """This test run's p2pd daemons."""
    found = set()
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if (
                "p2pd" in (process.info["name"] or "")
                or any("p2pd" in part for part in (process.info["cmdline"] or [])[:1])
            ) and process.environ().get(RUN_MARKER) == RUN_ID:
                found.add(process.pid)
        except psutil.Error:
            continue
    return found


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2
) -> None:
    """Poll ``condition`` until true; fail after ``timeout_s`` (bounded, never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Process:
    """A child running the `swarmgate` CLI, with its output kept in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        *,
        module: str = "swarmgate",  # or a test double's module with the same CLI
    ):
        self.name = name
        self.log_path = log_dir / f"{name.replace(' ', '_').replace(':', '-')}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, RUN_MARKER: RUN_ID, **(env or {})},
            start_new_session=True,  # its own group: stop() reaches every grandchild
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.Error:
            return []

    def terminate(self) -> None:
        """SIGTERM, without waiting (``stop`` waits)."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def kill_group(self) -> None:
        """`kill -9` the process with its children (DHT, p2pd): as if its machine died."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then SIGKILL to the whole group if it does not exit in time."""
        if self.alive():
            self.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def stop_all(processes: Sequence[Process]) -> None:
    """Stop ``processes`` together: each is told at once and then waited for, so a swarm's
    shutdown takes its slowest process's time rather than the sum of all."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.stop()


_SERVING = re.compile(r"serving blocks (\d+):(\d+) of \S+ as ([1-9A-HJ-NP-Za-km-z]{30,})")


def start_up(
    model: str,
    nodes: int,
    log_dir: Path,
    name: str,
    env: dict[str, str] | None = None,
    flags: Sequence[str] = (),
) -> tuple[Process, str]:
    """`swarmgate up` on a free port once it serves (stopped again if it never does), and
    its base URL. ``flags``: more of `up`'s flags (``--device cuda``)."""
    port = free_port()
    argv = ["up", "--model", model, "--port", str(port), "--nodes", str(nodes), *flags]
    swarm = Process(name, argv, log_dir, env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not swarm.alive():
            raise RuntimeError(f"swarmgate up exited:\n{swarm.output()[-2000:]}")
        return http_ok(f"{url}/health")

    try:
        wait_for(ready, 600, "swarmgate up")
    except BaseException:
        swarm.stop(timeout_s=60)
        raise
    return swarm, url


def node_identity(process: Process) -> tuple[str, tuple[int, int]]:
    """A started `swarmgate node`'s peer id and span, from what it printed."""
    match = _SERVING.search(process.output())
    if match is None:
        raise AssertionError(f"{process.name} printed no peer id:\n{process.output()[-2000:]}")
    return match[3], (int(match[1]), int(match[2]))


ALARMS = ("swarmgate_failovers_total", "swarmgate_hung_servers_total")


def alarms(base_url: str) -> dict[str, float]:
    """The gateway's failover and hung-server counters (from /metrics): what a benchmark
    under load must leave at zero, or its servers were wrongly given up on."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    found = {name: 0.0 for name in ALARMS}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def no_orphans() -> Iterator[None]:
    """Fails the test if p2pd daemons started inside the block outlive it."""
    before = p2pd_pids()
    yield
    wait_for(lambda: not (p2pd_pids() - before), 20, "p2pd daemons to exit")


class RedisServer:
    """A throwaway redis-server on a free loopback port, restartable on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.popen = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def pong() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(pong, 20, "redis-server to answer")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(10)
