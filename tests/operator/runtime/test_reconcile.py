"""Every transition of the LoRAJob state machine, decided without an API server."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from lorajob_operator import api, backoff, pods, reconcile
from lorajob_operator.conditions import ConditionType, get_condition
from lorajob_operator.policy import Policy
from lorajob_operator.settings import OperatorSettings, load_settings
from loraops_contract.protocol import ExitCode, Progress, TerminationMessage
from loraops_contract.reasons import Reason

from tests.operator.runtime.kubefakes import (
    NAME,
    SPEC,
    T0,
    apply_status,
    at,
    job,
    pod,
    stamp,
    termination,
)

SETTINGS = load_settings(
    retry_backoff_seconds=10,
    retry_backoff_max_seconds=300,
    wait_backoff_seconds=15,
    wait_backoff_max_seconds=300,
    max_disruptions=3,
    status_min_interval_seconds=5,
)


class World:
    """A job plus its pods; `step()` decides and applies the status patch like controller.py."""

    def __init__(self, body: dict[str, Any] | None = None, settings: OperatorSettings = SETTINGS):
        self.job = body or job()
        self.pods: list[dict[str, Any]] = []
        self.settings = settings
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []

    def step(
        self,
        now: datetime = T0,
        *,
        quota: str | None = None,
        **facts: Any,
    ) -> reconcile.Decision:
        # Gathered, as the controller does when decide() asks (needs_facts).
        facts.setdefault("missing_secrets", ())
        facts.setdefault("active_in_namespace", 0)
        observed = reconcile.Observed(self.job, list(self.pods), now, **facts)
        decision = reconcile.decide(observed, self.settings)
        assert not decision.needs_facts
        self.deleted += [d.name for d in decision.delete]
        create = decision.create
        if create is not None:
            if quota is not None:
                decision = reconcile.create_rejected(observed, self.settings, quota, quota=True)
            else:
                self.created.append(create.body)
        self.job = apply_status(self.job, decision.status)
        return decision

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.job.get("status") or {})

    def cond(self, ctype: ConditionType) -> dict[str, Any]:
        found = get_condition(self.status.get("conditions"), ctype)
        assert found is not None, f"no {ctype} condition in {self.status}"
        return found

    def replace_pod(self, new: dict[str, Any]) -> None:
        name = new["metadata"]["name"]
        self.pods = [p for p in self.pods if p["metadata"]["name"] != name] + [new]

    def asks_for_facts(self, now: datetime = T0) -> bool:
        """Whether decide(), without the facts that cost API calls, asks for them (it
        may start an attempt)."""
        observed = reconcile.Observed(self.job, list(self.pods), now)
        return reconcile.decide(observed, self.settings).needs_facts

    def started(self, now: datetime = T0) -> None:
        """Create attempt 1 and see its pod running."""
        decision = self.step(now)
        assert decision.create is not None
        self.pods.append(pod(1, spec_hash=self.status["specHash"]))
        self.step(now)


def reasons(decision: reconcile.Decision) -> list[str]:
    return [e.reason for e in decision.events]


# --------------------------------------------------------------------------- creation


def test_new_job_creates_attempt_one() -> None:
    w = World()
    d = w.step()
    assert d.create is not None
    assert d.create.attempt == 1
    assert d.create.body["metadata"]["name"] == f"{NAME}-1"
    assert w.status["attempts"] == 1
    assert w.status["podName"] == f"{NAME}-1"
    assert w.status["specHash"] == api.spec_hash(api.parse_spec(SPEC))
    assert w.status["startTime"] == stamp(T0)
    assert w.status["phase"] == "Pending"
    assert w.status["observedGeneration"] == 1
    assert w.cond(ConditionType.ACCEPTED)["status"] == "True"
    assert reasons(d) == [Reason.SPEC_VALID, Reason.POD_CREATED]
    assert [t.kind for t in d.tallies] == ["attempt"]


def test_replayed_decision_changes_nothing() -> None:
    w = World()
    w.step()
    w.pods.append(pod(1, phase="Pending"))
    w.step()
    again = w.step()
    assert again.status == {}
    assert again.events == []
    assert again.create is None


def test_trainer_command_override_is_used() -> None:
    w = World(settings=load_settings(trainer_command=["python", "fake.py"]))
    create = w.step().create
    assert create is not None
    assert create.body["spec"]["containers"][0]["command"] == ["python", "fake.py"]


# --------------------------------------------------------------------------- validation


def test_invalid_spec_fails_without_pod_and_without_retry() -> None:
    bad = {**SPEC, "training": {"learningRate": -1}}
    w = World(job(spec=bad))
    d = w.step()
    assert d.create is None
    assert w.status["phase"] == "Failed"
    assert w.status["failureReason"] == Reason.INVALID_SPEC
    assert "spec.training.learningRate" in w.status["failureMessage"]
    assert w.status["hint"]
    assert [(e.type, e.reason) for e in d.events] == [("Warning", Reason.INVALID_SPEC)]
    assert d.requeue_after is None
    again = w.step(at(60))
    assert again.status == {}
    assert again.events == []
    assert again.create is None


def test_fixed_spec_of_a_job_that_never_ran_is_revalidated() -> None:
    w = World(job(spec={**SPEC, "training": {"learningRate": -1}}))
    w.step()
    w.job["spec"] = dict(SPEC)
    w.job["metadata"]["generation"] = 2
    d = w.step(at(5))
    assert d.create is not None
    assert w.status["phase"] == "Pending"
    assert "failureReason" not in w.status


def test_policy_violation_fails() -> None:
    settings = load_settings(policy=Policy(max_gpus_per_job=0))
    w = World(settings=settings)
    d = w.step()
    assert d.create is None
    assert w.status["failureReason"] == Reason.POLICY_VIOLATION
    assert w.status["phase"] == "Failed"


# --------------------------------------------------------------------------- running


def test_running_pod_sets_running_and_node() -> None:
    w = World()
    w.step()
    w.pods.append(pod(1))
    d = w.step(at(3))
    assert w.status["phase"] == "Running"
    assert w.status["nodeName"] == "gpu-node-1"
    assert w.cond(ConditionType.RUNNING)["reason"] == Reason.TRAINER_RUNNING
    assert reasons(d) == [Reason.TRAINER_RUNNING]


def test_progress_is_copied_when_changed_and_rate_limited() -> None:
    w = World()
    w.started()
    p1 = Progress(stage="training", step=5, total_steps=20, loss=2.0, tokens_per_second=900.0)
    w.step(at(10), progress=p1)
    assert w.status["progress"]["step"] == 5
    assert w.status["progress"]["percent"] == 25.0
    # Changed, but only 2s later: not written yet.
    p2 = Progress(stage="training", step=6, total_steps=20, loss=1.9)
    assert "progress" not in w.step(at(12), progress=p2).status
    # Same values much later (only throughput differs): nothing to write.
    same = p1.model_copy(update={"tokens_per_second": 950.0})
    assert "progress" not in w.step(at(30), progress=same).status
    # Changed and the interval has passed: written, and only once.
    d = w.step(at(40), progress=p2)
    assert w.status["progress"]["step"] == 6
    assert w.status["progress"]["lastUpdated"] == stamp(at(40))
    assert "progress" not in w.step(at(60), progress=p2).status
    assert d.events == []


def test_progress_checkpoint_is_recorded() -> None:
    w = World()
    w.started()
    w.step(
        at(10),
        progress=Progress(step=10, last_checkpoint="s3://adapters/tune/checkpoints/checkpoint-10"),
    )
    assert w.status["lastCheckpoint"].endswith("checkpoint-10")


# --------------------------------------------------------------------------- outcomes


def test_success_records_adapter_and_completion() -> None:
    w = World()
    w.started()
    w.replace_pod(pod(1, "Succeeded", exit_code=0, message=termination(), finished=at(100)))
    d = w.step(at(101))
    s = w.status
    assert s["phase"] == "Succeeded"
    assert s["adapter"]["sha256"] == "ab" * 32
    assert s["adapter"]["manifestUri"].endswith("manifest.json")
    assert s["completionTime"] == stamp(at(100))
    assert s["progress"]["percent"] == 100.0
    assert s["podName"] == f"{NAME}-1"
    assert reasons(d) == [Reason.COMPLETED]
    assert ("finished", "Succeeded") in [(t.kind, t.reason) for t in d.tallies]
    assert w.step(at(200)).status == {}


def test_skipped_records_reach_status_and_metrics_once() -> None:
    """The trainer's count of invalid records it left out (dataset.invalidRecords: skip):
    live from its progress, final from its termination message, tallied on success."""
    w = World()
    w.started()
    checkpoint = "s3://adapters/tune/checkpoints/run-1/attempt-1/checkpoint-1"
    live = Progress(stage="training", step=1, skipped_records=3, last_checkpoint=checkpoint)
    w.step(at(10), progress=live)
    assert w.status["skippedRecords"] == 3
    assert w.status["lastCheckpoint"] == checkpoint
    # Its checkpoints were deleted once the adapter was complete: none is left to name.
    final = TerminationMessage.model_validate_json(termination()).model_copy(
        update={"skipped_records": 3, "last_checkpoint": None}
    )
    w.replace_pod(pod(1, "Succeeded", exit_code=0, message=final.to_json(), finished=at(100)))
    d = w.step(at(101))
    assert w.status["skippedRecords"] == 3
    assert "lastCheckpoint" not in w.status
    assert ("skipped_records", "invalid", 3) in [(t.kind, t.reason, t.value) for t in d.tallies]
    assert w.step(at(200)).tallies == []


def test_final_loss_is_rounded_like_live_progress() -> None:
    w = World()
    w.started()
    message = termination(train_loss=5.7508934815724695)
    w.replace_pod(pod(1, "Succeeded", exit_code=0, message=message, finished=at(100)))
    w.step(at(101))
    assert w.status["progress"]["loss"] == 5.7509


def test_exit_zero_without_adapter_is_not_success() -> None:
    w = World()
    w.started()
    w.replace_pod(
        pod(1, "Succeeded", exit_code=0, message=termination(with_adapter=False), finished=at(100))
    )
    w.step(at(101))
    assert w.status["phase"] != "Succeeded"
    assert w.status["failedAttempts"] == 1


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (ExitCode.INVALID_DATASET, Reason.INVALID_DATASET),
        (ExitCode.CUDA_OOM, Reason.CUDA_OUT_OF_MEMORY),
        (ExitCode.TARGET_MODULES_NOT_FOUND, Reason.TARGET_MODULES_NOT_FOUND),
    ],
)
def test_permanent_failure_is_not_retried(code: int, reason: str) -> None:
    w = World()
    w.started()
    msg = termination("Failed", reason=str(reason), message="bad data")
    w.replace_pod(pod(1, "Failed", exit_code=int(code), message=msg, finished=at(50)))
    d = w.step(at(51))
    assert d.create is None
    assert w.status["phase"] == "Failed"
    assert w.status["failureReason"] == reason
    assert w.status["failedAttempts"] == 1
    assert w.status["hint"]
    assert w.step(at(500)).create is None


def test_oom_killed_is_permanent() -> None:
    w = World()
    w.started()
    w.replace_pod(pod(1, "Failed", exit_code=137, term_reason="OOMKilled", finished=at(50)))
    w.step(at(51))
    assert w.status["phase"] == "Failed"
    assert w.status["failureReason"] == Reason.OOM_KILLED


def test_retryable_failure_retries_after_backoff_and_resumes() -> None:
    w = World()
    w.started()
    msg = termination("Failed", reason="StorageError", message="S3 503", retryable=True)
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.TRANSIENT, message=msg, finished=at(50)))
    d = w.step(at(51))
    assert d.create is None
    assert w.status["failedAttempts"] == 1
    assert "podName" not in w.status
    assert w.status["phase"] == "Pending"
    assert d.requeue_after == pytest.approx(9)
    assert "retry 1 of 3" in w.cond(ConditionType.RUNNING)["message"]
    # Backoff not over yet: still nothing.
    assert w.step(at(55)).create is None
    d = w.step(at(61))
    assert d.create is not None
    assert d.create.attempt == 2
    assert w.status["attempts"] == 2
    w.pods.append(pod(2))
    d = w.step(at(62))
    assert w.cond(ConditionType.RUNNING)["reason"] == Reason.RESUMING
    assert w.status["failedAttempts"] == 1


def test_backoff_limit_exceeded() -> None:
    w = World(job(spec={**SPEC, "backoffLimit": 1}))
    w.started()
    msg = termination("Failed", reason="InternalError", retryable=True)
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.INTERNAL, message=msg, finished=at(10)))
    w.step(at(11))
    assert w.step(at(30)).create is not None
    w.pods.append(pod(2, "Failed", exit_code=ExitCode.INTERNAL, message=msg, finished=at(40)))
    d = w.step(at(41))
    assert d.create is None
    assert w.status["phase"] == "Failed"
    assert w.status["failureReason"] == Reason.BACKOFF_LIMIT_EXCEEDED
    assert w.status["failedAttempts"] == 2


def test_backoff_limit_zero_means_no_retry() -> None:
    w = World(job(spec={**SPEC, "backoffLimit": 0}))
    w.started()
    msg = termination("Failed", reason="StorageError", retryable=True)
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.TRANSIENT, message=msg, finished=at(10)))
    w.step(at(11))
    assert w.status["phase"] == "Failed"


# --------------------------------------------------------------------------- disruptions


def test_eviction_starts_new_attempt_without_counting_a_failure() -> None:
    w = World()
    w.started()
    w.replace_pod(pod(1, "Failed", pod_reason="Evicted", exit_code=137, finished=at(20)))
    d = w.step(at(21))
    assert w.status["disruptions"] == 1
    assert w.status.get("failedAttempts", 0) == 0
    assert d.create is not None
    assert d.create.attempt == 2
    assert ("disruption", Reason.EVICTED) in [(t.kind, t.reason) for t in d.tallies]


def test_kueue_preemption_is_a_disruption() -> None:
    w = World()
    w.started()
    # What Kueue v0.17 writes on the pod before deleting it.
    target = {
        "type": "TerminationTarget",
        "status": "True",
        "reason": "WorkloadEvictedDueToPreempted",
        "message": "Preempted to accommodate a workload due to prioritization in the ClusterQueue",
    }
    w.replace_pod(pod(1, "Running", conditions=[target], deleting=True))
    d = w.step(at(21))
    assert w.status["disruptions"] == 1
    assert ("disruption", Reason.PREEMPTED) in [(t.kind, t.reason) for t in d.tallies]
    assert d.create is None  # the old trainer is still checkpointing
    assert d.delete == []
    w.pods = []
    d = w.step(at(30))
    assert d.create is not None
    assert d.create.attempt == 2
    assert w.status["disruptions"] == 1


def test_vanished_pod_is_a_disruption() -> None:
    w = World()
    w.started()
    w.pods = []
    d = w.step(at(30))
    assert w.status["disruptions"] == 1
    assert d.create is not None
    assert d.create.attempt == 2


def test_too_many_disruptions_fail_the_job() -> None:
    w = World(job(status={"attempts": 4, "disruptions": 3, "podName": f"{NAME}-4"}))
    w.pods = [pod(4, "Failed", pod_reason="Evicted", exit_code=137)]
    d = w.step(at(5))
    assert d.create is None
    assert w.status["phase"] == "Failed"
    assert w.status["failureReason"] == Reason.DISRUPTED


# --------------------------------------------------------------------------- deadline


def test_active_deadline_deletes_pod_and_fails() -> None:
    w = World(job(spec={**SPEC, "activeDeadlineSeconds": 60}))
    w.started()
    d = w.step(at(30))
    assert d.requeue_after == pytest.approx(30)
    d = w.step(at(61))
    assert d.delete
    assert d.delete[0].name == f"{NAME}-1"
    assert w.status["failureReason"] == Reason.DEADLINE_EXCEEDED
    w.replace_pod(pod(1, "Failed", exit_code=21, finished=at(62)))
    d = w.step(at(63))
    assert d.create is None
    assert w.status["phase"] == "Failed"


# --------------------------------------------------------------------------- suspend


def test_suspend_and_resume() -> None:
    w = World()
    w.started()
    w.job["spec"]["suspend"] = True
    w.job["metadata"]["generation"] = 2
    d = w.step(at(10))
    assert [x.name for x in d.delete] == [f"{NAME}-1"]
    assert w.status["phase"] == "Suspended"
    assert reasons(d) == [Reason.SUSPENDED_BY_USER]
    # Pod terminating: nothing more to do, nothing counted.
    w.replace_pod(pod(1, "Running", deleting=True))
    assert w.step(at(11)).delete == []
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.INTERRUPTED, finished=at(12)))
    d = w.step(at(13))
    assert "podName" not in w.status
    assert w.status.get("failedAttempts", 0) == 0
    assert w.status.get("disruptions", 0) == 0
    assert d.create is None
    # Resume: a new attempt.
    w.job["spec"]["suspend"] = False
    w.job["metadata"]["generation"] = 3
    d = w.step(at(20))
    assert d.create is not None
    assert d.create.attempt == 2
    assert Reason.RESUMED in reasons(d)
    assert w.status["startTime"] == stamp(at(20))  # deadline clock restarts
    assert w.cond(ConditionType.SUSPENDED)["status"] == "False"


def test_invalid_edit_while_suspended_waits_instead_of_failing() -> None:
    w = World()
    w.started()
    w.job["spec"]["suspend"] = True
    w.step(at(5))
    w.pods = []
    w.step(at(6))
    w.job["spec"]["training"] = {"learningRate": -1}
    w.job["metadata"]["generation"] = 3
    d = w.step(at(7))
    assert w.status["phase"] == "Suspended"
    accepted = w.cond(ConditionType.ACCEPTED)
    assert accepted["reason"] == Reason.INVALID_SPEC
    assert "spec.training.learningRate" in accepted["message"]
    assert reasons(d) == [Reason.INVALID_SPEC]
    # Resumed with the spec still invalid: now it fails, without a pod.
    w.job["spec"]["suspend"] = False
    w.job["metadata"]["generation"] = 4
    d = w.step(at(8))
    assert d.create is None
    assert w.status["phase"] == "Failed"
    assert w.status["failureReason"] == Reason.INVALID_SPEC


def test_suspended_before_start_creates_nothing() -> None:
    w = World(job(spec={**SPEC, "suspend": True}))
    d = w.step()
    assert d.create is None
    assert w.status["phase"] == "Suspended"


def test_spec_change_while_suspended_is_used_by_next_attempt() -> None:
    w = World()
    w.started()
    w.job["spec"]["suspend"] = True
    w.step(at(5))
    w.pods = []
    w.step(at(6))
    w.job["spec"]["training"] = {"maxSteps": 40}
    w.job["spec"]["suspend"] = False
    w.job["metadata"]["generation"] = 3
    d = w.step(at(10))
    assert d.create is not None
    new_hash = api.spec_hash(api.parse_spec(w.job["spec"]))
    assert w.status["specHash"] == new_hash
    assert '"maxSteps":40' in str(d.create.body["spec"]["containers"][0]["env"])


# --------------------------------------------------------------------------- spec changes


def _edit(w: World, generation: int, **changes: Any) -> None:
    """A user's edit: spec sections merged (a None value removes the field)."""
    for key, value in changes.items():
        if value is None:
            w.job["spec"].pop(key, None)
        elif isinstance(value, dict):
            w.job["spec"][key] = {**(w.job["spec"].get(key) or {}), **value}
        else:
            w.job["spec"][key] = value
    w.job["metadata"]["generation"] = generation


