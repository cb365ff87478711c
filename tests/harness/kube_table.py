"""Server-side `Table` rendering (what `kubectl get` asks for with as=Table).

CRDs render their additionalPrinterColumns (JSONPath, incl. filters); a few
built-ins get kubectl's familiar columns; everything else gets NAME + AGE.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Iterable
from typing import Any

from tests.harness.kube_jsonpath import JSONPathError, evaluate, parse_jsonpath
from tests.harness.kube_resources import ResourceType

Obj = dict[str, Any]
Column = dict[str, Any]


def human_duration(seconds: float) -> str:
    """kubectl's HumanDuration."""
    s = int(max(seconds, 0))
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 192:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y"


def age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        moment = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    return human_duration((dt.datetime.now(dt.UTC) - moment).total_seconds())


def _column(
    name: str, type_: str = "string", *, fmt: str = "", priority: int = 0, description: str = ""
) -> Column:
    return {
        "name": name,
        "type": type_,
        "format": fmt,
        "description": description,
        "priority": priority,
    }


_NAME = _column("Name", fmt="name", description="Name must be unique within a namespace.")
_AGE = _column(
    "Age",
    description="CreationTimestamp is a timestamp representing the server time when this object was created.",
)


@functools.lru_cache(maxsize=256)
def _compiled(expression: str) -> Any:
    return parse_jsonpath(expression)


def _cell(column: dict[str, Any], obj: Obj) -> Any:
    try:
        values = evaluate(_compiled(column["jsonPath"]), obj)
    except JSONPathError:
        return None
    if not values:
        return None
    value: Any = values[0] if len(values) == 1 else ",".join(str(v) for v in values)
    if column.get("type") == "date" and isinstance(value, str):
        return age(value)
    if isinstance(value, dict | list):
        return str(value)
    return value


def _pod_status(pod: Obj) -> str:
    status = pod.get("status") or {}
    reason = status.get("reason") or status.get("phase") or "Unknown"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "SchedulingGated":
            reason = "SchedulingGated"
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if (state.get("waiting") or {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state:
            terminated = state["terminated"]
            reason = terminated.get("reason") or (
                f"Signal:{terminated['signal']}"
                if terminated.get("signal")
                else f"ExitCode:{terminated.get('exitCode')}"
            )
    inits = status.get("initContainerStatuses") or []
    total = len((pod.get("spec") or {}).get("initContainers") or [])
    done = sum(
        1 for cs in inits if (cs.get("state") or {}).get("terminated", {}).get("exitCode") == 0
    )
    failed = any(
        (cs.get("state") or {}).get("terminated", {}).get("exitCode", 0) != 0 for cs in inits
    )
    if failed:
        reason = "Init:Error"
    elif total and done < total:
        reason = f"Init:{done}/{total}"
    if pod["metadata"].get("deletionTimestamp") and status.get("reason") != "NodeLost":
        reason = "Terminating"
    return str(reason)


def _pod_row(pod: Obj) -> list[Any]:
    status = pod.get("status") or {}
    containers = (pod.get("spec") or {}).get("containers") or []
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for cs in statuses if cs.get("ready"))
    restarts = sum(int(cs.get("restartCount", 0)) for cs in statuses)
    return [
        pod["metadata"]["name"],
        f"{ready}/{len(containers)}",
        _pod_status(pod),
        restarts,
        age(pod["metadata"].get("creationTimestamp")),
        status.get("podIP") or "<none>",
        (pod.get("spec") or {}).get("nodeName") or "<none>",
    ]


def _node_row(node: Obj) -> list[Any]:
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    state = "Ready" if ready and ready.get("status") == "True" else "NotReady"
    if (node.get("spec") or {}).get("unschedulable"):
        state += ",SchedulingDisabled"
    labels = node["metadata"].get("labels") or {}
    roles = [k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/")]
    version = ((node.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", "")
    return [
        node["metadata"]["name"],
        state,
        ",".join(roles) or "<none>",
        age(node["metadata"].get("creationTimestamp")),
        version,
    ]


def _event_row(event: Obj) -> list[Any]:
    involved = event.get("involvedObject") or event.get("regarding") or {}
    last = (
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event["metadata"].get("creationTimestamp")
    )
    return [
        age(last),
        event.get("type", ""),
        event.get("reason", ""),
        f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}",
        event.get("message") or event.get("note", ""),
    ]


_BUILTIN: dict[str, tuple[list[Column], Callable[[Obj], list[Any]]]] = {
    "pods": (
        [
            _NAME,
            _column("Ready"),
            _column("Status"),
            _column("Restarts", "string"),
            _AGE,
            _column("IP", priority=1),
            _column("Node", priority=1),
        ],
        _pod_row,
    ),
    "nodes": (
        [_NAME, _column("Status"), _column("Roles"), _AGE, _column("Version")],
        _node_row,
    ),
    "namespaces": (
        [_NAME, _column("Status"), _AGE],
        lambda ns: [
            ns["metadata"]["name"],
            (ns.get("status") or {}).get("phase", ""),
            age(ns["metadata"].get("creationTimestamp")),
        ],
    ),
    "events": (
        [
            _column("Last Seen"),
            _column("Type"),
            _column("Reason"),
            _column("Object"),
            _column("Message"),
        ],
        _event_row,
    ),
}


def columns_and_renderer(resource: ResourceType) -> tuple[list[Column], Callable[[Obj], list[Any]]]:
    if resource.custom:
        printer = [c for c in resource.printer_columns if c.get("jsonPath")]
        if not printer:
            printer = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        columns = [_NAME] + [
            _column(
                c["name"],
                "string" if c.get("type") == "date" else c.get("type", "string"),
                fmt=c.get("format", ""),
                priority=int(c.get("priority", 0)),
                description=c.get("description", ""),
            )
            for c in printer
        ]

        def render(obj: Obj) -> list[Any]:
            return [obj["metadata"]["name"], *(_cell(c, obj) for c in printer)]

        return columns, render
    if resource.plural in _BUILTIN and resource.group in ("", "events.k8s.io"):
        return _BUILTIN[resource.plural]
    return [_NAME, _AGE], lambda obj: [
        obj["metadata"]["name"],
        age(obj["metadata"].get("creationTimestamp")),
    ]


def _row_object(obj: Obj, include: str) -> Obj | None:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata", {}),
    }


def table(
    resource: ResourceType,
    objects: Iterable[Obj],
    *,
    resource_version: str = "",
    include_object: str = "Metadata",
    headers: bool = True,
) -> Obj:
    columns, render = columns_and_renderer(resource)
    rows = []
    for obj in objects:
        row: Obj = {"cells": render(obj)}
        embedded = _row_object(obj, include_object)
        if embedded is not None:
            row["object"] = embedded
        rows.append(row)
    result: Obj = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version} if resource_version else {},
        "columnDefinitions": columns if headers else [],
        "rows": rows,
    }
    return result
