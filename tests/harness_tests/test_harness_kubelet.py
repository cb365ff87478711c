"""The test kubelet: scheduling, running, env/mounts, status, deletion, simulations (12)."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.apiserver import ApiServer
from tests.harness.controlplane import wait_for
from tests.harness.kubelet import (
    SIMULATE_AFTER_ANNOTATION,
    SIMULATE_ANNOTATION,
    Kubelet,
    NodeConfig,
    NodeUsage,
    SimulatedRuntime,
    cpu_node,
)
from tests.harness_tests.helpers import Http

PODS = "/api/v1/namespaces/default/pods"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture
def kubelet(api: ApiServer, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(
        api.kubeconfig,
        tmp_path / "kubelet",
        nodes=[NodeConfig(), cpu_node()],
        image_pull_error_pattern=r"^missing\.registry/",
    ) as k:
        yield k


def pod(name: str, script: str, *, gpus: int = 0, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": "python:3.11",
        "command": ["python", "-c", script],
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    container.update(spec.pop("container", {}))
    body: dict[str, Any] = {
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }
    if gpus:
        body["spec"]["tolerations"] = [GPU_TOLERATION]
    return body


def phase_of(http: Http, name: str, phase: str, timeout: float = 20) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status, body = http.get(f"{PODS}/{name}")
        return body if status == 200 and body["status"].get("phase") == phase else None

    return wait_for(check, timeout=timeout, message=f"pod {name} {phase}")


def test_nodes_are_registered(http: Http, kubelet: Kubelet) -> None:
    del kubelet
    node = http.ok("GET", "/api/v1/nodes/gpu-node-1")
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]} == {"Ready": "True"}


def test_pod_runs_to_success_with_env_mounts_and_termination_message(
    http: Http, kubelet: Kubelet
) -> None:
    http.ok(
        "POST",
        "/api/v1/namespaces/default/secrets",
        {"metadata": {"name": "creds"}, "data": {"KEY": base64.b64encode(b"s3cr3t").decode()}},
    )
    script = (
        "import os, json, sys;"
        "open(os.environ['SCRATCH'] + '/out.txt', 'w').write('hi');"
        "open(os.environ['TERM_LOG'], 'w').write(json.dumps({'ok': True}));"
        "print(json.dumps({k: os.environ[k] for k in ('SECRET', 'IP', 'NAME', 'NS', 'UID', 'NODE', 'SCRATCH', 'CPU')}));"
        "print(os.getcwd()); print(sys.executable)"
    )
    body = pod(
        "ok",
        script,
        gpus=1,
        volumes=[{"name": "scratch", "emptyDir": {}}],
        container={
            "workingDir": "/scratch/work",
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            "env": [
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "KEY"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {
                    "name": "CPU",
                    "valueFrom": {"resourceFieldRef": {"resource": "limits.nvidia.com/gpu"}},
                },
                {"name": "SCRATCH", "value": "/scratch"},
                {"name": "TERM_LOG", "value": "/dev/termination-log"},
            ],
        },
    )
    http.ok("POST", PODS, body)
    done = phase_of(http, "ok", "Succeeded")
    status = done["status"]
    assert status["podIP"].startswith("127.")
    assert status["podIP"] != "127.0.0.1"
    assert status["podIPs"] == [{"ip": status["podIP"]}]
    assert done["spec"]["nodeName"] == "gpu-node-1"
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert terminated["message"] == '{"ok": true}'
    assert set(status["containerStatuses"][0]["state"]) == {"terminated"}
    log = kubelet.pod_log("default", "ok")
    env = json.loads(log.splitlines()[0])
    assert env["SECRET"] == "s3cr3t"
    assert env["IP"] == status["podIP"]
    assert env["NAME"] == "ok"
    assert env["NS"] == "default"
    assert env["UID"] == done["metadata"]["uid"]
    assert env["NODE"] == "gpu-node-1"
    assert env["CPU"] == "1"
    scratch = Path(env["SCRATCH"])
    assert scratch.is_dir()
    assert (scratch / "out.txt").read_text() == "hi"
    assert log.splitlines()[1] == str(scratch / "work")
    assert log.splitlines()[2] == sys.executable
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["PodScheduled"] == "True"
    assert conditions["Ready"] == "False"
    assert not kubelet.process_ids()


def test_failure_reports_exit_code_and_log_fallback(http: Http, kubelet: Kubelet) -> None:
    del kubelet
    body = pod(
        "fail",
        "import sys; print('boom happened'); sys.exit(13)",
        container={"terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    http.ok("POST", PODS, body)
    terminated = phase_of(http, "fail", "Failed")["status"]["containerStatuses"][0]["state"][
        "terminated"
    ]
    assert terminated["exitCode"] == 13
    assert terminated["reason"] == "Error"
    assert "boom happened" in terminated["message"]


def test_missing_secret_is_create_container_config_error_until_it_exists(
    http: Http, kubelet: Kubelet
) -> None:
    del kubelet
    body = pod(
        "cfg",
        "print('started')",
        container={
            "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "later", "key": "KEY"}}}]
        },
    )
    http.ok("POST", PODS, body)

    def waiting() -> dict[str, Any] | None:
        statuses = http.ok("GET", f"{PODS}/cfg")["status"].get("containerStatuses") or []
        return statuses[0]["state"].get("waiting") if statuses else None

    state = wait_for(waiting, message="CreateContainerConfigError")
    assert state == {"reason": "CreateContainerConfigError", "message": 'secret "later" not found'}
    http.ok(
        "POST",
        "/api/v1/namespaces/default/secrets",
        {"metadata": {"name": "later"}, "data": {"OTHER": "eA=="}},
    )
    wait_for(
        lambda: (waiting() or {}).get("message") == "couldn't find key KEY in Secret default/later",
        message="missing key message",
    )
    http.ok(
        "PATCH",
        "/api/v1/namespaces/default/secrets/later",
        {"data": {"KEY": "eA=="}},
        content_type="application/merge-patch+json",
    )
    phase_of(http, "cfg", "Succeeded")


def test_unschedulable_pod_gets_the_scheduler_message(http: Http, kubelet: Kubelet) -> None:
    del kubelet
    http.ok("POST", PODS, pod("big", "pass", gpus=9))

    def condition() -> dict[str, Any] | None:
        conditions = http.ok("GET", f"{PODS}/big")["status"].get("conditions") or []
        return next((c for c in conditions if c["type"] == "PodScheduled"), None)

    scheduled = wait_for(condition, message="PodScheduled condition")
    assert scheduled["status"] == "False"
    assert scheduled["reason"] == "Unschedulable"
    assert scheduled["message"] == (
        "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. "
        "preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling."
    )
    events = http.ok(
        "GET",
        "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dbig,reason%3DFailedScheduling",
    )
    assert events["items"]


def test_taints_and_node_selectors(http: Http, kubelet: Kubelet) -> None:
    del kubelet
    untolerated = pod("untol", "pass", gpus=1)
    untolerated["spec"].pop("tolerations")
    untolerated["spec"]["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
    http.ok("POST", PODS, untolerated)
    scheduled = wait_for(
        lambda: next(
            (
                c
                for c in http.ok("GET", f"{PODS}/untol")["status"].get("conditions") or []
                if c["type"] == "PodScheduled"
            ),
            None,
        )
    )
    assert "1 node(s) had untolerated taint {nvidia.com/gpu: present}" in scheduled["message"]
    assert "1 node(s) didn't match Pod's node affinity/selector" in scheduled["message"]
    cpu_only = pod("cpu", "pass", nodeSelector={"kubernetes.io/hostname": "cpu-node-1"})
    http.ok("POST", PODS, cpu_only)
    assert phase_of(http, "cpu", "Succeeded")["spec"]["nodeName"] == "cpu-node-1"


def test_scheduling_gates_hold_the_pod(http: Http, kubelet: Kubelet) -> None:
    del kubelet
    http.ok(
        "POST", PODS, pod("gated", "pass", schedulingGates=[{"name": "kueue.x-k8s.io/admission"}])
    )
    scheduled = wait_for(
        lambda: next(
            (
                c
                for c in http.ok("GET", f"{PODS}/gated")["status"].get("conditions") or []
                if c["type"] == "PodScheduled"
            ),
            None,
        )
    )
    assert scheduled["reason"] == "SchedulingGated"
    assert not http.ok("GET", f"{PODS}/gated")["spec"].get("nodeName")
    http.ok(
        "PATCH",
        f"{PODS}/gated",
        {
            "spec": {
                "schedulingGates": None,
                "nodeSelector": {"kubernetes.io/hostname": "cpu-node-1"},
            }
        },
        content_type="application/merge-patch+json",
    )
    assert phase_of(http, "gated", "Succeeded")["spec"]["nodeName"] == "cpu-node-1"


def test_gpu_capacity_is_accounted(http: Http, kubelet: Kubelet) -> None:
    del kubelet
    http.ok("POST", PODS, pod("hog", "import time; time.sleep(60)", gpus=8))
    phase_of(http, "hog", "Running")
    http.ok("POST", PODS, pod("waiter", "pass", gpus=1))
    wait_for(
        lambda: any(
            c.get("reason") == "Unschedulable"
            for c in http.ok("GET", f"{PODS}/waiter")["status"].get("conditions") or []
        )
    )
    http.ok("DELETE", f"{PODS}/hog", {"gracePeriodSeconds": 1})
    phase_of(http, "waiter", "Succeeded")


def test_graceful_deletion_sigterm_then_sigkill(
    http: Http, kubelet: Kubelet, tmp_path: Path
) -> None:
    marker = tmp_path / "got-sigterm"
    polite = (
        "import signal, sys, time, pathlib;"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text('x'), sys.exit(21)));"
        "print('ready', flush=True); time.sleep(60)"
    )
    http.ok("POST", PODS, pod("polite", polite))
    phase_of(http, "polite", "Running")
    wait_for(lambda: "ready" in kubelet.pod_log("default", "polite"))
    rv = http.ok("GET", PODS)["metadata"]["resourceVersion"]
    http.ok("DELETE", f"{PODS}/polite")
    wait_for(lambda: http.get(f"{PODS}/polite")[0] == 404, message="pod removed")
    assert marker.exists()
    events = http.watch(
        f"{PODS}?watch=true&resourceVersion={rv}&fieldSelector=metadata.name%3Dpolite&timeoutSeconds=1",
        until=10,
    )
    final = [e for e in events if e["type"] == "MODIFIED"][-1]["object"]
    assert final["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 21
    # A process that ignores SIGTERM is killed after the grace period.
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    http.ok("POST", PODS, pod("stubborn", stubborn, terminationGracePeriodSeconds=1))
    phase_of(http, "stubborn", "Running")
    wait_for(lambda: "ready" in kubelet.pod_log("default", "stubborn"))
    http.ok("DELETE", f"{PODS}/stubborn")
    wait_for(
        lambda: http.get(f"{PODS}/stubborn")[0] == 404, timeout=10, message="stubborn pod killed"
    )
    assert not kubelet.process_ids()


def test_eviction_marks_disruption_and_terminates(http: Http, kubelet: Kubelet) -> None:
    http.ok("POST", PODS, pod("victim", "import time; print('ready', flush=True); time.sleep(60)"))
    phase_of(http, "victim", "Running")
    rv = http.ok("GET", PODS)["metadata"]["resourceVersion"]
    kubelet.evict("default", "victim")
    wait_for(lambda: http.get(f"{PODS}/victim")[0] == 404, message="evicted pod removed")
    events = http.watch(
        f"{PODS}?watch=true&resourceVersion={rv}&fieldSelector=metadata.name%3Dvictim&timeoutSeconds=1",
        until=10,
    )
    last = events[-1]
    assert last["type"] == "DELETED"
    conditions = {c["type"]: c for c in last["object"]["status"]["conditions"]}
    assert conditions["DisruptionTarget"]["reason"] == "EvictionByEvictionAPI"
    assert last["object"]["status"]["phase"] == "Failed"


def test_oom_simulation(http: Http, kubelet: Kubelet) -> None:
    del kubelet
    body = pod("oom", "import time; time.sleep(60)")
    body["metadata"]["annotations"] = {
        SIMULATE_ANNOTATION: "OOMKilled",
        SIMULATE_AFTER_ANNOTATION: "0.5",
    }
    http.ok("POST", PODS, body)
    terminated = phase_of(http, "oom", "Failed")["status"]["containerStatuses"][0]["state"][
        "terminated"
    ]
    assert terminated["reason"] == "OOMKilled"
    assert terminated["exitCode"] == 137


def test_image_pull_error_simulation(http: Http, kubelet: Kubelet) -> None:
    del kubelet
    body = pod("pull", "pass", container={"image": "missing.registry/trainer:1"})
    http.ok("POST", PODS, body)

    def reason() -> str | None:
        statuses = http.ok("GET", f"{PODS}/pull")["status"].get("containerStatuses") or []
        return statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None

    wait_for(lambda: reason() == "ImagePullBackOff", message="ImagePullBackOff")
    assert http.ok("GET", f"{PODS}/pull")["status"]["phase"] == "Pending"


def test_node_loss_fails_its_pods(http: Http, kubelet: Kubelet) -> None:
    http.ok("POST", PODS, pod("lost", "import time; time.sleep(60)", gpus=1))
    phase_of(http, "lost", "Running")
    kubelet.lose_node("gpu-node-1")
    failed = phase_of(http, "lost", "Failed")
    assert failed["status"]["reason"] == "NodeLost"
    assert {c["type"]: c.get("reason") for c in failed["status"]["conditions"]}[
        "DisruptionTarget"
    ] == "DeletionByTaintManager"
    node = http.ok("GET", "/api/v1/nodes/gpu-node-1")
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "Unknown"
    wait_for(lambda: not kubelet.process_ids(), message="processes gone")
    kubelet.restore_node("gpu-node-1")
    http.ok("POST", PODS, pod("after", "pass", gpus=1))
    phase_of(http, "after", "Succeeded")


def test_processes_do_not_outlive_the_kubelet(api: ApiServer, tmp_path: Path) -> None:
    http = Http(api)
    with Kubelet(api.kubeconfig, tmp_path / "k2", nodes=[cpu_node()]) as k:
        http.ok("POST", PODS, pod("sleeper", "import time; time.sleep(600)"))
        phase_of(http, "sleeper", "Running")
        pids = k.process_ids()
        assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_active_deadline_and_simulated_pull_backoff(http: Http, kubelet: Kubelet) -> None:
    del kubelet
    http.ok("POST", PODS, pod("slow", "import time; time.sleep(60)", activeDeadlineSeconds=1))
    failed = phase_of(http, "slow", "Failed")
    assert failed["status"]["reason"] == "DeadlineExceeded"
    body = pod("nopull", "pass")
    body["metadata"]["annotations"] = {SIMULATE_ANNOTATION: "ImagePullBackOff"}
    http.ok("POST", PODS, body)

    def waiting() -> str | None:
        statuses = http.ok("GET", f"{PODS}/nopull")["status"].get("containerStatuses") or []
        return statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None

    wait_for(lambda: waiting() == "ImagePullBackOff", message="simulated ImagePullBackOff")


def test_priority_classes_are_resolved(http: Http) -> None:
    status, body = http.post(PODS, pod("p", "pass", priorityClassName="missing"))
    assert status == 403
    assert body["message"] == 'pods "p" is forbidden: no PriorityClass with name missing was found'
    http.ok(
        "POST",
        "/apis/scheduling.k8s.io/v1/priorityclasses",
        {"metadata": {"name": "training"}, "value": 1000, "preemptionPolicy": "Never"},
    )
    created = http.ok("POST", PODS, pod("p", "pass", priorityClassName="training"))
    assert created["spec"]["priority"] == 1000
    assert created["spec"]["preemptionPolicy"] == "Never"


HEALTH_SERVER = """
import http.server, os, threading, time
healthy = {"ok": True}
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if healthy["ok"] else 500)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((os.environ["IP"], 8080), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("serving", flush=True)
time.sleep(float(os.environ["HEALTHY_FOR"]))
healthy["ok"] = False
time.sleep(60)
"""


def test_readiness_and_liveness_probes(http: Http, kubelet: Kubelet) -> None:
    del kubelet
    probe = {
        "httpGet": {"path": "/healthz", "port": "http"},
        "periodSeconds": 0.2,
        "failureThreshold": 2,
    }
    body = pod(
        "probed",
        HEALTH_SERVER,
        terminationGracePeriodSeconds=1,
        container={
            "ports": [{"name": "http", "containerPort": 8080}],
            "env": [
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "HEALTHY_FOR", "value": "2"},
            ],
            "readinessProbe": probe,
            "livenessProbe": probe,
        },
    )
    http.ok("POST", PODS, body)

    def ready() -> bool:
        statuses = http.ok("GET", f"{PODS}/probed")["status"].get("containerStatuses") or []
        return bool(statuses and statuses[0]["ready"])

    wait_for(ready, message="readiness probe passes")
    failed = phase_of(http, "probed", "Failed")
    terminated = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "Error"
    events = http.ok(
        "GET", "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dprobed"
    )
    reasons = [e["reason"] for e in events["items"]]
    assert "Unhealthy" in reasons
    messages = [e["message"] for e in events["items"]]
    assert "Container main failed liveness probe, will be restarted" in messages


def test_concurrent_kubelets_get_disjoint_pod_ip_blocks(api: ApiServer, tmp_path: Path) -> None:
    first = Kubelet(api.kubeconfig, tmp_path / "a", nodes=[cpu_node("a")])
    second = Kubelet(api.kubeconfig, tmp_path / "b", nodes=[cpu_node("b")])
    with first, second:
        assert first._allocate_ip().split(".")[1] != second._allocate_ip().split(".")[1]


def test_pod_ips_are_unique_and_a_freed_one_is_not_reused_at_once(tmp_path: Path) -> None:
    kubelet = Kubelet(tmp_path / "kubeconfig", tmp_path, nodes=[cpu_node("a")])
    kubelet._ip_block = 7  # as _claim_ip_block would set it
    ips = [kubelet._allocate_ip() for _ in range(300)]
    assert len(set(ips)) == 300
    assert all(ip.startswith("127.7.") for ip in ips)
    assert not any(ip.endswith((".0", ".255")) for ip in ips)  # network and broadcast
    kubelet._ips_in_use.discard(ips[0])
    assert kubelet._allocate_ip() not in ips


def test_simulated_runtime_runs_no_processes(api: ApiServer, tmp_path: Path) -> None:
    http = Http(api)
    runtime = SimulatedRuntime(
        seconds=0.3,
        exit_code=0,
        termination_message=lambda p: f'{{"pod": "{p["metadata"]["name"]}"}}',
    )
    with Kubelet(
        api.kubeconfig, tmp_path / "sim", nodes=[cpu_node()], simulated_runtime=runtime
    ) as k:
        http.ok("POST", PODS, pod("sim", "raise SystemExit(3)"))
        phase_of(http, "sim", "Running")
        assert not k.process_ids()
        terminated = phase_of(http, "sim", "Succeeded")["status"]["containerStatuses"][0]["state"][
            "terminated"
        ]
        assert terminated["exitCode"] == 0
        assert terminated["message"] == '{"pod": "sim"}'
        long = SimulatedRuntime(seconds=60)
        k.simulated_runtime = long
        http.ok("POST", PODS, pod("sim-long", "pass"))
        phase_of(http, "sim-long", "Running")
        http.ok("DELETE", f"{PODS}/sim-long")
        wait_for(
            lambda: http.get(f"{PODS}/sim-long")[0] == 404,
            message="simulated pod stopped on delete",
        )


def test_secret_and_configmap_volumes_and_env_from(http: Http, kubelet: Kubelet) -> None:
    http.ok(
        "POST",
        "/api/v1/namespaces/default/secrets",
        {"metadata": {"name": "files"}, "stringData": {"token.txt": "t0k3n"}},
    )
    http.ok(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        {"metadata": {"name": "settings"}, "data": {"MODE": "fast", "LEVEL": "3"}},
    )
    script = "import os; print(open('/etc/creds/token.txt'.replace('/etc/creds', os.environ['CREDS'])).read(), os.environ['CFG_MODE'], os.environ['CFG_LEVEL'], os.environ['GREETING'])"
    body = pod(
        "vols",
        script,
        volumes=[{"name": "creds", "secret": {"secretName": "files"}}],
        container={
            "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds", "readOnly": True}],
            "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
            "env": [
                {"name": "CREDS", "value": "/etc/creds"},
                {"name": "WHO", "value": "pod"},
                {"name": "GREETING", "value": "hello $(WHO) $$(WHO)"},
            ],
        },
    )
    http.ok("POST", PODS, body)
    phase_of(http, "vols", "Succeeded")
    assert kubelet.pod_log("default", "vols").strip() == "t0k3n fast 3 hello pod $(WHO)"


def test_restart_policies(http: Http, kubelet: Kubelet, tmp_path: Path) -> None:
    del kubelet
    counter = tmp_path / "attempts"
    # Fails twice, then succeeds: OnFailure restarts it until it does.
    script = (
        "import pathlib, sys;"
        f"p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) if p.exists() else 0;"
        "p.write_text(str(n + 1)); sys.exit(0 if n >= 2 else 7)"
    )
    http.ok("POST", PODS, pod("flaky", script, restartPolicy="OnFailure"))
    done = phase_of(http, "flaky", "Succeeded")
    status = done["status"]["containerStatuses"][0]
    assert status["restartCount"] == 2
    assert status["lastState"]["terminated"]["exitCode"] == 7
    events = http.ok(
        "GET",
        "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dflaky,reason%3DBackOff",
    )
    assert len(events["items"]) == 2
    # Always: a container that keeps exiting shows CrashLoopBackOff while it waits.
    http.ok("POST", PODS, pod("looping", "pass", restartPolicy="Always"))

    def crash_looping() -> bool:
        statuses = http.ok("GET", f"{PODS}/looping")["status"].get("containerStatuses") or []
        waiting = statuses[0]["state"].get("waiting") if statuses else None
        return bool(
            waiting and waiting["reason"] == "CrashLoopBackOff" and statuses[0]["restartCount"] >= 1
        )

    wait_for(crash_looping, message="CrashLoopBackOff")
    assert http.ok("GET", f"{PODS}/looping")["status"]["phase"] == "Running"
    http.ok("DELETE", f"{PODS}/looping")
    wait_for(lambda: http.get(f"{PODS}/looping")[0] == 404, message="looping pod deleted")


def test_init_containers_run_first(http: Http, kubelet: Kubelet) -> None:
    body = pod(
        "init",
        "import os; print(open(os.environ['SHARED'] + '/seed').read())",
        volumes=[{"name": "shared", "emptyDir": {}}],
        container={
            "env": [{"name": "SHARED", "value": "/shared"}],
            "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
        },
    )
    body["spec"]["initContainers"] = [
        {
            "name": "seed",
            "image": "python:3.11",
            # Paths are rewritten in env values and whole arguments, not inside scripts.
            "command": [
                "python",
                "-c",
                "import sys; open(sys.argv[1], 'w').write('seeded')",
                "/shared/seed",
            ],
            "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
        }
    ]
    http.ok("POST", PODS, body)
    done = phase_of(http, "init", "Succeeded")
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert kubelet.pod_log("default", "init", "main").strip() == "seeded"
    failing = pod("init-fail", "print('never')")
    failing["spec"]["initContainers"] = [
        {"name": "boom", "image": "x:1", "command": ["python", "-c", "raise SystemExit(4)"]}
    ]
    http.ok("POST", PODS, failing)
    failed = phase_of(http, "init-fail", "Failed")
    assert failed["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 4
    assert (
        failed["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "PodInitializing"
    )


def test_interpreter_under_a_mount_path_is_not_rewritten(api: ApiServer, tmp_path: Path) -> None:
    """A checkout under /tmp (the venv's python is /tmp/...) must still run pods that
    mount an emptyDir at /tmp."""
    http = Http(api)
    host_bin = tmp_path / "hostbin"
    host_bin.mkdir()
    (host_bin / "python3").symlink_to(sys.executable)
    with Kubelet(
        api.kubeconfig, tmp_path / "k", nodes=[cpu_node()], python=str(host_bin / "python3")
    ) as k:
        body = pod(
            "venv-under-mount",
            "print('ran')",
            volumes=[{"name": "shadow", "emptyDir": {}}],
            container={"volumeMounts": [{"name": "shadow", "mountPath": str(tmp_path)}]},
        )
        http.ok("POST", PODS, body)
        phase_of(http, "venv-under-mount", "Succeeded")
        assert k.pod_log("default", "venv-under-mount").strip() == "ran"


def test_existing_host_paths_under_a_mount_are_kept(
    http: Http, kubelet: Kubelet, tmp_path: Path
) -> None:
    script = tmp_path / "hello.py"
    script.write_text(
        "import os; print('hello', os.environ['DATA'].startswith(os.environ['MOUNT_HOST']))"
    )
    mount = str(tmp_path)  # the pod mounts an emptyDir over the directory holding the script
    body = pod("hostpath", "unused", volumes=[{"name": "v", "emptyDir": {}}])
    body["spec"]["containers"][0]["command"] = ["python", str(script)]
    body["spec"]["containers"][0]["volumeMounts"] = [{"name": "v", "mountPath": mount}]
    body["spec"]["containers"][0]["env"] = [
        {"name": "DATA", "value": f"{mount}/not-on-the-host/data"},
        {"name": "MOUNT_HOST", "value": mount},
    ]
    http.ok("POST", PODS, body)
    phase_of(http, "hostpath", "Succeeded")
    # The script (a host file) ran from where it is, while DATA (no such host path)
    # and the mount path itself were mapped onto the pod's volume.
    assert kubelet.pod_log("default", "hostpath").strip() == "hello True"


def test_node_usage_follows_each_pod_change() -> None:
    """The scheduler's per-node usage: one pod counted once across its updates, its
    requests freed (but the pod still counted) once it finished, all of it gone with it."""
    usage = NodeUsage()
    body = pod("p", "pass", gpus=1)
    usage.update("u1", body)  # not bound yet: counts nowhere
    assert usage.on("gpu-node-1") == {"pods": 0}
    bound = {**body, "spec": {**body["spec"], "nodeName": "gpu-node-1"}}
    usage.update("u1", bound)
    usage.update("u1", {**bound, "status": {"phase": "Running"}})
    assert usage.on("gpu-node-1")["pods"] == 1
    assert usage.on("gpu-node-1")["nvidia.com/gpu"] == 1
    usage.update("u1", {**bound, "status": {"phase": "Succeeded"}})
    assert usage.on("gpu-node-1")["pods"] == 1
    assert usage.on("gpu-node-1")["nvidia.com/gpu"] == 0
    usage.update("u1", None)
    assert usage.on("gpu-node-1")["pods"] == 0
