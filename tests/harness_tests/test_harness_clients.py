"""Real clients end to end: kubectl 1.35 and the `kubernetes` Python client."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from tests.harness.controlplane import ControlPlane, wait_for
from tests.harness.kubelet import cpu_node
from tests.harness.tools import helm, kubectl
from tests.harness_tests.helpers import TEST_CRD

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    workdir = tmp_path_factory.mktemp("clients")
    crd_file = workdir / "widget-crd.yaml"
    crd_file.write_text(yaml.safe_dump(TEST_CRD))
    with ControlPlane(workdir / "cp", crds=[REPO / "crds", crd_file], nodes=[cpu_node()]) as cp:
        yield cp


def _widget(name: str, size: int = 1) -> str:
    return json.dumps(
        {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"size": size},
        }
    )


def test_kubectl_apply_get_describe_delete(plane: ControlPlane) -> None:
    assert (
        "widget.example.com/k1 created"
        in plane.kubectl("apply", "-f", "-", input=_widget("k1", 3)).stdout
    )
    assert "unchanged" in plane.kubectl("apply", "-f", "-", input=_widget("k1", 3)).stdout
    assert "configured" in plane.kubectl("apply", "-f", "-", input=_widget("k1", 4)).stdout
    table = plane.kubectl("get", "wd").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "READY", "AGE"]
    assert table[1].split()[:2] == ["k1", "4"]
    assert plane.kubectl("get", "gadgets", "-o", "name").stdout.strip() == "widget.example.com/k1"
    got = json.loads(plane.kubectl("get", "widget", "k1", "-o", "json").stdout)
    assert got["spec"] == {"size": 4, "color": "red"}
    described = plane.kubectl("describe", "widget", "k1").stdout
    assert "Name:         k1" in described
    assert "Size:   4" in described
    assert 'widget.example.com "k1" deleted' in plane.kubectl("delete", "widget", "k1").stdout
    assert plane.kubectl("get", "widget", "k1", check=False).returncode == 1


def test_kubectl_reports_validation_errors(plane: ControlPlane) -> None:
    result = plane.kubectl("apply", "-f", "-", input=_widget("bad", 0), check=False)
    assert result.returncode == 1
    assert "spec.size in body should be greater than or equal to 1" in result.stderr
    typo = json.dumps(
        {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "typo"},
            "spec": {"size": 1, "colour": "red"},
        }
    )
    result = plane.kubectl("apply", "-f", "-", input=typo, check=False)
    assert result.returncode == 1
    assert 'unknown field "spec.colour"' in result.stderr


def test_kubectl_lorajob_printer_columns(plane: ControlPlane) -> None:
    example = (REPO / "examples" / "lorajob-tiny.yaml").read_text()
    plane.kubectl("apply", "-f", "-", input=example)
    status = {
        "status": {
            "phase": "Succeeded",
            "attempts": 1,
            "progress": {"percent": 100, "loss": 1.25},
            "conditions": [
                {
                    "type": "Succeeded",
                    "status": "True",
                    "reason": "Completed",
                    "message": "done",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        }
    }
    plane.kubectl(
        "patch", "lj", "tiny-demo", "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )
    lines = plane.kubectl("get", "lj").stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "SUCCEEDED", "AGE"]
    assert lines[1].split()[:5] == ["tiny-demo", "Succeeded", "100", "1.25", "True"]
    wide = plane.kubectl("get", "lj", "-o", "wide").stdout.splitlines()
    assert "ATTEMPTS" in wide[0].split()
    assert (
        "condition met"
        in plane.kubectl(
            "wait", "--for=condition=Succeeded", "lj/tiny-demo", "--timeout=10s"
        ).stdout
    )
    assert (
        "condition met"
        in plane.kubectl(
            "wait", "--for=jsonpath={.status.phase}=Succeeded", "lj/tiny-demo", "--timeout=10s"
        ).stdout
    )
    plane.kubectl("delete", "lj", "tiny-demo")


def test_kubectl_wait_blocks_until_the_condition(plane: ControlPlane) -> None:
    plane.kubectl("apply", "-f", "-", input=_widget("w", 1))
    waiter = subprocess.Popen(
        [
            str(kubectl()),
            "--kubeconfig",
            str(plane.kubeconfig),
            "wait",
            "--for=condition=Ready",
            "widget/w",
            "--timeout=20s",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    assert waiter.poll() is None
    status = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    plane.kubectl(
        "patch", "widget", "w", "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    assert "condition met" in out
    plane.kubectl("delete", "widget", "w")


def test_kubectl_get_watch_streams_changes(plane: ControlPlane) -> None:
    plane.kubectl("apply", "-f", "-", input=_widget("watched", 1))
    watcher = subprocess.Popen(
        [
            str(kubectl()),
            "--kubeconfig",
            str(plane.kubeconfig),
            "get",
            "widgets",
            "-w",
            "--request-timeout=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert watcher.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(watcher.stdout or []), daemon=True)
    reader.start()
    try:
        # The initial list is printed once the watch is established.
        wait_for(lambda: any(line.startswith("watched") for line in lines), message="initial row")
        plane.kubectl("patch", "widget", "watched", "--type=merge", "-p", '{"spec":{"size":42}}')
        wait_for(
            lambda: any(line.split()[:2] == ["watched", "42"] for line in lines),
            message="row for the change",
        )
    finally:
        watcher.terminate()
        watcher.communicate(timeout=10)
        reader.join(10)
    assert lines[0].split()[:2] == ["NAME", "SIZE"]
    assert sum(1 for line in lines if line.startswith("NAME")) == 1
    plane.kubectl("delete", "widget", "watched")


def test_kubectl_typed_commands_and_pods(plane: ControlPlane) -> None:
    plane.kubectl("create", "namespace", "team-k")
    plane.kubectl(
        "create", "secret", "generic", "creds", "-n", "team-k", "--from-literal=KEY=value"
    )
    secret = json.loads(
        plane.kubectl("get", "secret", "creds", "-n", "team-k", "-o", "json").stdout
    )
    assert secret["data"] == {"KEY": "dmFsdWU="}
    assert "generateName" not in secret["metadata"]
    plane.kubectl("create", "quota", "gpus", "-n", "team-k", "--hard=requests.nvidia.com/gpu=4")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "hello", "namespace": "team-k"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11",
                    "command": ["python", "-c", "print('hello from the pod')"],
                }
            ],
        },
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(pod))
    plane.kubectl(
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/hello",
        "-n",
        "team-k",
        "--timeout=20s",
    )
    assert plane.kubectl("logs", "hello", "-n", "team-k").stdout == "hello from the pod\n"
    table = plane.kubectl("get", "pods", "-n", "team-k").stdout.splitlines()
    assert table[1].split()[:3] == ["hello", "0/1", "Completed"]
    assert (
        "Started container main" in plane.kubectl("describe", "pod", "hello", "-n", "team-k").stdout
    )
    plane.kubectl("delete", "namespace", "team-k", "--timeout=30s")


def test_python_client(plane: ControlPlane) -> None:
    client = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))  # type: ignore[no-untyped-call]
    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    assert "default" in [ns.metadata.name for ns in core.list_namespace().items if ns.metadata]
    config_map = kubernetes.client.V1ConfigMap(
        metadata=kubernetes.client.V1ObjectMeta(name="py"), data={"a": "1"}
    )
    cm = core.create_namespaced_config_map("default", config_map)
    assert cm.metadata is not None
    assert cm.metadata.uid
    with pytest.raises(kubernetes.client.ApiException) as error:
        core.create_namespaced_config_map("default", config_map)
    assert error.value.status == 409
    body = json.loads(_widget("pyw", 2))
    created: Any = custom.create_namespaced_custom_object(
        "example.com", "v1", "default", "widgets", body
    )
    custom.patch_namespaced_custom_object_status(
        "example.com", "v1", "default", "widgets", "pyw", {"status": {"phase": "Running"}}
    )
    got: Any = custom.get_namespaced_custom_object("example.com", "v1", "default", "widgets", "pyw")
    assert got["status"] == {"phase": "Running"}
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    # watch.Watch: the initial state then live changes
    events: list[tuple[str, Any]] = []
    stream = kubernetes.watch.Watch().stream(  # type: ignore[no-untyped-call]
        custom.list_namespaced_custom_object,
        "example.com",
        "v1",
        "default",
        "widgets",
        timeout_seconds=5,
    )
    for event in stream:
        events.append((event["type"], event["object"]["metadata"]["name"]))
        if len(events) == 1:
            custom.delete_namespaced_custom_object("example.com", "v1", "default", "widgets", "pyw")
        if event["type"] == "DELETED":
            break
    assert events == [("ADDED", "pyw"), ("DELETED", "pyw")]
    pods = core.list_namespaced_pod(
        "default", label_selector="app=none", field_selector="status.phase=Running"
    )
    assert pods.items == []
    core.delete_namespaced_config_map("py", "default")
    wait_for(
        lambda: (
            not core.list_namespaced_config_map("default", field_selector="metadata.name=py").items
        )
    )


def test_kubectl_server_side_apply_dry_run_and_explain(plane: ControlPlane) -> None:
    manifest = _widget("ssa", 1)
    assert (
        "serverside-applied"
        in plane.kubectl("apply", "--server-side", "-f", "-", input=manifest).stdout
    )
    plane.kubectl("apply", "--server-side", "-f", "-", input=_widget("ssa", 6))
    got = json.loads(plane.kubectl("get", "widget", "ssa", "-o", "json").stdout)
    assert got["spec"]["size"] == 6
    assert got["metadata"]["generation"] == 2
    dry = plane.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=_widget("ssa", 0), check=False
    )
    assert dry.returncode == 1
    assert "should be greater than or equal to 1" in dry.stderr
    dry = plane.kubectl("apply", "--dry-run=server", "-f", "-", input=_widget("ssa", 8))
    assert (
        json.loads(plane.kubectl("get", "widget", "ssa", "-o", "json").stdout)["spec"]["size"] == 6
    )
    explained = plane.kubectl("explain", "lj.spec.training").stdout
    assert "KIND:       LoRAJob" in explained
    assert "batchSize" in explained
    plane.kubectl("delete", "widget", "ssa")


def test_kubectl_drain_evicts_and_logs_follow(plane: ControlPlane) -> None:
    script = "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.1)\ntime.sleep(60)"
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "drained"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "x:1", "command": ["python", "-c", script]}],
        },
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(pod))
    plane.kubectl("wait", "--for=condition=Ready", "pod/drained", "--timeout=20s")
    wait_for(lambda: "4" in plane.kubectl("logs", "drained").stdout.split(), message="pod output")
    assert plane.kubectl("logs", "--tail=1", "drained").stdout == "4\n"
    drained = plane.kubectl("drain", "cpu-node-1", "--force", "--timeout=30s")
    assert "pod/drained evicted" in drained.stdout
    node = json.loads(plane.kubectl("get", "node", "cpu-node-1", "-o", "json").stdout)
    assert node["spec"]["unschedulable"] is True
    assert plane.get("pods", "drained") is None
    plane.kubectl("uncordon", "cpu-node-1")
    quick = {**pod, "metadata": {"name": "follow"}}
    quick["spec"] = {
        **pod["spec"],
        "containers": [
            {
                "name": "c",
                "image": "x:1",
                "command": [
                    "python",
                    "-c",
                    "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.2)",
                ],
            }
        ],
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(quick))
    plane.wait_for(
        lambda: (
            (plane.get("pods", "follow") or {}).get("status", {}).get("phase")
            in ("Running", "Succeeded")
        ),
        message="follow pod started",
    )
    assert plane.kubectl("logs", "-f", "follow", timeout=30).stdout == "0\n1\n2\n"


HELM_TEMPLATES = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: probe}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: probe-{{ .Release.Namespace }}}
rules: [{apiGroups: [""], resources: [pods], verbs: [get]}]
---
apiVersion: v1
kind: Service
metadata: {name: probe}
spec: {ports: [{port: 80}], selector: {app: probe}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: probe}
spec:
  selector: {matchLabels: {app: probe}}
  template:
    metadata: {labels: {app: probe}}
    spec: {serviceAccountName: probe, containers: [{name: c, image: "x:1"}]}
"""


def test_helm_install_and_uninstall(plane: ControlPlane, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KUBECONFIG": str(plane.kubeconfig),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }

    def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(helm()), *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr
        return result

    def deployments() -> list[str]:
        listed = json.loads(plane.kubectl("get", "deployments", "-n", "ops", "-o", "json").stdout)
        return [d["metadata"]["name"] for d in listed["items"]]

    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "all.yaml").write_text(HELM_TEMPLATES)
    plane.kubectl("create", "namespace", "ops")
    run_helm("install", "probe", str(chart), "--namespace", "ops")
    assert "deployed" in run_helm("list", "--namespace", "ops").stdout
    assert deployments() == ["probe"]
    run_helm("uninstall", "probe", "--namespace", "ops")  # helm deletes with protobuf bodies
    assert deployments() == []
    assert plane.kubectl("auth", "can-i", "create", "pods").stdout.strip() == "yes"
    plane.kubectl("delete", "namespace", "ops")
