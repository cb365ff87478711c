"""A trainer pod whose node is gone: terminating for good, yet still "Running".

On a real cluster a node whose kubelet stops heartbeating goes `Ready=Unknown`
after the node monitor grace period and is tainted
`node.kubernetes.io/unreachable:NoExecute`. Pods tolerate that taint for
`tolerationSeconds` (300 s by default); then the taint-eviction controller deletes
them: they get `DisruptionTarget=True` (reason `DeletionByTaintManager`) and a
`deletionTimestamp`. Only the kubelet can stop the containers and confirm the
deletion, so the pod stays terminating with `status.phase: Running` until PodGC
force-deletes it, which it does only once the Node object is deleted or tainted
`node.kubernetes.io/out-of-service`. Waiting for such a pod to go away would hang
the job for good.

Kubernetes' own Job controller does not wait either by default: with
`podReplacementPolicy: TerminatingOrFailed` it creates the replacement as soon as a
pod is terminating, and it never force-deletes pods (with `Failed` it waits for the
terminal phase, which such a pod only reaches through PodGC). The operator keeps the
stricter rule for pods whose kubelet is alive (the trainer saves a checkpoint on
SIGTERM and the next attempt resumes from it) and replaces only pods whose node is
lost. It does not force-delete them (grace period 0) either: that would remove the
API object while a partitioned node may still run the trainer, and hide the pod
from `kubectl`; PodGC removes it once the node is dealt with. The lost trainer may
thus still run next to the new attempt's; that is safe because each attempt writes
its checkpoints under its own prefix (`checkpoints/run-<run>/attempt-<N>/`,
lora_trainer's checkpoints.py) and prunes only its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from lorajob_operator.api import parse_time

__all__ = ["NODE_LOST_MARGIN_SECONDS", "TAINT_EVICTION_REASON", "node_lost"]

# How long a terminating pod may still report a non-terminal phase past its
# deletionTimestamp before its node is presumed lost. The API server sets
# deletionTimestamp to the time of the delete request plus the grace period, so by
# then a live kubelet has stopped the containers (SIGKILL at the end of the grace
# period) and reported the pod Failed; the margin covers a slow status update.
NODE_LOST_MARGIN_SECONDS = 30.0
# The DisruptionTarget reason of the taint-eviction controller: the pod did not
# tolerate a NoExecute taint, in practice node.kubernetes.io/unreachable or not-ready
# on a node that stopped reporting.
TAINT_EVICTION_REASON = "DeletionByTaintManager"


def _deleted_at(pod: Mapping[str, Any]) -> datetime | None:
    return parse_time((pod.get("metadata") or {}).get("deletionTimestamp"))


def _evicted_by_taint(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "DisruptionTarget"
        and c.get("status") == "True"
        and c.get("reason") == TAINT_EVICTION_REASON
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def node_lost(pod: Mapping[str, Any], now: datetime | None) -> str | None:
    """Why a terminating pod will never finish terminating (its node is lost), or None.

    Lost: the pod is being deleted, has no terminal phase, and either the
    taint-eviction controller deleted it (a node that stopped reporting), or `now` is
    NODE_LOST_MARGIN_SECONDS past its deletionTimestamp (the grace period included)
    without the kubelet confirming. Without `now` only the first sign counts.
    """
    deleted = _deleted_at(pod)
    phase = (pod.get("status") or {}).get("phase") or "Pending"
    if deleted is None or phase in ("Succeeded", "Failed"):
        return None
    node = (pod.get("spec") or {}).get("nodeName")
    where = f"node {node}" if node else "the pod's node"
    if _evicted_by_taint(pod):
        return (
            f"{where} was lost: the taint-eviction controller deleted the trainer pod from "
            "the unreachable node, whose kubelet cannot stop it; the pod is left for the pod "
            "garbage collector"
        )
    if now is not None and now >= deleted + timedelta(seconds=NODE_LOST_MARGIN_SECONDS):
        return (
            f"{where} was lost: the trainer pod still reports {phase} "
            f"{NODE_LOST_MARGIN_SECONDS:g}s after its deletion grace period ended, so its "
            "kubelet is not responding; the pod is left for the pod garbage collector"
        )
    return None
