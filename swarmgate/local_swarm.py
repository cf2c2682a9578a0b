"""`swarmgate up`: a DHT, N block servers and the gateway on this machine, as one command.

Every part but the DHT is a child process running the same CLI a multi-machine swarm uses,
in a session of its own: Ctrl-C reaches `up` alone, which then stops the gateway before the
nodes so that they drain cleanly. Children die with their parent (PR_SET_PDEATHSIG), so even
a SIGKILL of `up` leaves no block server behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from models.devices import node_devices
from models.loading import load_config
from models.resolve import ModelSource
from protocol.credentials import Role
from protocol.membership import Membership, SwarmKey, SwarmKeyError
from protocol.swarm import LOOPBACK_MADDRS
from routing.block_selection import split_evenly
from swarm_dht.dht import SwarmDHT, die_with_parent
from swarmgate.flags import command_line
from swarmgate.options import UP_GATEWAY, UP_NODE

STOP_TIMEOUT_S = 20.0
# Settings of one process that an environment may hold (a container image sets some): every
# child of `up` inheriting them would make its nodes fight over one port or one identity.
PER_PROCESS = (
    "SWARMGATE_HOST_MADDRS",
    "SWARMGATE_ANNOUNCE_MADDRS",
    "SWARMGATE_IDENTITY",
    "SWARMGATE_METRICS_PORT",
    "SWARMGATE_READY_FILE",
    "SWARMGATE_DHT_HTTP_PORT",
    "SWARMGATE_BLOCKS",
    "SWARMGATE_NUM_BLOCKS",
    "SWARMGATE_INITIAL_PEERS",
)
# Flags of the children that `up` sets itself: the model as resolved here, the swarm's own
# DHT, a device per node.
BY_HAND = ("--model", "--revision", "--model-name", "--namespace", "--initial-peers", "--device")


class LocalSwarm:
    def __init__(self, source: ModelSource, args: argparse.Namespace) -> None:
        self.source = source
        self.args = args
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._stop = threading.Event()
        self.key_file = Path()  # the swarm key's file, once `run` has one
        self.computing = 1  # children that run torch, once `run` knows

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        num_blocks = load_config(self.source.path).num_hidden_layers
        spans = split_evenly(num_blocks, min(self.args.nodes, num_blocks))
        self.computing = len(spans) + 1  # the nodes and the gateway
        with tempfile.TemporaryDirectory(prefix="swarmgate-up-") as private:
            return self._run(spans, self._key_file(Path(private)))

    @property
    def threads_per_child(self) -> int:
        """This machine's cores, shared among the children that compute."""
        return max(1, len(os.sched_getaffinity(0)) // self.computing)

    def _key_file(self, private: Path) -> Path:
        """The swarm's key: the one given, else a new one that lives as long as this swarm
        (in a directory only this user can read), so even the default swarm is closed."""
        if self.args.swarm_key:
            return Path(self.args.swarm_key)
        path = private / "swarm.key"
        SwarmKey.generate().save(path)
        return path

    def _run(self, spans: list[tuple[int, int]], key_file: Path) -> int:
        self.key_file = key_file
        try:
            membership = Membership.load(key_file, Role.SERVER)
        except SwarmKeyError as e:
            raise SystemExit(f"swarmgate up: {e}") from None
        dht = SwarmDHT(host_maddrs=LOOPBACK_MADDRS, start=True, membership=membership)
        try:
            peers = [str(m) for m in dht.get_visible_maddrs()]
            devices = node_devices(self.args.device, len(spans))
            for (start, end), device in zip(spans, devices, strict=True):
                self._spawn(
                    f"node {start}:{end}",
                    [
                        "node",
                        "--blocks",
                        f"{start}:{end}",
                        "--device",
                        device,
                        *self._common(peers),
                        *self._node_flags(),
                    ],
                    env=self._child_env(),
                )
            self._spawn(
                "gateway",
                [
                    "gateway",
                    *("--device", self.args.device),
                    *self._common(peers),
                    *self._gateway_flags(),
                ],
                env=self._child_env(gateway=True),
            )
            if not self._wait_until_healthy():
                return 0 if self._stop.is_set() else 1  # asked to stop while starting: fine
            self._print_banner(spans)
            while not self._stop.wait(0.5):
                dead = self._dead_child()
                if dead:
                    print(f"swarmgate up: {dead} exited; stopping the swarm", file=sys.stderr)
                    return 1
            return 0
        finally:
            self._stop_children()
            dht.shutdown()

    def _common(self, peers: list[str]) -> list[str]:
        # A Hub model goes to the children pinned to the commit resolved here, so that all
        # serve the same weights even if its branch moves meanwhile.
        flags = [*self.source.model_flags(), "--model-name", self.source.name]
        if self.args.namespace:
            flags += ["--namespace", self.args.namespace]
        return [*flags, "--initial-peers", *peers]

    def _node_flags(self) -> list[str]:
        """Every node flag `up` took, as the nodes' command line (--device goes per node)."""
        flags: list[str] = []
        for flag in UP_NODE:
            value = getattr(self.args, flag.dest)
            if flag.name == "--adapters":  # the children need not share this directory
                value = [str(Path(a).resolve()) for a in value]
            if flag.name not in BY_HAND and not flag.secret:
                flags += command_line(flag, value)
        return flags

    def _gateway_flags(self) -> list[str]:
        """Every gateway flag `up` took, as the gateway's command line; secrets go in its
        environment (`_child_env`)."""
        flags: list[str] = []
        for flag in UP_GATEWAY:
            if flag.name not in BY_HAND and not flag.secret:
                flags += command_line(flag, getattr(self.args, flag.dest))
        return flags

    def _child_env(self, *, gateway: bool = False) -> dict[str, str]:
        """Secrets go to children in their environment, never as arguments: a command line
        is visible to every user of the machine (`ps`). The swarm key travels as its file's
        path; only the gateway gets API keys and the Redis URL (which may hold a password)."""
        private = ("SWARMGATE_API_KEY", "REDIS_URL", "SWARMGATE_SWARM_KEY")
        env = {k: v for k, v in os.environ.items() if k not in private + PER_PROCESS}
        env["SWARMGATE_SWARM_KEY"] = str(self.key_file)
        # Every child runs torch on the same cores: each taking all of them oversubscribes
        # the machine (threads preempting each other mid-matmul). Measured on 2 cores with
        # 2 nodes + gateway: one thread each gave +12% for one stream, +29% for sixteen.
        env.setdefault("OMP_NUM_THREADS", str(self.threads_per_child))
        if gateway and self.args.api_key:
            env["SWARMGATE_API_KEY"] = " ".join(self.args.api_key)
        if gateway and self.args.redis_url:
            env["REDIS_URL"] = self.args.redis_url
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        command = [
            sys.executable,
            "-m",
            "swarmgate",
            "--log-level",
            self.args.log_level,
            "--log-format",
            self.args.log_format,
            *argv,
        ]
        process = subprocess.Popen(
            command, preexec_fn=die_with_parent, start_new_session=True, env=env
        )
        self.children.append((name, process))

    def _dead_child(self) -> str | None:
        for name, process in self.children:
            if process.poll() is not None:
                return f"{name} (exit code {process.returncode})"
        return None

    def _wait_until_healthy(self) -> bool:
        url = f"http://{self.args.host}:{self.args.port}/health"
        deadline = time.monotonic() + self.args.ready_timeout
        print(
            "swarmgate up: starting the swarm (loading blocks, joining the DHT)...", file=sys.stderr
        )
        while time.monotonic() < deadline and not self._stop.is_set():
            dead = self._dead_child()
            if dead:
                print(f"swarmgate up: {dead} exited during startup", file=sys.stderr)
                return False
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass  # the gateway is still starting
            self._stop.wait(0.5)
        if not self._stop.is_set():
            print(
                f"swarmgate up: not healthy after {self.args.ready_timeout:.0f} s", file=sys.stderr
            )
        return False

    def _print_banner(self, spans: list[tuple[int, int]]) -> None:
        base = f"http://{self.args.host}:{self.args.port}"
        layout = ", ".join(f"{s}:{e}" for s, e in spans)
        print(
            f"\nswarmgate is ready: model {self.source.name!r} on {len(spans)} nodes "
            f"(blocks {layout})\n"
            f"  OpenAI base URL:  {base}/v1\n"
            f"  try:  curl -N {base}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model":"{self.source.name}","stream":true,'
            f'"messages":[{{"role":"user","content":"Hello!"}}]}}\'\n'
            f"  The swarm is closed: only processes given its key ({self.key_file}) join it.\n"
            f"  Ctrl-C stops the swarm.\n",
            flush=True,
        )

    def _stop_children(self) -> None:
        for _, process in reversed(self.children):  # gateway first, so nodes see streams close
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for _, process in self.children:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
