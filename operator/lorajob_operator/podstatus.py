"""Classify a trainer pod's state into one PodOutcome the reconciler can act on.

The kinds and what the operator does with them:
  pending    waiting to start (image pulling, container creating); keep waiting
  queued     not scheduled yet (no node fits, Kueue gate); keep waiting, report why
  running    the trainer runs; read its progress
  succeeded  exit 0 with a termination message; record the adapter
  failed     the attempt failed; `retryable` says whether a new attempt may help
             (and counts toward backoffLimit) or the job fails now
  disrupted  stopped from outside (eviction, preemption, Kueue stopping it, node loss,
             SIGTERM); start a new attempt that resumes from the last checkpoint, not counted
  unknown    the node stopped reporting; wait for the pod to resolve
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from loraops_contract.protocol import PERMANENT_EXIT_CODES, ExitCode, TerminationMessage
from loraops_contract.reasons import Reason, reason_from_trainer
from pydantic import ValidationError

from lorajob_operator.conditions import HINTS, scrub
from lorajob_operator.nodeloss import node_lost
from lorajob_operator.objects import CONTAINER_NAME

__all__ = ["OutcomeKind", "PodOutcome", "classify_pod", "parse_termination"]

OutcomeKind = Literal["pending", "queued", "running", "succeeded", "failed", "disrupted", "unknown"]

SIGKILL_EXIT = 137
SIGTERM_EXIT = 143
# Characters of the container log quoted after the cause of a failure without a report.
LOG_TAIL_LIMIT = 300

# Reasons on a pod's DisruptionTarget condition (Kubernetes) and what they mean for the job.
_DISRUPTION_REASONS: dict[str, Reason] = {
    "EvictionByEvictionAPI": Reason.EVICTED,
    "PreemptionByScheduler": Reason.PREEMPTED,
    "PreemptionByKubeScheduler": Reason.PREEMPTED,
    "DeletionByTaintManager": Reason.NODE_LOST,
    "DeletionByPodGC": Reason.NODE_LOST,
    "TerminationByKubelet": Reason.EVICTED,
}
# Kueue's plain-pod integration (v0.17) stops a pod it admitted by setting the pod
# condition TerminationTarget=True and deleting the pod (pkg/controller/jobs/pod Stop).
# The reason is jobframework's StopReason; an eviction of the pod's Workload reads
# "WorkloadEvictedDueTo" + the Workload's Evicted reason (jobframework stopJob), e.g.
# WorkloadEvictedDueToPreempted. None of them is the trainer's doing, so every one is a
# disruption: the next attempt (a new pod, hence a new Workload that queues again)
# resumes from the last checkpoint and backoffLimit is untouched.
_KUEUE_EVICTED = "WorkloadEvictedDueTo"
_KUEUE_STOP_REASONS: dict[str, Reason] = {
    # Preempted for a higher-priority workload, a cohort reclaiming its lent quota, or
    # fair sharing (the Workload's Preempted condition says which).
    f"{_KUEUE_EVICTED}Preempted": Reason.PREEMPTED,
    # Topology-aware scheduling found no replacement for the pod's failed node.
    f"{_KUEUE_EVICTED}NodeFailures": Reason.NODE_LOST,
    # Any other WorkloadEvictedDueTo<X> (PodsReadyTimeout, AdmissionCheck,
    # ClusterQueueStopped, LocalQueueStopped, Deactivated, EvictedOnManagerCluster) and
    # a bare WorkloadEvicted (no Evicted condition left to name why) map to EVICTED. A
    # Deactivated Workload does not stop the job for good: its pod is gone, and the
    # next attempt's pod gets a new, active Workload (spec.suspend stops a LoRAJob).
    "WorkloadEvicted": Reason.EVICTED,
    # Someone deleted the running pod's Workload; Kueue deletes the pod with it.
    "WorkloadDeleted": Reason.DISRUPTED,
    # The pod ran without a Workload that matches it (deleted before Kueue saw it, or
    # the pod no longer matches its spec); Kueue stops it rather than run it unaccounted.
    "NoMatchingWorkload": Reason.DISRUPTED,
    # The pod ran (its gate removed) while its Workload was not admitted.
    "NotAdmitted": Reason.DISRUPTED,
}
# Pod-level status.reason values set by the kubelet or node lifecycle controller.
_POD_REASONS: dict[str, Reason] = {
    "Evicted": Reason.EVICTED,
    "NodeLost": Reason.NODE_LOST,
    "NodeShutdown": Reason.NODE_LOST,
    "Terminated": Reason.NODE_LOST,  # graceful node shutdown
    "Shutdown": Reason.NODE_LOST,
    "Preempting": Reason.PREEMPTED,
    "UnexpectedAdmissionError": Reason.DISRUPTED,
    "NodeAffinity": Reason.DISRUPTED,  # node labels changed before the kubelet admitted it
}
_PERMANENT_PULL = ("not found", "manifest unknown", "unauthorized", "denied", "forbidden", "invalid reference", "no such host")  # fmt: skip
_TRANSIENT_PULL = ("toomanyrequests", "too many requests", "timeout", "i/o timeout", "connection refused", "connection reset", "tls handshake", "temporary", "503", "502", "500 internal")  # fmt: skip


@dataclass(frozen=True)
class PodOutcome:
    kind: OutcomeKind
    reason: Reason
    message: str
    hint: str | None
    retryable: bool
    exit_code: int | None = None
    termination: TerminationMessage | None = None

    @property
    def counts_toward_backoff(self) -> bool:
        """Only failed attempts use up spec.backoffLimit; disruptions never do."""
        return self.kind == "failed"


def _outcome(
    kind: OutcomeKind,
    reason: Reason,
    message: str,
    *,
    retryable: bool,
    hint: str | None = None,
    exit_code: int | None = None,
    termination: TerminationMessage | None = None,
) -> PodOutcome:
    return PodOutcome(
        kind=kind,
        reason=reason,
        message=scrub(message),
        hint=scrub(hint) if hint else HINTS.get(reason),
        retryable=retryable,
        exit_code=exit_code,
        termination=termination,
    )


def parse_termination(text: str | None) -> TerminationMessage | None:
    """The trainer's TerminationMessage, or None for anything else (e.g. a log tail)."""
    if not text or not text.lstrip().startswith("{"):
        return None
    try:
        data = json.loads(text)
        return TerminationMessage.model_validate(data) if isinstance(data, dict) else None
    except (ValueError, ValidationError):
        return None


