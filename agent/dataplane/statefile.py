"""A ``DataplaneState`` as JSON: how a standalone writer (``python -m agent.dataplane.run``) is handed a state by
tests, benchmarks or an operator debugging the dataplane without a datastore."""

from __future__ import annotations

import json
from typing import Any

from agent.calc.state import IPSET_TYPES, Chain, DataplaneState, IpSet, KernelJump


class StateFileError(ValueError):
    pass


def to_json(state: DataplaneState) -> str:
    doc = {
        "ipsets": [
            {"name": s.name, "type": s.type, "family": s.family, "members": sorted(s.members)}
            for s in sorted(state.ipsets.values(), key=lambda s: s.name)
        ],
        "tables": {
            table: [
                {"name": c.name, "rules": list(c.rules), **({} if c.hashed else {"hashed": False})}
                for c in sorted(chains.values(), key=lambda c: c.name)
            ]
            for table, chains in sorted(state.tables.items())
        },
        "jumps": [{"table": j.table, "chain": j.chain, "rule": j.rule} for j in state.jumps],
    }
    return json.dumps(doc, indent=1)


def from_json(text: str) -> DataplaneState:
    try:
        doc: Any = json.loads(text)
        ipsets = {}
        for s in doc.get("ipsets", []):
            if s["type"] not in IPSET_TYPES:
                raise StateFileError(f"ipset {s['name']}: type {s['type']!r} is not one of {IPSET_TYPES}")
            ipsets[s["name"]] = IpSet(s["name"], s["type"], frozenset(s["members"]), s.get("family", "inet"))
        tables = {
            table: {c["name"]: Chain(c["name"], tuple(c["rules"]), bool(c.get("hashed", True))) for c in chains}
            for table, chains in doc.get("tables", {}).items()
        }
        jumps = tuple(KernelJump(j["table"], j["chain"], j["rule"]) for j in doc.get("jumps", []))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"not a dataplane state file: {exc!r}") from exc
    return DataplaneState(ipsets=ipsets, tables=tables, jumps=jumps)
