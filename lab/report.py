"""Reachability matrices as the lab prints them: what the kernels let through, next to what podnet's compiler
(`agentctl policy matrix`) says should. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Pair = tuple[str, str]


def expected_from_json(doc: Mapping[str, object]) -> dict[Pair, bool]:
    """`agentctl policy matrix -o json` → {(source, destination): allowed}."""
    allowed = doc.get("allowed")
    if not isinstance(allowed, dict):
        raise ValueError("matrix JSON without 'allowed'")
    out: dict[Pair, bool] = {}
    for src, row in allowed.items():
        if not isinstance(row, dict):
            raise ValueError(f"matrix JSON: row {src!r} is not a mapping")
        for dst, ok in row.items():
            out[(str(src), str(dst))] = bool(ok)
    return out


def mismatches(expected: Mapping[Pair, bool], observed: Mapping[Pair, bool]) -> list[Pair]:
    """Pairs where the kernel disagrees with the compiler (or one side has no answer)."""
    return sorted(p for p in set(expected) | set(observed) if expected.get(p) != observed.get(p))


def render(pods: Sequence[str], expected: Mapping[Pair, bool], observed: Mapping[Pair, bool]) -> str:
    """Rows are sources, columns destinations: ``ok`` reached, ``--`` refused/dropped, ``·`` itself; a cell where
    the kernel disagrees with the compiler is marked ``!`` (``ok!``: reached but should not have been)."""
    width = max([len(p) for p in pods] + [6])
    cols = [f"{i + 1:>3}" for i in range(len(pods))]
    head = "from \\ to"
    lines = [f"{head:<{width + 4}} " + " ".join(f"{c:>4}" for c in cols)]
    for i, src in enumerate(pods):
        cells = []
        for dst in pods:
            if dst == src:
                cells.append("   ·")
                continue
            seen = observed.get((src, dst))
            mark = "ok" if seen else "--"
            if seen != expected.get((src, dst)):
                mark += "!"
            cells.append(f"{mark:>4}")
        lines.append(f"{i + 1:>3} {src:<{width}} " + " ".join(cells))
    return "\n".join(lines)
