"""The package layering stays as docs/architecture.md draws it, read from the source with `ast` (no import
runs): the model never imports training, serving or the engines; no two modules, and no two packages,
import each other (directly or around a cycle). Function-level imports count: a lazy import is still a
dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dsmtp"

# The parts of dsmtp.parallel the model's layers call (process groups and the tensor- and sequence-parallel
# regions); the rest of dsmtp.parallel (engines, pipeline, expert dispatch, collectives) builds on the model.
PARALLEL_PRIMITIVES = {"dsmtp.parallel.topology", "dsmtp.parallel.tensor", "dsmtp.parallel.sequence",
                       "dsmtp.parallel.vocab", "dsmtp.parallel.flat"}


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports() -> dict[str, set[str]]:
    """Each dsmtp module -> the dsmtp modules it imports anywhere in its source."""
    names = module_names()

    def resolve(name: str) -> str:
        while name not in names:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "dsmtp"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "dsmtp":
                    found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in names else resolve(base) for a in node.names}
        graph[name] = found - {name}
    return graph


def package(module: str) -> str:
    """The layer a module belongs to: its dsmtp subpackage (dsmtp.parallel split in two), or itself."""
    if module in PARALLEL_PRIMITIVES:
        return "dsmtp.parallel (groups and regions)"
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return imports()


def test_the_graph_sees_the_imports_it_checks(graph):
    """The reader finds known edges (a broken reader would pass every rule below)."""
    assert "dsmtp.model.fp8" in graph["dsmtp.model.kernels"]
    assert "dsmtp.train.distributed" in graph["dsmtp.train.command"]
    assert "dsmtp.parallel.deepspeed_engine" in graph["dsmtp.parallel.rank"]  # a function-level import
    assert "dsmtp.model" in graph["dsmtp.parallel.native_engine"]  # `from dsmtp.model import DeepSeekV3`


def test_the_model_imports_only_config_and_the_parallel_primitives(graph):
    allowed = {"dsmtp.config"} | PARALLEL_PRIMITIVES
    for module, targets in graph.items():
        if package(module) == "dsmtp.model":
            outside = {t for t in targets if package(t) != "dsmtp.model" and t not in allowed}
            assert not outside, f"{module} imports {sorted(outside)}: the model must not depend on training, " \
                                "serving, data, checkpoints or the engines"


def test_the_parallel_primitives_do_not_import_the_model(graph):
    for module in PARALLEL_PRIMITIVES:
        assert not {t for t in graph[module] if package(t) == "dsmtp.model"}, module


def test_no_import_cycles_between_modules(graph):
    assert cycles(graph) == []


def test_no_import_cycles_between_packages(graph):
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(package(module), set()).update(package(t) for t in targets)
    for name, targets in packages.items():
        targets.discard(name)
    assert cycles(packages) == []