def _stopped(attempt: int, checkpoint: str | None, at_s: float) -> dict[str, Any]:
    """The pod of `attempt` after SIGTERM: exit 21 with the checkpoint it saved."""
    message = TerminationMessage(
        outcome="Failed",
        reason="Interrupted",
        message="stopped by SIGTERM",
        retryable=True,
        last_checkpoint=checkpoint,
    ).to_json()
    return pod(
        attempt, "Failed", exit_code=ExitCode.INTERRUPTED, message=message, finished=at(at_s)
    )


def _succeed(w: World, attempt: int, at_s: float) -> reconcile.Decision:
    w.replace_pod(pod(attempt, "Succeeded", exit_code=0, message=termination(), finished=at(at_s)))
    return w.step(at(at_s + 1))


CHECKPOINT_10 = "s3://adapters/tune/checkpoints/run-r/attempt-1/checkpoint-10"
CHECKPOINT_12 = "s3://adapters/tune/checkpoints/run-r/attempt-1/checkpoint-12"


@pytest.mark.parametrize(
    ("change", "effect"),
    [
        ({"training": {"maxSteps": 40}}, "resume"),
        ({"training": {"checkpointEverySteps": 7, "loggingSteps": 2}}, "resume"),
        ({"output": {"mergedModel": True}}, "resume"),
        ({"resources": {"gpus": 2}}, "new run"),  # the run id counts the ranks (issue 12)
        ({"scheduling": {"priorityClassName": "high"}}, "resume"),
        ({"image": "registry.example.com/trainer:2"}, "resume"),
        ({"training": {"learningRate": 1e-3}}, "new run"),
        ({"training": {"batchSize": 8}}, "new run"),
        ({"lora": {"r": 8}}, "new run"),
        ({"quantization": {"mode": "none"}}, "new run"),
        ({"dataset": {"uri": "s3://data/other.jsonl"}}, "new run"),
        ({"model": {"uri": "s3://models/other"}}, "new run"),
        ({"backoffLimit": 7}, "live"),
        ({"activeDeadlineSeconds": 86400}, "live"),
        ({"ttlSecondsAfterFinished": 60}, "live"),
    ],
)
def test_each_field_class_while_running(change: dict[str, Any], effect: str) -> None:
    """Resumable fields restart the trainer, which resumes; run-defining ones restart it
    as a new run from step 0; control fields apply without touching it."""
    w = World()
    w.started()
    w.step(at(5), progress=Progress(step=10, last_checkpoint=CHECKPOINT_10))
    run = w.status["runId"]
    _edit(w, 2, **change)
    d = w.step(at(10))
    if effect == "live":
        assert d.delete == []
        assert w.status["phase"] == "Running"
        assert w.status["runGeneration"] == 2
        assert d.events == []
        return
    assert [x.name for x in d.delete] == [f"{NAME}-1"]
    assert [x.reason for x in d.delete] == [Reason.SPEC_CHANGED]
    running = w.cond(ConditionType.RUNNING)
    assert (running["status"], running["reason"]) == ("False", Reason.SPEC_CHANGED)
    assert running["observedGeneration"] == 2
    assert w.cond(ConditionType.ACCEPTED)["status"] == "True"
    assert w.status["runGeneration"] == 1  # attempt 1 still runs generation 1
    assert ("new training run from step 0" in running["message"]) == (effect == "new run")
    # The trainer saves checkpoint 12 as it stops; the next attempt runs generation 2.
    w.replace_pod(_stopped(1, CHECKPOINT_12, 12))
    d = w.step(at(13))
    assert d.create is not None
    assert d.create.attempt == 2
    assert w.status["runGeneration"] == 2
    assert w.status["specHash"] == api.spec_hash(api.parse_spec(w.job["spec"]))
    assert w.status.get("failedAttempts", 0) == 0
    assert w.status.get("disruptions", 0) == 0
    created = next(e.message for e in d.events if e.reason == Reason.POD_CREATED)
    if effect == "resume":
        assert w.status["runId"] == run
        assert w.status["lastCheckpoint"] == CHECKPOINT_12
        assert CHECKPOINT_12 in created
    else:
        assert w.status["runId"] != run
        assert "lastCheckpoint" not in w.status  # the old run's: never resumed
        assert "progress" not in w.status
        assert "a new training run" in created


