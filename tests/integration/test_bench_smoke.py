"""Every bench runs end to end for a couple of tokens with the smallest settings: the tiny
model, one repeat. The benches that measure a gateway share the session's swarm (``--url``);
so does finetune (``--initial-peers``); wan and failover, which start swarms of their own,
start them on the tiny model. Figures are not checked here (they mean nothing at this size
and on a shared machine), only that each bench finishes, that the greedy checks it makes of
the swarm hold, and that bench/report.py renders its result as the README's table."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bench import (
    affinity,
    concurrency,
    decode,
    failover,
    finetune,
    fit,
    head,
    planner,
    precision,
    report,
    speculative,
    wan,
)
from bench.common import run_record
from tests.integration.conftest import Swarm, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def flags(**values: object) -> list[str]:
    """``--name value`` for each keyword (``max_tokens`` is ``--max-tokens``)."""
    return [part for k, v in values.items() for part in (f"--{k.replace('_', '-')}", str(v))]


def run(bench: ModuleType, *argv: str) -> dict[str, Any]:
    """``bench``'s main on ``argv``; its result, once rendered as its README table."""
    result: dict[str, Any] = bench.main(list(argv))
    name = bench.__name__.rsplit(".", 1)[1]
    assert report.RENDERERS[name]([("smoke.jsonl:1", run_record(name, result))])
    return result


def test_decode_alternates_cold_rounds_and_matches_generate(swarm: Swarm) -> None:
    result = run(decode, *flags(model=swarm.model_path, url=swarm.base_url, tokens=3, repeats=2))
    assert result["greedy_equal"], result["first_unequal"]
    assert len(result["rounds"]["hf"]) == len(result["rounds"]["swarm"]) == 2
    assert result["swarm_cached_tokens"] == [0, 0]  # each round's prompt is cold
    assert result["swarm_prompt_tokens"] == result["prompt_tokens"]


def test_concurrency(swarm: Swarm) -> None:
    settings = flags(model=swarm.model_path, url=swarm.base_url, tokens=2, repeats=1)
    result = run(concurrency, *settings, "--streams", "1", "2")
    assert all(level["failures"] == 0 for level in result["swarm"].values()), result["swarm"]


def test_affinity(swarm: Swarm, tmp_path: Path) -> None:
    with running_gateway(swarm, tmp_path, "--no-affinity", name="miss") as miss:
        urls = ["--urls", swarm.base_url, miss]
        result = run(affinity, *urls, *flags(model=swarm.model_path, repeats=1, turns=2))
    assert result["hit_equals_miss"]
    assert result["greedy_equal"], result["first_unequal"]


def test_finetune(swarm: Swarm) -> None:
    peers = ["--initial-peers", *swarm.initial_peers, "--model-name", swarm.model_id]
    settings = flags(model=swarm.model_path, steps=2, batch_size=1, length=16, rank=2)
    assert run(finetune, *peers, *settings)["bytes_sent_per_step"] > 0


def test_wan(tiny_model: Path) -> None:
    result = run(wan, *flags(model=tiny_model, rtt_ms=0, modes="push", tokens=2))
    assert result["rtt"]["0"]["push"]["completion_tokens"] == 2


def test_speculative(tiny_model: Path) -> None:
    settings = flags(model=tiny_model, rtt_ms=0, modes="lookup", tasks="edit", tokens=4)
    result = run(speculative, *settings, "--concurrent", "2")
    runs = result["rtt"]["0"]["edit"]
    assert list(runs) == ["off", "lookup"]  # off always runs: the baseline
    assert all(run["completion_tokens"] == 4 for run in runs.values())
    assert result["identical"] and result["equals_generate"], result
    together = result["concurrent"]
    assert [together[m]["failures"] for m in ("off", "lookup")] == [0, 0], together
    assert together["lookup"]["completion_tokens"] == together["off"]["completion_tokens"]


def test_failover_hang(tiny_model: Path) -> None:
    settings = flags(model=tiny_model, fault="hang", hops="last", tokens=6, fault_at=2)
    result = run(failover, *settings, "--repeats", "1")
    assert result["last"]["faults_struck"] == 1
    assert result["last"]["stall_s"] is not None
    assert result["last"]["identical"] and result["greedy_equal"], result


def test_the_benches_without_a_swarm(tiny_model: Path) -> None:
    smallest = flags(blocks=1, tokens=2, prompt_tokens=4, repeats=1, greedy_tokens=2)
    assert run(precision, *smallest, *flags(model=tiny_model, accuracy_prompts=1))
    assert run(head, *flags(heads="smollm2", repeats=1))["results"]
    assert run(fit, *flags(gpus=24))["rows"]
    assert run(planner, *flags(servers=60, blocks=8, plans=2))["plans"] == 2
