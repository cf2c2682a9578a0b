"""Each flag is declared once, on the settings field it fills where it fills one: its
variable and its flag give the same value, `swarmgate up` takes every node and gateway
flag that makes sense on one machine and hands it on, and what the README, the chart and
the Dockerfile name exists."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path

import pytest

from gateway.settings import GatewaySettings
from models.resolve import ModelSource
from swarm_node.settings import NodeSettings
from swarmgate import commands
from swarmgate.cli import build_parser
from swarmgate.flags import Flag, flag_fields
from swarmgate.local_swarm import BY_HAND, LocalSwarm
from swarmgate.options import COMMANDS, FLAGS, UP_GATEWAY, UP_NODE
from training.settings import FinetuneSettings

ROOT = Path(__file__).resolve().parents[3]
PEER = "/ip4/10.0.0.1/tcp/31337/p2p/QmPeer"
# Fields the command line fills from other flags (the model as resolved, the swarm key, the
# key file), and tunables that have never had a flag.
NOT_FLAGS = {
    NodeSettings: {"membership"},
    GatewaySettings: {
        "model_id",
        "model_path",
        "model_revision",
        "membership",
        "key_limits",
        "refresh_period_s",
        "max_refresh_period_s",
    },
    # The model as resolved, the peers and the key as every command reads them; the targets
    # as --targets resolves against the model; retries and call timeouts are tunables.
    FinetuneSettings: {
        "model_name",
        "model_path",
        "model_revision",
        "initial_peers",
        "membership",
        "targets",
        "max_retries",
        "call_timeout_s",
    },
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SWARMGATE_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


@pytest.mark.parametrize("settings", [NodeSettings, GatewaySettings, FinetuneSettings])
def test_every_settings_field_has_a_flag(settings: type) -> None:
    fields = {spec.name for spec in dataclasses.fields(settings)}
    assert set(flag_fields(settings)) == fields - NOT_FLAGS[settings]


@pytest.mark.parametrize("settings", [NodeSettings, GatewaySettings, FinetuneSettings])
def test_a_flag_filling_two_settings_has_one_default(settings: type) -> None:
    """--device, --namespace, ...: declared on a node's field, named on a gateway's."""
    for spec in dataclasses.fields(settings):
        if "flag" in spec.metadata:
            flag = FLAGS[spec.metadata["flag"]]
            own = spec.metadata.get("default", spec.default)
            if own is dataclasses.MISSING:  # a required flag
                assert flag.required and flag.default is None, (settings.__name__, spec.name)
                continue
            expected = (not flag.default) if flag.inverts else flag.default
            assert own == expected, (settings.__name__, spec.name)


def sample(flag: Flag) -> tuple[str, list[str]]:
    """A value for the flag other than its default: as its variable holds it, and as words
    on the command line."""
    if flag.switch:
        return "1", []
    if flag.choices:
        other = next(choice for choice in reversed(flag.choices) if choice != flag.default)
        return other, [other]
    if flag.words or flag.repeat:
        return "/a, /b", ["/a", "/b"]
    if flag.name == "--blocks":
        return "1:3", ["1:3"]
    if flag.name == "--device":
        return "cpu", ["cpu"]
    if isinstance(flag.default, float) or flag.parse is float:
        return "2.5", ["2.5"]
    if flag.parse is not str:
        return "3", ["3"]
    return "x", ["x"]


def given(flag: Flag) -> list[str]:
    words = sample(flag)[1]
    if flag.repeat:
        return [part for word in words for part in (flag.name, word)]
    return [flag.name, *words]


# What each command needs besides the flag under test.
NEEDS = {
    "keygen": ["f"],
    "issue": ["--role", "server", "f"],
    "finetune": ["--initial-peers", PEER, "--data", "d", "--out", "o"],
    **{command: ["--initial-peers", PEER] for command in ("revoke", "node", "gateway", "status")},
}


def needs(command: str, flag: Flag) -> list[str]:
    words = NEEDS.get(command, [])
    if flag.name in words:
        at = words.index(flag.name)
        return words[:at] + words[at + 2 :]
    return words


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_variable_and_its_flag_give_the_same_value(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for flag in COMMANDS[command]:
        if flag.env is None:
            continue
        base = [command, *needs(command, flag)]
        from_flag = getattr(build_parser().parse_args([*base, *given(flag)]), flag.dest)
        monkeypatch.setenv(flag.env, sample(flag)[0])
        from_env = getattr(build_parser().parse_args(base), flag.dest)
        monkeypatch.delenv(flag.env)
        if flag.required:
            base += [flag.name, PEER]
        unset = getattr(build_parser().parse_args(base), flag.dest)
        assert from_env == from_flag, flag.name
        assert from_env != unset, flag.name


def bad_start(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("SWARMGATE_MAX_QUEUE", "lots", "argument --max-queue: SWARMGATE_MAX_QUEUE='lots': "),
        ("SWARMGATE_SEND_TIMEOUT", "0", "SWARMGATE_SEND_TIMEOUT='0': must be above 0, got 0"),
        ("SWARMGATE_DEVICE", "gpu", "SWARMGATE_DEVICE='gpu': 'gpu' is not one of auto, cpu"),
        ("SWARMGATE_DTYPE", "fp8", "SWARMGATE_DTYPE='fp8': 'fp8' is not one of auto, float32"),
    ],
)
def test_a_bad_value_in_a_variable_names_it_and_its_flag(
    variable: str,
    value: str,
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)
    line = bad_start(["gateway", "--initial-peers", PEER], capsys)
    assert line.startswith("swarmgate gateway: error: argument --") and says in line


def test_a_bad_value_on_the_command_line_names_its_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = bad_start(["gateway", "--initial-peers", PEER, "--max-queue", "lots"], capsys)
    assert line == "swarmgate gateway: error: argument --max-queue: bad value 'lots'"
    line = bad_start(["up", "--max-concurrent-per-key", "0"], capsys)
    assert line.endswith("argument --max-concurrent-per-key: must be at least 1, got 0")


def test_a_flag_given_overrides_a_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARMGATE_MAX_QUEUE", "lots")
    args = build_parser().parse_args(["gateway", "--initial-peers", PEER, "--max-queue", "3"])
    assert args.max_queue == 3


def test_help_shows_each_default_and_variable() -> None:
    help_text = " ".join(flag.help_text() for flag in COMMANDS["gateway"])
    assert "(default: 1024; env SWARMGATE_DEFAULT_MAX_TOKENS)" in help_text
    assert "(default: 86400; env SWARMGATE_RESPONSE_TTL)" in help_text
    assert "(env REDIS_URL)" in help_text


# ---- swarmgate up ----


def test_up_takes_every_node_and_gateway_flag_but_each_processs_own() -> None:
    up = {flag.name for flag in COMMANDS["up"]}
    for settings in (NodeSettings, GatewaySettings):
        for name in flag_fields(settings).values():
            assert (name in up) is FLAGS[name].local, name
    for name in ("--max-concurrent-per-key", "--queue-timeout", "--drain-timeout", "--step-floor"):
        assert name in up
    for name in ("--blocks", "--host-maddrs", "--identity", "--metrics-port", "--ready-file"):
        assert name not in up


def up_with_every_flag(tmp_path: Path) -> tuple[argparse.Namespace, LocalSwarm]:
    """`up` given a value other than the default for each flag it hands on."""
    argv = ["up"]
    for flag in COMMANDS["up"]:
        if flag.name not in BY_HAND and flag.name not in ("--swarm-key", "--nodes"):
            argv += given(flag)
    args = build_parser().parse_args(argv)
    return args, LocalSwarm(ModelSource(name="m", path=tmp_path), args)


def test_up_hands_every_node_and_gateway_flag_to_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each value `up` was given reaches its children's settings, through their command
    lines or (secrets) their environment."""
    args, swarm = up_with_every_flag(tmp_path)
    swarm.key_file = tmp_path / "swarm.key"
    common = ["--model", "m", "--initial-peers", PEER]
    node = build_parser().parse_args(["node", *common, *swarm._node_flags()])
    for name, value in swarm._child_env(gateway=True).items():
        if name.startswith("SWARMGATE_") or name == "REDIS_URL":
            monkeypatch.setenv(name, value)
    gateway = build_parser().parse_args(["gateway", *common, *swarm._gateway_flags()])
    for child, flags in ((node, UP_NODE), (gateway, UP_GATEWAY)):
        for flag in flags:
            if flag.name not in BY_HAND:
                assert getattr(child, flag.dest) == getattr(args, flag.dest), flag.name
                assert getattr(args, flag.dest) != FLAGS[flag.name].default, flag.name
    assert "/a" not in " ".join(swarm._gateway_flags()), "API keys stay off command lines"