def _trainer_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER_NAME:
            return dict(status)
    return dict(statuses[0]) if statuses else {}


def _condition(pod: Mapping[str, Any], *types: str) -> Mapping[str, Any] | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return dict(condition)
    return None


def _pod_scheduled_false(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return dict(condition)
    return None


def _image(pod: Mapping[str, Any]) -> str:
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == CONTAINER_NAME:
            return str(container.get("image", "?"))
    return "?"


def _kueue_stop(kueue_reason: str, message: str) -> tuple[Reason, str]:
    """What Kueue's TerminationTarget condition means: the Reason and a message that
    says Kueue stopped the pod and why (its reason, then its message)."""
    reason = _KUEUE_STOP_REASONS.get(kueue_reason)
    if reason is None:
        reason = Reason.EVICTED if kueue_reason.startswith(_KUEUE_EVICTED) else Reason.DISRUPTED
    why = f"stopped by Kueue ({kueue_reason or 'no reason given'})"
    return reason, f"{why}: {message}" if message else why


def _disruption(pod: Mapping[str, Any]) -> tuple[Reason, str] | None:
    """Why the pod was stopped from outside, if it was."""
    if condition := _condition(pod, "TerminationTarget"):
        return _kueue_stop(str(condition.get("reason") or ""), str(condition.get("message") or ""))
    if condition := _condition(pod, "DisruptionTarget"):
        reason = _DISRUPTION_REASONS.get(str(condition.get("reason")), Reason.DISRUPTED)
        return reason, str(condition.get("message") or condition.get("reason") or "")
    status = pod.get("status") or {}
    pod_reason = str(status.get("reason") or "")
    if pod_reason in _POD_REASONS:
        return _POD_REASONS[pod_reason], str(status.get("message") or pod_reason)
    if pod_reason.startswith("OutOf"):  # kubelet admission: OutOfcpu, OutOfnvidia.com/gpu
        return Reason.DISRUPTED, str(status.get("message") or pod_reason)
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return Reason.POD_DELETED, "the trainer pod was deleted"
    return None


def _scratch_exceeded(message: str) -> bool:
    text = message.lower()
    return "ephemeral" in text or ("emptydir" in text and "exceeds" in text)


def _with_log_tail(cause: str, log: str) -> str:
    """`cause`, then the end of `log`, shortened, on one line and set apart: a log tail
    of up to 2 KiB used to be the whole message and hid why the attempt ended."""
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    if not lines:
        return cause
    tail = " | ".join(lines)
    if len(tail) > LOG_TAIL_LIMIT:
        tail = "..." + tail[-(LOG_TAIL_LIMIT - 3) :]
    return f"{cause}; last log lines: {tail}"


def _terminated(pod: Mapping[str, Any], terminated: Mapping[str, Any]) -> PodOutcome:
    code = terminated.get("exitCode")
    exit_code = code if isinstance(code, int) else None
    raw = str(terminated.get("message") or "")
    term = parse_termination(raw)
    detail = term.message if term and term.message else ""
    hint = term.hint if term else None

    def explained(cause: str) -> str:
        """The trainer's own report, else `cause` with the log tail Kubernetes kept in
        its place (FallbackToLogsOnError) quoted after it."""
        return detail or _with_log_tail(cause, "" if term else raw)

    k8s_reason = str(terminated.get("reason") or "")

    if exit_code == ExitCode.OK:
        if term is not None and term.outcome == "Failed":
            return _outcome(
                "failed",
                reason_from_trainer(term.reason),
                f"the trainer exited 0 but reported failure: {detail}",
                retryable=True,
                hint=hint,
                exit_code=exit_code,
                termination=term,
            )
        message = "training finished" if term else "training finished (no termination report)"
        return _outcome(
            "succeeded", Reason.COMPLETED, message, retryable=False, exit_code=0, termination=term
        )

    if k8s_reason == "OOMKilled":
        # The same spec would be killed at the same point again: do not retry.
        return _outcome(
            "failed",
            Reason.OOM_KILLED,
            "the trainer was killed for using more memory than resources.memory",
            retryable=False,
            exit_code=exit_code,
            termination=term,
        )
    if k8s_reason in ("StartError", "ContainerCannotRun"):
        return _outcome(
            "failed",
            Reason.CONTAINER_START_ERROR,
            f"the trainer container could not start: {raw or k8s_reason}",
            retryable=False,
            exit_code=exit_code,
        )

    disruption = _disruption(pod)
    if disruption and disruption[0] is Reason.EVICTED and _scratch_exceeded(disruption[1]):
        # Evicted for filling its scratch volume: a new attempt would fill it again.
        return _outcome(
            "failed",
            Reason.SCRATCH_SPACE_EXCEEDED,
            disruption[1],
            retryable=False,
            exit_code=exit_code,
            termination=term,
        )
    if exit_code in (ExitCode.INTERRUPTED, SIGTERM_EXIT) or (
        exit_code == SIGKILL_EXIT and disruption
    ):
        reason, why = disruption or (Reason.DISRUPTED, "the trainer was stopped by SIGTERM")
        return _outcome(
            "disrupted",
            reason,
            f"{why}; checkpoint saved, resuming in a new attempt"
            if exit_code == ExitCode.INTERRUPTED
            else why,
            retryable=True,
            exit_code=exit_code,
            termination=term,
        )

    if exit_code is not None and exit_code in PERMANENT_EXIT_CODES:
        by_code = {
            ExitCode.INVALID_CONFIG: Reason.INVALID_SPEC,
            ExitCode.INVALID_DATASET: Reason.INVALID_DATASET,
            ExitCode.TARGET_MODULES_NOT_FOUND: Reason.TARGET_MODULES_NOT_FOUND,
            ExitCode.CREDENTIALS: Reason.CREDENTIALS_ERROR,
            ExitCode.SOURCE_NOT_FOUND: Reason.SOURCE_NOT_FOUND,
            ExitCode.CUDA_OOM: Reason.CUDA_OUT_OF_MEMORY,
        }
        reason = reason_from_trainer(term.reason if term else None, by_code[ExitCode(exit_code)])
        return _outcome(
            "failed",
            reason,
            explained(f"the trainer failed with exit code {exit_code} ({reason})"),
            retryable=False,
            hint=hint,
            exit_code=exit_code,
            termination=term,
        )

    default = Reason.STORAGE_ERROR if exit_code == ExitCode.TRANSIENT else Reason.TRAINER_ERROR
    cause = f"the trainer exited with code {exit_code} ({k8s_reason or 'Error'})"
    if exit_code == SIGKILL_EXIT:
        cause = (
            f"the trainer was killed (SIGKILL, exit {SIGKILL_EXIT}): it did not stop within "
            "its grace period, failed its liveness probe, or one of its processes was "
            "killed for memory"
        )
    return _outcome(
        "failed",
        reason_from_trainer(term.reason if term else None, default),
        explained(cause),
        retryable=True,
        hint=hint,
        exit_code=exit_code,
        termination=term,
    )


def _waiting(pod: Mapping[str, Any], waiting: Mapping[str, Any]) -> PodOutcome | None:
    reason = str(waiting.get("reason") or "")
    message = str(waiting.get("message") or "")
    if reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"):
        text = f"cannot pull image {_image(pod)}: {message or reason}"
        lowered = message.lower()
        transient = reason in ("ErrImagePull", "ImagePullBackOff") and (
            any(m in lowered for m in _TRANSIENT_PULL)
            and not any(m in lowered for m in _PERMANENT_PULL)
        )
        if transient:
            # Registry rate limits and timeouts clear up; the kubelet keeps retrying.
            return _outcome("pending", Reason.IMAGE_PULL_ERROR, text, retryable=True)
        return _outcome("failed", Reason.IMAGE_PULL_ERROR, text, retryable=False)
    if reason == "CreateContainerConfigError":
        lowered = message.lower()
        missing_secret = "secret" in lowered and (
            "not found" in lowered or "couldn't find key" in lowered
        )
        return _outcome(
            "failed",
            Reason.SECRET_NOT_FOUND if missing_secret else Reason.CONTAINER_CONFIG_ERROR,
            message or reason,
            retryable=False,
        )
    if reason in ("CreateContainerError", "RunContainerError"):
        return _outcome("failed", Reason.CONTAINER_START_ERROR, message or reason, retryable=False)
    return None


def classify_pod(pod: Mapping[str, Any], now: datetime | None = None) -> PodOutcome:
    """What a trainer pod's current state means for its LoRAJob.

    With `now`, a pod still not terminal well past its deletion grace period counts
    as lost with its node (nodeloss.node_lost); without it only a taint eviction does.
    """
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    container = _trainer_status(pod)
    # Only the state keys that are set (a status patch can leave `"waiting": null`).
    state = {k: v for k, v in (container.get("state") or {}).items() if v}

    if "terminated" in state and phase in ("Succeeded", "Failed", "Running"):
        return _terminated(pod, state["terminated"] or {})

    if phase == "Succeeded":
        return _outcome("succeeded", Reason.COMPLETED, "training finished", retryable=False)

    if phase == "Failed":
        if disruption := _disruption(pod):
            reason, why = disruption
            if reason is Reason.EVICTED and _scratch_exceeded(why):
                return _outcome("failed", Reason.SCRATCH_SPACE_EXCEEDED, why, retryable=False)
            return _outcome("disrupted", reason, why, retryable=True)
        if status.get("reason") == "DeadlineExceeded":
            return _outcome(
                "failed",
                Reason.DEADLINE_EXCEEDED,
                str(status.get("message") or "the pod ran past its deadline"),
                retryable=False,
            )
        return _outcome(
            "failed",
            Reason.TRAINER_ERROR,
            str(status.get("message") or status.get("reason") or "the trainer pod failed"),
            retryable=True,
        )

    # Terminating on a node that is gone: it never finishes, whatever it still reports.
    if (lost := node_lost(pod, now)) is not None:
        return _outcome("disrupted", Reason.NODE_LOST, lost, retryable=True)

    if phase == "Unknown":
        return _outcome(
            "unknown",
            Reason.NODE_LOST,
            str(status.get("message") or "the node stopped reporting the pod's state"),
            retryable=True,
        )

    # From here on the pod has not finished; a deletion or eviction in progress wins.
    if disruption := _disruption(pod):
        reason, why = disruption
        return _outcome("disrupted", reason, why, retryable=True)

    if "waiting" in state and (found := _waiting(pod, state["waiting"] or {})):
        return found

    if phase == "Running":
        return _outcome("running", Reason.TRAINER_RUNNING, "the trainer is running", retryable=True)

    # Pending.
    if (pod.get("spec") or {}).get("schedulingGates"):
        gates = ", ".join(g.get("name", "?") for g in pod["spec"]["schedulingGates"])
        return _outcome(
            "queued", Reason.SCHEDULING_GATED, f"waiting for admission ({gates})", retryable=True
        )
    if unscheduled := _pod_scheduled_false(pod):
        why = str(unscheduled.get("reason") or "")
        message = str(unscheduled.get("message") or why)
        if why == "SchedulingGated":
            return _outcome("queued", Reason.SCHEDULING_GATED, message, retryable=True)
        return _outcome("queued", Reason.UNSCHEDULABLE, message, retryable=True)
    if "waiting" in state:
        waiting_reason = str((state["waiting"] or {}).get("reason") or "ContainerCreating")
        return _outcome(
            "pending",
            Reason.CONTAINER_CREATING,
            f"the trainer container is {waiting_reason}",
            retryable=True,
        )
    return _outcome("pending", Reason.POD_PENDING, "the trainer pod is pending", retryable=True)
