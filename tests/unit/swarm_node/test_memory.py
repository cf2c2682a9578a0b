"""The default KV budget respects a container's memory limit, not just the host's."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from swarm_node import node


@pytest.mark.parametrize(("limit", "capped"), [("4096\n", True), ("max\n", False)])
def test_the_default_cache_is_a_quarter_of_the_tighter_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str, capped: bool
) -> None:
    memory_max = tmp_path / "memory.max"
    memory_max.write_text(limit)
    monkeypatch.setattr(node, "CGROUP_LIMITS", (str(memory_max), "/nonexistent"))
    budget = node.default_cache_bytes()
    if capped:
        assert budget == 1024
    else:
        assert budget > 1024 and budget <= psutil.virtual_memory().total // 4
