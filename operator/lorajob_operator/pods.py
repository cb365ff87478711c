"""What the operator reads of a trainer pod: accessors over the pod body (or its
cached view), shared by the decisions (reconcile.py), the pod cache (informer) and the
outcome classifier (podstatus.py). Pure functions, no API calls."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from lorajob_operator import api, objects
from lorajob_operator.api import parse_time

__all__ = [
    "finished_at",
    "is_live",
    "is_stopping",
    "is_terminating",
    "job_key_of_pod",
    "pod_attempt",
    "pod_name",
    "pod_view",
]


def pod_attempt(pod: Mapping[str, Any]) -> int:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    try:
        return int(labels.get(objects.LABEL_ATTEMPT, "0"))
    except ValueError:
        return 0


def job_key_of_pod(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, job name) of a trainer pod, from its controller reference.

    Not from the job label: label values are shortened for long job names.
    """
    meta = pod.get("metadata") or {}
    namespace = meta.get("namespace")
    for ref in meta.get("ownerReferences") or []:
        if (
            ref.get("kind") == api.KIND
            and str(ref.get("apiVersion", "")).startswith(f"{api.GROUP}/")
            and namespace
            and ref.get("name")
        ):
            return str(namespace), str(ref["name"])
    return None


# The parts of a pod that decide() and the controller read; the rest (volumes, env,
# managed fields) is dropped from the operator's watch cache to save memory.
_POD_METADATA = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "labels",
    "annotations",
    "ownerReferences",
)


def pod_view(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What decide() needs of a pod: identity, labels, node, container images, status.

    decide() on the view makes the same decision as on the whole pod. Short strings
    (field names, condition types, label values) are interned: thousands of cached
    views then share one copy of each instead of one per watch event.
    """
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    view_spec: dict[str, Any] = {
        "containers": [
            {"name": c.get("name"), "image": c.get("image")} for c in spec.get("containers") or []
        ]
    }
    for key in ("nodeName", "schedulingGates"):
        if key in spec:
            view_spec[key] = spec[key]
    view = {
        "metadata": {k: meta[k] for k in _POD_METADATA if k in meta},
        "spec": view_spec,
        "status": pod.get("status") or {},
    }
    interned: dict[str, Any] = _interned(view)
    return interned


# Strings up to this length are interned in pod views (names, types, reasons,
# timestamps); longer ones (messages) are rarely repeated.
_INTERN_MAX = 64


def _interned(value: Any) -> Any:
    """A copy of a JSON value with its dict keys and short strings interned."""
    if isinstance(value, Mapping):
        return {sys.intern(str(k)): _interned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interned(v) for v in value]
    if isinstance(value, str) and len(value) <= _INTERN_MAX:
        return sys.intern(value)
    return value


def is_live(pod: Mapping[str, Any]) -> bool:
    """The pod may still run a trainer (terminating pods count until they are gone)."""
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def is_terminating(pod: Mapping[str, Any]) -> bool:
    """A deletion was asked for (the trainer got SIGTERM, or will)."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def pod_name(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("name", ""))


def finished_at(pod: Mapping[str, Any]) -> datetime | None:
    """When the trainer container ended (None while it runs)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated") or {}
        when = parse_time(terminated.get("finishedAt"))
        if when is not None:
            return when
    return None


def is_stopping(pod: Mapping[str, Any]) -> bool:
    """The pod ended, is being deleted, or is marked for disruption: its job must see
    it before it is gone (its last state says why, e.g. Evicted)."""
    if not is_live(pod) or is_terminating(pod):
        return True
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("DisruptionTarget", "TerminationTarget") for c in conditions)
