"""The package's import graph follows the architecture: imports point down the layers (README,
Layout), engines do not import each other, and no module imports itself back through others.
Every import statement counts, also those inside functions."""
import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("graphgrow", "passes")

#: (layer, module prefixes), lowest first; the longest matching prefix decides
LAYERS = [
    (1, ["graphgrow.errors", "graphgrow.spec", "graphgrow.specyaml", "graphgrow.ir", "graphgrow.init", "graphgrow.ops"]),
    (2, ["graphgrow.compiler", "graphgrow"]),  # the package's own __init__ is the core + compiler API
    (3, ["passes"]),
    (4, ["graphgrow.runtime"]),
    (5, ["graphgrow.sensli", "graphgrow.mgopt", "graphgrow.precond", "graphgrow.frobenius", "graphgrow.rmntr"]),
    (6, ["graphgrow.cli", "graphgrow.__main__"]),
]
ENGINES = ["graphgrow.sensli", "graphgrow.mgopt", "graphgrow.precond", "graphgrow.rmntr"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer(name: str) -> int:
    matches = [(len(prefix), number) for number, prefixes in LAYERS for prefix in prefixes if within(name, prefix)]
    assert matches, f"module {name} is in no layer: add it to LAYERS"
    return max(matches)[1]


def engine(name: str) -> str | None:
    return next((e for e in ENGINES if within(name, e)), None)


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``
    when ``sub`` is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known)
    return found - {name}


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    found = modules()
    g = nx.DiGraph()
    g.add_nodes_from(found)
    for name, path in found.items():
        g.add_edges_from((name, target) for target in imports(name, path, set(found)))
    return g


def test_every_module_is_in_a_layer(graph):
    for name in graph:
        layer(name)


def test_imports_point_down_the_layers(graph):
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, b in graph.edges if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_engines_do_not_import_each_other(graph):
    crossing = [f"{a} imports {b}" for a, b in graph.edges
                if engine(a) and engine(b) and engine(a) != engine(b)]
    assert not crossing, "\n".join(crossing)


def test_the_import_graph_has_no_cycle(graph):
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "\n".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_the_checker_resolves_relative_lazy_and_submodule_imports(tmp_path):
    source = tmp_path / "ir.py"
    source.write_text("from . import ops\n"
                      "def late():\n    from .runtime.train import Trainer\n    import passes.insert\n")
    known = {"graphgrow.ops", "graphgrow.runtime.train", "passes.insert", "graphgrow.spec"}
    assert imports("graphgrow.ir", source, known) == {"graphgrow.ops", "graphgrow.runtime.train", "passes.insert"}
    assert layer("graphgrow.runtime.train") > layer("graphgrow.ir") > layer("graphgrow.ops.base") - 1
    assert layer("graphgrow.compiler.io") == 2 and layer("graphgrow.sensli.growth") == 5
