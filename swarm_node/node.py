"""A block server's life: join the DHT, load a span, serve it, announce it, drain, leave."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

import psutil
import torch

from models.adapters import Adapter, AdapterError, attach_adapters, read_adapters
from models.devices import CPU, DeviceError, Placement, dtype_name, free_bytes
from models.loading import Span, load_config, load_span
from models.quantization import QuantizationError
from models.resolve import ModelSourceError, resolve_model
from protocol.latency import SIMULATED_RTT_ENV, SimulatedLink
from protocol.rpc import ServerInfo
from protocol.swarm import ModelRecord, NodeState, ServerRecord, dht_prefix
from routing.block_selection import choose_blocks
from swarm_dht.dht import SwarmDHT
from swarm_dht.discovery import announce, fetch_model, fetch_snapshot, warn_if_model_differs
from swarm_dht.join import SwarmMember, join_swarm
from swarm_dht.revocations import publish_revocations, watch_revocations
from swarm_node.admission import AdmissionRules
from swarm_node.cache_store import CacheStore
from swarm_node.handler import BlockHandler, NodeHooks
from swarm_node.kv_buffers import KVShape
from swarm_node.metrics import InfoBoard, NodeMetrics
from swarm_node.settings import NodeSettings
from swarm_node.throughput import measure_decode_throughput

logger = logging.getLogger("swarmgate.node")

INFO_PERIOD_S = 1.0  # how stale the metrics endpoint's view may be
# Of a GPU's memory left free once the blocks are loaded, what the KV caches may take by
# default: the rest leaves room for activations of a batched forward and the allocator.
GPU_CACHE_SHARE = 0.9


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def default_cache_bytes(device: torch.device = CPU) -> int:
    """The KV budget when none is given. On a GPU, ``GPU_CACHE_SHARE`` of its free memory,
    read after the blocks are loaded (``torch.cuda.mem_get_info``). On the CPU, a quarter of
    the memory this process may use: free memory, or a container's limit when that is lower
    (the host's free memory would get a pod killed for overcommitting)."""
    on_device = free_bytes(device)
    if on_device is not None:
        return int(on_device * GPU_CACHE_SHARE)
    available = int(psutil.virtual_memory().available)
    for path in CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            available = min(available, int(text))
        break
    return available // 4


def simulated_link() -> SimulatedLink:
    """The delay ``SWARMGATE_SIMULATED_RTT_MS`` puts on this node's pushes to other nodes
    (benchmarks only; the gateway delays its own messages)."""
    link = SimulatedLink.from_env()
    if link.enabled:
        logger.warning(
            "%s is set: every push to another node waits %.0f ms per round trip (benchmarks only)",
            SIMULATED_RTT_ENV,
            link.rtt_s * 1000,
        )
    return link


class BlockServer:
    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.state = NodeState.JOINING
        self.adapters: list[Adapter] = []  # read at start: run() fails on a bad one
        self._stop = asyncio.Event()
        self._hurry = False  # a second signal: leave without waiting for sessions

    def request_stop(self) -> None:
        self._hurry = self._stop.is_set()
        self._stop.set()

    async def run(self) -> None:
        settings = self.settings
        try:
            source = await asyncio.to_thread(
                resolve_model, settings.model, name=settings.model_name, revision=settings.revision
            )
        except ModelSourceError as e:
            raise SystemExit(f"swarmgate node: {e}") from None
        self.source = source  # a Hub model's blocks are fetched once the span is chosen
        config = load_config(source.path)
        try:  # a bad adapter stops the node before it joins, with the adapter's name
            self.adapters = read_adapters([Path(folder) for folder in settings.adapters], config)
        except AdapterError as e:
            raise SystemExit(f"swarmgate node: {e}") from None
        try:
            placement = Placement.of(settings.device, settings.dtype)
        except DeviceError as e:
            raise SystemExit(f"swarmgate node: {e}") from None
        logger.info("computing on %s", placement.describe())
        self.placement = placement
        model = ModelRecord.of(
            source.name, config, dtype_name(placement.dtype), revision=source.revision or ""
        )
        self.prefix = dht_prefix(source.name, settings.namespace)
        member = join_swarm(
            settings.initial_peers,
            settings.membership,
            host_maddrs=list(settings.host_maddrs),
            announce_maddrs=list(settings.announce_maddrs) or None,
            identity_path=settings.identity_path,
        )
        try:
            await self._serve(member, source.path, model, placement)
        finally:
            member.leave()
            logger.info("left the swarm")

    async def _serve(
        self, member: SwarmMember, folder: object, model: ModelRecord, placement: Placement
    ) -> None:
        settings = self.settings
        dht = member.dht
        self.peer_id = member.peer_id
        self.owner_tag = dht.owner_tag
        self.model_digest = model.digest
        with contextlib.suppress(Exception):  # a first node finds none
            warn_if_model_differs(await fetch_model(dht, self.prefix), model)
        start, end = settings.blocks or await self._choose_blocks(dht, model)
        # Claim the span while loading, so that servers joining meanwhile pick other blocks.
        joining = ServerRecord(
            model=model.digest, state=NodeState.JOINING, start=start, end=end, throughput=0.0
        )
        try:
            await announce(
                dht,
                self.prefix,
                self.peer_id,
                joining,
                model,
                ttl_s=3 * settings.announce_period_s,
                namespace=settings.namespace,
            )
        except Exception as e:
            logger.warning("could not announce joining: %s", e)
        logger.info("peer %s: loading blocks %d:%d of %s", self.peer_id, start, end, model.name)
        if self.adapters:
            logger.info("adapters: %s", ", ".join(a.name for a in self.adapters))
        began = time.monotonic()
        try:  # a Hub model: download the files holding these blocks (a no-op for local ones)
            await asyncio.to_thread(self.source.fetch_blocks, start, end)
        except ModelSourceError as e:
            raise SystemExit(f"swarmgate node: {e}") from None
        try:
            span: Span = await asyncio.to_thread(
                load_span,
                folder,  # type: ignore[arg-type]
                start,
                end,
                placement.dtype,
                settings.quant,
                placement.device,
            )
        except QuantizationError as e:
            raise SystemExit(f"swarmgate node: {e}") from None
        try:
            await asyncio.to_thread(attach_adapters, span, self.adapters)
        except AdapterError as e:
            raise SystemExit(f"swarmgate node: {e}") from None
        self.throughput = await asyncio.to_thread(measure_decode_throughput, span)
        logger.info(
            "loaded %d blocks in %.1f s; %.1f decode steps/s",
            end - start,
            time.monotonic() - began,
            self.throughput,
        )
        budget = (
            settings.cache_bytes
            if settings.cache_bytes is not None
            else default_cache_bytes(span.device)
        )
        logger.info("KV cache budget: %.2f GiB on %s", budget / 2**30, span.device)
        self.caches = CacheStore(
            budget,
            KVShape.of(span.config, span.dtype, span.device).bytes_per_token_per_block,
            idle_ttl_s=settings.cache_ttl_s,
        )
        self.span = span
        p2p = await dht.replicate_p2p()
        # Scraped only once served, below, when the board exists.
        metrics = NodeMetrics(lambda: board.latest, budget)
        member_pass = member.member_pass
        rules = AdmissionRules(
            members=settings.membership,
            accepting=lambda: self.state is NodeState.ONLINE,
            adapters=frozenset(a.name for a in self.adapters),
        )
        hooks = NodeHooks(
            observe_step=metrics.observe_step,
            observe_batch=metrics.observe_batch,
            member_pass=member_pass,
            link=simulated_link(),
        )
        self.handler = BlockHandler(
            span, self.caches, self.info, rules, hooks, prefill_chunk=settings.prefill_per_batch
        )
        await self.handler.register(p2p)
        self.state = NodeState.ONLINE
        board = InfoBoard(self.info)
        if settings.metrics_port is not None:
            metrics.serve(settings.metrics_port, settings.metrics_host)
        announcer = asyncio.create_task(self._announce_forever(dht, model))
        publisher = asyncio.create_task(board.run(INFO_PERIOD_S))
        revocations = (
            asyncio.create_task(watch_revocations(dht, settings.membership))
            if settings.membership is not None
            else None
        )
        print(
            f"swarmgate node: serving blocks {start}:{end} of {model.name} as {self.peer_id}; "
            "others can join through it with --initial-peers "
            + " ".join(str(m) for m in dht.get_visible_maddrs()),
            flush=True,
        )
        try:
            await self._stop.wait()
            await self._drain(dht, model)
        finally:
            self._set_ready(False)
            announcer.cancel()
            publisher.cancel()
            if revocations is not None:
                revocations.cancel()
            await self.handler.unregister(p2p)
            self.handler.shutdown()

    async def _choose_blocks(self, dht: SwarmDHT, model: ModelRecord) -> tuple[int, int]:
        snapshot = await fetch_snapshot(dht, self.prefix, model)
        length = self.settings.num_blocks or model.num_blocks
        return choose_blocks(snapshot, model.num_blocks, length)

    def record(self) -> ServerRecord:
        stats = self.caches.stats()
        return ServerRecord(
            model=self.model_digest,
            state=self.state,
            start=self.span.start,
            end=self.span.end,
            throughput=self.throughput,
            load=float(self.handler.active_streams),
            cache_bytes_free=stats.free_bytes,
            cached_sessions=stats.sessions,
            evictions=stats.evictions,
            dtype=dtype_name(self.span.dtype),  # resolved: never "auto"
            quant=self.settings.quant,
            adapters=tuple(a.name for a in self.adapters),
        )

    def info(self) -> ServerInfo:
        """The node's counters now; call on the event loop only (it expires idle sessions)."""
        self.caches.expire()
        stats = self.caches.stats()
        return ServerInfo(
            start=self.span.start,
            end=self.span.end,
            state=self.state,
            sessions=stats.sessions,
            load=float(self.handler.active_streams),
            cache_bytes_free=stats.free_bytes,
            throughput=self.throughput,
            evictions=stats.evictions,
            tokens_computed=stats.tokens_computed,
            tokens_reused=stats.tokens_reused,
            owner=self.owner_tag,
            credential=(
                membership.credential().encode()
                if (membership := self.settings.membership) is not None
                else ""
            ),
        )

    async def _announce(self, dht: SwarmDHT, model: ModelRecord) -> None:
        self.caches.expire()
        ttl = 3 * self.settings.announce_period_s
        await announce(
            dht,
            self.prefix,
            self.peer_id,
            self.record(),
            model,
            ttl_s=ttl,
            namespace=self.settings.namespace,
        )

    async def _announce_forever(self, dht: SwarmDHT, model: ModelRecord) -> None:
        while True:
            try:
                await self._announce(dht, model)
                self._set_ready(self.state is NodeState.ONLINE)
            except Exception as e:  # a missed announcement is retried next period
                logger.warning("announce failed: %s", e)
            if (membership := self.settings.membership) is not None:
                # Stored again by every server, a revocation outlives the peers holding it.
                with contextlib.suppress(Exception):
                    await publish_revocations(dht, membership.revocations.all())
            await asyncio.sleep(self.settings.announce_period_s)

    def _set_ready(self, ready: bool) -> None:
        """``--ready-file`` exists while this node serves and gateways can find it: a
        readiness probe (`test -f`) for orchestrators."""
        path = self.settings.ready_file
        if path is None:
            return
        if ready:
            Path(path).touch()
        else:
            Path(path).unlink(missing_ok=True)

    async def _drain(self, dht: SwarmDHT, model: ModelRecord) -> None:
        """Tell gateways to stop placing sessions here, let open ones finish, then leave."""
        self.state = NodeState.DRAINING
        self._set_ready(False)
        logger.info("draining: %d open streams", self.handler.active_streams)
        try:
            await self._announce(dht, model)
        except Exception as e:
            logger.warning("could not announce draining: %s", e)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.handler.active_streams and not self._hurry and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


def run_node(settings: NodeSettings) -> None:
    """Run a block server until SIGTERM/SIGINT (a second signal skips the drain)."""

    async def main() -> None:
        server = BlockServer(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
        await server.run()

    asyncio.run(main())