def test_a_restart_for_a_spec_change_is_counted_once_and_never_as_a_failure() -> None:
    w = World()
    w.started()
    _edit(w, 2, training={"maxSteps": 40})
    d = w.step(at(10))
    assert [(e.type, e.reason) for e in d.events] == [("Normal", Reason.SPEC_CHANGED)]
    assert [(t.kind, t.reason) for t in d.tallies] == [("disruption", Reason.SPEC_CHANGED)]
    # The pod terminates: nothing more to do, nothing posted again.
    w.replace_pod(pod(1, "Running", deleting=True))
    again = w.step(at(11))
    assert (again.delete, again.events, again.tallies, again.create) == ([], [], [], None)
    # Whatever the stopped trainer reports, even a permanent failure, is not the job's.
    msg = termination("Failed", reason="InvalidDataset", message="bad record")
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.INVALID_DATASET, message=msg))
    d = w.step(at(12))
    assert d.create is not None
    assert w.status["phase"] == "Pending"
    assert "failureReason" not in w.status
    assert w.status.get("failedAttempts", 0) == 0
    assert [t.kind for t in d.tallies] == ["attempt"]


def test_a_change_made_while_the_operator_was_away_still_applies() -> None:
    # The spec changed, and the attempt then failed on the old spec, all while the
    # operator was down: the failure was the old spec's; the new spec gets its attempt.
    w = World()
    w.started()
    _edit(w, 2, dataset={"format": "alpaca"})
    msg = termination("Failed", reason="InvalidDataset", message="record 3 has no text")
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.INVALID_DATASET, message=msg))
    d = w.step(at(30))
    assert d.create is not None
    assert w.status["phase"] == "Pending"
    assert w.status.get("failedAttempts", 0) == 0


