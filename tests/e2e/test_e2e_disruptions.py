"""A job survives the trainer pod being evicted and the operator being restarted."""

from __future__ import annotations

import json
import re

from tests.e2e.conftest import BUCKET, Cluster

# Long enough to interrupt mid-run, with a checkpoint every 4 steps to resume from.
# Long enough to interrupt mid-run (gradient accumulation makes each step ~0.1s or more),
# with a checkpoint every 4 steps to resume from.
LONGER = {
    "spec": {
        "training": {"maxSteps": 24, "checkpointEverySteps": 4, "gradientAccumulationSteps": 8}
    }
}
TOTAL_STEPS = 24


def _checkpoint_step(uri: str | None) -> int:
    return int(uri.rstrip("/").rsplit("-", 1)[-1]) if uri else 0


def test_evicted_trainer_resumes_from_its_checkpoint(cluster: Cluster) -> None:
    cluster.create_secret()
    # The checkpoints are kept after success, to check them below.
    kept = {"spec": {**LONGER["spec"], "output": {"keepCheckpoints": True}}}
    cluster.apply(cluster.manifest("evicted", kept))
    running = cluster.wait_status("evicted", lambda s: bool(s.get("podName")), "a trainer pod")
    first_pod = running["podName"]
    # Watch the trainer itself and evict right after its first checkpoint.
    progress = cluster.cp.wait_for(
        lambda: (p := cluster.trainer_progress(first_pod)).get("lastCheckpoint") and p,
        timeout=180,
        message="the first checkpoint",
    )
    assert progress["step"] < TOTAL_STEPS, "training finished before it could be interrupted"
    assert cluster.cp.kubelet is not None
    cluster.cp.kubelet.evict("default", first_pod)

    status = cluster.wait_phase("evicted", "Succeeded")
    # The eviction is a disruption: a new attempt, nothing spent from backoffLimit.
    assert status["attempts"] == 2
    assert status["disruptions"] == 1
    assert status.get("failedAttempts", 0) == 0
    assert status["podName"] != first_pod
    assert status["progress"]["step"] == TOTAL_STEPS
    # The first trainer checkpointed on SIGTERM; the second resumed from that checkpoint.
    first_log = cluster.cp.kubelet.pod_log("default", first_pod)
    second_log = cluster.cp.kubelet.pod_log("default", status["podName"])
    stopped = re.search(r"stopped by SIGTERM at step (\d+)/", first_log)
    assert stopped, first_log[-2000:]
    resumed = re.search(r"resuming from \S+/checkpoint-(\d+) \(step (\d+)\)", second_log)
    assert resumed, second_log[-2000:]
    assert int(resumed[2]) == int(stopped[1]) < TOTAL_STEPS
    reasons = {
        e["reason"]
        for e in json.loads(
            cluster.kubectl(
                "get", "events", "--field-selector", "involvedObject.name=evicted", "-o", "json"
            ).stdout
        )["items"]
    }
    assert "Evicted" in reasons, reasons
    # Every checkpoint that exists is complete, and the adapter is published.
    objects = cluster.s3_objects("adapters/evicted/")
    assert "adapters/evicted/manifest.json" in objects
    # Each attempt wrote under its own prefix of the one run (checkpoints/run-<run>/
    # attempt-<N>/checkpoint-<step>/).
    runs = {k.split("/")[3] for k in objects if k.startswith("adapters/evicted/checkpoints/")}
    assert len(runs) == 1, runs
    checkpoints = {
        "/".join(k.split("/")[3:6])
        for k in objects
        if k.startswith("adapters/evicted/checkpoints/")
    }
    assert checkpoints
    assert {c.split("/")[1] for c in checkpoints} <= {"attempt-1", "attempt-2"}, checkpoints
    assert any("/attempt-1/" in c for c in checkpoints), checkpoints
    for checkpoint in checkpoints:
        assert f"adapters/evicted/checkpoints/{checkpoint}/COMPLETE" in objects, checkpoint
    assert f"/attempt-1/checkpoint-{stopped[1]}" in resumed[0], resumed[0]
    assert status["adapter"]["uri"] == f"s3://{BUCKET}/adapters/evicted"


def test_operator_restart_mid_job_keeps_the_running_trainer(cluster: Cluster) -> None:
    cluster.create_secret()
    cluster.apply(cluster.manifest("restarted", LONGER))
    running = cluster.wait_status(
        "restarted",
        lambda s: s.get("phase") == "Running" and (s.get("progress") or {}).get("step", 0) >= 1,
        "training to start",
    )
    pod = running["podName"]
    cluster.cp.stop_operator()
    # Nothing follows the job now; the trainer keeps going on its own.
    cluster.cp.start_operator()

    status = cluster.wait_phase("restarted", "Succeeded")
    # The restarted operator adopted the running pod instead of starting another.
    assert status["attempts"] == 1
    assert status["podName"] == pod
    assert status.get("disruptions", 0) == 0
    assert status["progress"]["step"] == TOTAL_STEPS
    assert "adapters/restarted/manifest.json" in cluster.s3_objects("adapters/restarted/")


def test_suspend_frees_the_pod_and_resume_continues_from_the_checkpoint(cluster: Cluster) -> None:
    cluster.create_secret()
    cluster.apply(cluster.manifest("pausable", LONGER))
    first_pod = cluster.wait_status("pausable", lambda s: bool(s.get("podName")), "a pod")[
        "podName"
    ]
    cluster.cp.wait_for(
        lambda: cluster.trainer_progress(first_pod).get("lastCheckpoint"),
        timeout=180,
        message="the first checkpoint",
    )
    cluster.kubectl("patch", "lj", "pausable", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    suspended = cluster.wait_phase("pausable", "Suspended", timeout=120)
    assert cluster.cp.wait_for(
        lambda: not [p for p in cluster.pods("pausable") if p["status"].get("phase") == "Running"],
        timeout=60,
        message="the trainer pod to stop",
    )
    assert suspended.get("failedAttempts", 0) == 0

    cluster.kubectl("patch", "lj", "pausable", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    status = cluster.wait_phase("pausable", "Succeeded")
    assert status["attempts"] == 2
    assert status.get("failedAttempts", 0) == 0
    second_log = (
        cluster.cp.kubelet.pod_log("default", status["podName"]) if cluster.cp.kubelet else ""
    )
    assert re.search(r"resuming from \S+/checkpoint-\d+", second_log), second_log[-2000:]
    assert status["progress"]["step"] == TOTAL_STEPS
