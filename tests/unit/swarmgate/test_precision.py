"""Precision per node on the command line and in what the swarm reports about itself."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models.resolve import ModelSource
from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.snapshot import SwarmSnapshot
from swarm_node.cache_store import CacheStore
from swarm_node.node import BlockServer
from swarm_node.settings import NodeSettings
from swarmgate.cli import build_parser
from swarmgate.local_swarm import LocalSwarm
from swarmgate.status import format_table, summarize

NODE = ["node", "--initial-peers", "/ip4/127.0.0.1/tcp/1"]


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_node_and_up_accept_each_quantization(quant: str) -> None:
    assert build_parser().parse_args([*NODE, "--quant", quant]).quant == quant
    assert build_parser().parse_args(["up", "--quant", quant]).quant == quant


def test_the_environment_sets_the_quantization_and_a_typo_there_fails_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SWARMGATE_QUANT", "nf4")
    assert build_parser().parse_args(NODE).quant == "nf4"
    monkeypatch.setenv("SWARMGATE_QUANT", "int4")
    with pytest.raises(SystemExit):
        build_parser().parse_args(NODE)


def test_up_passes_dtype_and_quant_to_every_node(tmp_path: Path) -> None:
    args = build_parser().parse_args(["up", "--dtype", "bfloat16", "--quant", "nf4"])
    flags = LocalSwarm(ModelSource(name="m", path=tmp_path), args)._node_flags()
    assert flags[:4] == ["--dtype", "bfloat16", "--quant", "nf4"]


def test_a_node_announces_its_dtype_and_quant() -> None:
    # --dtype auto: the record names what it resolved to (bf16, on a GPU).
    server = BlockServer(NodeSettings(model="m", dtype="auto", quant="int8"))
    server.adapters = [SimpleNamespace(name="pirate")]  # type: ignore[list-item]
    server.model_digest, server.throughput = "d", 3.0
    server.span = SimpleNamespace(start=0, end=2, dtype=torch.bfloat16)  # type: ignore[assignment]
    server.caches = CacheStore(1 << 20, 1024)
    server.handler = SimpleNamespace(active_streams=0)  # type: ignore[assignment]
    record = ServerRecord.from_wire(server.record().to_wire())
    assert (record.dtype, record.quant, record.precision) == ("bfloat16", "int8", "bfloat16/int8")
    assert record.adapters == ("pirate",)


def _record(dtype: str, quant: str, start: int, end: int) -> ServerRecord:
    return ServerRecord(
        state=NodeState.ONLINE, start=start, end=end, throughput=1.0, dtype=dtype, quant=quant
    )


SNAPSHOT = SwarmSnapshot(
    ModelRecord(name="m", architecture="llama", num_blocks=6, hidden_size=8, max_length=64),
    {
        "QmA": _record("bfloat16", "none", 0, 2),
        "QmB": _record("float32", "int8", 2, 4),
        "QmC": _record("bfloat16", "nf4", 4, 6),
    },
)


def test_status_shows_each_servers_precision() -> None:
    table = format_table([SNAPSHOT])
    assert "precision" in table.splitlines()[3]
    for peer, precision in [("QmA", "bfloat16"), ("QmB", "float32/int8"), ("QmC", "bfloat16/nf4")]:
        [line] = [line for line in table.splitlines() if peer in line]
        assert f" {precision} " in line
    assert [s["precision"] for s in summarize(SNAPSHOT)["servers"]] == [
        "bfloat16",
        "float32/int8",
        "bfloat16/nf4",
    ]


def test_precision_is_derived_not_sent() -> None:
    assert "precision" not in _record("float32", "int8", 0, 1).to_wire()