def test_up_passes_a_per_key_cap_to_its_gateway_and_not_its_nodes(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["up", "--max-concurrent-per-key", "3", "--drain-timeout", "4"]
    )
    swarm = LocalSwarm(ModelSource(name="m", path=tmp_path), args)
    gateway, node = swarm._gateway_flags(), swarm._node_flags()
    at = gateway.index("--max-concurrent-per-key")
    assert gateway[at + 1] == "3" and "--max-concurrent-per-key" not in node
    at = node.index("--drain-timeout")
    assert node[at + 1] == "4.0" and "--drain-timeout" not in gateway
    shared = {flag.name for flag in UP_NODE} & {flag.name for flag in UP_GATEWAY}
    assert shared == {"--device", "--dtype", "--namespace"}


def test_up_leaves_unset_flags_to_its_childrens_defaults(tmp_path: Path) -> None:
    args = build_parser().parse_args(["up"])
    swarm = LocalSwarm(ModelSource(name="m", path=tmp_path), args)
    assert "--max-concurrent-per-key" not in swarm._gateway_flags()
    assert "--cache-bytes" not in swarm._node_flags()
    assert "--no-push" not in swarm._gateway_flags()


# ---- what the docs and the deployment name ----

ELSEWHERE = {  # argparse's own, and flags of docker, kubectl, helm and ruff
    "--help",
    "--build-arg",
    "--check",
    "--from-file",
    "--no-healthcheck",
    "--set",
    "--target",
}
NOT_CLI = {"SWARMGATE_CACHE_DIR", "SWARMGATE_SIMULATED_RTT_MS", "SWARMGATE_TEST_DEVICE"}


