"""API keys and the Redis URL stay off command lines, which every user of a machine sees."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from models.resolve import ModelSource
from swarmgate.cli import build_parser
from swarmgate.commands import api_keys
from swarmgate.local_swarm import LocalSwarm


def test_up_hands_secrets_to_its_gateway_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SWARMGATE_API_KEY", raising=False)
    args = build_parser().parse_args(
        ["up", "--api-key", "sk-one", "--api-key", "sk-two", "--redis-url", "redis://:pw@db/0"]
    )
    swarm = LocalSwarm(ModelSource(name="m", path=tmp_path), args)
    swarm.key_file = tmp_path / "swarm.key"
    argv = " ".join(swarm._gateway_flags() + swarm._node_flags())
    env = swarm._child_env(gateway=True)
    assert "sk-one" not in argv and "pw@db" not in argv and "swarm.key" not in argv
    assert api_keys(env["SWARMGATE_API_KEY"].split(), None) == ("sk-one", "sk-two")
    assert env["REDIS_URL"] == "redis://:pw@db/0"
    assert env["SWARMGATE_SWARM_KEY"] == str(swarm.key_file)
    monkeypatch.setenv("SWARMGATE_HOST_MADDRS", "/ip4/0.0.0.0/tcp/31337")  # as in the image
    node_env = swarm._child_env()
    assert "SWARMGATE_HOST_MADDRS" not in node_env, "two nodes would fight over one port"
    assert node_env["SWARMGATE_SWARM_KEY"] == str(swarm.key_file)
    assert "SWARMGATE_API_KEY" not in node_env and "REDIS_URL" not in node_env


def test_the_gateway_reads_keys_and_redis_from_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SWARMGATE_API_KEY", "sk-one sk-two")
    monkeypatch.setenv("REDIS_URL", "redis://:pw@db/0")
    args = build_parser().parse_args(["gateway", "--initial-peers", "x"])
    assert api_keys(args.api_key, args.api_key_file) == ("sk-one", "sk-two")
    assert args.redis_url == "redis://:pw@db/0"


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, False), (0o600, False)])
def test_a_key_file_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# team\nsk-file\n")
    keys.chmod(mode)
    with caplog.at_level(logging.WARNING):
        assert api_keys([], str(keys)) == ("sk-file",)
    assert ("every user of this machine" in caplog.text) is warned
    assert "sk-file" not in caplog.text


def test_up_shares_the_machines_cores_among_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    swarm = LocalSwarm(ModelSource(name="m", path=tmp_path), build_parser().parse_args(["up"]))
    swarm.computing = 3  # two nodes and the gateway
    assert swarm._child_env()["OMP_NUM_THREADS"] == "5"
    swarm.computing = 40
    assert swarm._child_env()["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the operator's choice wins
    assert swarm._child_env()["OMP_NUM_THREADS"] == "7"
