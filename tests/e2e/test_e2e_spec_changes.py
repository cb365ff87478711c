"""The README's way to change a job, with the real trainer: suspend it, change its
learning rate, resume it. That change defines a new training run: it trains from step 0
and succeeds (it used to fail for good as InvalidSpec, refusing to mix two runs)."""

from __future__ import annotations

import json
import re

from tests.e2e.conftest import BUCKET, Cluster

# Long enough to suspend mid-run, with a checkpoint every 4 steps.
LONGER = {
    "spec": {
        "training": {"maxSteps": 24, "checkpointEverySteps": 4, "gradientAccumulationSteps": 8}
    }
}
TOTAL_STEPS = 24


def _patch(cluster: Cluster, name: str, spec: dict[str, object]) -> None:
    cluster.kubectl("patch", "lj", name, "--type=merge", "-p", json.dumps({"spec": spec}))


def test_suspend_change_the_learning_rate_resume_trains_a_new_run(cluster: Cluster) -> None:
    cluster.create_secret()
    cluster.apply(cluster.manifest("relearned", LONGER))
    first_pod = cluster.wait_status("relearned", lambda s: bool(s.get("podName")), "a pod")[
        "podName"
    ]
    cluster.cp.wait_for(
        lambda: cluster.trainer_progress(first_pod).get("lastCheckpoint"),
        timeout=180,
        message="the first checkpoint",
    )
    _patch(cluster, "relearned", {"suspend": True})
    suspended = cluster.wait_status(
        "relearned",
        lambda s: s.get("phase") == "Suspended" and not s.get("podName"),
        "suspended, its trainer stopped",
        timeout=120,
    )
    assert cluster.cp.kubelet is not None
    first_log = cluster.cp.kubelet.pod_log("default", first_pod)
    stopped = re.search(r"stopped by SIGTERM at step (\d+)/", first_log)
    assert stopped, first_log[-2000:]
    # The checkpoint saved on SIGTERM is the one status names (it used to lag one behind).
    assert suspended["lastCheckpoint"].endswith(f"/checkpoint-{stopped[1]}"), suspended
    first_run = suspended["runId"]
    assert f"/checkpoints/run-{first_run}/attempt-1/" in suspended["lastCheckpoint"]

    _patch(cluster, "relearned", {"training": {"learningRate": 0.0005}})
    _patch(cluster, "relearned", {"suspend": False})
    status = cluster.wait_phase("relearned", "Succeeded")

    assert status["runId"] != first_run
    assert status["attempts"] == 2
    assert status.get("failedAttempts", 0) == 0
    assert status["progress"]["step"] == TOTAL_STEPS
    generation = cluster.job("relearned")["metadata"]["generation"]
    assert status["completedGeneration"] == status["runGeneration"] == generation
    second_log = cluster.cp.kubelet.pod_log("default", status["podName"])
    assert f"no checkpoint of run {status['runId']} to resume: training from step 0" in (
        second_log
    ), second_log[-2000:]
    metrics = json.loads(
        cluster.s3_objects("adapters/relearned/metrics.json")["adapters/relearned/metrics.json"]
    )
    assert metrics["resumed_from_step"] is None
    assert metrics["loss_history"][0][0] == 1  # trained from the first step
    assert status["adapter"]["uri"] == f"s3://{BUCKET}/adapters/relearned"