def test_every_flag_the_readme_names_exists() -> None:
    flag = r"(?<![\w-])--[a-z][a-z0-9-]+"
    named = set(re.findall(flag, (ROOT / "README.md").read_text()))
    bench = {
        f for path in (ROOT / "bench").glob("*.py") for f in re.findall(flag, path.read_text())
    }
    unknown = named - ELSEWHERE - bench - set(FLAGS)
    assert not unknown, sorted(unknown)


def test_every_variable_the_docs_and_deployment_name_is_read() -> None:
    files = [ROOT / "README.md", ROOT / "Dockerfile", *(ROOT / "charts").rglob("*")]
    text = "".join(path.read_text() for path in files if path.is_file())
    named = set(re.findall(r"SWARMGATE_[A-Z_]+", text))
    variables = {flag.env for flag in FLAGS.values()}
    assert named - NOT_CLI <= variables, sorted(named - NOT_CLI - variables)


# ---- the settings the commands build ----


def test_a_node_gets_its_settings_from_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[NodeSettings] = []
    monkeypatch.setattr("swarm_node.node.run_node", built.append)
    monkeypatch.setenv("SWARMGATE_CACHE_TTL", "7")
    argv = ["node", "--initial-peers", PEER, "--blocks", "2:4", "--batch-prefill-tokens", "9"]
    commands.node(build_parser().parse_args([*argv, "--identity", "id.key", "--adapters", "a"]))
    (settings,) = built
    assert (settings.blocks, settings.prefill_per_batch, settings.cache_ttl_s) == ((2, 4), 9, 7.0)
    assert (settings.identity_path, settings.adapters) == ("id.key", ("a",))
    assert settings.initial_peers == (PEER,) and settings.membership is None
    assert settings.host_maddrs == NodeSettings(model="m").host_maddrs


def test_a_gateway_gets_its_settings_from_its_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[GatewaySettings] = []
    monkeypatch.setattr("gateway.app.create_app", built.append)
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: None)
    monkeypatch.setattr(
        "swarmgate.commands.model_source", lambda *args: ModelSource(name="m", path=tmp_path)
    )
    monkeypatch.setenv("SWARMGATE_API_KEY", "sk-a")
    argv = ["gateway", "--initial-peers", PEER, "--device", "cpu", "--no-push"]
    argv += ["--max-concurrent-per-key", "2", "--max-generation-seconds", "5", "--step-floor", "3"]
    commands.gateway(build_parser().parse_args(argv))
    (settings,) = built
    assert (settings.push, settings.affinity, settings.device) == (False, True, "cpu")
    assert (settings.max_concurrent_per_key, settings.max_generation_s) == (2, 5.0)
    assert (settings.step_floor_s, settings.api_keys, settings.model_id) == (3.0, ("sk-a",), "m")
