"""Condition types, hints and the pure helpers that maintain `status.conditions`.

The reasons themselves are the contract's (loraops_contract.reasons), shared with the
trainer; HINTS says what to change for each.

Conditions follow metav1.Condition: one entry per type, `lastTransitionTime` moves
only when `status` flips, and the phase is derived from them (never stored alone).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from loraops_contract.reasons import Reason

from lorajob_operator.api import Phase, format_time

__all__ = [
    "HINTS",
    "MAX_MESSAGE_LENGTH",
    "ConditionType",
    "derive_phase",
    "get_condition",
    "is_true",
    "scrub",
    "set_condition",
]

# metav1.Condition allows 32768 bytes; a screenful is what helps in `kubectl describe`.
MAX_MESSAGE_LENGTH = 1024


class ConditionType(StrEnum):
    ACCEPTED = "Accepted"  # spec valid and allowed by policy
    QUEUED = "Queued"  # waiting for quota, a node or a concurrency slot
    RUNNING = "Running"  # a trainer pod is running
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    # True (a Warning) when the finished adapter's eval loss is above its base model's;
    # set only once that has happened to the job, never part of the phase.
    ADAPTER_WORSE_THAN_BASE = "AdapterWorseThanBase"
    # kstatus (sigs.k8s.io/cli-utils) summary conditions, read by Flux health checks and
    # `kubectl wait --for=condition=Ready`; derived from the ones above, never set alone.
    READY = "Ready"  # True only once the adapter is written
    RECONCILING = "Reconciling"  # True while the job is pending, queued or running
    STALLED = "Stalled"  # True when the job failed for good


# What to change, keyed by reason: shown as status.hint and in events.
HINTS: dict[Reason, str] = {
    Reason.INVALID_SPEC: "fix the fields named in the message and apply the LoRAJob again",
    Reason.POLICY_VIOLATION: "change the fields named in the message to fit the cluster "
    "policy, or ask the cluster admin",
    Reason.UNSCHEDULABLE: "no node fits the pod now; it starts when one frees up. To start "
    "sooner, lower resources.gpus/cpu/memory or relax resources.gpuProduct and "
    "scheduling.nodeSelector",
    Reason.SCHEDULING_GATED: "waiting for Kueue to admit the job into scheduling.queueName; "
    "check the ClusterQueue's quota (kubectl get workloads)",
    Reason.QUOTA_EXCEEDED: "the namespace quota is used up; wait for other jobs or ask for "
    "a larger quota",
    Reason.CONCURRENCY_LIMIT: "the namespace runs as many LoRAJobs as the cluster policy "
    "allows; this one starts when another finishes",
    Reason.IMAGE_PULL_ERROR: "check spec.image (name, tag, registry credentials); remove it "
    "to use the operator's trainer image",
    Reason.SECRET_NOT_FOUND: "create the Secret named in spec.storage.credentialsSecret "
    "(keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or spec.storage.hfTokenSecret (key "
    "HF_TOKEN) in the job's namespace; the job starts by itself once it exists",
    Reason.CONTAINER_CONFIG_ERROR: "check the Secrets named under spec.storage exist with "
    "the expected keys",
    Reason.CONTAINER_START_ERROR: "spec.image must be a lora-trainer image (python -m "
    "lora_trainer); remove spec.image to use the operator's",
    Reason.OOM_KILLED: "raise resources.memory or lower training.batchSize / maxSeqLength",
    Reason.CUDA_OUT_OF_MEMORY: "lower training.batchSize, enable "
    "training.gradientCheckpointing or shorten training.maxSeqLength (or use "
    "quantization.mode nf4 / more GPU memory)",
    Reason.SCRATCH_SPACE_EXCEEDED: "the model and checkpoints outgrew the pod's scratch "
    "volume; ask the admin to raise scratchSizeLimit or use a smaller model",
    Reason.INVALID_DATASET: "check dataset.uri and dataset.format: every record must have "
    "the fields of its format (e.g. alpaca: instruction, output)",
    Reason.TARGET_MODULES_NOT_FOUND: "set lora.targetModules to module names of this model "
    "(or all-linear)",
    Reason.CREDENTIALS_ERROR: "check the keys in spec.storage.credentialsSecret and that "
    "they may read the sources and write spec.output.uri",
    Reason.SOURCE_NOT_FOUND: "check model.uri and dataset.uri exist (bucket, prefix, revision)",
    Reason.STORAGE_ERROR: "object storage failed; the job retries up to spec.backoffLimit "
    "times. If it persists, check spec.storage.endpoint and that the cluster can reach it",
    Reason.TRAINER_ERROR: "see the message and the pod logs (kubectl logs); the job retries "
    "up to spec.backoffLimit times",
    Reason.DEADLINE_EXCEEDED: "raise spec.activeDeadlineSeconds or lower training.maxSteps "
    "/ epochs",
    Reason.BACKOFF_LIMIT_EXCEEDED: "every attempt failed; fix the cause in the last "
    "failure message, or raise spec.backoffLimit for flaky infrastructure",
    Reason.EVICTED: "the pod was evicted (the message says by whom: the node, the eviction "
    "API or Kueue); the job resumes from its last checkpoint",
    Reason.PREEMPTED: "a higher-priority workload (or, with Kueue, a queue reclaiming the "
    "quota it lent) took the resources; the job resumes from its last checkpoint when "
    "capacity returns",
    Reason.NODE_LOST: "the node went away; the job resumes from its last checkpoint",
    Reason.DISRUPTED: "the pod was stopped from outside; the job resumes from its last checkpoint",
    Reason.SUSPENDED_BY_USER: "set spec.suspend: false to resume from the last checkpoint",
    Reason.GANG_TIMEOUT: "the cluster had no room for all of spec.resources.nodes pods at "
    "once; the job tries again by itself. To start sooner, lower resources.nodes or "
    "gpus/cpu/memory per node, or admit the job through Kueue (scheduling.queueName)",
}

# Secret-shaped substrings that must never reach status, events or logs, whatever a
# library put into an exception message.
_SECRET_PATTERNS = [
    (re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"), "<redacted-access-key>"),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), "<redacted-hf-token>"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1<redacted>"),
    (
        re.compile(
            r"(?i)(\b(?:aws_)?(?:secret_access_key|session_token|secret|token|password|passwd|"
            r"api[_-]?key|signature)s?[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]+"
        ),
        r"\1<redacted>",
    ),
    (re.compile(r"(?i)(x-amz-(?:signature|credential|security-token)=)[^&\s]+"), r"\1<redacted>"),
    (re.compile(r"://[^/@\s:]+:[^/@\s]+@"), "://<redacted>@"),
]


def scrub(message: str | None, limit: int = MAX_MESSAGE_LENGTH) -> str:
    """Redact credential-shaped text and cap the length (keeping the end, where errors are)."""
    text = message or ""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    text = text.strip()
    if len(text) > limit:
        text = "..." + text[-(limit - 3) :]
    return text


def _status_str(status: bool | str) -> str:
    if isinstance(status, bool):
        return "True" if status else "False"
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
    return status


def get_condition(
    conditions: Sequence[Mapping[str, Any]] | None, type_: str
) -> dict[str, Any] | None:
    for condition in conditions or []:
        if condition.get("type") == type_:
            return dict(condition)
    return None


def is_true(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return bool(condition) and (condition or {}).get("status") == "True"


def set_condition(  # noqa: PLR0917 - positional order is the documented interface
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    observed_generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """A new condition list with `type_` set; the input is not modified.

    lastTransitionTime is kept when the status does not change, so it tells when
    the condition last flipped, not when the operator last looked.
    """
    status_str = _status_str(status)
    previous = get_condition(conditions, type_)
    transition = (
        previous["lastTransitionTime"]
        if previous and previous.get("status") == status_str and previous.get("lastTransitionTime")
        else format_time(now)
    )
    entry: dict[str, Any] = {
        "type": str(type_),
        "status": status_str,
        "reason": str(reason),
        "message": scrub(message),
        "lastTransitionTime": transition,
    }
    if observed_generation is not None:
        entry["observedGeneration"] = observed_generation
    out = [dict(c) for c in conditions or [] if c.get("type") != type_]
    # Keep the original position of an existing type so diffs (and patches) stay small.
    index = next((i for i, c in enumerate(conditions or []) if c.get("type") == type_), len(out))
    out.insert(index, entry)
    return out


def derive_phase(conditions: Sequence[Mapping[str, Any]] | None) -> Phase:
    """Failed > Succeeded > Suspended > Running > Queued > Pending."""
    for type_, phase in (
        (ConditionType.FAILED, Phase.FAILED),
        (ConditionType.SUCCEEDED, Phase.SUCCEEDED),
        (ConditionType.SUSPENDED, Phase.SUSPENDED),
        (ConditionType.RUNNING, Phase.RUNNING),
        (ConditionType.QUEUED, Phase.QUEUED),
    ):
        if is_true(conditions, type_):
            return phase
    return Phase.PENDING
