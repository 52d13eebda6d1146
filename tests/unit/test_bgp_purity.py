"""bgp's calculation modules do no I/O (as DESIGN.md asks of protocol encode/decode): checked on their imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bgp

PURE = ["plan", "outbound", "rib", "commands", "events", "exabgp_conf", "sync", "aspath"]
IO = {"subprocess", "socket", "os", "threading", "pyroute2", "grpc", "pyetcd", "datastore.etcd", "datastore.watcher"}


@pytest.mark.parametrize("name", PURE)
def test_pure_module_imports_no_io(name: str) -> None:
    tree = ast.parse((Path(bgp.__file__).parent / f"{name}.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{a.name}" for a in node.names)
    modules = {m.split(".")[0] for m in imported} | imported
    assert not modules & IO, f"bgp.{name} imports {sorted(modules & IO)}"
    local = {m for m in imported if m.startswith("bgp.") and m.split(".")[1] not in PURE and m.count(".") == 1}
    assert not local, f"bgp.{name} imports non-pure bgp modules {sorted(local)}"
