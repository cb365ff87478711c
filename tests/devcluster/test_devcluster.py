"""The local cluster itself: real components started, wired and torn down.

These pin what the rest of the suite relies on: RBAC is enforced, nodes registered by
the process kubelet become schedulable through the real node lifecycle controller,
kube-scheduler binds pods, the kubelet runs them and `kubectl logs` reaches it over
TLS, garbage collection and ServiceAccounts are the controller manager's, and a node
whose kubelet stops heartbeating is handled by the real controllers.
"""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.cluster import ApiStatusError, Timings
from devcluster.controlplane import ControlPlane, free_port
from devcluster.kubelet import cpu_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ControlPlane(
        tmp_path_factory.mktemp("devcluster"),
        nodes=(cpu_node("node-a"), cpu_node("node-b")),
        timings=Timings(node_monitor_grace_seconds=6, default_toleration_seconds=2),
    ) as cp:
        yield cp


def _pod(
    name: str, node: str | None = None, script: str = "print('hello from the pod')"
) -> dict[str, object]:
    spec: dict[str, object] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 2,
        "containers": [
            {"name": "main", "image": "python:3.11", "command": ["python", "-c", script]}
        ],
    }
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_control_plane_starts_in_seconds(plane: ControlPlane) -> None:
    # The first start of a test session may be slow on a loaded machine; the bound is
    # loose on purpose: this catches a start that waits out a timeout.
    assert plane.cluster.started_seconds < 90
    version = plane.cluster.request("GET", "/version")
    assert version["gitVersion"].startswith("v1.35.")


def test_rbac_is_enforced(plane: ControlPlane, tmp_path: Path) -> None:
    plane.kubectl("create", "serviceaccount", "nobody")
    kubeconfig = plane.cluster.service_account_kubeconfig("default", "nobody", tmp_path / "kc")
    result = plane.cluster.kubectl("get", "pods", kubeconfig=kubeconfig, check=False)
    assert result.returncode != 0
    assert "forbidden" in result.stderr.lower()


def test_pod_is_scheduled_run_and_its_logs_served(plane: ControlPlane) -> None:
    plane.kubectl("apply", "-f", "-", input=json.dumps(_pod("hello")))

    def finished() -> dict[str, object] | None:
        pod = plane.get("pods", "hello")
        return pod if pod and pod["status"].get("phase") == "Succeeded" else None

    pod = plane.wait_for(finished, timeout=60, message="pod hello Succeeded")
    assert pod["spec"]["nodeName"] in ("node-a", "node-b")  # type: ignore[index]
    logs = plane.kubectl("logs", "hello").stdout
    assert "hello from the pod" in logs


def test_garbage_collector_deletes_owned_objects(plane: ControlPlane) -> None:
    owner = plane.cluster.request(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}},
    )
    plane.cluster.request(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "owned",
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": "owner",
                        "uid": owner["metadata"]["uid"],
                    }
                ],
            },
        },
    )
    plane.kubectl("delete", "configmap", "owner")
    plane.wait_for(
        lambda: plane.get("configmaps", "owned") is None, timeout=60, message="owned deleted"
    )


def test_lost_node_pods_are_evicted_by_the_real_controllers(plane: ControlPlane) -> None:
    assert plane.kubelet is not None
    plane.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(_pod("sleeper", "node-b", "import time; time.sleep(600)")),
    )
    plane.wait_for(
        lambda: (plane.get("pods", "sleeper") or {}).get("status", {}).get("phase") == "Running",
        timeout=60,
        message="sleeper Running",
    )
    plane.kubelet.lose_node("node-b")
    try:

        def tainted() -> bool:
            node = plane.get("nodes", "node-b", namespace="") or {}
            return any(
                t["key"] == "node.kubernetes.io/unreachable"
                for t in node.get("spec", {}).get("taints") or []
            )

        plane.wait_for(tainted, timeout=60, message="node-b tainted unreachable")

        def evicted() -> dict[str, Any] | None:
            pod = plane.get("pods", "sleeper") or {}
            conditions = pod.get("status", {}).get("conditions") or []
            target = [c for c in conditions if c["type"] == "DisruptionTarget"]
            return pod if pod.get("metadata", {}).get("deletionTimestamp") and target else None

        pod = plane.wait_for(evicted, timeout=60, message="sleeper evicted by taint")
        target = next(c for c in pod["status"]["conditions"] if c["type"] == "DisruptionTarget")
        assert target["reason"] == "DeletionByTaintManager"
        # Nobody confirms the deletion: the pod stays Running and Terminating, as on a
        # real cluster, until the node comes back or is deleted.
        assert pod["status"]["phase"] == "Running"
    finally:
        plane.kubelet.restore_node("node-b")
    plane.wait_nodes_ready(["node-b"])


def test_apiserver_answers_errors_as_the_real_thing(plane: ControlPlane) -> None:
    with pytest.raises(ApiStatusError) as raised:
        plane.cluster.request("GET", "/api/v1/namespaces/default/pods/nope")
    assert raised.value.code == 404
    assert raised.value.reason == "NotFound"


@contextlib.contextmanager
def _taken(port: int) -> Iterator[None]:
    """Hold `port` the way another control plane's operator would (if it is free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with contextlib.suppress(OSError):  # already taken: the same situation
            sock.bind(("0.0.0.0", port))
            sock.listen()
        yield


def test_an_operator_beside_another_control_plane_gets_free_ports(tmp_path: Path) -> None:
    # The operator's default metrics port (8000) is taken, as by the operator of a second
    # control plane on this host: this one gets free ports and serves metrics on its own.
    with _taken(8000), ControlPlane(tmp_path, kubelet=False, operator=True) as cp:
        assert cp.metrics_port not in (0, 8000)
        assert cp.liveness_port not in (0, 8081, cp.metrics_port)
        url = f"http://127.0.0.1:{cp.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert b"lorajob_jobs" in response.read()
        assert "cannot serve metrics" not in cp.operator_log_tail(400)


def test_the_callers_operator_ports_are_kept(tmp_path: Path) -> None:
    metrics, health = free_port(), free_port()
    env = {"LORAJOB_METRICS_PORT": str(metrics), "LORAJOB_HEALTH_PORT": str(health)}
    with ControlPlane(tmp_path, kubelet=False, operator=True, operator_env=env) as cp:
        assert (cp.metrics_port, cp.liveness_port) == (metrics, health)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            assert b"lorajob_jobs" in r.read()
