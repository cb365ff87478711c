"""The chart's Grafana dashboard and PrometheusRule, read as Grafana and Prometheus would.

Queries are parsed by a real PromQL parser (promql-parser, the Rust crate's Python
binding); the metric names they select are what the operator must export.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import promql_parser

from tests.helm.chart import Manifest, render

MONITORING_VALUES = {
    "metrics.serviceMonitor.enabled": "true",
    "metrics.dashboard.enabled": "true",
    "metrics.prometheusRule.enabled": "true",
}
DASHBOARD_KEY = "lorajob-operator.json"

# Grafana's built-in range variables, as Grafana substitutes them before querying.
_GRAFANA_RANGES = re.compile(
    r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}"
)
# label_values(<metric>, <label>): Grafana's variable query, not PromQL.
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*[A-Za-z_][A-Za-z0-9_]*\)$")


def monitoring_manifests(values: Mapping[str, str] | None = None) -> list[Manifest]:
    return render({**MONITORING_VALUES, **(values or {})})


def dashboard(manifests: list[Manifest]) -> dict[str, Any]:
    (config_map,) = [
        m for m in manifests if m["kind"] == "ConfigMap" and DASHBOARD_KEY in m.get("data", {})
    ]
    loaded: dict[str, Any] = json.loads(config_map["data"][DASHBOARD_KEY])
    return loaded


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def dashboard_queries(board: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable, Grafana variables
    substituted as Grafana does before it sends the query."""
    out: list[tuple[str, str]] = []
    for panel in _panels(list(board.get("panels") or [])):
        for target in panel.get("targets") or []:
            out.append((f"panel {panel['title']!r}", _GRAFANA_RANGES.sub("5m", target["expr"])))
    for variable in (board.get("templating") or {}).get("list") or []:
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, Mapping) else str(query)
        match = _LABEL_VALUES.match(text.strip())
        out.append((f"variable {variable['name']!r}", match["selector"] if match else text))
    return out


def alert_rules(manifests: list[Manifest]) -> list[dict[str, Any]]:
    (rule,) = [m for m in manifests if m["kind"] == "PrometheusRule"]
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (raises on a parse error)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)
            return
        for attr in ("vector_selector", "expr", "lhs", "rhs", "param"):
            child = getattr(node, attr, None)
            if child is not None:
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(expr))
    return names
