"""A LoRAJob with `resources.gpus: 2` on the local cluster: one pod whose trainer runs
torchrun with 2 ranks (gloo on the CPU: the process kubelet's GPU node has 8 GPUs of
capacity, not devices), and one adapter published by rank 0."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from devcluster.kubelet import NodeConfig
from tests.e2e.conftest import Cluster


def test_two_gpus_train_as_two_ranks_in_one_pod(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = cluster_factory(nodes=[NodeConfig()])  # the default: 8 GPUs, tainted
    cluster.create_secret()
    spec = {
        "resources": {"gpus": 2, "cpu": "2", "memory": "4Gi"},
        "training": {"maxSteps": 10, "batchSize": 2, "gradientAccumulationSteps": 2},
        "evaluation": {"prompts": []},
    }
    cluster.apply(cluster.manifest("two-ranks", {"spec": spec}))
    status = cluster.wait_phase("two-ranks", "Succeeded")

    # One attempt, one pod asking for both GPUs, running the trainer as torchrun's launcher.
    assert status["attempts"] == 1
    [pod] = cluster.pods("two-ranks")
    container = pod["spec"]["containers"][0]
    assert container["args"][:2] == ["--nproc-per-node", "2"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert cluster.cp.kubelet is not None
    log = cluster.cp.kubelet.pod_log("default", status["podName"])
    assert "starting 2 training processes" in log, log[-3000:]
    assert "[rank 0]" in log

    # Status says how the run was spread: 2 ranks x 2 rows x 2 accumulation steps.
    progress = status["progress"]
    assert (progress["strategy"], progress["ranks"], progress["globalBatchSize"]) == ("ddp", 2, 8)
    assert progress["step"] == progress["totalSteps"] == 10

    # One adapter, written by rank 0, with the same accounting in metrics.json.
    local = cluster.download("adapters/two-ranks", tmp_path / "adapter")
    metrics = json.loads((local / "metrics.json").read_text())
    assert metrics["parallel"]["global_batch_size"] == 8
    assert metrics["parallel"]["ranks"] == 2
    assert (local / "adapter_model.safetensors").stat().st_size == status["adapter"]["size"]
