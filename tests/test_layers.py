"""The package's imports run one way: down the layers, without circles; the settings object is read
by the layers at the edges only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moleflow"

# Bottom to top; a module may import its own package and anything on a lower rank.
RANKS = {
    "data": 0, "utils": 0, "distributed": 0,
    "config": 1, "extractors": 1, "models": 1,
    "trainer": 2, "evaluation": 2,
    "build": 3, "experiment": 3, "checkpoint": 3, "resume": 3,
    "precompile": 4, "report": 4, "trained": 4,
    "predictor": 5,
    "predict": 6, "api": 6, "export": 6, "reevaluate": 6,
    "runner": 5,
    "run_groups": 5,
    "cli_main": 6, "benchmark": 6, "summarize": 6, "cache": 6, "sweep": 7,
}
CONFIG_FREE = ("data", "utils", "distributed", "extractors", "models", "trainer", "evaluation")  # take plain values


def _imports() -> dict[str, set[str]]:
    """moleflow module -> the moleflow modules it imports (at the top or inside a function)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[module] = {name for name in found if name.startswith("moleflow.")}
    return graph


def _part(module: str) -> str:
    return module.split(".")[1]


def test_every_part_of_the_package_has_a_layer() -> None:
    assert {_part(m) for m in _imports() if m != "moleflow"} == set(RANKS)


def test_imports_run_down_the_layers() -> None:
    upward = [f"{m} -> {n}" for m, names in _imports().items() if m != "moleflow" for n in names
              if _part(n) in RANKS and RANKS[_part(n)] > RANKS[_part(m)]]
    assert upward == []


def test_no_import_circles() -> None:
    graph = _imports()
    modules = {m: {n for n in names if n in graph and n != m} for m, names in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in modules[module]:
            assert state.get(nxt) != 1, " -> ".join([*path, module, nxt])
            if nxt not in state:
                visit(nxt, [*path, module])
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [])


def test_the_settings_object_is_read_at_the_edges() -> None:
    readers = [f"{m} -> {n}" for m, names in _imports().items() if m != "moleflow" and _part(m) in CONFIG_FREE
               for n in names if _part(n) == "config"]
    assert readers == []
