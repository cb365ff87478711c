"""The one vocabulary of reasons, from a trainer's exit to a LoRAJob's conditions.

A trainer pod reports why it failed in its termination message (`reason`,
protocol.TerminationMessage); the operator writes a reason into every condition and
event. Both draw on this enum, so a reason is spelled once. The operator's hints for
each reason live with the conditions (lorajob_operator.conditions.HINTS).

Two reasons only the trainer reports name what the trainer saw: it was stopped
(Interrupted) or failed unexpectedly (InternalError). For the job they mean that its
pod was disrupted from outside (Disrupted) and that its trainer failed (TrainerError):
`reason_from_trainer` maps them; every other trainer reason is the job's reason too.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TRAINER_REASONS", "Reason", "reason_from_trainer"]


class Reason(StrEnum):
    # admission
    SPEC_VALID = "SpecValid"
    INVALID_SPEC = "InvalidSpec"
    POLICY_VIOLATION = "PolicyViolation"  # e.g. the endpoint resolved to a private address
    # Written by operators before spec changes were applied to started jobs; still read
    # from their statuses (reconcile._ran_generation).
    SPEC_CHANGE_REJECTED = "SpecChangeRejected"
    # The spec changed: the trainer restarts with it, or a finished job runs again.
    SPEC_CHANGED = "SpecChanged"
    # waiting
    POD_CREATED = "PodCreated"
    POD_PENDING = "PodPending"
    CONTAINER_CREATING = "ContainerCreating"
    UNSCHEDULABLE = "Unschedulable"
    SCHEDULING_GATED = "SchedulingGated"  # Kueue holds the pod until the quota admits it
    # The pods of a job on several nodes did not all get a node in time: all deleted.
    GANG_TIMEOUT = "GangTimeout"
    QUOTA_EXCEEDED = "QuotaExceeded"
    CONCURRENCY_LIMIT = "ConcurrencyLimit"
    # pod could not start
    IMAGE_PULL_ERROR = "ImagePullError"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    CONTAINER_START_ERROR = "ContainerStartError"
    SECRET_NOT_FOUND = "SecretNotFound"
    # running / disruptions
    TRAINER_RUNNING = "TrainerRunning"
    RESUMING = "Resuming"
    EVICTED = "Evicted"
    PREEMPTED = "Preempted"
    NODE_LOST = "NodeLost"
    DISRUPTED = "Disrupted"
    # outcomes
    COMPLETED = "Completed"
    # the finished adapter against its base model (condition AdapterWorseThanBase)
    EVAL_LOSS_ABOVE_BASE = "EvalLossAboveBase"
    EVAL_LOSS_NOT_ABOVE_BASE = "EvalLossNotAboveBase"
    OOM_KILLED = "OOMKilled"
    CUDA_OUT_OF_MEMORY = "CUDAOutOfMemory"
    SCRATCH_SPACE_EXCEEDED = "ScratchSpaceExceeded"
    INVALID_DATASET = "InvalidDataset"
    TARGET_MODULES_NOT_FOUND = "TargetModulesNotFound"
    CREDENTIALS_ERROR = "CredentialsError"
    SOURCE_NOT_FOUND = "SourceNotFound"
    STORAGE_ERROR = "StorageError"
    TRAINER_ERROR = "TrainerError"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    POD_DELETED = "PodDeleted"
    # suspend
    SUSPENDED_BY_USER = "SuspendedByUser"
    RESUMED = "Resumed"
    # reported by the trainer only (see the module docstring)
    INTERRUPTED = "Interrupted"
    INTERNAL_ERROR = "InternalError"


# The reasons a trainer reports; protocol.REASON_EXIT_CODES gives each its exit code.
TRAINER_REASONS = frozenset(
    {
        Reason.INVALID_SPEC,
        Reason.POLICY_VIOLATION,
        Reason.INVALID_DATASET,
        Reason.TARGET_MODULES_NOT_FOUND,
        Reason.CREDENTIALS_ERROR,
        Reason.SOURCE_NOT_FOUND,
        Reason.CUDA_OUT_OF_MEMORY,
        Reason.STORAGE_ERROR,
        Reason.INTERRUPTED,
        Reason.INTERNAL_ERROR,
    }
)

# The trainer's view of a stop, named for the job.
_FOR_THE_JOB = {Reason.INTERRUPTED: Reason.DISRUPTED, Reason.INTERNAL_ERROR: Reason.TRAINER_ERROR}


def reason_from_trainer(reason: str | None, default: Reason = Reason.TRAINER_ERROR) -> Reason:
    """The job's condition reason for a trainer's reported reason (a termination
    message's `reason`); `default` when it reported none, or one this release does not
    know."""
    try:
        reported = Reason(reason) if reason else None
    except ValueError:
        return default
    if reported is None:
        return default
    return _FOR_THE_JOB.get(reported, reported)
