"""The layers import one way and no module import cycle exists (lazy, function-level imports included).

Layers, lowest first (a module may import its own layer and the ones below, never above):

0. genpath's base: the tensor contract, I/O, tissue, tiling, the generic slide engine
   (``genpath.wsi``), configs, utils.
1. ``normalization``, ``augment``, ``genpath.models``, ``genpath.encoders``, ``genpath.metrics``.
2. ``genpath.pipelines``, ``genpath.translation``.
3. ``genpath.training``, ``genpath.apps``, ``genpath.synth``, ``genpath.synth_masks`` (command implementations).
4. ``genpath.cli``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("genpath", "normalization", "augment")
LAYERS = [
    ("genpath.cli", 4),
    ("genpath.training", 3), ("genpath.apps", 3), ("genpath.synth", 3), ("genpath.synth_masks", 3),
    ("genpath.synth_shards", 3),
    ("genpath.pipelines", 2), ("genpath.translation", 2),
    ("normalization", 1), ("augment", 1), ("genpath.models", 1), ("genpath.encoders", 1), ("genpath.metrics", 1),
    ("genpath", 0),
]


def layer(module: str) -> int:
    for prefix, number in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return number
    raise AssertionError(f"no layer for {module}")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (top level, functions, TYPE_CHECKING blocks included)."""
    found = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}


def test_every_module_has_a_layer():
    for name in GRAPH:
        layer(name)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_go_down_the_layers(name):
    upward = sorted(m for m in GRAPH[name] if layer(m) > layer(name) and not name.startswith(m + "."))
    assert not upward, f"{name} (layer {layer(name)}) imports higher layers: {upward}"


def test_base_engine_config_and_translation_never_import_normalization_or_augment():
    for name, targets in GRAPH.items():
        if name.startswith(("genpath.wsi", "genpath.config", "genpath.translation", "genpath.io", "genpath.utils")):
            bad = sorted(t for t in targets if t.split(".")[0] in ("normalization", "augment"))
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph: every component is one module.

    A package's ``__init__`` re-exporting its own submodules is not a cycle (submodule -> parent
    package edges are the interpreter's, not the code's), so edges from a module to a package
    that contains it are left out.
    """
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"
