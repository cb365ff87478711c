"""core/v1 Events about a LoRAJob, built by a pure function."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from lorajob_operator import api
from lorajob_operator.conditions import scrub

__all__ = ["COMPONENT", "build_event"]

COMPONENT = "lorajob-operator"
# Kubernetes rejects Event messages over 1 KiB.
MESSAGE_LIMIT = 1024


def build_event(
    job: Mapping[str, Any], type_: str, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """An Event about `job` (a LoRAJob body with metadata name/namespace/uid)."""
    meta = job.get("metadata") or {}
    stamp = api.format_time(now)
    # Scrubbed again: trainer and API server messages end up here too.
    text = scrub(message, MESSAGE_LIMIT)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": f"{meta.get('name', 'lorajob')}.",
            "namespace": meta.get("namespace"),
        },
        "involvedObject": {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "reason": reason,
        "message": text,
        "type": type_,
        "source": {"component": COMPONENT},
        "reportingComponent": f"{api.GROUP}/{COMPONENT}",
        "reportingInstance": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
