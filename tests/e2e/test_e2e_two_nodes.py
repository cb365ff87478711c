"""A LoRAJob with `resources.nodes: 2` on the local cluster: two pods on two nodes, one
training process each (gloo on the CPU), that meet through torchrun's c10d rendezvous
at the attempt's headless Service, resolved by the cluster DNS (CoreDNS), and one
adapter published by global rank 0; losing one of the pods restarts both from the
last checkpoint."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from devcluster.kubelet import cpu_node
from tests.e2e.conftest import JOB_TIMEOUT_S, Cluster


def _two_node_job(
    cluster_factory: Callable[..., Cluster], name: str, training: dict[str, int]
) -> Cluster:
    """A cluster of two CPU nodes with the cluster DNS, and a LoRAJob `name` on both."""
    cluster = cluster_factory(nodes=[cpu_node("cpu-node-1"), cpu_node("cpu-node-2")], dns=True)
    cluster.create_secret()
    spec = {
        "resources": {"gpus": 0, "nodes": 2, "cpu": "1", "memory": "4Gi"},
        "training": training,
        "evaluation": {"prompts": []},
    }
    cluster.apply(cluster.manifest(name, {"spec": spec}))
    return cluster


def test_two_nodes_train_as_one_group(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    training = {"maxSteps": 6, "batchSize": 2, "gradientAccumulationSteps": 1}
    cluster = _two_node_job(cluster_factory, "two-nodes", training)
    # The pods, read while the group exists: once global rank 0 has published, the
    # operator deletes a pod of the group that is still finishing.
    pods = cluster.cp.wait_for(
        lambda: (
            found
            if len(found := {p["metadata"]["name"]: p for p in cluster.pods("two-nodes")}) == 2
            else None
        ),
        timeout=JOB_TIMEOUT_S,
        message="both pods of the group",
    )
    status = cluster.wait_phase("two-nodes", "Succeeded")

    # One attempt of two pods, one per node, joined at rank 0's Service.
    assert status["attempts"] == 1
    assert status["podName"] == "two-nodes-1-n0"
    assert [r["pod"] for r in status["ranks"]] == ["two-nodes-1-n0", "two-nodes-1-n1"]
    assert sorted(r["node"] for r in status["ranks"]) == ["cpu-node-1", "cpu-node-2"]
    args = pods["two-nodes-1-n1"]["spec"]["containers"][0]["args"]
    assert args[args.index("--node-rank") + 1] == "1"
    assert args[args.index("--rdzv-endpoint") + 1] == "two-nodes-1-rdzv.default.svc:29400"
    service = json.loads(cluster.kubectl("get", "service", "two-nodes-1-rdzv", "-o", "json").stdout)
    assert service["spec"]["clusterIP"] == "None"

    # Status says how the run was spread: 2 ranks (one per node) x 2 rows.
    progress = status["progress"]
    assert (progress["ranks"], progress["globalBatchSize"]) == (2, 4)
    assert progress["step"] == progress["totalSteps"] == 6

    # One adapter, written by global rank 0, with the same accounting in metrics.json.
    local = cluster.download("adapters/two-nodes", tmp_path / "adapter")
    metrics = json.loads((local / "metrics.json").read_text())
    assert metrics["parallel"]["ranks"] == 2
    assert metrics["parallel"]["global_batch_size"] == 4
    assert (local / "adapter_model.safetensors").stat().st_size == status["adapter"]["size"]


def test_losing_one_node_resumes_the_group_from_its_checkpoint(
    cluster_factory: Callable[..., Cluster],
) -> None:
    training = {"maxSteps": 12, "checkpointEverySteps": 2, "gradientAccumulationSteps": 4}
    cluster = _two_node_job(cluster_factory, "lose-node", training)
    # Evict node rank 1's pod once the group has a checkpoint.
    running = cluster.wait_status(
        "lose-node", lambda s: bool(s.get("lastCheckpoint")), "the first checkpoint"
    )
    assert running["progress"]["step"] < 12, "training finished before it could be interrupted"
    assert cluster.cp.kubelet is not None
    cluster.cp.kubelet.evict("default", "lose-node-1-n1")

    # Two attempts, each starting two trainers on a shared 2-core machine.
    status = cluster.wait_phase("lose-node", "Succeeded", timeout=2 * JOB_TIMEOUT_S)
    # A disruption of one pod ends the attempt for both; nothing spent from backoffLimit.
    assert status["attempts"] == 2
    assert status["disruptions"] == 1
    assert status.get("failedAttempts", 0) == 0
    assert [r["pod"] for r in status["ranks"]] == ["lose-node-2-n0", "lose-node-2-n1"]
    assert status["progress"]["step"] == 12
    # The second attempt's ranks resumed from a checkpoint of the first.
    logs = "".join(cluster.cp.kubelet.pod_log("default", f"lose-node-2-n{rank}") for rank in (0, 1))
    resumed = re.search(r"resuming from \S+/attempt-1/checkpoint-(\d+) \(step (\d+)\)", logs)
    assert resumed, logs[-3000:]
    assert 0 < int(resumed[2]) < 12
