"""A gateway reachable from the network without API keys must be asked for (--allow-open),
and the API key file may give a key its own cap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.web.auth import KeyFileError, is_loopback, read_key_lines
from models.resolve import ModelSource
from swarmgate.cli import build_parser, main
from swarmgate.commands import check_exposure, read_api_keys
from swarmgate.local_swarm import LocalSwarm

PEER = "/ip4/10.0.0.1/tcp/31337/p2p/QmPeer"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SWARMGATE_"):
            monkeypatch.delenv(name)


def refusal(argv: list[str]) -> str:
    """The one line a refused start exits with (its exit status is 1)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert isinstance(exited.value.code, str), exited.value.code
    return exited.value.code


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_nothing(host: str) -> None:
    assert is_loopback(host)
    check_exposure("gateway", host, (), allow_open=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.example.com", ""])
def test_any_other_address_needs_keys_or_allow_open(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(SystemExit) as refused:
        check_exposure("gateway", host, (), allow_open=False)
    message = str(refused.value.code)
    assert "\n" not in message
    assert message.startswith(f"swarmgate gateway: refusing to serve the API on {host} ")
    assert "API keys" in message and "--allow-open" in message
    check_exposure("gateway", host, ("sk-a",), allow_open=False)
    check_exposure("gateway", host, (), allow_open=True)


@pytest.mark.parametrize("command", ["gateway", "up"])
def test_the_cli_refuses_an_open_non_loopback_gateway_before_loading_anything(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was resolved before the check")

    monkeypatch.setattr("swarmgate.commands.model_source", no_model)
    extra = ["--initial-peers", PEER] if command == "gateway" else []
    message = refusal([command, "--host", "0.0.0.0", *extra])
    assert message.startswith(f"swarmgate {command}: refusing to serve the API on 0.0.0.0")
    monkeypatch.setenv("SWARMGATE_HOST", "0.0.0.0")  # as the image sets it
    assert "refusing" in refusal([command, *extra])


@pytest.mark.parametrize(
    ("env", "flags", "opens"),
    [
        ({}, ["--allow-open"], True),
        ({"SWARMGATE_ALLOW_OPEN": "1"}, [], True),
        ({"SWARMGATE_ALLOW_OPEN": "true"}, [], True),
        ({"SWARMGATE_ALLOW_OPEN": "0"}, [], False),
        ({"SWARMGATE_ALLOW_OPEN": ""}, [], False),
        ({}, [], False),
    ],
)
def test_allow_open_reads_its_flag_or_env(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], flags: list[str], opens: bool
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["gateway", "--initial-peers", PEER, *flags])
    assert args.allow_open is opens


class PastTheCheck(Exception):
    pass


def test_keys_from_the_environment_or_a_file_let_it_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def reached(*args: object) -> None:
        raise PastTheCheck

    monkeypatch.setattr("swarmgate.commands.model_source", reached)
    keys = tmp_path / "keys"
    keys.write_text("sk-file\n")
    keys.chmod(0o600)
    with pytest.raises(PastTheCheck):
        main(["gateway", "--host", "0.0.0.0", "--initial-peers", PEER, "--api-key-file", str(keys)])
    monkeypatch.setenv("SWARMGATE_API_KEY", "sk-env")
    with pytest.raises(PastTheCheck):
        main(["gateway", "--host", "0.0.0.0", "--initial-peers", PEER])
    with pytest.raises(PastTheCheck):
        main(["up", "--host", "0.0.0.0"])


def test_up_hands_allow_open_to_its_gateway(tmp_path: Path) -> None:
    args = build_parser().parse_args(["up", "--host", "0.0.0.0", "--allow-open"])
    swarm = LocalSwarm(ModelSource(name="m", path=tmp_path), args)
    assert "--allow-open" in swarm._gateway_flags()
    quiet = LocalSwarm(ModelSource(name="m", path=tmp_path), build_parser().parse_args(["up"]))
    assert "--allow-open" not in quiet._gateway_flags()


def test_a_refused_start_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    """As a container of the image starts without keys: SWARMGATE_HOST=0.0.0.0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMGATE_")}
    env |= {"SWARMGATE_HOST": "0.0.0.0", "SWARMGATE_INITIAL_PEERS": PEER}
    result = subprocess.run(
        [sys.executable, "-m", "swarmgate", "gateway"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("swarmgate gateway: refusing to serve the API on 0.0.0.0")
    assert "--allow-open" in line


# ---- the API key file ----


def test_plain_key_files_still_read_as_they_did() -> None:
    keys = read_key_lines(["# team keys", "", "  sk-one  ", "sk-two", "#sk-commented"])
    assert keys.keys == ("sk-one", "sk-two") and keys.limits == {}


def test_a_key_may_have_a_cap_of_its_own() -> None:
    keys = read_key_lines(
        ["sk-one max_concurrent=8", "sk-two   # the CI's key", "sk-3 max_concurrent=2 # small"]
    )
    assert keys.keys == ("sk-one", "sk-two", "sk-3")
    assert keys.limits == {"sk-one": 8, "sk-3": 2}


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("sk-secret max_concurrnet=8", "unknown setting 'max_concurrnet'"),
        ("sk-secret max_concurrent=0", "max_concurrent must be a whole number >= 1"),
        ("sk-secret max_concurrent=lots", "max_concurrent must be a whole number >= 1"),
        ("sk-secret second-word", "no NAME=VALUE"),
    ],
)
def test_a_bad_line_is_named_without_its_key(line: str, says: str) -> None:
    with pytest.raises(KeyFileError) as bad:
        read_key_lines(["# keys", line])
    assert str(bad.value).startswith("line 2: ") and says in str(bad.value)
    assert "sk-secret" not in str(bad.value)


def test_a_key_listed_twice_is_refused() -> None:
    with pytest.raises(KeyFileError, match="line 3: the key of line 1 again"):
        read_key_lines(["sk-a max_concurrent=2", "sk-b", "sk-a max_concurrent=9"])


def test_the_cli_reads_caps_and_stops_on_a_bad_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-a max_concurrent=3\nsk-b\n")
    keys.chmod(0o600)
    read = read_api_keys(["sk-flag", "sk-b"], str(keys))
    assert read.keys == ("sk-flag", "sk-b", "sk-a") and read.limits == {"sk-a": 3}
    keys.write_text("sk-a max_concurrent=many\n")
    with pytest.raises(SystemExit) as bad:
        read_api_keys([], str(keys))
    assert bad.value.code == (
        f"swarmgate gateway: --api-key-file {keys}: line 1: max_concurrent must be a whole "
        "number >= 1"
    )
    with pytest.raises(SystemExit, match="No such file"):
        read_api_keys([], str(tmp_path / "missing"))
