"""The harnesses use the ledger only as a user or operator could.

Every module under ``clients/`` (the client library, and the tools built on it: workloads,
chaos drills, bench, deployment harness, local cluster) may import the generated gRPC stubs
and other ``clients`` modules, and nothing else of this repository. What a drill needs from
inside the ledger it gets from ``ledgerctl`` (run as a subprocess) or through the gRPC API.
This parses every module (imports inside functions included) and fails on any other import
of ``ledger``, ``shard_router``, ``coordinator`` or ``tests``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "clients"

# Top-level packages of this repository: an import of one of them is "ours".
OURS = ("clients", "ledger", "shard_router", "coordinator", "tests")
# What of ours ``clients/`` may import: itself. The client distribution's packages
# (``redledger_client`` and the generated stubs ``ledgerpb``, in ``clients/python``) are
# top-level packages of their own and not in ``OURS``: importing them is what a user does.
ALLOWED_PREFIXES = ("clients",)
# Imports known to break the rule, each with why it is tolerated for now (none).
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def import_statements(source: str, module: str,
                      is_package: bool = False) -> list[tuple[str, list[str]]]:
    """Every import statement in ``source`` as (module, names), relative imports resolved.

    ``import a.b`` is ``("a.b", [])``; ``from a.b import c, d`` is ``("a.b", ["c", "d"])``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def _allowed(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ALLOWED_PREFIXES)


def _ours(name: str) -> bool:
    return name.split(".")[0] in OURS


def violations(source: str, module: str, rel_path: str, is_package: bool = False) -> list[str]:
    """Imports of server internals in one module's source, one ``path: module`` line each."""
    out = set()
    for base, names in import_statements(source, module, is_package):
        if not _ours(base) or _allowed(base):
            continue
        # ``from clients import bank`` names an allowed module through its parent.
        if names and all(_allowed(f"{base}.{name}") for name in names):
            continue
        if (rel_path, base) in KNOWN_EXCEPTIONS:
            continue
        out.add(f"{rel_path}: {base}")
    return sorted(out)


def _modules() -> list[Path]:
    return sorted(p for p in CLIENTS.rglob("*.py") if "__pycache__" not in p.parts)


def test_there_are_modules_to_check():
    names = {_module_name(p) for p in _modules()}
    assert {"clients.python.redledger_client.client", "clients.chaos.drills", "clients.bench.cli",
            "clients.localcluster.cluster", "clients.harness"} <= names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_clients_module_imports_no_server_internals(path: Path):
    rel = str(path.relative_to(ROOT))
    found = violations(path.read_text(), _module_name(path), rel, _is_package(path))
    assert not found, ("clients/ may import only clients.* and the generated stubs "
                       "(ledgerpb, redledger_client); use ledgerctl --json or the gRPC API instead:\n"
                       + "\n".join(found))


def test_the_check_sees_internal_imports_anywhere():
    source = (
        "import ledger.store.cassandra\n"
        "from shard_router.hashing import shard_of\n"
        "def f():\n"
        "    from ledger import reconcile\n"
        "    from coordinator.coordinator import Coordinator\n"
        "from ledgerpb import ledger_pb2\n"
        "from clients.bank import BankWorkload\n"
        "from . import checks\n"
        "import json\n")
    found = violations(source, "clients.chaos.example", "clients/chaos/example.py")
    assert found == [
        "clients/chaos/example.py: coordinator.coordinator",
        "clients/chaos/example.py: ledger",
        "clients/chaos/example.py: ledger.store.cassandra",
        "clients/chaos/example.py: shard_router.hashing",
    ]
    assert violations("from redledger_client import LedgerClient\n", "clients.x",
                      "clients/x.py") == []


def test_relative_imports_resolve_inside_clients():
    assert import_statements("from . import checks\nfrom ..bank import Op\n",
                             "clients.chaos.drills") == [
        ("clients.chaos", ["checks"]), ("clients.bank", ["Op"])]
    assert import_statements("from .cli import main\n", "clients.chaos", True) == [
        ("clients.chaos.cli", ["main"])]
