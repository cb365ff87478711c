"""A throwaway kopf operator (`kopf run` subprocess) against the emulator.

Proves the semantics kopf relies on: discovery incl. the status subresource,
list+watch, merge patches of annotations (progress storage) and /status, create/
update/delete handlers with a finalizer, kopf.adopt (uid) + child pod creation,
posted events, timers, and a restart mid-flight via ControlPlane.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.controlplane import ControlPlane
from tests.harness.kubelet import NodeConfig, cpu_node
from tests.harness_tests.helpers import TEST_CRD

OPERATOR = textwrap.dedent(
    """
    import kopf

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_):
        settings.posting.level = 0
        settings.watching.server_timeout = 30

    @kopf.on.create("example.com", "v1", "widgets")
    def created(spec, name, namespace, body, patch, logger, **_):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-pod"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox:1", "command": ["python", "-c", "print('child ran')"]}],
            },
        }
        kopf.adopt(pod, owner=body)
        import kubernetes
        kubernetes.config.load_kube_config()
        kubernetes.client.CoreV1Api().create_namespaced_pod(namespace, pod)
        kopf.info(body, reason="Created", message=f"child pod for size {spec['size']}")
        return {"child": pod["metadata"]["name"]}

    @kopf.on.update("example.com", "v1", "widgets", field="spec.size")
    def resized(old, new, patch, **_):
        patch.status["resized"] = f"{old}->{new}"

    @kopf.on.delete("example.com", "v1", "widgets")
    def deleted(name, **_):
        pass

    @kopf.timer("example.com", "v1", "widgets", interval=0.3)
    def tick(patch, status, **_):
        patch.status["ticks"] = int(status.get("ticks", 0)) + 1
    """
)


@pytest.fixture
def plane(tmp_path: Path) -> Any:
    module_dir = tmp_path / "probe"
    module_dir.mkdir()
    (module_dir / "harness_kopf_probe.py").write_text(OPERATOR)
    crd_file = tmp_path / "widget-crd.yaml"
    crd_file.write_text(yaml.safe_dump(TEST_CRD))
    with ControlPlane(
        tmp_path / "cp",
        crds=[crd_file],
        nodes=[NodeConfig(), cpu_node()],
        operator=True,
        operator_module="harness_kopf_probe",
        operator_env={"PYTHONPATH": str(module_dir)},
    ) as cp:
        yield cp


@pytest.mark.timeout(120)
def test_kopf_operator_end_to_end(plane: ControlPlane) -> None:
    plane.kubectl(
        "apply",
        "-f",
        "-",
        input='{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"w1"},"spec":{"size":2}}',
    )
    # create handler ran: result stored in status, finalizer added, progress annotations cleaned
    widget = plane.wait_for(
        lambda: (w := plane.get("widgets", "w1")) and (w.get("status") or {}).get("created") and w,
        message="create handler result in status",
    )
    assert widget["status"]["created"] == {"child": "w1-pod"}
    assert "kopf.zalando.org/KopfFinalizerMarker" in widget["metadata"]["finalizers"]
    assert any(
        k.startswith("kopf.zalando.org/last-handled-configuration")
        for k in widget["metadata"]["annotations"]
    )
    # adopted child pod: owner reference with the widget's uid; the kubelet ran it
    pod = plane.wait_for(lambda: plane.get("pods", "w1-pod"), message="child pod")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == widget["metadata"]["uid"]
    plane.wait_for(
        lambda: (plane.get("pods", "w1-pod") or {}).get("status", {}).get("phase") == "Succeeded",
        message="child pod succeeded",
    )
    # event posted by kopf.info, visible in kubectl describe
    plane.wait_for(
        lambda: "child pod for size 2" in plane.kubectl("describe", "widget", "w1").stdout,
        message="event in describe",
    )
    # timer ticks
    plane.wait_for(
        lambda: (plane.get("widgets", "w1") or {}).get("status", {}).get("ticks", 0) >= 2,
        message="timer ticks",
    )
    # update handler on a spec field
    plane.kubectl("patch", "widget", "w1", "--type=merge", "-p", '{"spec":{"size":5}}')
    plane.wait_for(
        lambda: (plane.get("widgets", "w1") or {}).get("status", {}).get("resized") == "2->5",
        message="update handler",
    )
    # restart the operator mid-flight: it resumes from its annotations, no re-create
    plane.stop_operator()
    plane.start_operator()
    plane.kubectl("patch", "widget", "w1", "--type=merge", "-p", '{"spec":{"size":7}}')
    plane.wait_for(
        lambda: (plane.get("widgets", "w1") or {}).get("status", {}).get("resized") == "5->7",
        message="update after restart",
    )
    # delete: the finalizer is released by kopf, then GC removes the child pod
    plane.kubectl("delete", "widget", "w1", "--timeout=30s")
    assert plane.get("widgets", "w1") is None
    plane.wait_for(
        lambda: plane.get("pods", "w1-pod") is None, message="child pod garbage-collected"
    )
