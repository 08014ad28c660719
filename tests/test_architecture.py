"""The package's import structure: no cycle between modules or packages, and imports that run down the layers.

The graph is read from the source with ``ast``: every import counts, the ones inside functions too (a lazy import
still ties two modules together), and relative imports are resolved. ``docs/architecture.md`` draws the same
layers; change both together.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import resnetlab

SRC = Path(resnetlab.__file__).resolve().parent.parent
ROOT = "resnetlab"

# Bottom to top. A unit (a sub-package of resnetlab, or a top-level module) may import units of its own layer (as long
# as no cycle forms) and of the layers below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("_version", "errors", "utils", "config"),
    ("hardware",),
    ("models", "data", "evaluation", "recipes"),
    ("checkpoint",),
    ("engine", "reporting"),
    ("deployment",),
    ("jobs",),
    ("bench", "tuning"),
    ("api",),
    ("cli",),
    ("__main__", "resnetlab"),  # "resnetlab": the package's own __init__, the public face (lazily, the api)
]
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module
    file: str
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line} ({self.source} imports {self.target})"


def collect_modules() -> dict[str, tuple[Path, bool]]:
    modules = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


MODULES = collect_modules()


def _resolve(name: str) -> str | None:
    """The module that defines ``name`` (a module, or a name inside one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def collect_imports() -> list[Import]:
    imports = []
    for module, (path, is_package) in MODULES.items():
        package = module if is_package else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                # `from a.b import c`: c is a module of a.b or a name defined in a.b
                targets = [f"{name}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target != ROOT and not target.startswith(ROOT + "."):
                    continue
                resolved = _resolve(target)
                if resolved and resolved != module:
                    imports.append(Import(module, resolved, str(path.relative_to(SRC.parent)), node.lineno))
    return imports


IMPORTS = collect_imports()


def unit(module: str) -> str:
    """The layer unit of a module: ``resnetlab.data.formats.cifar`` -> ``data``; ``resnetlab`` -> ``resnetlab``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one node (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def describe_cycle(component: list[str], edges: list[Import], key) -> str:
    members = set(component)
    ties = sorted({imp.where() for imp in edges if key(imp.source) in members and key(imp.target) in members
                   and key(imp.source) != key(imp.target)})
    return " <-> ".join(component) + ", through:\n    " + "\n    ".join(ties)


def test_the_graph_is_read():
    assert len(MODULES) > 50 and len(IMPORTS) > 100
    assert {unit(m) for m in MODULES} <= set(LAYER_OF), (
        f"units without a layer (add them to LAYERS and docs/architecture.md): {sorted({unit(m) for m in MODULES} - set(LAYER_OF))}")


def test_no_cycle_between_modules():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        graph[imp.source].add(imp.target)
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles between modules:\n" + "\n".join(
        describe_cycle(c, IMPORTS, lambda m: m) for c in cycles)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for imp in IMPORTS:
        if unit(imp.source) != unit(imp.target):
            graph.setdefault(unit(imp.source), set()).add(unit(imp.target))
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles between packages:\n" + "\n".join(
        describe_cycle(c, IMPORTS, unit) for c in cycles)


def test_imports_run_down_the_layers():
    upward = [imp for imp in IMPORTS if LAYER_OF.get(unit(imp.target), -1) > LAYER_OF.get(unit(imp.source), -1)]
    assert not upward, "imports against the layer order (a lower layer importing a higher one):\n" + "\n".join(
        f"  {imp.where()}: {unit(imp.source)} (layer {LAYER_OF.get(unit(imp.source))}) -> {unit(imp.target)} "
        f"(layer {LAYER_OF.get(unit(imp.target))})" for imp in upward)


# Pairs the layer order allows but the design does not: serving must not need the training code, and the data
# path must not need the engine that consumes it.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "deployment": ("engine", "jobs"),
    "data": ("engine",),
}


def test_forbidden_imports():
    bad = [imp for imp in IMPORTS if unit(imp.target) in FORBIDDEN.get(unit(imp.source), ())]
    assert not bad, "imports the design rules out:\n" + "\n".join(
        f"  {imp.where()}: {unit(imp.source)} must not import {unit(imp.target)}" for imp in bad)
