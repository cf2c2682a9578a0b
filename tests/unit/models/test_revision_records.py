"""Servers of a Hub model record its revision's commit: two servers on other commits never
chain, local models keep the digests they had, and `swarmgate status` shows the commit."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest

from protocol.swarm import ModelRecord, ServerRecord
from routing.snapshot import SwarmSnapshot
from swarmgate.status import format_table, summarize

CONFIG = SimpleNamespace(
    model_type="llama", num_hidden_layers=4, hidden_size=64, max_position_embeddings=1024
)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"


def test_a_local_model_keeps_the_digest_it_had() -> None:
    shape = ["org/tiny", "llama", 4, 64, 1024]
    before = hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]
    assert ModelRecord.of("org/tiny", CONFIG).digest == before
    assert ModelRecord.of("org/tiny", CONFIG, "bfloat16", revision="").digest == before


def test_digests_differ_by_revision_and_the_disagreement_names_it() -> None:
    local = ModelRecord.of("org/tiny", CONFIG)
    ours = ModelRecord.of("org/tiny", CONFIG, revision=COMMIT)
    theirs = ModelRecord.of("org/tiny", CONFIG, revision=OTHER)
    assert len({local.digest, ours.digest, theirs.digest}) == 3
    assert ours.digest == ModelRecord.of("org/tiny", CONFIG, "bfloat16", COMMIT).digest
    assert ours.disagreement(theirs) == f"revision {OTHER!r} (here {COMMIT!r})"
    assert ours.disagreement(local) == f"revision '' (here {COMMIT!r})"
    assert local.disagreement(ModelRecord.of("org/tiny", CONFIG)) is None
    assert ModelRecord.from_wire(ours.to_wire()) == ours
    assert ModelRecord.from_wire(local.to_wire() | {"revision": ""}) == local
    with pytest.raises(ValueError, match="revision"):
        ModelRecord.from_wire(ours.to_wire() | {"revision": "x" * 65})


def test_status_shows_the_revision_of_a_hub_model_only() -> None:
    server = ServerRecord.model_validate(
        {"state": "online", "start": 0, "end": 4, "throughput": 5.0}
    )
    hub = SwarmSnapshot(ModelRecord.of("org/tiny", CONFIG, revision=COMMIT), {"QmA": server})
    local = SwarmSnapshot(ModelRecord.of("tiny", CONFIG), {"QmA": server})
    assert summarize(hub)["revision"] == COMMIT
    assert summarize(local)["revision"] == ""
    assert (
        format_table([hub]).splitlines()[0] == f"org/tiny: 4 blocks, ok, 1 hops, revision {COMMIT}"
    )
    assert format_table([local]).splitlines()[0] == "tiny: 4 blocks, ok, 1 hops"
