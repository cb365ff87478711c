"""The opt-in Kueue stand-in: gated pods are admitted by ClusterQueue quota."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.controlplane import ControlPlane
from tests.harness.kube_kueue import ADMISSION_GATE, QUEUE_LABEL
from tests.harness.kubelet import NodeConfig

REPO = Path(__file__).resolve().parents[2]
A100 = NodeConfig(
    name="a100-node",
    labels={"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
    capacity={"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8", "pods": "110"},
)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    with ControlPlane(tmp_path / "cp", nodes=[A100], kueue=True) as cp:
        for name in ("team-a", "team-b"):
            cp.kubectl("create", "namespace", name)
        for manifest in ("00-kueue-setup.yaml", "10-cluster-queues.yaml", "20-local-queues.yaml"):
            cp.kubectl("apply", "-f", str(REPO / "examples" / "kueue" / manifest))
        yield cp


def _trainer(name: str, gpus: int, seconds: float) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "team-a", "labels": {QUEUE_LABEL: "gpus"}},
        "spec": {
            "restartPolicy": "Never",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "containers": [
                {
                    "name": "main",
                    "image": "x:1",
                    "command": ["python", "-c", f"import time; time.sleep({seconds})"],
                    "resources": {
                        "limits": {"nvidia.com/gpu": str(gpus), "cpu": "1", "memory": "1Gi"}
                    },
                }
            ],
        },
    }


def test_pods_wait_for_cluster_queue_quota(plane: ControlPlane) -> None:
    # team-a's ClusterQueue: 4 A100s (first flavor), then 2 L4s.
    plane.kubectl("apply", "-f", "-", input=json.dumps(_trainer("first", 4, 2)))
    first = plane.wait_for(
        lambda: (
            (p := plane.get("pods", "first", "team-a"))
            and not p["spec"].get("schedulingGates")
            and p
        ),
        message="first pod admitted",
    )
    assert first["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    plane.kubectl("apply", "-f", "-", input=json.dumps(_trainer("second", 4, 0)))
    second = plane.get("pods", "second", "team-a")
    assert second is not None
    assert second["spec"]["schedulingGates"] == [{"name": ADMISSION_GATE}]
    plane.wait_for(
        lambda: any(
            c.get("reason") == "SchedulingGated"
            for c in ((plane.get("pods", "second", "team-a") or {}).get("status") or {}).get(
                "conditions"
            )
            or []
        ),
        message="second pod reported SchedulingGated",
    )
    # When the first pod finishes, its quota goes to the second one.
    plane.wait_for(
        lambda: (
            ((plane.get("pods", "second", "team-a") or {}).get("status") or {}).get("phase")
            == "Succeeded"
        ),
        timeout=30,
        message="second pod admitted and run after the first finished",
    )
    # A pod whose LocalQueue does not exist stays gated.
    orphan = _trainer("lost", 1, 0)
    orphan["metadata"]["labels"][QUEUE_LABEL] = "no-such-queue"
    plane.kubectl("apply", "-f", "-", input=json.dumps(orphan))
    assert (plane.get("pods", "lost", "team-a") or {})["spec"]["schedulingGates"] == [
        {"name": ADMISSION_GATE}
    ]


def test_namespaces_carry_their_name_label(plane: ControlPlane) -> None:
    namespace = plane.get("namespaces", "team-a")
    assert namespace is not None
    assert namespace["metadata"]["labels"]["kubernetes.io/metadata.name"] == "team-a"
