"""Hub ids on real processes, against a fake Hugging Face Hub on loopback (tests/fake_hub.py):
a swarm started from `--model ORG/NAME` answers as `generate` on the same model, each
process downloading only its part; a model that cannot be had stops the command at start
with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.resolve import resolve_model
from tests.fake_hub import (
    TINY_META,
    FakeHub,
    folder_files,
    hub_env,
    shard_name,
    shard_per_block,
    use_hub,
)
from tests.integration.conftest import printed_initial_peers
from tests.processes import (
    REPO,
    RUN_ID,
    RUN_MARKER,
    Process,
    free_port,
    http_ok,
    no_orphans,
    stop_all,
    wait_for,
)
from tests.reference import greedy_ids, token_texts

pytestmark = pytest.mark.integration

TOKEN = "hf_granted"
PROMPT = list(range(500, 530))
NEW_TOKENS = 8
SHARDS = 6  # embedding, 4 blocks, norm + LM head
# Any well-formed peer: these commands stop before they join a swarm.
UNUSED_PEER = "/ip4/127.0.0.1/tcp/9/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def shards(*indices: int) -> set[str]:
    return {shard_name(i, SHARDS) for i in indices}


@pytest.fixture(scope="module")
def hub(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    files = folder_files(shard_per_block(tiny_model, tmp_path_factory.mktemp("sharded")))
    files["README.md"] = b"# tiny"
    # The same files gated: the same commit, which only a token holder may download.
    repos = {"org/tiny": {"main": files}, "org/gated": {"main": files}}
    with FakeHub(repos, gated={"org/gated": TOKEN}) as running:
        yield running


def test_a_swarm_from_hub_ids_answers_as_generate_each_process_downloading_its_part(
    hub: FakeHub,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Node 0:2 serves org/tiny; node 2:4 its gated copy with HF_TOKEN (under the same
    model id); the gateway runs offline (HF_HUB_OFFLINE=1) on a cache filled beforehand, as
    a `gateway` command run online once would."""
    root = tmp_path_factory.mktemp("hub-swarm")
    logs = root / "logs"
    logs.mkdir()
    use_hub(monkeypatch, hub.endpoint("gateway-prefetch"), root / "gateway-hf")
    resolve_model("org/tiny").fetch_head()

    sha = hub.sha("org/tiny")
    assert hub.sha("org/gated") == sha
    with no_orphans():
        dht = Process("dht", ["dht"], logs)
        processes = [dht]
        try:
            wait_for(lambda: "--initial-peers" in dht.output() or not dht.alive(), 60, "the DHT")
            peers = printed_initial_peers(dht.output())
            common = ["--initial-peers", *peers, "--announce-period", "2"]
            processes.append(
                Process(
                    "node 0:2",
                    ["node", "--model", "org/tiny", "--blocks", "0:2", *common],
                    logs,
                    env=hub_env(hub.endpoint("node-0-2"), root / "node-0-2-hf"),
                )
            )
            gated = ["--model", "org/gated", "--model-name", "org/tiny"]
            processes.append(
                Process(
                    "node 2:4",
                    ["node", *gated, "--blocks", "2:4", *common],
                    logs,
                    env=hub_env(hub.endpoint("node-2-4"), root / "node-2-4-hf", token=TOKEN),
                )
            )
            port = free_port()
            processes.append(
                Process(
                    "gateway",
                    [
                        "gateway",
                        "--model",
                        "org/tiny",
                        "--port",
                        str(port),
                        "--initial-peers",
                        *peers,
                    ],
                    logs,
                    env=hub_env(hub.endpoint("gateway"), root / "gateway-hf", offline=True),
                )
            )
            url = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                for process in processes:
                    assert process.alive(), f"{process.name} died:\n{process.output()[-3000:]}"
                return http_ok(f"{url}/health")

            wait_for(ready, 180, "the swarm to become healthy")
            body = {
                "model": "org/tiny",
                "prompt": PROMPT,
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "logprobs": 0,
            }
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            tokens = r.json()["choices"][0]["logprobs"]["tokens"]
            models = httpx.get(f"{url}/v1/models", timeout=10).json()
            swarm = httpx.get(f"{url}/swarm", timeout=10).json()
            node_log = processes[2].output()
        finally:
            stop_all(processes)

    assert tokens == token_texts(tiny_model, greedy_ids(tiny_model, PROMPT, NEW_TOKENS))
    assert [m["id"] for m in models["data"]] == ["org/tiny"]
    assert swarm["revision"] == sha
    assert [(s["start"], s["end"]) for s in swarm["servers"]] == [(0, 2), (2, 4)]

    assert hub.downloads("node-0-2") == TINY_META | shards(2, 3)
    assert hub.downloads("node-2-4") == TINY_META | shards(4, 5)
    assert hub.downloads("gateway-prefetch") == TINY_META | shards(1, 6)
    assert hub.requests("gateway") == []  # offline: all from its cache
    assert f"downloading blocks 2:4 of org/gated (revision {sha}): 2 files" in node_log


def test_a_model_that_cannot_be_had_stops_the_command_with_one_line(
    hub: FakeHub, tmp_path: Path
) -> None:
    peers = ["--initial-peers", UNUSED_PEER]
    cases = {
        "gated, no token": (
            ["node", "--model", "org/gated", "--blocks", "0:2", *peers],
            hub_env(hub.endpoint("no-token"), tmp_path / "a"),
            "swarmgate node: org/gated (revision main) is gated and the Hugging Face Hub "
            "refused access (HTTP 401): set HF_TOKEN to the token of an account granted "
            "access to it",
        ),
        "missing revision": (
            ["gateway", "--model", "org/tiny", "--revision", "v9", *peers],
            hub_env(hub.endpoint("no-revision"), tmp_path / "b"),
            "swarmgate gateway: org/tiny has no revision 'v9' on the Hugging Face Hub",
        ),
        "offline, never downloaded": (
            ["gateway", "--model", "org/tiny", *peers],
            hub_env(hub.endpoint("offline"), tmp_path / "c", offline=True),
            f"swarmgate gateway: org/tiny (revision main) is not in the Hugging Face cache "
            f"{tmp_path / 'c' / 'hub'} and offline mode is on (HF_HUB_OFFLINE=1): download it "
            "once with network access",
        ),
    }
    started = {
        case: subprocess.Popen(
            [sys.executable, "-m", "swarmgate", *argv],
            cwd=REPO,
            env={**os.environ, RUN_MARKER: RUN_ID, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (argv, env, _) in cases.items()
    }
    for case, process in started.items():
        try:
            _, stderr = process.communicate(timeout=120)
        finally:
            process.kill()
        expected = cases[case][2]
        assert process.returncode == 1, f"{case}: exit {process.returncode}\n{stderr}"
        assert stderr.strip().splitlines()[-1] == expected, f"{case}:\n{stderr}"
        assert "Traceback" not in stderr, f"{case}:\n{stderr}"
    assert hub.downloads("no-token") == set()
    assert hub.requests("offline") == []