def test_a_change_reverted_while_the_trainer_stops_is_not_a_disruption() -> None:
    w = World()
    w.started()
    _edit(w, 2, training={"maxSteps": 40})
    w.step(at(10))
    _edit(w, 3, training={"maxSteps": 20})  # back to what attempt 1 runs
    w.replace_pod(pod(1, "Running", deleting=True))
    assert w.step(at(11)).delete == []
    w.replace_pod(_stopped(1, CHECKPOINT_12, 12))
    d = w.step(at(13))
    assert d.create is not None
    assert w.status.get("disruptions", 0) == 0
    assert w.status["runGeneration"] == 3


def test_invalid_change_while_running_keeps_the_attempt() -> None:
    w = World()
    w.started()
    _edit(w, 2, training={"learningRate": -1})
    d = w.step(at(10))
    assert d.delete == []
    accepted = w.cond(ConditionType.ACCEPTED)
    assert (accepted["status"], accepted["reason"]) == ("False", Reason.INVALID_SPEC)
    assert "spec.training.learningRate" in accepted["message"]
    assert "keeps running the spec it started with" in accepted["message"]
    assert w.status["phase"] == "Running"
    assert reasons(d) == [Reason.INVALID_SPEC]
    assert w.step(at(20)).events == []
    # It succeeds with the spec it ran: the adapter is generation 1's.
    _succeed(w, 1, 100)
    assert w.status["phase"] == "Succeeded"
    assert w.status["completedGeneration"] == 1


