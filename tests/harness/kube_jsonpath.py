"""The JSONPath subset used by CRD additionalPrinterColumns.

Supports `.a.b`, `.a[0]`, `.a[-1]`, `.a[*]`, `.a[?(@.type=="X")].b` (== and !=,
string/number/bool literals) and an optional `{...}` wrapper.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_FILTER = re.compile(r"^\?\(@(?P<path>(\.[^=!<>]+)*)\s*(?P<op>==|!=)\s*(?P<literal>.+)\)$")


class JSONPathError(ValueError):
    """An expression outside the supported subset."""


@dataclass(frozen=True)
class _Step:
    kind: str  # "field" | "index" | "all" | "filter"
    name: str = ""
    index: int = 0
    filter_path: tuple[_Step, ...] = ()
    negate: bool = False
    literal: Any = None


def _parse_literal(text: str) -> Any:
    text = text.strip()
    if text[:1] == text[-1:] and text[:1] in ("'", '"'):
        return text[1:-1]
    try:
        return json.loads(text)
    except ValueError as exc:
        raise JSONPathError(f"unsupported filter literal {text!r}") from exc


def parse_jsonpath(expression: str) -> tuple[_Step, ...]:
    text = expression.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    if text.startswith("$"):
        text = text[1:]
    steps: list[_Step] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char == ".":
            end = pos + 1
            while end < len(text) and text[end] not in ".[":
                end += 1
            name = text[pos + 1 : end]
            if not name:
                raise JSONPathError(f"empty field name in {expression!r}")
            steps.append(_Step("field", name=name))
            pos = end
        elif char == "[":
            depth, end = 0, pos
            while end < len(text):
                if text[end] == "[":
                    depth += 1
                elif text[end] == "]":
                    depth -= 1
                    if depth == 0:
                        break
                end += 1
            inner = text[pos + 1 : end].strip()
            pos = end + 1
            if inner == "*":
                steps.append(_Step("all"))
            elif inner.lstrip("-").isdigit():
                steps.append(_Step("index", index=int(inner)))
            elif inner[:1] in ("'", '"'):
                steps.append(_Step("field", name=inner[1:-1]))
            else:
                match = _FILTER.match(inner)
                if not match:
                    raise JSONPathError(f"unsupported JSONPath element [{inner}] in {expression!r}")
                steps.append(
                    _Step(
                        "filter",
                        filter_path=parse_jsonpath(match["path"]) if match["path"] else (),
                        negate=match["op"] == "!=",
                        literal=_parse_literal(match["literal"]),
                    )
                )
        else:
            raise JSONPathError(f"unexpected {char!r} at {pos} in {expression!r}")
    return tuple(steps)


def _apply(steps: tuple[_Step, ...], values: list[Any]) -> list[Any]:
    for step in steps:
        found: list[Any] = []
        for value in values:
            if step.kind == "field":
                if isinstance(value, dict) and step.name in value:
                    found.append(value[step.name])
            elif step.kind == "index":
                if isinstance(value, list) and -len(value) <= step.index < len(value):
                    found.append(value[step.index])
            elif step.kind == "all":
                if isinstance(value, list):
                    found.extend(value)
                elif isinstance(value, dict):
                    found.extend(value.values())
            else:
                items = value if isinstance(value, list) else []
                for item in items:
                    got = _apply(step.filter_path, [item])
                    equal = bool(got) and got[0] == step.literal
                    if equal != step.negate:
                        found.append(item)
        values = found
    return values


def evaluate(expression: str | tuple[_Step, ...], obj: Any) -> list[Any]:
    """All values the expression selects in `obj` (empty list when none)."""
    steps = parse_jsonpath(expression) if isinstance(expression, str) else expression
    return _apply(steps, [obj])
