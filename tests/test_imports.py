"""Imports run one way: no import cycle between the modules of distillguard, nor between its
subpackages, and every module imports on its own in a fresh interpreter, in either order.

The graph is grimp's (the import graph library behind import-linter): it reads every import
statement, those inside functions included, so a cycle hidden behind a lazy import counts too.
Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import grimp
import networkx as nx
import pytest

PACKAGE = "distillguard"
IN_ENGINE_ENV = {"distillguard.integrations.vllm": "vllm"}  # module -> the engine it needs


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    imports = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True)
    g = nx.DiGraph()
    g.add_nodes_from(imports.modules)
    for module in imports.modules:
        for imported in imports.find_modules_directly_imported_by(module):
            g.add_edge(module, imported)
    return g


def _cycles(g: nx.DiGraph) -> list[list[str]]:
    """Each strongly connected component of more than one module, as one example cycle."""
    out = []
    for component in nx.strongly_connected_components(g):
        if len(component) > 1:
            cycle = nx.find_cycle(g.subgraph(component))
            out.append([a for a, _ in cycle] + [cycle[-1][1]])
    return out


def test_the_cycle_finder_finds_a_cycle():
    g = nx.DiGraph([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])
    assert [sorted(set(c)) for c in _cycles(g)] == [["a", "b", "c"]]


def test_no_import_cycle_between_modules(graph):
    assert len(graph) > 50  # the whole package was read
    cycles = [" -> ".join(c) for c in _cycles(graph)]
    assert not cycles, "import cycles (move the shared part into a module both import):\n" + (
        "\n".join(cycles)
    )


def test_no_import_cycle_between_subpackages(graph):
    top = nx.DiGraph()
    for a, b in graph.edges:
        pa, pb = (".".join(m.split(".")[:2]) for m in (a, b))
        if pa != pb:
            top.add_edge(pa, pb)
    cycles = [" -> ".join(c) for c in _cycles(top)]
    assert not cycles, "subpackages import each other:\n" + "\n".join(cycles)


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_a_fresh_interpreter(graph, order):
    # a module that runs inside another engine's environment (vLLM's, tests/integrations)
    modules = sorted(
        m
        for m in graph
        if not m.endswith("__main__")
        and not (m in IN_ENGINE_ENV and importlib.util.find_spec(IN_ENGINE_ENV[m]) is None)
    )
    if order == "reversed":
        modules.reverse()
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, *modules], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
