"""Imports point inward: no package imports one that imports it back, and the core is pure.

Every module of ``ledger``, ``coordinator``, ``shard_router`` and ``clients`` is parsed (not
imported) and each import, at any depth of the module (imports inside functions count too),
becomes an edge between packages. The packages are the top-level ones, with the rings inside
``ledger`` that others may use on their own: ``ledger.core`` (the pure rules),
and ``ledger.runtime`` (task supervision, failpoints, clock); the generated stubs are the
client distribution's ``ledgerpb``. The test fails on:

- a cycle of packages (``coordinator`` importing ``ledger.owner`` while ``ledger`` imports
  ``coordinator`` was one; ports are declared by the side that uses them instead);
- ``ledger.core`` importing anything outside itself and the standard library (no grpc,
  cassandra, etcd, generated ``*_pb2``), except the pure libraries in ``CORE_LIBRARIES``;
- ``ledger.runtime`` importing anything outside itself and the standard library;
- a call of ``decide`` or ``evolve`` outside the core (``ledger.core.step`` is the only loop).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ledger", "coordinator", "shard_router", "clients")
# Rings of ``ledger`` that count as packages of their own, innermost first.
RINGS = ("ledger.core", "ledger.runtime")

# Edges known to go, each with who removes it. An entry here is not a licence: it names a
# module pair whose move is under way, so that this test guards everything else meanwhile.
# (None now: the bench harness left the product package for ``clients/bench``.)
MOVING: set[tuple[str, str]] = set()

# Third-party libraries the core may use: pure functions, no I/O, no threads, no state.
# orjson: the journal encoder on every append (``ledger.core.codec``), for its C speed.
# rbloom: the filters of spilled idempotency keys (``ledger.core.spilled``).
CORE_LIBRARIES = {"orjson", "rbloom"}


def package_of(module: str) -> str | None:
    """The package (graph node) a module belongs to, or None for a module outside them."""
    for ring in RINGS:
        if module == ring or module.startswith(ring + "."):
            return ring
    top = module.split(".")[0]
    return top if top in PACKAGES else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[str]:
    """Every module ``path`` imports (absolute names), at any depth of the module."""
    module = module_name(path)
    is_package = path.name == "__init__.py"
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append(name)
            # ``from package import module`` imports that module.
            found.extend(f"{name}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def package_edges() -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(importing package, imported package) -> the module pairs that make the edge."""
    edges: dict[tuple[str, str], list[tuple[str, str]]] = {}
    known = modules()
    for module, path in known.items():
        source = package_of(module)
        for imported in imports_of(path):
            target = package_of(imported)
            if target is None or target == source:
                continue
            if (module, target) in MOVING:
                continue
            edges.setdefault((source, target), []).append((module, imported))
    return edges


def cycles(edges) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_parser_sees_the_imports_it_must():
    edges = package_edges()
    assert ("ledger", "coordinator") in edges      # the server runs the coordinator
    assert ("coordinator", "ledger.core") in edges
    assert package_of("ledger.core.shard") == "ledger.core"
    assert package_of("ledger.owner") == "ledger"
    assert package_of("grpc") is None


def test_no_package_imports_one_that_imports_it_back():
    edges = package_edges()
    found = cycles(edges)
    detail = []
    for component in found:
        for (a, b), pairs in sorted(edges.items()):
            if a in component and b in component:
                detail.append(f"{a} -> {b}: " + ", ".join(f"{m} imports {i}"
                                                          for m, i in pairs[:3]))
    assert not found, "package cycles:\n" + "\n".join(detail)


def _outside(ring: str, allowed: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    stdlib = sys.stdlib_module_names | allowed
    bad = []
    for module, path in modules().items():
        if package_of(module) != ring:
            continue
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if top == "__future__" or top in stdlib or package_of(imported) == ring:
                continue
            bad.append(f"{module} imports {imported}")
    return bad


def test_the_core_imports_only_itself_and_the_standard_library():
    assert not _outside("ledger.core", allowed=CORE_LIBRARIES)


def test_the_runtime_imports_only_itself_and_the_standard_library():
    assert not _outside("ledger.runtime")


def test_only_the_core_step_decides_and_evolves():
    """``ledger.core.step`` is the one decide-then-evolve loop and the one replay fold: no
    module outside the core (tests included) calls ``decide`` or ``evolve`` itself."""
    calls = []
    for folder in (*PACKAGES, "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_relative_to(ROOT / "ledger" / "core"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("decide", "evolve")):
                    calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not calls, f"decide/evolve called outside ledger.core: {calls}"
