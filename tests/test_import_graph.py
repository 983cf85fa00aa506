"""The package's import graph has no cycles, and only the command line imports the command line.

Read statically (``ast``), without importing anything but the package's (empty) ``__init__``:
every ``import`` / ``from ... import`` anywhere in a module counts, at module level or inside a
function, class or ``try`` block (a deferred import is still a dependency; it only hides the cycle
until the function runs). Imports under ``if TYPE_CHECKING:`` do not count: they never run.

Rules, so a failure is reproducible by hand:

- ``import a.b.c`` and ``from a.b.c import x`` import module ``a.b.c``; ``from a.b import c``
  imports ``a.b.c`` too when ``c`` is a submodule (a file or package), else only ``a.b``.
  Relative imports are resolved against the importing module's package.
- Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``. Edges to a package
  (explicit or implied) count only when that package's ``__init__`` itself imports something in
  the package: an ``__init__`` that imports nothing here cannot close a cycle, and leaving it out
  keeps the report readable. An implied edge to a package that contains the importing module is
  left out as well: Python runs that ``__init__`` before the module, whatever the module imports.
- Only modules of the package are nodes; a module importing itself is not a cycle.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections import deque
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "cosmic_bake"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function
    implied: bool = False  # a parent package's __init__, run because a submodule is imported


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, lazy: bool = False):
    """(node, lazy) for every Import / ImportFrom, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for node in child.orelse:
                yield from _import_nodes(ast.Module(body=[node], type_ignores=[]), lazy)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, lazy
        inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _import_nodes(child, inner)


def imported_names(source: str, module: str, is_package: bool, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(module imported, line, lazy)`` for each import in ``source``, by the rules above.

    ``modules`` is the set of known module names, to tell ``from pkg import submodule`` from
    ``from pkg import attribute``. Names outside the package are returned too (filtered later).
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node, lazy in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, lazy) for alias in node.names]
            continue
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        found.append((target, node.lineno, lazy))
        for alias in node.names:
            if f"{target}.{alias.name}" in modules:
                found.append((f"{target}.{alias.name}", node.lineno, lazy))
    return found


@dataclass
class Graph:
    modules: dict[str, Path]  # module name -> file
    packages: set[str]
    edges: list[Edge]

    def adjacency(self) -> dict[str, set[str]]:
        adj: dict[str, set[str]] = {m: set() for m in self.modules}
        for e in self.edges:
            adj[e.source].add(e.target)
        return adj


def _package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{PACKAGE} is not importable"
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def package_graph() -> Graph:
    root = _package_root()
    modules: dict[str, Path] = {}
    packages: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        if "__pycache__" in rel.parts:
            continue
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
            packages.add(".".join(parts))
        modules[".".join(parts)] = path
    names = set(modules)
    raw: dict[str, list[tuple[str, int, bool]]] = {
        m: imported_names(p.read_text(encoding="utf-8"), m, m in packages, names) for m, p in modules.items()
    }

    def known(target: str) -> str | None:
        """The module a dotted import names (``a.b.attr`` of ``import a.b.attr`` cannot occur; be lenient)."""
        while target and target not in names:
            target = target.rpartition(".")[0]
        return target or None

    def in_package(name: str) -> bool:
        return name == PACKAGE or name.startswith(PACKAGE + ".")

    # a package __init__ counts as a node with edges into it only if it imports something here
    live_inits = {p for p in packages if any(in_package(t) for t, _, _ in raw[p])}
    edges: list[Edge] = []
    for module, found in raw.items():
        own_parents = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
        seen: set[tuple[str, int]] = set()
        for target, line, lazy in found:
            if not in_package(target):
                continue
            target = known(target)
            if target is None:
                continue
            parts = target.split(".")
            implied = [".".join(parts[:i]) for i in range(1, len(parts))]
            candidates = [(t, True) for t in implied if t not in own_parents] + [(target, False)]
            for t, is_implied in candidates:
                if t == module or (t in packages and t not in live_inits) or (t, line) in seen:
                    continue
                seen.add((t, line))
                edges.append(Edge(module, t, line, lazy, is_implied))
    return Graph(modules, packages, edges)


