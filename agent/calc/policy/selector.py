"""Kubernetes label selectors (matchLabels + matchExpressions): parse with validation, match, canonical text.

The canonical text names a selector independently of how it was written (key order, duplicate values), so two
policies that select the same pods share one ipset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

# Label keys: an optional DNS-subdomain prefix and a name of at most 63 characters; values at most 63 characters.
_NAME = r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
_KEY_RE = re.compile(rf"^([a-z0-9]([a-z0-9.-]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^({_NAME})?$")


class SelectorError(ValueError):
    """A selector that Kubernetes would refuse; the message names the field at fault."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # one of OPERATORS
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels

    def text(self) -> str:
        if self.operator in ("Exists", "DoesNotExist"):
            return f"{'!' if self.operator == 'DoesNotExist' else ''}{self.key}"
        verb = "in" if self.operator == "In" else "notin"
        return f"{self.key} {verb} ({','.join(sorted(self.values))})"


@dataclass(frozen=True)
class Selector:
    """A parsed label selector. No requirements selects everything."""

    requirements: tuple[Requirement, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def equalities(self) -> list[tuple[str, str]]:
        """(key, value) pairs every matching object must carry: lets a caller narrow candidates with an index."""
        return [(r.key, next(iter(r.values))) for r in self.requirements if r.operator == "In" and len(r.values) == 1]

    def text(self) -> str:
        """Canonical, human-readable form (kubectl style); "" selects everything."""
        return ",".join(sorted(r.text() for r in self.requirements))


ALL = Selector()


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise SelectorError(f"{where}: {key!r} is not a valid label key")
    return key


def _check_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _VALUE_RE.match(value):
        raise SelectorError(f"{where}: {value!r} is not a valid label value")
    return value


def parse_selector(raw: Any, where: str) -> Selector:
    """Parse a LabelSelector object. ``None`` and ``{}`` select everything."""
    if raw is None:
        return ALL
    if not isinstance(raw, dict):
        raise SelectorError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = set(raw) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise SelectorError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    reqs: list[Requirement] = []
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise SelectorError(f"{where}.matchLabels: expected an object of label key to value")
    for key, value in labels.items():
        k = _check_key(key, f"{where}.matchLabels")
        v = _check_value(value, f"{where}.matchLabels[{key}]")
        reqs.append(Requirement(k, "In", frozenset((v,))))
    exprs = raw.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise SelectorError(f"{where}.matchExpressions: expected a list")
    for i, expr in enumerate(exprs):
        at = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, dict):
            raise SelectorError(f"{at}: expected an object")
        key = _check_key(expr.get("key"), f"{at}.key")
        op = expr.get("operator")
        if op not in OPERATORS:
            raise SelectorError(f"{at}.operator: {op!r} is not one of {', '.join(OPERATORS)}")
        values = expr.get("values") or []
        if not isinstance(values, list):
            raise SelectorError(f"{at}.values: expected a list of strings")
        vals = frozenset(_check_value(v, f"{at}.values") for v in values)
        if op in ("In", "NotIn") and not vals:
            raise SelectorError(f"{at}.values: must be non-empty for operator {op}")
        if op in ("Exists", "DoesNotExist") and vals:
            raise SelectorError(f"{at}.values: must be empty for operator {op}")
        reqs.append(Requirement(key, op, vals))
    return Selector(tuple(sorted(set(reqs), key=lambda r: (r.key, r.operator, sorted(r.values)))))
