"""classify_pod: every pod state a trainer can be in, and what it means for the job."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from lorajob_operator.nodeloss import NODE_LOST_MARGIN_SECONDS, node_lost
from lorajob_operator.podstatus import SIGTERM_EXIT, PodOutcome, classify_pod, parse_termination
from loraops_contract.protocol import (
    PERMANENT_EXIT_CODES,
    REASON_EXIT_CODES,
    AdapterInfo,
    ExitCode,
    TerminationMessage,
)
from loraops_contract.reasons import Reason

IMAGE = "ghcr.io/loraops/lora-trainer:0.1.0"


def pod(
    phase: str = "Pending",
    *,
    state: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    reason: str | None = None,
    message: str | None = None,
    deleting: bool = False,
    gates: list[str] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if state is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": state, "image": IMAGE}]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    metadata: dict[str, Any] = {"name": "job-1", "namespace": "ns"}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec: dict[str, Any] = {"containers": [{"name": "trainer", "image": IMAGE}]}
    if gates:
        spec["schedulingGates"] = [{"name": g} for g in gates]
    return {"metadata": metadata, "spec": spec, "status": status}


def terminated(
    code: int, message: str | TerminationMessage | None = None, reason: str = "Error"
) -> dict[str, Any]:
    text = message.to_json() if isinstance(message, TerminationMessage) else message
    return {"terminated": {"exitCode": code, "reason": reason, "message": text or ""}}


def failure(reason: Reason, retryable: bool = False) -> TerminationMessage:
    return TerminationMessage(
        outcome="Failed",
        reason=reason,
        message=f"{reason} happened",
        hint=None,
        retryable=retryable,
    )


def check(outcome: PodOutcome, kind: str, reason: Reason, retryable: bool) -> None:
    assert (outcome.kind, outcome.reason, outcome.retryable) == (kind, reason, retryable), outcome


# --------------------------------------------------------------------------- waiting


def test_pending_without_status() -> None:
    check(classify_pod({"metadata": {}, "spec": {}}), "pending", Reason.POD_PENDING, True)


def test_unschedulable_is_queued_with_scheduler_message() -> None:
    msg = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    p = pod(
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg}
        ]
    )
    outcome = classify_pod(p)
    check(outcome, "queued", Reason.UNSCHEDULABLE, True)
    assert outcome.message == msg
    assert outcome.hint is not None
    assert "resources.gpus" in outcome.hint


def test_scheduling_gated_by_kueue() -> None:
    p = pod(
        gates=["kueue.x-k8s.io/admission"],
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}],
    )
    outcome = classify_pod(p)
    check(outcome, "queued", Reason.SCHEDULING_GATED, True)
    assert "kueue.x-k8s.io/admission" in outcome.message
    gated_by_condition_only = pod(
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]
    )
    check(classify_pod(gated_by_condition_only), "queued", Reason.SCHEDULING_GATED, True)


def test_container_creating() -> None:
    p = pod(
        state={"waiting": {"reason": "ContainerCreating"}},
        conditions=[{"type": "PodScheduled", "status": "True"}],
    )
    check(classify_pod(p), "pending", Reason.CONTAINER_CREATING, True)


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("ErrImagePull", 'failed to pull "x": manifest unknown'),
        ("ImagePullBackOff", 'Back-off pulling image "x"'),
        ("InvalidImageName", "couldn't parse image reference"),
        ("ErrImagePull", "pull access denied, repository does not exist"),
        ("ErrImageNeverPull", "image not present with pull policy of Never"),
    ],
)
def test_image_pull_errors_fail_permanently(reason: str, message: str) -> None:
    outcome = classify_pod(pod(state={"waiting": {"reason": reason, "message": message}}))
    check(outcome, "failed", Reason.IMAGE_PULL_ERROR, False)
    assert IMAGE in outcome.message
    assert outcome.hint is not None
    assert "spec.image" in outcome.hint


def test_rate_limited_pull_keeps_waiting() -> None:
    msg = "toomanyrequests: You have reached your pull rate limit"
    outcome = classify_pod(pod(state={"waiting": {"reason": "ErrImagePull", "message": msg}}))
    check(outcome, "pending", Reason.IMAGE_PULL_ERROR, True)


def test_missing_secret() -> None:
    msg = 'secret "s3-credentials" not found'
    outcome = classify_pod(
        pod(state={"waiting": {"reason": "CreateContainerConfigError", "message": msg}})
    )
    check(outcome, "failed", Reason.SECRET_NOT_FOUND, False)
    assert "s3-credentials" in outcome.message
    assert outcome.hint is not None
    assert "AWS_ACCESS_KEY_ID" in outcome.hint


def test_missing_secret_key() -> None:
    msg = "couldn't find key AWS_SECRET_ACCESS_KEY in Secret ns/s3-credentials"
    outcome = classify_pod(
        pod(state={"waiting": {"reason": "CreateContainerConfigError", "message": msg}})
    )
    check(outcome, "failed", Reason.SECRET_NOT_FOUND, False)


def test_other_config_error() -> None:
    outcome = classify_pod(
        pod(state={"waiting": {"reason": "CreateContainerConfigError", "message": "bad volume"}})
    )
    check(outcome, "failed", Reason.CONTAINER_CONFIG_ERROR, False)


# --------------------------------------------------------------------------- running


def test_running() -> None:
    p = pod("Running", state={"running": {"startedAt": "2026-01-01T00:00:00Z"}})
    check(classify_pod(p), "running", Reason.TRAINER_RUNNING, True)


def test_running_pod_being_deleted_is_disrupted() -> None:
    p = pod("Running", state={"running": {}}, deleting=True)
    check(classify_pod(p), "disrupted", Reason.POD_DELETED, True)


def test_running_pod_targeted_for_eviction() -> None:
    p = pod(
        "Running",
        state={"running": {}},
        conditions=[
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting",
            }
        ],
    )
    check(classify_pod(p), "disrupted", Reason.EVICTED, True)


# --------------------------------------------------------------------------- success


def test_success_with_adapter() -> None:
    report = TerminationMessage(
        outcome="Succeeded",
        message="trained 100 steps",
        adapter=AdapterInfo(
            uri="s3://a/run",
            manifest_uri="s3://a/run/manifest.json",
            sha256="ab" * 32,
            size=1234,
            files=7,
        ),
        steps=100,
        train_loss=0.5,
    )
    outcome = classify_pod(pod("Succeeded", state=terminated(0, report, reason="Completed")))
    check(outcome, "succeeded", Reason.COMPLETED, False)
    assert outcome.exit_code == 0
    assert outcome.termination is not None
    assert outcome.termination.adapter is not None
    assert outcome.termination.adapter.manifest_uri == "s3://a/run/manifest.json"
    assert not outcome.counts_toward_backoff


def test_success_without_report_still_succeeds() -> None:
    outcome = classify_pod(
        pod("Succeeded", state=terminated(0, "some log tail", reason="Completed"))
    )
    check(outcome, "succeeded", Reason.COMPLETED, False)
    assert outcome.termination is None


def test_exit_zero_with_failure_report_is_a_failure() -> None:
    outcome = classify_pod(pod("Succeeded", state=terminated(0, failure(Reason.STORAGE_ERROR))))
    check(outcome, "failed", Reason.STORAGE_ERROR, True)


# --------------------------------------------------------------------------- failures

PERMANENT_CASES = [
    (ExitCode.INVALID_CONFIG, Reason.INVALID_SPEC, Reason.INVALID_SPEC),
    (ExitCode.INVALID_DATASET, Reason.INVALID_DATASET, Reason.INVALID_DATASET),
    (
        ExitCode.TARGET_MODULES_NOT_FOUND,
        Reason.TARGET_MODULES_NOT_FOUND,
        Reason.TARGET_MODULES_NOT_FOUND,
    ),
    (ExitCode.CREDENTIALS, Reason.CREDENTIALS_ERROR, Reason.CREDENTIALS_ERROR),
    (ExitCode.SOURCE_NOT_FOUND, Reason.SOURCE_NOT_FOUND, Reason.SOURCE_NOT_FOUND),
    (ExitCode.CUDA_OOM, Reason.CUDA_OUT_OF_MEMORY, Reason.CUDA_OUT_OF_MEMORY),
]


def test_cases_cover_every_permanent_code() -> None:
    assert {c[0] for c in PERMANENT_CASES} == set(PERMANENT_EXIT_CODES)
    for code, failure_reason, _ in PERMANENT_CASES:
        assert REASON_EXIT_CODES[failure_reason] == code


@pytest.mark.parametrize(("code", "failure_reason", "reason"), PERMANENT_CASES)
def test_permanent_exit_codes(code: ExitCode, failure_reason: Reason, reason: Reason) -> None:
    report = TerminationMessage(
        outcome="Failed", reason=failure_reason, message="details here", hint="do this instead"
    )
    outcome = classify_pod(pod("Failed", state=terminated(code, report)))
    check(outcome, "failed", reason, False)
    assert outcome.exit_code == code
    assert outcome.message == "details here"
    assert outcome.hint == "do this instead"  # the trainer's hint beats the generic one
    assert outcome.counts_toward_backoff


@pytest.mark.parametrize(("code", "failure_reason", "reason"), PERMANENT_CASES)
def test_permanent_exit_codes_without_report(
    code: ExitCode, failure_reason: Reason, reason: Reason
) -> None:
    del failure_reason
    outcome = classify_pod(pod("Failed", state=terminated(code, "Traceback ...\nValueError: x")))
    check(outcome, "failed", reason, False)
    assert "ValueError: x" in outcome.message


def test_transient_exit_is_retryable() -> None:
    outcome = classify_pod(
        pod(
            "Failed",
            state=terminated(ExitCode.TRANSIENT, failure(Reason.STORAGE_ERROR, True)),
        )
    )
    check(outcome, "failed", Reason.STORAGE_ERROR, True)
    assert outcome.counts_toward_backoff


def test_internal_error_is_retryable() -> None:
    outcome = classify_pod(
        pod("Failed", state=terminated(ExitCode.INTERNAL, failure(Reason.INTERNAL_ERROR)))
    )
    check(outcome, "failed", Reason.TRAINER_ERROR, True)


def test_unknown_exit_code_uses_log_tail() -> None:
    outcome = classify_pod(
        pod("Failed", state=terminated(1, "ModuleNotFoundError: No module named 'trl'"))
    )
    check(outcome, "failed", Reason.TRAINER_ERROR, True)
    assert "ModuleNotFoundError" in outcome.message


def test_interrupted_is_a_disruption() -> None:
    report = TerminationMessage(
        outcome="Failed",
        reason=Reason.INTERRUPTED,
        retryable=True,
        last_checkpoint="s3://a/run/checkpoints/checkpoint-50",
    )
    outcome = classify_pod(pod("Failed", state=terminated(ExitCode.INTERRUPTED, report)))
    check(outcome, "disrupted", Reason.DISRUPTED, True)
    assert outcome.termination is not None
    assert outcome.termination.last_checkpoint == "s3://a/run/checkpoints/checkpoint-50"
    assert not outcome.counts_toward_backoff


def test_sigterm_exit_is_a_disruption() -> None:
    check(
        classify_pod(pod("Failed", state=terminated(143, ""))), "disrupted", Reason.DISRUPTED, True
    )


def test_oom_killed_is_permanent_with_hint() -> None:
    outcome = classify_pod(pod("Failed", state=terminated(137, "", reason="OOMKilled")))
    check(outcome, "failed", Reason.OOM_KILLED, False)
    assert outcome.hint is not None
    assert "resources.memory" in outcome.hint


def test_sigkill_without_disruption_is_a_retryable_failure() -> None:
    outcome = classify_pod(pod("Failed", state=terminated(137, "")))
    check(outcome, "failed", Reason.TRAINER_ERROR, True)
    assert "SIGKILL" in outcome.message


def _log(lines: int) -> str:
    """A FallbackToLogsOnError message: the last 2 KiB of a training log."""
    text = "\n".join(f"step {i}: loss=1.{i:04d} lr=2e-4 tokens/s=5120" for i in range(lines))
    return text[-2048:]


def test_sigkill_says_the_cause_first_and_keeps_the_log_tail_apart() -> None:
    log = _log(200)
    outcome = classify_pod(pod("Failed", state=terminated(137, log)))
    check(outcome, "failed", Reason.TRAINER_ERROR, True)
    assert outcome.message.startswith("the trainer was killed (SIGKILL, exit 137): "), outcome
    cause, sep, tail = outcome.message.partition("; last log lines: ")
    assert "grace period" in cause
    assert sep
    assert "\n" not in outcome.message
    assert len(tail) <= 300
    assert tail.endswith("step 199: loss=1.0199 lr=2e-4 tokens/s=5120")
    assert "step 150" not in tail  # shortened from the front


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (1, "the trainer exited with code 1 (Error)"),
        (ExitCode.TRANSIENT, "the trainer exited with code 20 (Error)"),
        (ExitCode.INVALID_DATASET, "the trainer failed with exit code 11 (InvalidDataset)"),
    ],
)
def test_an_exit_without_a_report_gives_the_cause_before_the_log(code: int, cause: str) -> None:
    outcome = classify_pod(pod("Failed", state=terminated(code, _log(200))))
    assert outcome.message.startswith(f"{cause}; last log lines: ..."), outcome.message
    assert len(outcome.message) < len(cause) + 330


def test_start_error() -> None:
    msg = 'exec: "python": executable file not found in $PATH'
    outcome = classify_pod(pod("Failed", state=terminated(128, msg, reason="StartError")))
    check(outcome, "failed", Reason.CONTAINER_START_ERROR, False)


# --------------------------------------------------------------------------- disruptions


@pytest.mark.parametrize(
    ("condition_reason", "reason"),
    [
        ("EvictionByEvictionAPI", Reason.EVICTED),
        ("PreemptionByScheduler", Reason.PREEMPTED),
        ("DeletionByTaintManager", Reason.NODE_LOST),
        ("DeletionByPodGC", Reason.NODE_LOST),
        ("TerminationByKubelet", Reason.EVICTED),
    ],
)
def test_disruption_target(condition_reason: str, reason: Reason) -> None:
    conditions = [
        {"type": "DisruptionTarget", "status": "True", "reason": condition_reason, "message": "why"}
    ]
    interrupted = classify_pod(
        pod("Failed", state=terminated(ExitCode.INTERRUPTED), conditions=conditions)
    )
    check(interrupted, "disrupted", reason, True)
    killed = classify_pod(pod("Failed", state=terminated(137), conditions=conditions))
    check(killed, "disrupted", reason, True)


# What Kueue v0.17 writes on TerminationTarget when it stops a pod it manages
# (jobframework StopReason; evictions as "WorkloadEvictedDueTo" + the Evicted reason).
_PREEMPTED_MESSAGE = (
    "Preempted to accommodate a workload (UID: 1f2e, JobUID: 3d4c) due to prioritization "
    "in the ClusterQueue; preemptor path: /gpus; preemptee path: /gpus"
)


def kueue_stopped(reason: str, message: str = "why") -> list[dict[str, Any]]:
    return [{"type": "TerminationTarget", "status": "True", "reason": reason, "message": message}]


def test_kueue_preemption() -> None:
    conditions = kueue_stopped("WorkloadEvictedDueToPreempted", _PREEMPTED_MESSAGE)
    outcome = classify_pod(
        pod("Failed", state=terminated(ExitCode.INTERRUPTED), conditions=conditions)
    )
    check(outcome, "disrupted", Reason.PREEMPTED, True)
    assert not outcome.counts_toward_backoff
    assert "stopped by Kueue (WorkloadEvictedDueToPreempted)" in outcome.message
    assert "prioritization in the ClusterQueue" in outcome.message


def test_kueue_preemption_while_terminating() -> None:
    """Kueue sets the condition and deletes the pod: the trainer still checkpoints."""
    running = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    conditions = kueue_stopped("WorkloadEvictedDueToPreempted", _PREEMPTED_MESSAGE)
    outcome = classify_pod(pod("Running", state=running, conditions=conditions, deleting=True))
    check(outcome, "disrupted", Reason.PREEMPTED, True)
    # Admitted but not started yet (still Pending) when preempted.
    pending = classify_pod(pod("Pending", conditions=conditions, deleting=True))
    check(pending, "disrupted", Reason.PREEMPTED, True)


@pytest.mark.parametrize(
    ("kueue_reason", "reason"),
    [
        ("WorkloadEvictedDueToPreempted", Reason.PREEMPTED),
        ("WorkloadEvictedDueToNodeFailures", Reason.NODE_LOST),
        ("WorkloadEvictedDueToPodsReadyTimeout", Reason.EVICTED),
        ("WorkloadEvictedDueToAdmissionCheck", Reason.EVICTED),
        ("WorkloadEvictedDueToClusterQueueStopped", Reason.EVICTED),
        ("WorkloadEvictedDueToLocalQueueStopped", Reason.EVICTED),
        ("WorkloadEvictedDueToDeactivated", Reason.EVICTED),
        ("WorkloadEvictedDueToEvictedOnManagerCluster", Reason.EVICTED),
        ("WorkloadEvictedDueToSomethingNew", Reason.EVICTED),
        ("WorkloadEvicted", Reason.EVICTED),
        ("WorkloadDeleted", Reason.DISRUPTED),
        ("NoMatchingWorkload", Reason.DISRUPTED),
        ("NotAdmitted", Reason.DISRUPTED),
        ("", Reason.DISRUPTED),
    ],
)
def test_kueue_stop_reasons_are_disruptions(kueue_reason: str, reason: Reason) -> None:
    conditions = kueue_stopped(kueue_reason, "Kueue's message")
    for state in (terminated(ExitCode.INTERRUPTED), terminated(SIGTERM_EXIT), terminated(137)):
        outcome = classify_pod(pod("Failed", state=state, conditions=conditions))
        check(outcome, "disrupted", reason, True)
        assert not outcome.counts_toward_backoff
        assert outcome.message.startswith("stopped by Kueue")
        assert "Kueue's message" in outcome.message
    # Without container statuses (deleted before it started).
    check(classify_pod(pod("Failed", conditions=conditions)), "disrupted", reason, True)


def test_kueue_stop_without_message_names_the_reason() -> None:
    outcome = classify_pod(pod("Failed", conditions=kueue_stopped("NotAdmitted", "")))
    assert outcome.message == "stopped by Kueue (NotAdmitted)"


def test_kueue_condition_false_is_ignored() -> None:
    conditions = [{"type": "TerminationTarget", "status": "False", "reason": "NotAdmitted"}]
    outcome = classify_pod(pod("Failed", state=terminated(1, "boom"), conditions=conditions))
    check(outcome, "failed", Reason.TRAINER_ERROR, True)


def test_kubelet_eviction_for_memory_pressure() -> None:
    p = pod("Failed", reason="Evicted", message="The node was low on resource: memory.")
    check(classify_pod(p), "disrupted", Reason.EVICTED, True)


def test_eviction_for_scratch_space_is_permanent() -> None:
    msg = 'Usage of EmptyDir volume "scratch" exceeds the limit "200Gi".'
    check(
        classify_pod(pod("Failed", reason="Evicted", message=msg)),
        "failed",
        Reason.SCRATCH_SPACE_EXCEEDED,
        False,
    )
    with_exit = pod("Failed", reason="Evicted", message=msg, state=terminated(ExitCode.INTERRUPTED))
    check(classify_pod(with_exit), "failed", Reason.SCRATCH_SPACE_EXCEEDED, False)


def test_node_lost() -> None:
    check(classify_pod(pod("Failed", reason="NodeLost")), "disrupted", Reason.NODE_LOST, True)
    check(classify_pod(pod("Unknown")), "unknown", Reason.NODE_LOST, True)
    shutdown = pod(
        "Failed",
        reason="Terminated",
        message="Pod was terminated in response to imminent node shutdown.",
    )
    check(classify_pod(shutdown), "disrupted", Reason.NODE_LOST, True)


def test_kubelet_admission_rejection() -> None:
    p = pod("Failed", reason="OutOfnvidia.com/gpu", message="Node didn't have enough resource")
    check(classify_pod(p), "disrupted", Reason.DISRUPTED, True)


def test_pod_deadline() -> None:
    check(
        classify_pod(pod("Failed", reason="DeadlineExceeded")),
        "failed",
        Reason.DEADLINE_EXCEEDED,
        False,
    )


def test_failed_without_anything() -> None:
    check(classify_pod(pod("Failed")), "failed", Reason.TRAINER_ERROR, True)


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "not json",
        "{",
        "[1,2]",
        '{"outcome": 5}',
        '{"no": "outcome"}',
        "{" * 5000,
        "\x00\xff",
    ],
)
def test_termination_garbage_is_none(text: str | None) -> None:
    assert parse_termination(text) is None


def test_termination_with_unknown_fields_parses() -> None:
    text = json.dumps({"outcome": "Failed", "reason": "InvalidDataset", "newField": 1})
    parsed = parse_termination(text)
    assert parsed is not None
    assert parsed.reason == "InvalidDataset"


def test_garbage_termination_still_gives_useful_outcome() -> None:
    outcome = classify_pod(
        pod(
            "Failed", state=terminated(ExitCode.INVALID_DATASET, '{"outcome": "Failed", "reason": ')
        )
    )
    check(outcome, "failed", Reason.INVALID_DATASET, False)
    assert outcome.hint is not None


def test_unknown_reason_in_report_falls_back_to_exit_code() -> None:
    report = TerminationMessage(outcome="Failed", reason="BrandNewReason", message="m")
    outcome = classify_pod(pod("Failed", state=terminated(ExitCode.SOURCE_NOT_FOUND, report)))
    check(outcome, "failed", Reason.SOURCE_NOT_FOUND, False)


def test_secrets_in_messages_are_scrubbed() -> None:
    report = TerminationMessage(
        outcome="Failed", reason="CredentialsError", message="key AKIAIOSFODNN7EXAMPLE rejected"
    )
    outcome = classify_pod(pod("Failed", state=terminated(ExitCode.CREDENTIALS, report)))
    assert "AKIAIOSFODNN7EXAMPLE" not in outcome.message


def test_long_log_tail_is_truncated() -> None:
    outcome = classify_pod(
        pod("Failed", state=terminated(1, "line\n" * 2000 + "RuntimeError: boom"))
    )
    assert len(outcome.message) <= 1024
    assert outcome.message.endswith("RuntimeError: boom")


# --------------------------------------------------------------------------- node loss

DELETED_AT = datetime(2026, 1, 1, tzinfo=UTC)  # pod(deleting=True)'s deletionTimestamp
TAINT_EVICTION = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "DeletionByTaintManager",
    "message": "Taint manager: deleting due to NoExecute taint",
}
NOT_READY = {"type": "Ready", "status": "False"}


def on_node(p: dict[str, Any]) -> dict[str, Any]:
    p["spec"]["nodeName"] = "gpu-7"
    return p


def after(seconds: float) -> datetime:
    return DELETED_AT + timedelta(seconds=seconds)


def test_pod_evicted_from_an_unreachable_node_is_node_lost() -> None:
    """What a real cluster shows once the kubelet stopped heartbeating: the pod stays
    Running (nobody can stop its containers) while terminating, for good."""
    p = on_node(
        pod(
            "Running",
            state={"running": {}},
            conditions=[NOT_READY, TAINT_EVICTION],
            deleting=True,
        )
    )
    for now in (None, after(-100), after(3600)):
        outcome = classify_pod(p, now)
        check(outcome, "disrupted", Reason.NODE_LOST, True)
        assert outcome.message.startswith("node gpu-7 was lost: the taint-eviction controller")
        assert "left for the pod garbage collector" in outcome.message
    assert node_lost(p, None) == classify_pod(p).message


@pytest.mark.parametrize(
    ("conditions", "in_grace"),
    [
        ([], Reason.POD_DELETED),
        (
            [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
            Reason.PREEMPTED,
        ),
    ],
)
def test_pod_never_confirmed_deleted_is_node_lost_past_the_margin(
    conditions: list[dict[str, Any]], in_grace: Reason
) -> None:
    p = on_node(pod("Running", state={"running": {}}, conditions=conditions, deleting=True))
    # deletionTimestamp already includes the grace period: until it has passed by
    # NODE_LOST_MARGIN_SECONDS the trainer may still be saving its checkpoint.
    check(classify_pod(p), "disrupted", in_grace, True)
    check(classify_pod(p, after(-60)), "disrupted", in_grace, True)
    check(classify_pod(p, after(NODE_LOST_MARGIN_SECONDS - 1)), "disrupted", in_grace, True)
    outcome = classify_pod(p, after(NODE_LOST_MARGIN_SECONDS))
    check(outcome, "disrupted", Reason.NODE_LOST, True)
    assert outcome.message == (
        "node gpu-7 was lost: the trainer pod still reports Running 30s after its deletion "
        "grace period ended, so its kubelet is not responding; the pod is left for the pod "
        "garbage collector"
    )


def test_pending_pod_stuck_terminating_is_node_lost() -> None:
    p = pod("Pending", state={"waiting": {"reason": "ContainerCreating"}}, deleting=True)
    outcome = classify_pod(p, after(3600))
    check(outcome, "disrupted", Reason.NODE_LOST, True)
    assert outcome.message.startswith(
        "the pod's node was lost: the trainer pod still reports Pending"
    )


def test_pods_the_kubelet_answered_for_are_not_node_lost() -> None:
    late = after(3600)
    # Not being deleted: running, however long.
    check(
        classify_pod(pod("Running", state={"running": {}}), late),
        "running",
        Reason.TRAINER_RUNNING,
        True,
    )
    # The kubelet reported the trainer's exit (checkpoint saved on SIGTERM).
    stopped = pod("Running", state=terminated(ExitCode.INTERRUPTED), deleting=True)
    check(classify_pod(stopped, late), "disrupted", Reason.POD_DELETED, True)
    # Terminal phases are final: node_lost() is only about pods that never end.
    for phase in ("Failed", "Succeeded"):
        ended = pod(phase, conditions=[TAINT_EVICTION], deleting=True)
        assert node_lost(ended, late) is None
    assert node_lost(pod("Running", conditions=[TAINT_EVICTION]), late) is None
