"""The package's structure: no module of sn_kernels takes part in an import cycle.

Imports inside functions count too (a lazy import used to dodge a cycle is still a cycle).
A package's own ``__init__`` is not counted as imported by its submodules (Python runs it
first, but nothing in it depends on them being loaded)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sn_kernels"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The sn_kernels modules ``path`` imports, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:  # "from . import x": the submodule x; "from .m import f": the module m
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


# compiled extensions (setup.py builds them from csrc/): modules that import nothing of the package, so
# ``from .. import _C`` is an edge to them, not to the package's ``__init__``
EXTENSIONS = {"sn_kernels._C"}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {_module_name(p) for p in files} | EXTENSIONS
    return {**{_module_name(p): _imports(p, modules) for p in files}, **{m: set() for m in EXTENSIONS}}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    """The checker itself can fail: a planted two-module cycle is reported."""
    graph = import_graph()
    graph["sn_kernels.backends.contract"] = graph["sn_kernels.backends.contract"] | {"sn_kernels.functional"}
    assert ["sn_kernels.backends.contract", "sn_kernels.functional"] in [
        [m for m in c if m in ("sn_kernels.backends.contract", "sn_kernels.functional")] for c in cycles(graph)]