def test_finished_job_runs_again_resuming_when_more_steps_are_asked_for() -> None:
    w = World()
    w.started()
    _succeed(w, 1, 100)
    assert w.status["completedGeneration"] == 1
    adapter, run = w.status["adapter"], w.status["runId"]
    _edit(w, 2, training={"maxSteps": 40})
    d = w.step(at(110))
    assert d.create is not None
    assert d.create.attempt == 2
    assert '"maxSteps":40' in str(d.create.body["spec"]["containers"][0]["env"])
    assert w.status["phase"] == "Pending"
    assert w.cond(ConditionType.SUCCEEDED)["status"] == "False"
    assert w.cond(ConditionType.SUCCEEDED)["reason"] == Reason.SPEC_CHANGED
    assert "completionTime" not in w.status
    # Until the new adapter replaces it, status says which one is at output.uri.
    assert (w.status["adapter"], w.status["completedGeneration"]) == (adapter, 1)
    assert Reason.SPEC_CHANGED in reasons(d)
    assert w.status["runId"] == run  # more steps: the same run, resumed
    w.pods.append(pod(2))
    w.step(at(111))
    _succeed(w, 2, 200)
    assert w.status["phase"] == "Succeeded"
    assert (w.status["completedGeneration"], w.status["runGeneration"]) == (2, 2)


def test_finished_job_runs_again_as_a_new_run_when_the_learning_rate_changes() -> None:
    w = World()
    w.started()
    _succeed(w, 1, 100)
    run = w.status["runId"]
    assert w.status["lastCheckpoint"]
    _edit(w, 2, training={"learningRate": 1e-3})
    d = w.step(at(110))
    assert d.create is not None
    assert w.status["runId"] != run
    assert "lastCheckpoint" not in w.status
    changed = next(e.message for e in d.events if e.reason == Reason.SPEC_CHANGED)
    assert "runs again, as a new training run from step 0" in changed


def test_failed_job_runs_again_with_a_fresh_budget_when_its_spec_changes() -> None:
    w = World(job(spec={**SPEC, "backoffLimit": 0}))
    w.started()
    msg = termination("Failed", reason="InternalError", retryable=True)
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.INTERNAL, message=msg, finished=at(10)))
    w.step(at(11))
    assert w.status["failureReason"] == Reason.BACKOFF_LIMIT_EXCEEDED
    _edit(w, 2, dataset={"format": "alpaca"})
    d = w.step(at(20))
    assert d.create is not None
    assert w.status["phase"] == "Pending"
    assert w.cond(ConditionType.FAILED)["status"] == "False"
    for gone in ("failureReason", "failureMessage", "hint", "failedAttempts", "completionTime"):
        assert gone not in w.status, gone


def test_failed_job_runs_again_when_the_limit_that_failed_it_is_raised() -> None:
    w = World(job(spec={**SPEC, "backoffLimit": 0}))
    w.started()
    msg = termination("Failed", reason="InternalError", retryable=True)
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.INTERNAL, message=msg, finished=at(10)))
    w.step(at(11))
    assert w.status["failedAttempts"] == 1
    _edit(w, 2, ttlSecondsAfterFinished=3600)  # not a limit that failed it
    assert w.step(at(20)).create is None
    assert w.status["phase"] == "Failed"
    _edit(w, 3, backoffLimit=2)
    d = w.step(at(30))
    assert d.create is not None
    assert w.status["failedAttempts"] == 1  # the raised limit counts what failed before
    changed = next(e.message for e in d.events if e.reason == Reason.SPEC_CHANGED)
    assert changed.startswith("spec.backoffLimit is now 2 (1 failed attempts so far)")


def test_failed_job_runs_again_when_its_deadline_is_raised() -> None:
    w = World(job(spec={**SPEC, "activeDeadlineSeconds": 60}))
    w.started()
    w.step(at(61))
    assert w.status["failureReason"] == Reason.DEADLINE_EXCEEDED
    w.replace_pod(_stopped(1, CHECKPOINT_12, 62))
    w.step(at(63))
    _edit(w, 2, activeDeadlineSeconds=30)  # still shorter than it ran
    assert w.step(at(70)).create is None
    _edit(w, 3, activeDeadlineSeconds=3600)
    d = w.step(at(80))
    assert d.create is not None
    assert w.status["startTime"] == stamp(at(80))  # the deadline clock restarts
    assert w.status["lastCheckpoint"] == CHECKPOINT_12


def test_control_field_change_of_a_finished_job_changes_nothing() -> None:
    w = World()
    w.started()
    _succeed(w, 1, 100)
    _edit(w, 2, ttlSecondsAfterFinished=3600, backoffLimit=5)
    d = w.step(at(110))
    assert d.create is None
    assert w.status["phase"] == "Succeeded"
    assert w.status["completedGeneration"] == 2  # the adapter fulfils this spec too
    assert d.events == []


def test_invalid_change_of_a_finished_job_keeps_its_result() -> None:
    w = World()
    w.started()
    _succeed(w, 1, 100)
    _edit(w, 2, training={"learningRate": -1})
    d = w.step(at(110))
    assert d.create is None
    assert w.status["phase"] == "Succeeded"
    accepted = w.cond(ConditionType.ACCEPTED)
    assert (accepted["status"], accepted["reason"]) == ("False", Reason.INVALID_SPEC)
    assert "keeps its result" in accepted["message"]
    assert reasons(d) == [Reason.INVALID_SPEC]
    # Fixed: it runs again with the fixed spec.
    _edit(w, 3, training={"learningRate": 1e-3})
    assert w.step(at(120)).create is not None


