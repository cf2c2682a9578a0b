"""The packages import one another only down the layers of docs/ARCHITECTURE.md.

Every ``.py`` file of every package is parsed (nothing is imported, so this runs in a blink
and in ``make check``), and every import in it counts: ``import x``, ``from x import y``,
relative imports, imports inside functions or under ``if TYPE_CHECKING:``, and
``importlib.import_module("x")`` with a literal name. An import of a package that its layer
may not use fails here with the file and line that made it.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What each package may import besides itself: the layers of docs/ARCHITECTURE.md, from the
# bottom up. Keep the two in step.
ALLOWED: dict[str, frozenset[str]] = {
    "protocol": frozenset(),
    "routing": frozenset({"protocol"}),
    "swarm_dht": frozenset({"protocol", "routing"}),
    "models": frozenset({"protocol"}),
    "swarm_node": frozenset({"protocol", "routing", "swarm_dht", "models"}),
    "client": frozenset({"protocol", "routing", "swarm_dht"}),
    "gateway": frozenset({"protocol", "routing", "swarm_dht", "models", "client"}),
    "training": frozenset({"protocol", "models", "client"}),
    "swarmgate": frozenset(
        {
            "protocol",
            "routing",
            "swarm_dht",
            "models",
            "swarm_node",
            "client",
            "gateway",
            "training",
        }
    ),
}


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in a module's syntax tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                yield node.lineno, node.module
            else:  # relative: from the module's own package, `level - 1` packages up
                parts = module.split(".") if is_package else module.split(".")[:-1]
                base = parts[: len(parts) - (node.level - 1)]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def package_imports(package: str) -> dict[str, list[tuple[str, str]]]:
    """Other first-party packages that ``package`` imports → where (``file:line``) and
    which module."""
    edges: dict[str, list[tuple[str, str]]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT)
        is_package = path.name == "__init__.py"
        module = ".".join(relative.with_suffix("").parts[: -1 if is_package else None])
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(relative))
        for line, name in imported_modules(tree, module, is_package):
            top = name.split(".")[0]
            if top in ALLOWED and top != package:
                edges.setdefault(top, []).append((f"{relative}:{line}", name))
    return edges


GRAPH = {package: package_imports(package) for package in ALLOWED}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that returns to its start, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return [*path[path.index(child) :], child]
            if child not in state and (found := visit(child, [*path, child])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_map_names_every_package_that_is_installed() -> None:
    """A new top-level package gets a layer here (and in docs/ARCHITECTURE.md) first."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.removesuffix("*") for pattern in include} == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    forbidden = {
        other: where for other, where in GRAPH[package].items() if other not in ALLOWED[package]
    }
    assert not forbidden, (
        f"{package}/ may import only {sorted(ALLOWED[package]) or 'none of our packages'} "
        f"(docs/ARCHITECTURE.md), but imports: "
        + "; ".join(
            f"{other} at {', '.join(where for where, _ in found)}"
            for other, found in sorted(forbidden.items())
        )
    )


def test_there_is_no_import_cycle_between_packages() -> None:
    assert cycle({package: set(edges) for package, edges in GRAPH.items()}) is None
    assert cycle({package: set(allowed) for package, allowed in ALLOWED.items()}) is None


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_every_kind_of_import_is_seen() -> None:
    source = (
        "import routing.planner\n"
        "from protocol import rpc\n"
        "from . import sibling\n"
        "from ..models import loading\n"
        "def late():\n"
        "    import gateway.app\n"
        "    importlib.import_module('training.trainer')\n"
        "if TYPE_CHECKING:\n"
        "    from swarm_node.handler import BlockHandler\n"
    )
    found = [name for _, name in imported_modules(ast.parse(source), "pkg.sub.mod", False)]
    assert sorted(found) == sorted(
        [
            "routing.planner",
            "protocol",
            "pkg.sub",
            "pkg.models",
            "gateway.app",
            "training.trainer",
            "swarm_node.handler",
        ]
    )


# Inside the gateway: its four packages import one another only downwards; the modules at
# its root that they share (metrics, settings) import none of them. `app.py`, the
# composition root, may import anything.
GATEWAY_ALLOWED: dict[str, frozenset[str]] = {
    "engine": frozenset(),
    "openai": frozenset({"engine"}),
    "responses": frozenset({"openai", "engine"}),
    "web": frozenset({"responses", "openai", "engine"}),
    "metrics": frozenset(),
    "settings": frozenset(),
}


def gateway_imports(part: str) -> list[tuple[str, str]]:
    """(file:line, imported gateway part) of every import of another gateway part in
    ``gateway/<part>`` (a package, or a module at the gateway's root)."""
    folder = ROOT / "gateway" / part
    paths = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]
    found = []
    for path in paths:
        relative = path.relative_to(ROOT)
        is_package = path.name == "__init__.py"
        module = ".".join(relative.with_suffix("").parts[: -1 if is_package else None])
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(relative))
        for line, name in imported_modules(tree, module, is_package):
            parts = name.split(".")
            if parts[0] == "gateway" and len(parts) > 1 and parts[1] != part:
                found.append((f"{relative}:{line}", parts[1]))
    return found


def test_the_gateway_map_names_every_part_of_the_gateway() -> None:
    parts = {
        path.stem if path.is_file() else path.name
        for path in (ROOT / "gateway").iterdir()
        if (path.suffix == ".py" and path.stem not in ("__init__", "app"))
        or (path.is_dir() and (path / "__init__.py").exists())
    }
    assert parts == set(GATEWAY_ALLOWED)


@pytest.mark.parametrize("part", sorted(GATEWAY_ALLOWED))
def test_a_gateway_package_imports_only_the_packages_below_it(part: str) -> None:
    shared = {"metrics", "settings"}
    allowed = GATEWAY_ALLOWED[part] | (shared if part not in shared else frozenset())
    forbidden = [(where, other) for where, other in gateway_imports(part) if other not in allowed]
    assert not forbidden, (
        f"gateway/{part} may import only {sorted(allowed) or 'no other gateway part'} "
        "(docs/ARCHITECTURE.md, inside the gateway), but imports: "
        + "; ".join(f"{other} at {where}" for where, other in forbidden)
    )