def strongly_connected(adj: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; only those of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(adj):
        if start in index:
            continue
        work = [(start, iter(sorted(adj[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(adj[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
    return sorted(found)


def _shortest_cycle(graph: Graph, component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as a list of modules (first repeated)."""
    members = set(component)
    adj = graph.adjacency()
    start = component[0]
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(adj[node] & members):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return component  # pragma: no cover - a component always has a cycle through each member


def _describe(graph: Graph, component: list[str]) -> str:
    members = set(component)
    cycle = _shortest_cycle(graph, component)
    lines = [f"cycle among {len(component)} modules: {', '.join(component)}", "  e.g. " + " -> ".join(cycle)]
    for e in sorted(graph.edges, key=lambda e: (e.source, e.line)):
        if e.source in members and e.target in members:
            how = "implied package" if e.implied else ("inside a function" if e.lazy else "module level")
            where = graph.modules[e.source].relative_to(_package_root().parent)
            lines.append(f"    {where}:{e.line}  {e.source} -> {e.target}  ({how})")
    return "\n".join(lines)


def _is_cli(module: str) -> bool:
    cli = f"{PACKAGE}.cli"
    return module == cli or module.startswith((cli + ".", cli + "_"))


def test_no_import_cycles() -> None:
    graph = package_graph()
    components = strongly_connected(graph.adjacency())
    assert not components, "import cycles (lazy imports count):\n" + "\n".join(_describe(graph, c) for c in components)


def test_only_the_command_line_imports_the_command_line() -> None:
    graph = package_graph()
    allowed = {f"{PACKAGE}.__main__"}
    bad = [
        f"{graph.modules[e.source].relative_to(_package_root().parent)}:{e.line}  {e.source} -> {e.target}"
        for e in graph.edges
        if _is_cli(e.target) and not _is_cli(e.source) and e.source not in allowed
    ]
    assert not bad, "modules outside the command line import it (the CLI calls the API, not back):\n" + "\n".join(
        sorted(bad)
    )


def test_the_graph_is_read() -> None:
    """The walk finds the package and the entry point module the console script names."""
    graph = package_graph()
    assert f"{PACKAGE}.cli" in graph.modules
    assert len(graph.modules) > 10
    assert graph.edges


def test_import_rules() -> None:
    """The rules of the module docstring, on a made-up module ``pkg.sub.mod``."""
    source = """
from __future__ import annotations
import os
import pkg.a.b
from typing import TYPE_CHECKING
from . import sibling, not_a_module
from .. import other
from ..a import b as bee

if TYPE_CHECKING:
    from pkg.typing_only import T
else:
    from pkg.runtime_only import R

def f():
    from pkg.lazy import g
    return g

class C:
    def m(self):
        import pkg.deep.inner
"""
    modules = {
        "pkg",
        "pkg.a",
        "pkg.a.b",
        "pkg.sub",
        "pkg.sub.sibling",
        "pkg.other",
        "pkg.typing_only",
        "pkg.runtime_only",
        "pkg.lazy",
        "pkg.deep.inner",
    }
    found = imported_names(source, "pkg.sub.mod", False, modules)
    by_name = {name: lazy for name, _, lazy in found}
    assert "pkg.typing_only" not in by_name
    assert by_name["pkg.runtime_only"] is False
    assert by_name["pkg.lazy"] is True and by_name["pkg.deep.inner"] is True
    assert by_name["pkg.a.b"] is False
    assert "pkg.sub" in by_name and "pkg.sub.sibling" in by_name and "pkg.sub.not_a_module" not in by_name
    assert "pkg.other" in by_name and "pkg" in by_name
    assert "os" in by_name
    # relative to a package's own __init__: ``from . import x`` is ``pkg.sub.x``
    init = imported_names("from . import sibling\n", "pkg.sub", True, modules)
    assert [n for n, _, _ in init] == ["pkg.sub", "pkg.sub.sibling"]


def test_cycles_are_found() -> None:
    adj = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d", "a"}, "e": set()}
    assert strongly_connected(adj) == [["a", "b", "c"]]