def test_needs_new_attempt_after_a_finished_job_is_edited() -> None:
    w = World()
    w.started()
    _succeed(w, 1, 100)
    assert not w.asks_for_facts(at(101))
    _edit(w, 2, training={"maxSteps": 40})
    assert w.asks_for_facts(at(101))


def test_checkpoint_saved_on_sigterm_is_recorded_when_the_attempt_ends() -> None:
    """status.lastCheckpoint must not lag behind what the next attempt resumes from: the
    checkpoint a trainer saves as it stops is only in its termination message."""
    w = World()
    w.started()
    w.step(at(5), progress=Progress(step=10, last_checkpoint=CHECKPOINT_10))
    _edit(w, 2, suspend=True)
    w.step(at(10))
    w.replace_pod(_stopped(1, CHECKPOINT_12, 11))
    w.step(at(12))
    assert w.status["phase"] == "Suspended"
    assert w.status["lastCheckpoint"] == CHECKPOINT_12
    # The same for an eviction.
    _edit(w, 3, suspend=False)
    w.step(at(20))
    w.pods.append(pod(2))
    w.step(at(21))
    evicted = _stopped(2, CHECKPOINT_12.replace("12", "15"), 30)
    evicted["status"]["reason"] = "Evicted"
    w.replace_pod(evicted)
    w.step(at(31))
    assert w.status["lastCheckpoint"].endswith("checkpoint-15")


def test_status_of_an_older_operator_is_taken_over_without_a_restart() -> None:
    # Written before runGeneration/runId, with a spec hash of another formula: the same
    # spec, so the running attempt is left alone.
    w = World()
    w.started()
    for key in ("runGeneration", "runId"):
        w.job["status"].pop(key)
    w.job["status"]["specHash"] = "hash-by-an-older-operator"
    d = w.step(at(10))
    assert d.delete == []
    assert w.status["runGeneration"] == 1
    assert w.status["specHash"] == api.spec_hash(api.parse_spec(SPEC))
    assert w.status["runId"]


def test_a_change_an_older_operator_refused_is_applied() -> None:
    w = World()
    w.started()
    for key in ("runGeneration", "runId"):
        w.job["status"].pop(key)
    _edit(w, 2, training={"maxSteps": 40})
    w.job["status"]["observedGeneration"] = 2
    w.job["status"]["conditions"] = [
        c if c["type"] != "Accepted" else {**c, "status": "False", "reason": "SpecChangeRejected"}
        for c in w.job["status"]["conditions"]
    ]
    d = w.step(at(10))
    assert [x.reason for x in d.delete] == [Reason.SPEC_CHANGED]


# --------------------------------------------------------------------------- restarts


def test_pod_created_before_a_crash_is_adopted_not_duplicated() -> None:
    # The operator created attempt 1's pod, then died before writing status.
    w = World()
    w.pods.append(pod(1, "Pending", spec_hash="h1"))
    d = w.step(at(5))
    assert d.create is None
    assert w.status["attempts"] == 1
    assert w.status["podName"] == f"{NAME}-1"
    assert w.status["specHash"] == "h1"


def test_outcome_reached_while_operator_was_down_is_counted_once() -> None:
    w = World()
    w.started()
    msg = termination("Failed", reason="StorageError", retryable=True)
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.TRANSIENT, message=msg, finished=at(10)))
    w.step(at(500))  # operator back much later: backoff already over
    assert w.status["failedAttempts"] == 1
    assert w.status["attempts"] == 2
    # Replaying with the old failed pod still there counts nothing again.
    w.pods.append(pod(2))
    w.step(at(501))
    w.step(at(502))
    assert w.status["failedAttempts"] == 1


def test_deleted_job_is_left_to_the_finalizer() -> None:
    w = World(job(deletionTimestamp=stamp(T0)))
    d = w.step()
    assert d == reconcile.Decision()


# --------------------------------------------------------------------------- waiting


def test_quota_exceeded_queues_with_backoff_then_starts() -> None:
    w = World()
    message = 'pods "tune-1" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=1'
    d = w.step(quota=message)
    assert w.status["phase"] == "Queued"
    queued = w.cond(ConditionType.QUEUED)
    assert queued["reason"] == Reason.QUOTA_EXCEEDED
    assert "exceeded quota" in queued["message"]
    assert w.status.get("attempts", 0) == 0
    assert d.requeue_after == 15
    d = w.step(at(60), quota=message)
    assert d.requeue_after == 60  # grows with the time already waited
    d = w.step(at(4000), quota=message)
    assert d.requeue_after == 300
    d = w.step(at(4300))
    assert d.create is not None
    assert d.create.attempt == 1
    assert w.cond(ConditionType.QUEUED)["status"] == "False"


def test_concurrency_limit_queues() -> None:
    settings = load_settings(policy=Policy(max_concurrent_jobs_default=2))
    w = World(settings=settings)
    d = w.step(active_in_namespace=2)
    assert d.create is None
    assert w.cond(ConditionType.QUEUED)["reason"] == Reason.CONCURRENCY_LIMIT
    assert w.status["phase"] == "Queued"
    assert d.requeue_after is not None
    d = w.step(at(30), active_in_namespace=1)
    assert d.create is not None


def test_missing_secret_waits_queued() -> None:
    spec = {**SPEC, "storage": {"credentialsSecret": "s3-creds"}}
    w = World(job(spec=spec))
    d = w.step(missing_secrets=[("spec.storage.credentialsSecret", "s3-creds")])
    assert d.create is None
    queued = w.cond(ConditionType.QUEUED)
    assert queued["reason"] == Reason.SECRET_NOT_FOUND
    assert "s3-creds" in queued["message"]
    assert "spec.storage.credentialsSecret" in queued["message"]
    assert d.requeue_after == 15
    assert w.step(at(20)).create is not None


def test_secret_refs() -> None:
    spec = {"storage": {"credentialsSecret": "a", "hfTokenSecret": "b"}}
    assert reconcile.secret_refs(spec) == [
        ("spec.storage.credentialsSecret", "a"),
        ("spec.storage.hfTokenSecret", "b"),
    ]
    assert reconcile.secret_refs({}) == []


def test_kueue_gated_pod_shows_queued() -> None:
    w = World()
    w.step()
    gated = pod(1, "Pending", gates=["kueue.x-k8s.io/admission"])
    gated["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}
    ]
    w.pods.append(gated)
    w.step(at(2))
    assert w.status["phase"] == "Queued"
    assert w.cond(ConditionType.QUEUED)["reason"] == Reason.SCHEDULING_GATED


# --------------------------------------------------------------------------- ttl


