"""Label and field selectors, parsed the way the Kubernetes API server parses them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_KEY = re.compile(
    r"^([a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?/)?[a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?$"
)
_SET_OP = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)$")


class SelectorError(ValueError):
    """A selector string the real server would reject with 400 BadRequest."""


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        # "!=" and "notin" match objects that lack the label, as on the real server.
        return not present or value not in self.values


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _check_key(key: str, selector: str) -> str:
    if not _KEY.match(key):
        raise SelectorError(
            f"unable to parse requirement: invalid label key {key!r} in {selector!r}"
        )
    return key


def parse_label_selector(selector: str | None) -> tuple[LabelRequirement, ...]:
    """Parse `a=b,c!=d,e in (x,y),f notin (z),g,!h` into requirements (AND-ed)."""
    if not selector:
        return ()
    requirements = []
    for part in _split_top_level(selector):
        set_match = _SET_OP.match(part)
        if set_match:
            values = frozenset(v.strip() for v in set_match["values"].split(",") if v.strip())
            key = _check_key(set_match["key"], selector)
            requirements.append(LabelRequirement(key, set_match["op"], values))
        elif part.startswith("!"):
            requirements.append(LabelRequirement(_check_key(part[1:].strip(), selector), "!exists"))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append(
                LabelRequirement(
                    _check_key(key.strip(), selector), "!=", frozenset({value.strip()})
                )
            )
        elif "=" in part:
            key, value = part.split("==", 1) if "==" in part else part.split("=", 1)
            requirements.append(
                LabelRequirement(_check_key(key.strip(), selector), "=", frozenset({value.strip()}))
            )
        else:
            requirements.append(LabelRequirement(_check_key(part, selector), "exists"))
    return tuple(requirements)


def labels_match(
    requirements: tuple[LabelRequirement, ...], labels: Mapping[str, str] | None
) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in requirements)


@dataclass(frozen=True)
class FieldRequirement:
    path: tuple[str, ...]
    negate: bool
    value: str

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return (field_value(obj, self.path) == self.value) != self.negate


def field_value(obj: Mapping[str, Any], path: tuple[str, ...]) -> str:
    """The string form of a dotted field; absent fields read as "" like on the server."""
    current: Any = obj
    for step in path:
        if not isinstance(current, Mapping):
            return ""
        current = current.get(step)
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


def parse_field_selector(selector: str | None) -> tuple[FieldRequirement, ...]:
    """Parse `metadata.name=x,status.phase!=Failed` (any dotted path is accepted)."""
    if not selector:
        return ()
    requirements = []
    for part in _split_top_level(selector):
        if "!=" in part:
            path, value = part.split("!=", 1)
            negate = True
        elif "==" in part:
            path, value = part.split("==", 1)
            negate = False
        elif "=" in part:
            path, value = part.split("=", 1)
            negate = False
        else:
            raise SelectorError(f"invalid selector: {selector!r}; can't understand {part!r}")
        requirements.append(FieldRequirement(tuple(path.strip().split(".")), negate, value.strip()))
    return tuple(requirements)


def fields_match(requirements: tuple[FieldRequirement, ...], obj: Mapping[str, Any]) -> bool:
    return all(r.matches(obj) for r in requirements)
