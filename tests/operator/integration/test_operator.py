"""The real operator (`kopf run -m lorajob_operator.kopf_app`) against the API
server emulator and the test kubelet, with the fake protocol trainer."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from lorajob_operator.crd import build_crd
from loraops_contract.protocol import ExitCode
from loraops_contract.rules import VALIDATIONS_KEY

from tests.operator.integration.conftest import GROUP, LIMITED_NAMESPACE, PULL_ERROR_IMAGE, Cluster

# Each module starts a whole control plane (API server, kubelet, operator).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def reasons(cluster: Cluster, name: str, namespace: str = "default") -> list[str]:
    return [e["reason"] for e in cluster.events(name, namespace)]


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == ctype)


def test_job_runs_to_success_with_progress_events_and_adapter(cluster: Cluster) -> None:
    cluster.create_job("happy", script={"hold_at_step": 8})
    running = cluster.wait_status(
        "happy",
        lambda s: s.get("phase") == "Running" and (s.get("progress") or {}).get("step", 0) >= 8,
        "progress copied while running",
    )
    assert running["progress"]["totalSteps"] == 20
    assert running["progress"]["percent"] == 40.0
    assert running["lastCheckpoint"].endswith("checkpoint-5")
    assert running["podName"] == "happy-1"
    assert running["nodeName"].startswith("gpu-node-")
    cluster.release("happy")
    done = cluster.wait_phase("happy", "Succeeded")
    assert done["adapter"]["uri"] == "s3://adapters/default/happy"
    assert done["adapter"]["manifestUri"].endswith("manifest.json")
    assert done["progress"]["percent"] == 100.0
    assert done["attempts"] == 1
    assert done["observedGeneration"] == 1
    assert done["completionTime"]
    assert condition(done, "Succeeded")["status"] == "True"
    events = reasons(cluster, "happy")
    for reason in ("SpecValid", "PodCreated", "TrainerRunning", "Completed"):
        assert reason in events
    assert len(cluster.pods("happy")) == 1
    # kopf's own bookkeeping lives in annotations, never in status.
    job = cluster.job("happy") or {}
    assert GROUP + "/finalizer" in job["metadata"].get("finalizers", [])
    assert not any(k.startswith("kopf") for k in done)


def test_permanent_failure_is_not_retried(cluster: Cluster) -> None:
    cluster.create_job("baddata", script={"fail": {"1": int(ExitCode.INVALID_DATASET)}})
    status = cluster.wait_phase("baddata", "Failed")
    assert status["failureReason"] == "InvalidDataset"
    assert "scripted failure" in status["failureMessage"]
    assert status["hint"]
    assert status["attempts"] == 1
    assert status["failedAttempts"] == 1
    assert len(cluster.pods("baddata")) == 1
    assert "InvalidDataset" in reasons(cluster, "baddata")


def test_retryable_failure_retries_and_resumes_from_checkpoint(cluster: Cluster) -> None:
    cluster.create_job("flaky", script={"fail": {"1": int(ExitCode.TRANSIENT)}, "fail_at_step": 10})
    status = cluster.wait_phase("flaky", "Succeeded")
    assert status["attempts"] == 2
    assert status["failedAttempts"] == 1
    assert status.get("disruptions", 0) == 0
    assert cluster.attempts_log("flaky") == [
        "attempt=1 resumed_from=0",
        "attempt=2 resumed_from=10",
    ]
    assert "StorageError" in reasons(cluster, "flaky")


def test_backoff_limit_exceeded(cluster: Cluster) -> None:
    script = {"fail": {"1": int(ExitCode.INTERNAL), "2": int(ExitCode.INTERNAL)}}
    cluster.create_job("doomed", script=script, backoffLimit=1)
    status = cluster.wait_phase("doomed", "Failed")
    assert status["failureReason"] == "BackoffLimitExceeded"
    assert status["failedAttempts"] == 2
    assert len(cluster.pods("doomed")) == 2


def test_eviction_resumes_without_counting_a_failure(cluster: Cluster) -> None:
    cluster.create_job("evicted", script={"hold_at_step": 7})
    cluster.wait_status(
        "evicted", lambda s: (s.get("progress") or {}).get("step", 0) >= 7, "step 7"
    )
    assert cluster.cp.kubelet is not None
    cluster.cp.kubelet.evict("default", "evicted-1")
    status = cluster.wait_status(
        "evicted", lambda s: s.get("attempts") == 2 and s.get("phase") == "Running", "attempt 2"
    )
    assert status["disruptions"] == 1
    assert status.get("failedAttempts", 0) == 0
    cluster.release("evicted")
    status = cluster.wait_phase("evicted", "Succeeded")
    assert status.get("failedAttempts", 0) == 0
    # The SIGTERMed trainer checkpointed at step 7; attempt 2 went on from there.
    assert cluster.attempts_log("evicted")[-1] == "attempt=2 resumed_from=7"
    assert "Evicted" in reasons(cluster, "evicted")


def test_delete_removes_pods_and_finalizer(cluster: Cluster) -> None:
    cluster.create_job("doomed-by-user", script={"hold_at_step": 3})
    cluster.wait_phase("doomed-by-user", "Running")
    cluster.cp.kubectl("delete", f"lorajobs.{GROUP}", "doomed-by-user", "--wait=false")
    cluster.cp.wait_for(
        lambda: cluster.job("doomed-by-user") is None and not cluster.pods("doomed-by-user"),
        timeout=30,
        message="job and pods gone",
    )


def test_suspend_and_resume(cluster: Cluster) -> None:
    cluster.create_job("pausable", script={"hold_at_step": 6})
    cluster.wait_status(
        "pausable", lambda s: (s.get("progress") or {}).get("step", 0) >= 6, "step 6"
    )
    cluster.patch_job("pausable", {"spec": {"suspend": True}})
    status = cluster.wait_phase("pausable", "Suspended")
    cluster.cp.wait_for(lambda: not cluster.pods("pausable"), message="pod deleted on suspend")
    assert condition(status, "Suspended")["reason"] == "SuspendedByUser"
    # While suspended the spec may change; the next attempt runs it.
    cluster.patch_job(
        "pausable", {"spec": {"training": {"maxSteps": 12, "checkpointEverySteps": 5}}}
    )
    cluster.release("pausable")
    cluster.patch_job("pausable", {"spec": {"suspend": False}})
    status = cluster.wait_phase("pausable", "Succeeded")
    assert status["attempts"] == 2
    assert status.get("failedAttempts", 0) == 0
    assert status.get("disruptions", 0) == 0
    assert status["progress"]["step"] == 12
    assert cluster.attempts_log("pausable")[-1] == "attempt=2 resumed_from=6"
    assert {"SuspendedByUser", "Resumed"} <= set(reasons(cluster, "pausable"))


def test_operator_restart_mid_job(cluster: Cluster) -> None:
    cluster.create_job("survivor", script={"hold_at_step": 4})
    cluster.wait_status(
        "survivor", lambda s: (s.get("progress") or {}).get("step", 0) >= 4, "step 4"
    )
    cluster.cp.stop_operator()
    try:
        cluster.release("survivor")
        # The trainer finishes while no operator is watching.
        cluster.cp.wait_for(
            lambda: any(p["status"].get("phase") == "Succeeded" for p in cluster.pods("survivor")),
            message="pod finished",
        )
    finally:
        cluster.cp.start_operator()
    status = cluster.wait_phase("survivor", "Succeeded")
    assert status["attempts"] == 1
    assert len(cluster.pods("survivor")) == 1
    assert reasons(cluster, "survivor").count("PodCreated") == 1
    assert reasons(cluster, "survivor").count("Completed") == 1


def test_operator_restart_while_pod_vanishes(cluster: Cluster) -> None:
    cluster.create_job("orphaned", script={"hold_at_step": 4})
    cluster.wait_status(
        "orphaned", lambda s: (s.get("progress") or {}).get("step", 0) >= 4, "step 4"
    )
    cluster.cp.stop_operator()
    try:
        cluster.cp.kubectl("delete", "pod", "orphaned-1", "--wait=true")
    finally:
        cluster.cp.start_operator()
    status = cluster.wait_status("orphaned", lambda s: s.get("attempts") == 2, "attempt 2")
    assert status["disruptions"] == 1
    cluster.release("orphaned")
    status = cluster.wait_phase("orphaned", "Succeeded")
    assert status.get("failedAttempts", 0) == 0
    assert [p["metadata"]["name"] for p in cluster.pods("orphaned")] == ["orphaned-2"]


def _strip_rules(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_rules(v) for k, v in node.items() if k != VALIDATIONS_KEY}
    if isinstance(node, list):
        return [_strip_rules(v) for v in node]
    return node


@contextlib.contextmanager
def _crd_before_its_rules(cluster: Cluster, refused: dict[str, Any]) -> Iterator[None]:
    """The CRD without its CEL rules while the block runs, as a release before them had
    it: a job created meanwhile is stored as an older job was. `refused` is a job the
    rules refuse, to tell when the API server has switched."""

    def accepted() -> bool:
        dry_run = cluster.cp.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=json.dumps(refused), check=False
        )
        return dry_run.returncode == 0

    cluster.cp.cluster.apply([_strip_rules(build_crd())])
    cluster.cp.wait_for(accepted, timeout=30, message="the CRD without its rules")
    try:
        yield
    finally:
        cluster.cp.cluster.apply([build_crd()])
        cluster.cp.wait_for(lambda: not accepted(), timeout=30, message="the CRD's rules back")


def test_invalid_spec_fails_without_pod(cluster: Cluster) -> None:
    # The CRD refuses this spec at apply time now (its CEL rules); a job stored before
    # those rules existed still reaches the operator, which fails it without a pod.
    spec: dict[str, Any] = {"storage": {"endpoint": "https://s3.example.com"}}
    job = {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": "invalid-probe", "namespace": "default"},
        "spec": {"model": {"uri": "s3://m/x"}, "dataset": {"uri": "s3://d/x"}}
        | {"output": {"uri": "s3://o/x"}}
        | spec,
    }
    with _crd_before_its_rules(cluster, job):
        cluster.create_job("invalid", storage=spec["storage"])
    status = cluster.wait_phase("invalid", "Failed")
    assert status["failureReason"] == "InvalidSpec"
    assert "spec.storage.credentialsSecret" in status["failureMessage"]
    assert cluster.pods("invalid") == []
    events = cluster.events("invalid")
    assert [(e["type"], e["reason"]) for e in events] == [("Warning", "InvalidSpec")]


def test_missing_secret_waits_then_starts(cluster: Cluster) -> None:
    cluster.create_job("needs-secret", storage={"credentialsSecret": "s3-creds"})
    status = cluster.wait_phase("needs-secret", "Queued")
    queued = condition(status, "Queued")
    assert queued["reason"] == "SecretNotFound"
    assert "s3-creds" in queued["message"]
    assert cluster.pods("needs-secret") == []
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-creds", "namespace": "default"},
        "stringData": {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "hunter2-secret"},
    }
    cluster.apply(secret)
    status = cluster.wait_phase("needs-secret", "Succeeded")
    dump = json.dumps(status) + json.dumps(cluster.events("needs-secret"))
    assert "hunter2-secret" not in dump
    assert "hunter2-secret" not in cluster.cp.operator_log.read_text()


def test_quota_exceeded_queues_then_starts(cluster: Cluster) -> None:
    ns = "quota-team"
    cluster.cp.kubectl("create", "namespace", ns)
    quota: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "gpus", "namespace": ns},
        "spec": {"hard": {"requests.nvidia.com/gpu": "0"}},
    }
    cluster.apply(quota)
    cluster.create_job("squeezed", namespace=ns)
    status = cluster.wait_phase("squeezed", "Queued", namespace=ns)
    queued = condition(status, "Queued")
    assert queued["reason"] == "QuotaExceeded"
    assert "exceeded quota" in queued["message"]
    assert status.get("attempts", 0) == 0
    quota["spec"]["hard"]["requests.nvidia.com/gpu"] = "1"
    cluster.apply(quota)
    status = cluster.wait_phase("squeezed", "Succeeded", namespace=ns)
    assert status["attempts"] == 1


def test_concurrency_limit_queues_second_job(cluster: Cluster) -> None:
    ns = LIMITED_NAMESPACE
    cluster.cp.kubectl("create", "namespace", ns)
    cluster.create_job("first", namespace=ns, script={"hold_at_step": 2})
    cluster.wait_phase("first", "Running", namespace=ns)
    cluster.create_job("second", namespace=ns)
    status = cluster.wait_phase("second", "Queued", namespace=ns)
    assert condition(status, "Queued")["reason"] == "ConcurrencyLimit"
    assert cluster.pods("second", ns) == []
    cluster.release("first", ns)
    cluster.wait_phase("first", "Succeeded", namespace=ns)
    cluster.wait_phase("second", "Succeeded", namespace=ns)


def test_active_deadline_stops_the_job(cluster: Cluster) -> None:
    cluster.create_job("slowpoke", script={"hold_at_step": 3}, activeDeadlineSeconds=2)
    status = cluster.wait_phase("slowpoke", "Failed")
    assert status["failureReason"] == "DeadlineExceeded"
    cluster.cp.wait_for(
        lambda: all(p["status"].get("phase") in ("Failed", None) for p in cluster.pods("slowpoke")),
        message="pod stopped",
    )
    assert status["attempts"] == 1


def test_ttl_after_finished_deletes_the_job(cluster: Cluster) -> None:
    cluster.create_job("ephemeral", ttlSecondsAfterFinished=1)
    cluster.cp.wait_for(
        lambda: cluster.job("ephemeral") is None and not cluster.pods("ephemeral"),
        message="job deleted after its TTL",
    )


def test_image_pull_error_fails_without_retry(cluster: Cluster) -> None:
    cluster.create_job("unpullable", image=f"{PULL_ERROR_IMAGE}:1.0")
    status = cluster.wait_phase("unpullable", "Failed")
    assert status["failureReason"] == "ImagePullError"
    assert status["attempts"] == 1
    cluster.cp.wait_for(lambda: not cluster.pods("unpullable"), message="stuck pod deleted")


def test_metrics_are_served(cluster: Cluster) -> None:
    cluster.create_job("measured")
    cluster.wait_phase("measured", "Succeeded")
    text = cluster.metrics()
    assert 'lorajob_jobs{phase="Succeeded"}' in text
    assert "lorajob_attempts_total" in text
    assert "lorajob_reconcile_duration_seconds_bucket" in text
    assert "lorajob_job_duration_seconds_count" in text


def test_node_loss_moves_the_job_to_another_node(cluster: Cluster) -> None:
    # Last in the module: the lost node stays NotReady for the rest of the session.
    cluster.create_job("nomad", script={"hold_at_step": 6})
    status = cluster.wait_status(
        "nomad", lambda s: (s.get("progress") or {}).get("step", 0) >= 6, "step 6"
    )
    lost = status["nodeName"]
    assert cluster.cp.kubelet is not None
    cluster.cp.kubelet.lose_node(lost)
    # The real controllers take the node monitor grace period plus the pods'
    # unreachable toleration (devcluster.cluster.Timings: about 20 s here; a real
    # cluster's defaults make that about 6 minutes).
    status = cluster.wait_status(
        "nomad",
        lambda s: s.get("attempts") == 2 and s.get("phase") == "Running",
        "attempt 2",
        timeout=120,
    )
    assert status["nodeName"] != lost
    assert status["disruptions"] == 1
    assert status.get("failedAttempts", 0) == 0
    cluster.release("nomad")
    status = cluster.wait_phase("nomad", "Succeeded")
    # SIGKILLed with the node: no checkpoint at step 6, the last one is step 5.
    assert cluster.attempts_log("nomad")[-1] == "attempt=2 resumed_from=5"
    assert "NodeLost" in reasons(cluster, "nomad")