def test_ttl_after_finished_deletes_the_job() -> None:
    w = World(job(spec={**SPEC, "ttlSecondsAfterFinished": 30}))
    w.started()
    w.replace_pod(pod(1, "Succeeded", exit_code=0, message=termination(), finished=at(100)))
    d = w.step(at(101))
    assert d.requeue_after == pytest.approx(29)
    assert not d.delete_job
    assert w.step(at(131)).delete_job


# --------------------------------------------------------------------------- helpers


def test_backoff_doubles_and_caps() -> None:
    assert [backoff.exponential(n, 10, 60) for n in range(5)] == [0, 10, 20, 40, 60]


def test_decide_asks_for_the_facts_only_when_an_attempt_may_start() -> None:
    def asks(body: dict[str, Any], trainer_pods: list[dict[str, Any]]) -> bool:
        decision = reconcile.decide(reconcile.Observed(body, trainer_pods, T0), SETTINGS)
        if decision.needs_facts:  # nothing else is decided without them
            assert decision == reconcile.Decision(needs_facts=True)
        return decision.needs_facts

    assert asks(job(), [])
    assert not asks(job(), [pod(1)])
    assert not asks(job(spec={**SPEC, "suspend": True}), [])
    finished = {"phase": "Succeeded", "observedGeneration": 1}
    assert not asks(job(status=finished), [])


def test_progress_is_read_from_the_trainer_that_runs_on() -> None:
    w = World()
    w.started()
    assert w.step().progress_ip == "127.0.0.9"
    w.job["spec"] = {**w.job["spec"], "suspend": True}
    assert w.step().progress_ip is None  # its pod is being deleted


def test_job_key_of_pod_uses_owner_reference() -> None:
    assert pods.job_key_of_pod(pod(1)) == ("team-a", NAME)
    orphan = pod(1)
    orphan["metadata"]["ownerReferences"] = []
    assert pods.job_key_of_pod(orphan) is None


def test_pod_refused_for_good_fails_the_job() -> None:
    w = World()
    create = w.step().create
    assert create is not None
    w.job = job()  # the decision above was not applied: the create failed
    d = reconcile.create_rejected(
        reconcile.Observed(w.job, [], T0, missing_secrets=(), active_in_namespace=0),
        SETTINGS,
        "pods is forbidden: violates PodSecurity",
        quota=False,
    )
    w.job = apply_status(w.job, d.status)
    assert w.status["phase"] == "Failed"
    assert w.status["failureReason"] == Reason.CONTAINER_CONFIG_ERROR
    assert "PodSecurity" in w.status["failureMessage"]
    assert w.status.get("attempts", 0) == 0
    assert ("Warning", Reason.CONTAINER_CONFIG_ERROR) in [(e.type, e.reason) for e in d.events]


