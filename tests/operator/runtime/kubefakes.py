"""Builders of LoRAJob and trainer-pod bodies as the API server returns them.

Shared by the runtime unit tests: each test states only what matters to it.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from lorajob_operator import api, objects
from loraops_contract.protocol import AdapterInfo, TerminationMessage

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
NAME = "tune"
NAMESPACE = "team-a"
UID = "0b8c2f1e-uid"

SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny-llama"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://adapters/tune"},
    "training": {"maxSteps": 20},
    "resources": {"gpus": 1},
}


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def job(
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    generation: int = 1,
    **meta: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "uid": UID,
            "generation": generation,
            "creationTimestamp": stamp(T0),
            **meta,
        },
        "spec": copy.deepcopy(SPEC if spec is None else spec),
    }
    if status is not None:
        body["status"] = status
    return body


def apply_status(body: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch of .status, as the API server applies it."""

    def merge(target: Any, change: Any) -> Any:
        if not isinstance(change, dict):
            return copy.deepcopy(change)
        out = dict(target) if isinstance(target, dict) else {}
        for key, value in change.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(out.get(key), value)
        return out

    new = copy.deepcopy(body)
    new["status"] = merge(body.get("status") or {}, patch)
    return new


def termination(
    outcome: str = "Succeeded",
    reason: str | None = None,
    message: str = "",
    retryable: bool = False,
    with_adapter: bool = True,
    *,
    train_loss: float = 1.25,
) -> str:
    adapter = (
        AdapterInfo(
            uri="s3://adapters/tune",
            manifest_uri="s3://adapters/tune/manifest.json",
            sha256="ab" * 32,
            size=1234,
            files=7,
        )
        if with_adapter and outcome == "Succeeded"
        else None
    )
    return TerminationMessage(
        outcome=outcome,
        reason=reason,
        message=message,
        retryable=retryable,
        adapter=adapter,
        steps=20,
        train_loss=train_loss,
        last_checkpoint="s3://adapters/tune/checkpoints/checkpoint-20",
    ).to_json()


def pod(
    attempt: int = 1,
    phase: str = "Running",
    *,
    exit_code: int | None = None,
    message: str | None = None,
    term_reason: str | None = None,
    finished: datetime | None = None,
    pod_reason: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    deleting: bool = False,
    gates: list[str] | None = None,
    spec_hash: str | None = None,
    waiting: str | None = None,
) -> dict[str, Any]:
    name = objects.pod_name(NAME, attempt)
    status: dict[str, Any] = {"phase": phase}
    container: dict[str, Any] = {"name": "trainer", "ready": phase == "Running", "restartCount": 0}
    if phase == "Running":
        status["podIP"] = "127.0.0.9"
        container["state"] = {"running": {"startedAt": stamp(T0)}}
    elif exit_code is not None:
        container["state"] = {
            "terminated": {
                "exitCode": exit_code,
                "reason": term_reason or ("Completed" if exit_code == 0 else "Error"),
                "message": message or "",
                "startedAt": stamp(T0),
                "finishedAt": stamp(finished or T0),
            }
        }
    elif waiting:
        container["state"] = {"waiting": {"reason": waiting, "message": f"{waiting} for image"}}
    if exit_code is not None or phase == "Running" or waiting:
        status["containerStatuses"] = [container]
    if pod_reason:
        status["reason"] = pod_reason
        status["message"] = f"The node was low on resource: memory. ({pod_reason})"
    status["conditions"] = conditions or []
    meta: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "uid": f"pod-uid-{attempt}",
        "labels": {
            objects.LABEL_JOB: NAME,
            objects.LABEL_JOB_UID: UID,
            objects.LABEL_ATTEMPT: str(attempt),
            "app.kubernetes.io/managed-by": objects.MANAGED_BY,
        },
        "annotations": {objects.ANNOTATION_SPEC_HASH: spec_hash or "hash-1"},
        "ownerReferences": [objects.owner_reference(objects.JobRef(NAME, NAMESPACE, UID))],
    }
    if deleting:
        meta["deletionTimestamp"] = stamp(T0)
    spec: dict[str, Any] = {"containers": [{"name": "trainer", "image": "trainer:1"}]}
    if phase != "Pending" or not gates:
        spec["nodeName"] = "gpu-node-1"
    if gates:
        spec["schedulingGates"] = [{"name": g} for g in gates]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