@pytest.mark.parametrize("spec", [SPEC, {**SPEC, "training": {"maxSteps": -1}}])
def test_a_spec_parsed_before_decides_like_one_parsed_in_decide(
    spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller hands decide() the spec it parsed once per generation."""
    body = job(spec=spec)
    facts: dict[str, Any] = {"missing_secrets": (), "active_in_namespace": 0}
    fresh = reconcile.decide(reconcile.Observed(body, [], T0, **facts), SETTINGS)
    parsed = reconcile.parse_job_spec(body["spec"], "team-a", SETTINGS)
    assert (parsed.spec is None) == (parsed.error is not None)

    def no_parsing(spec: Any) -> api.LoRAJobSpec:
        raise AssertionError(f"decide() parsed the spec again: {spec}")

    monkeypatch.setattr(api, "parse_spec", no_parsing)
    cached = reconcile.decide(reconcile.Observed(body, [], T0, parsed=parsed, **facts), SETTINGS)
    assert cached.status == fresh.status
    assert cached.phase == fresh.phase
    assert (cached.create and cached.create.body) == (fresh.create and fresh.create.body)


# --------------------------------------------------------------------------- node loss

# The pod's grace period (terminationGracePeriodSeconds): the API server sets
# deletionTimestamp to the time of the delete request plus this much.
GRACE = 120


def _terminating(
    attempt: int, deleted: float, *, taint_eviction: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """A pod of `attempt` whose deletion was requested `deleted` seconds after T0 and
    that still reports Running: its kubelet has not (or cannot) stop it.

    With `taint_eviction` it has the shape a real cluster gives a pod on a node that
    stopped heartbeating: the node lifecycle controller marked it not Ready, and the
    taint-eviction controller deleted it once its toleration of
    node.kubernetes.io/unreachable:NoExecute ran out.
    """
    conditions: list[dict[str, Any]] = kwargs.pop("conditions", None) or []
    if taint_eviction:
        conditions = [
            {"type": "Ready", "status": "False", "lastTransitionTime": stamp(at(deleted - 300))},
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "DeletionByTaintManager",
                "message": "Taint manager: deleting due to NoExecute taint",
                "lastTransitionTime": stamp(at(deleted)),
            },
        ]
    body = pod(attempt, "Running", conditions=conditions, **kwargs)
    body["metadata"]["deletionTimestamp"] = stamp(at(deleted + GRACE))
    body["metadata"]["deletionGracePeriodSeconds"] = GRACE
    return body


def _running_second_attempt_after_a_failure(w: World) -> None:
    """Attempt 1 failed (retryable, counted); attempt 2 runs."""
    w.started()
    msg = termination("Failed", reason="StorageError", message="S3 503", retryable=True)
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.TRANSIENT, message=msg, finished=at(50)))
    w.step(at(51))
    assert w.step(at(61)).create is not None
    w.pods.append(pod(2))
    w.step(at(62))
    assert w.status["phase"] == "Running"
    assert w.status["failedAttempts"] == 1


def test_pod_of_a_lost_node_starts_the_next_attempt_at_once() -> None:
    w = World()
    _running_second_attempt_after_a_failure(w)
    # The node stopped heartbeating; 300s later the taint-eviction controller deleted the
    # pod. Its kubelet is gone: the pod stays Running and terminating until PodGC.
    w.replace_pod(_terminating(2, 900, taint_eviction=True))
    d = w.step(at(901))
    # A disruption: no backoff (attempt 1's failure would impose one), nothing counted.
    assert d.create is not None
    assert d.create.attempt == 3
    assert w.status["attempts"] == 3
    assert w.status["podName"] == f"{NAME}-3"
    assert w.status["disruptions"] == 1
    assert w.status["failedAttempts"] == 1
    assert ("disruption", Reason.NODE_LOST) in [(t.kind, t.reason) for t in d.tallies]
    assert d.delete == []  # left for PodGC, never force-deleted
    lost = [e for e in d.events if e.reason == Reason.NODE_LOST]
    assert [e.type for e in lost] == ["Warning"]
    assert "node gpu-node-1 was lost" in lost[0].message
    assert "a new attempt resumes from the last checkpoint" in lost[0].message
    assert "not counted against backoffLimit" in lost[0].message
    created = [e.message for e in d.events if e.reason == Reason.POD_CREATED]
    assert len(created) == 1
    assert created[0].startswith(
        f"created pod {NAME}-3 for attempt 3 (resumes from checkpoint "
        f"s3://adapters/tune/checkpoints/checkpoint-20) beside pod "
        f"{NAME}-2 of attempt 2: node gpu-node-1 was lost"
    )
    # The new attempt learns its number, which fences its checkpoints.
    env = {e["name"]: e.get("value") for e in d.create.body["spec"]["containers"][0]["env"]}
    assert env["LORA_TRAINER_ATTEMPT"] == "3"


def test_lost_old_pod_beside_the_new_attempt_makes_no_third_attempt() -> None:
    w = World()
    w.started()
    w.replace_pod(_terminating(1, 900, taint_eviction=True))
    assert w.step(at(901)).create is not None
    # While the new pod starts and once it runs: the lost pod holds nothing up, and it
    # is recognised as an older attempt's.
    w.pods.append(pod(2, "Pending"))
    for now in (902, 960, 5000):
        d = w.step(at(now))
        assert d.create is None
        assert d.delete == []
        w.replace_pod(pod(2))
    assert w.status["attempts"] == 2
    assert w.status["podName"] == f"{NAME}-2"
    assert w.status["phase"] == "Running"
    assert w.status["disruptions"] == 1
    assert not w.asks_for_facts(at(5000))
    # Attempt 2 fails: its retry waits for the backoff only, not for the lost pod.
    msg = termination("Failed", reason="StorageError", message="S3 503", retryable=True)
    w.replace_pod(pod(2, "Failed", exit_code=ExitCode.TRANSIENT, message=msg, finished=at(6000)))
    assert w.step(at(6001)).create is None
    d = w.step(at(6011))
    assert d.create is not None
    assert d.create.attempt == 3


def test_terminating_pod_within_its_grace_period_is_waited_for() -> None:
    w = World()
    w.started()
    eviction = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "EvictionByEvictionAPI",
        "message": "Eviction API: evicting",
    }
    w.replace_pod(_terminating(1, 100, conditions=[eviction]))
    # The trainer got SIGTERM and is saving a checkpoint: the next attempt waits for it.
    d = w.step(at(101))
    assert d.create is None
    assert w.status["disruptions"] == 1
    assert d.requeue_after == pytest.approx(reconcile.TERMINATING_RECHECK_SECONDS)
    # Still waiting at the end of the grace period and a little past it.
    assert w.step(at(100 + GRACE)).create is None
    assert w.step(at(100 + GRACE + 29)).create is None
    assert w.asks_for_facts(at(100 + GRACE + 30))  # the controller gathers the facts
    # 30s past its deletionTimestamp the pod still reports Running: the kubelet never
    # confirmed, the node is lost.
    d = w.step(at(100 + GRACE + 30))
    assert d.create is not None
    assert d.create.attempt == 2
    assert w.status["disruptions"] == 1  # counted once, when the eviction began
    assert d.delete == []


def test_pod_deleted_without_reason_on_a_lost_node_is_node_lost() -> None:
    w = World()
    w.started()
    w.replace_pod(_terminating(1, 100))  # e.g. kubectl delete, node gone meanwhile
    assert w.step(at(101)).create is None
    d = w.step(at(100 + GRACE + 31))
    assert d.create is not None
    # Counted as a disruption when the deletion began; the new attempt's message says
    # why it did not wait any longer.
    assert w.status["disruptions"] == 1
    message = w.cond(ConditionType.RUNNING)["message"]
    assert message.startswith(
        f"created pod {NAME}-2 for attempt 2 beside pod "
        f"{NAME}-1 of attempt 1: node gpu-node-1 was lost"
    )
    assert "still reports Running 30s after its deletion grace period ended" in message
    assert [e.message for e in d.events if e.reason == Reason.POD_CREATED] == [message]


def test_an_attempt_says_it_resumes_only_from_a_recorded_checkpoint() -> None:
    def messages(d: reconcile.Decision, reason: str) -> list[str]:
        return [e.message for e in d.events if e.reason == reason]

    w = World()
    w.started()
    # Attempt 1 fails before its first checkpoint: nothing to resume from, so no claim.
    msg = TerminationMessage(
        outcome="Failed", reason="StorageError", message="S3 503", retryable=True
    ).to_json()
    w.replace_pod(pod(1, "Failed", exit_code=ExitCode.TRANSIENT, message=msg, finished=at(50)))
    (retry,) = messages(w.step(at(51)), Reason.STORAGE_ERROR)
    assert retry.endswith("retry 1 of 3 in 10s"), retry
    d = w.step(at(61))
    assert messages(d, Reason.POD_CREATED) == [f"created pod {NAME}-2 for attempt 2"]
    w.pods.append(pod(2))
    w.step(at(62))

    # Attempt 2 fails after a checkpoint: the retry and attempt 3 name it.
    ckpt = "s3://adapters/tune/checkpoints/attempt-2/checkpoint-40"
    report = TerminationMessage(
        outcome="Failed", reason="StorageError", message="S3 503", retryable=True,
        last_checkpoint=ckpt,
    ).to_json()  # fmt: skip
    w.replace_pod(pod(2, "Failed", exit_code=ExitCode.TRANSIENT, message=report, finished=at(100)))
    (retry,) = messages(w.step(at(101)), Reason.STORAGE_ERROR)
    assert retry.endswith(f"retry 2 of 3 in 20s, resuming from checkpoint {ckpt}"), retry
    d = w.step(at(200))
    assert messages(d, Reason.POD_CREATED) == [
        f"created pod {NAME}-3 for attempt 3 (resumes from checkpoint {ckpt})"
    ]


def test_suspended_job_is_not_held_up_by_a_lost_pod() -> None:
    w = World()
    w.started()
    w.job["spec"]["suspend"] = True
    w.job["metadata"]["generation"] = 2
    w.step(at(10))
    w.replace_pod(_terminating(1, 10, taint_eviction=True))
    w.step(at(11))
    assert w.status["phase"] == "Suspended"
    w.job["spec"]["suspend"] = False
    w.job["metadata"]["generation"] = 3
    d = w.step(at(20))
    assert d.create is not None
    assert d.create.attempt == 2
