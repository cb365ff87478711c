"""Real Kueue (v0.17, devcluster/kueue.py) on the real control plane: what its
plain-Pod integration does to pods, and that the operator reads it right.

The first tests share one control plane with Kueue and a process kubelet (no operator):
each uses its own namespace, ClusterQueue and LocalQueue. The last one runs a LoRAJob
through Kueue with the operator and the trainer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lorajob_operator import objects
from lorajob_operator.api import parse_spec
from lorajob_operator.podstatus import classify_pod
from lorajob_operator.settings import OperatorSettings
from loraops_contract.reasons import Reason

from devcluster import kueue
from devcluster.controlplane import ControlPlane
from devcluster.kubelet import cpu_node
from tests.e2e.conftest import BUCKET, FAST_OPERATOR_ENV, Cluster, Inputs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Obj = dict[str, Any]
PREEMPTED = "WorkloadEvictedDueToPreempted"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    workdir = tmp_path_factory.mktemp("kueue-plane")
    with ControlPlane(workdir, nodes=[cpu_node()], kueue=True) as cp:
        yield cp


# ----------------------------------------------------------------- helpers
def namespace(cp: ControlPlane, name: str) -> str:
    cp.cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}])
    cp.cluster.wait_default_service_account(name)
    return name


def queue_setup(cp: ControlPlane, ns: str, quota: dict[str, str | int]) -> str:
    """A flavor, a ClusterQueue for `ns` only with `quota`, and LocalQueue `lq` in ns."""
    flavor, cq = f"{ns}-flavor", f"{ns}-cq"
    assert cp.kueue is not None
    cp.kueue.apply(
        [
            kueue.resource_flavor(flavor),
            kueue.cluster_queue(
                cq,
                {flavor: quota},
                namespace_selector={"matchLabels": {"kubernetes.io/metadata.name": ns}},
            ),
            kueue.local_queue(ns, "lq", cq),
        ]
    )
    return "lq"


def sleeper(
    name: str,
    *,
    queue: str | None = "lq",
    priority: str | None = None,
    cpu: str = "1",
    command: str = "import time; time.sleep(600)",
    ignore_sigterm: bool = False,
) -> Obj:
    labels = {}
    if queue:
        labels[kueue.QUEUE_LABEL] = queue
    if priority:
        labels[kueue.PRIORITY_CLASS_LABEL] = priority
    prelude = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            # Ignoring SIGTERM keeps a stopped pod around this long to be looked at.
            "terminationGracePeriodSeconds": 4,
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11",
                    "command": [
                        "python",
                        "-c",
                        (prelude if ignore_sigterm else "") + command,
                    ],
                    "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}},
                }
            ],
        },
    }


def create_pod(cp: ControlPlane, ns: str, body: Obj) -> Obj:
    return cp.cluster.request("POST", f"/api/v1/namespaces/{ns}/pods", body)


def get_pod(cp: ControlPlane, ns: str, name: str) -> Obj | None:
    return cp.cluster.get_path(f"/api/v1/namespaces/{ns}/pods/{name}")


def gates(pod: Obj) -> list[str]:
    return [g["name"] for g in (pod.get("spec") or {}).get("schedulingGates") or []]


def wait_workload(cp: ControlPlane, ns: str, pod: Obj, what: str = "a Workload") -> Obj:
    uid = pod["metadata"]["uid"]
    found: Obj = cp.wait_for(
        lambda: kueue.workload_for_pod(cp.cluster, ns, uid),
        timeout=30,
        message=f"{what} for pod {pod['metadata']['name']}",
    )
    return found


def wait_admitted_and_running(cp: ControlPlane, ns: str, name: str) -> Obj:
    def running() -> Obj | None:
        pod = get_pod(cp, ns, name) or {}
        phase = (pod.get("status") or {}).get("phase")
        return pod if not gates(pod) and phase == "Running" else None

    pod: Obj = cp.wait_for(running, timeout=60, message=f"pod {ns}/{name} admitted and Running")
    return pod


# ------------------------------------------------------------------- tests
def test_crds_serve_v1beta2_and_convert_v1beta1_through_the_webhook(plane: ControlPlane) -> None:
    crd = plane.cluster.request(
        "GET",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/clusterqueues.kueue.x-k8s.io",
    )
    versions = {v["name"]: (v["served"], v["storage"]) for v in crd["spec"]["versions"]}
    assert versions == {"v1beta1": (True, False), "v1beta2": (True, True)}
    assert crd["spec"]["conversion"]["webhook"]["clientConfig"]["url"].startswith(
        "https://127.0.0.1:"
    )
    assert plane.kueue is not None
    plane.kueue.apply(
        [
            kueue.resource_flavor("conv-flavor"),
            kueue.cluster_queue("conv", {"conv-flavor": {"cpu": 1}}, cohort="conv-cohort"),
        ]
    )
    # Read in the old version: the API server asks Kueue's conversion webhook.
    old = plane.cluster.request("GET", "/apis/kueue.x-k8s.io/v1beta1/clusterqueues/conv")
    assert old["apiVersion"] == "kueue.x-k8s.io/v1beta1"
    assert old["spec"]["cohort"] == "conv-cohort"  # v1beta2's cohortName


def test_examples_work_against_real_kueue(plane: ControlPlane) -> None:
    for ns in ("team-a", "team-b"):
        namespace(plane, ns)
    documents = kueue.example_documents()
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["ClusterQueue"] * 2 + ["LocalQueue"] * 2 + ["ResourceFlavor"] * 2
    assert plane.kueue is not None
    plane.kueue.apply(documents)  # waits for the queues to be Active


def test_webhook_manages_labelled_pods_in_managed_namespaces_only(plane: ControlPlane) -> None:
    ns = namespace(plane, "kq-webhook")

    def dry_run(where: str, body: Obj) -> Obj:
        return plane.cluster.request("POST", f"/api/v1/namespaces/{where}/pods?dryRun=All", body)

    managed = dry_run(ns, sleeper("managed"))
    assert gates(managed) == [kueue.ADMISSION_GATE, kueue.TOPOLOGY_GATE]
    assert managed["metadata"]["labels"][kueue.MANAGED_LABEL] == "true"
    assert kueue.POD_FINALIZER in managed["metadata"]["finalizers"]
    # No queue label: not Kueue's.
    unlabelled = dry_run(ns, sleeper("unlabelled", queue=None))
    assert gates(unlabelled) == []
    assert kueue.MANAGED_LABEL not in unlabelled["metadata"].get("labels", {})
    # kube-system is never managed, label or not.
    system = dry_run("kube-system", sleeper("system"))
    assert gates(system) == []
    assert not system["metadata"].get("finalizers")


def test_pod_without_quota_stays_gated_until_deleted(plane: ControlPlane) -> None:
    ns = namespace(plane, "kq-quota")
    queue_setup(plane, ns, {"cpu": 1, "memory": "1Gi"})
    pod = create_pod(plane, ns, sleeper("too-big", cpu="2"))
    workload = wait_workload(plane, ns, pod)
    reserved = plane.wait_for(
        lambda: kueue.condition(
            kueue.workload_for_pod(plane.cluster, ns, pod["metadata"]["uid"]) or {},
            "QuotaReserved",
        ),
        timeout=30,
        message="the QuotaReserved condition",
    )
    assert reserved["status"] == "False"
    assert "insufficient" in reserved["message"].lower(), reserved
    assert workload["spec"]["queueName"] == "lq"
    assert gates(get_pod(plane, ns, "too-big") or {}) == [
        kueue.ADMISSION_GATE,
        kueue.TOPOLOGY_GATE,
    ]
    # Kueue's finalizer does not keep a deleted pod: Kueue drops it at once.
    plane.cluster.request("DELETE", f"/api/v1/namespaces/{ns}/pods/too-big")
    plane.wait_for(lambda: get_pod(plane, ns, "too-big") is None, timeout=30, message="pod gone")


def test_finished_pod_is_released_by_kueue(plane: ControlPlane) -> None:
    ns = namespace(plane, "kq-finish")
    queue_setup(plane, ns, {"cpu": 1, "memory": "1Gi"})
    pod = create_pod(plane, ns, sleeper("quick", command="print('done')"))

    def finished() -> Obj | None:
        found = get_pod(plane, ns, "quick") or {}
        done = (found.get("status") or {}).get("phase") == "Succeeded"
        return found if done and not found["metadata"].get("finalizers") else None

    done: Obj = plane.wait_for(finished, timeout=60, message="pod Succeeded, finalizer removed")
    # The pod stays (finished pods are not deleted) and reads as a success.
    assert classify_pod(done).kind == "succeeded"
    workload = kueue.workload_for_pod(plane.cluster, ns, pod["metadata"]["uid"])
    assert workload is not None
    assert kueue.condition(workload, "Finished") is not None


def test_higher_priority_pod_preempts_a_running_one(plane: ControlPlane) -> None:
    ns = namespace(plane, "kq-preempt")
    assert plane.kueue is not None
    plane.kueue.apply(
        [
            kueue.workload_priority_class("kq-low", 100),
            kueue.workload_priority_class("kq-high", 1000),
        ]
    )
    queue_setup(plane, ns, {"cpu": 1, "memory": "1Gi"})

    low = create_pod(plane, ns, sleeper("low", priority="kq-low", ignore_sigterm=True))
    assert gates(low) == [kueue.ADMISSION_GATE, kueue.TOPOLOGY_GATE]
    low_workload = wait_workload(plane, ns, low)
    assert low_workload["spec"]["priority"] == 100
    assert low_workload["spec"]["priorityClassRef"]["name"] == "kq-low"
    wait_admitted_and_running(plane, ns, "low")

    high = create_pod(plane, ns, sleeper("high", priority="kq-high"))
    assert gates(high), "the high-priority pod must queue too"

    # Kueue evicts the low Workload (Preempted), marks the pod and deletes it.
    seen: list[Obj] = []

    def stopped() -> Obj | None:
        pod = get_pod(plane, ns, "low")
        if pod is None:
            return None
        seen.append(pod)
        target = kueue.condition(pod, kueue.TERMINATION_TARGET)
        return pod if target and pod["metadata"].get("deletionTimestamp") else None

    pod = plane.wait_for(stopped, timeout=60, message="the low pod stopped by Kueue")
    target = kueue.condition(pod, kueue.TERMINATION_TARGET)
    assert target is not None
    assert target["status"] == "True"
    assert target["reason"] == PREEMPTED, target
    assert "Preempted to accommodate a workload" in target["message"], target
    assert "prioritization in the ClusterQueue" in target["message"], target

    # What the operator makes of it: a preemption, resumable, not a failure.
    outcome = classify_pod(pod)
    assert (outcome.kind, outcome.reason) == ("disrupted", Reason.PREEMPTED), outcome
    assert not outcome.counts_toward_backoff

    evicted = kueue.workload_for_pod(plane.cluster, ns, low["metadata"]["uid"])
    if evicted is not None:  # garbage-collected with its pod soon after
        condition = kueue.condition(evicted, "Evicted")
        assert condition is not None, evicted
        assert condition["reason"] == "Preempted", evicted

    # The kubelet kills it after its grace period (it ignores SIGTERM); every state
    # on the way still reads as a preemption.
    def gone() -> bool:
        pod = get_pod(plane, ns, "low")
        if pod is not None:
            seen.append(pod)
        return pod is None

    plane.wait_for(gone, timeout=60, message="the low pod gone")
    for state in seen[seen.index(pod) :]:
        assert classify_pod(state).reason == Reason.PREEMPTED, state
    wait_admitted_and_running(plane, ns, "high")
    high_workload = kueue.workload_for_pod(plane.cluster, ns, high["metadata"]["uid"])
    assert high_workload is not None
    assert kueue.is_admitted(high_workload)


def test_restarted_kueue_admits_again(plane: ControlPlane) -> None:
    assert plane.kueue is not None
    plane.kueue.restart()
    ns = namespace(plane, "kq-restart")
    queue_setup(plane, ns, {"cpu": 1, "memory": "1Gi"})
    pod = create_pod(plane, ns, sleeper("after-restart"))
    assert kueue.ADMISSION_GATE in gates(pod)
    wait_admitted_and_running(plane, ns, "after-restart")


# ----------------------------------------------------- the operator with Kueue
# Long enough to preempt mid-run, with a checkpoint every 4 steps to resume from.
LONGER = {
    "spec": {
        "training": {"maxSteps": 24, "checkpointEverySteps": 4, "gradientAccumulationSteps": 8}
    }
}
TOTAL_STEPS = 24


def group_pods(ns: str) -> list[Obj]:
    """The two pods the operator makes for a LoRAJob with resources.nodes 2 that goes
    through LocalQueue lq, as sleepers carrying the Kueue metadata objects.py gives them
    (pod group name, total count, retriable-in-group)."""
    spec = parse_spec(
        {
            "model": {"uri": "s3://models/tiny"},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://adapters/pair"},
            "resources": {"gpus": 0, "nodes": 2, "cpu": "1", "memory": "64Mi"},
            "scheduling": {"queueName": "lq"},
        }
    )
    job = objects.JobRef(name="pair", namespace=ns, uid="5d1c0e9a-group-test")
    out = []
    for built in objects.build_trainer_pods(job, spec, OperatorSettings(), 1):
        assert "schedulingGates" not in built["spec"]  # Kueue gates a group, not the operator
        pod = sleeper(built["metadata"]["name"])
        pod["metadata"]["labels"] = built["metadata"]["labels"]
        pod["metadata"]["annotations"] = built["metadata"]["annotations"]
        out.append(pod)
    return out


def test_a_lorajob_pod_group_is_admitted_whole_or_not_at_all(plane: ControlPlane) -> None:
    """Kueue makes one Workload of the group's pods and admits both or neither."""
    small = namespace(plane, "kq-group-small")
    queue_setup(plane, small, {"cpu": 1, "memory": "1Gi"})  # room for one pod of two
    pods = [create_pod(plane, small, p) for p in group_pods(small)]
    workload = wait_workload(plane, small, pods[0], "the group's Workload")
    assert sum(p["count"] for p in workload["spec"]["podSets"]) == 2
    second = kueue.workload_for_pod(plane.cluster, small, pods[1]["metadata"]["uid"])
    assert (second or {}).get("metadata", {}).get("name") == workload["metadata"]["name"]
    reserved = plane.wait_for(
        lambda: kueue.condition(
            kueue.workload_for_pod(plane.cluster, small, pods[0]["metadata"]["uid"]) or {},
            "QuotaReserved",
        ),
        timeout=30,
        message="the group's QuotaReserved condition",
    )
    assert reserved["status"] == "False"
    for pod in pods:
        assert kueue.ADMISSION_GATE in gates(get_pod(plane, small, pod["metadata"]["name"]) or {})
    # Room for both: both admitted, both run.
    roomy = namespace(plane, "kq-group")
    queue_setup(plane, roomy, {"cpu": 2, "memory": "1Gi"})
    for pod in group_pods(roomy):
        create_pod(plane, roomy, pod)
    for name in ("pair-1-n0", "pair-1-n1"):
        wait_admitted_and_running(plane, roomy, name)


@pytest.fixture
def kueue_cluster(tiny_inputs: Inputs, tmp_path: Path) -> Iterator[Cluster]:
    cp = ControlPlane(
        tmp_path / "plane",
        nodes=[cpu_node()],
        s3_buckets=[BUCKET],
        operator=True,
        operator_env=FAST_OPERATOR_ENV,
        kueue=True,
    )
    with cp:
        cluster = Cluster(cp, tiny_inputs)
        cluster.upload_inputs()
        yield cluster


def test_lorajob_preempted_by_kueue_resumes_without_burning_backoff(
    kueue_cluster: Cluster,
) -> None:
    cluster = kueue_cluster
    cp = cluster.cp
    assert cp.kueue is not None
    # One CPU of quota: the trainer (1 CPU) or the intruder, never both.
    cp.cluster.apply([kueue.priority_class("lora-low", 100), kueue.priority_class("urgent", 1000)])
    cp.kueue.apply(
        [
            kueue.resource_flavor("cpu"),
            kueue.cluster_queue("cpus", {"cpu": {"cpu": 1, "memory": "4Gi"}}),
            kueue.local_queue("default", "cpus", "cpus"),
        ]
    )
    cluster.create_secret()
    overrides = {
        "spec": {
            **LONGER["spec"],
            "scheduling": {"queueName": "cpus", "priorityClassName": "lora-low"},
            "backoffLimit": 0,  # any attempt counted as failed fails the job
        }
    }
    cluster.apply(cluster.manifest("queued", overrides))
    first_pod = cluster.wait_status("queued", lambda s: bool(s.get("podName")), "a pod")["podName"]
    progress = cp.wait_for(
        lambda: (p := cluster.trainer_progress(first_pod)).get("lastCheckpoint") and p,
        timeout=180,
        message="the first checkpoint",
    )
    assert progress["step"] < TOTAL_STEPS, "training finished before it could be preempted"
    first = cp.get("pods", first_pod)
    assert first is not None
    assert first["metadata"]["labels"][kueue.QUEUE_LABEL] == "cpus"
    workload = kueue.workload_for_pod(cp.cluster, "default", first["metadata"]["uid"])
    assert workload is not None
    assert workload["spec"]["priority"] == 100

    # A more urgent pod in the same queue: Kueue preempts the trainer's Workload.
    urgent = sleeper("urgent", queue="cpus", cpu="1")
    urgent["spec"]["priorityClassName"] = "urgent"
    create_pod(cp, "default", urgent)

    # The job waits behind Kueue's gate while the urgent pod holds the quota.
    queued = cluster.wait_status(
        "queued",
        lambda s: (
            s.get("disruptions", 0) >= 1
            and s.get("podName") not in (None, first_pod)
            and any(c.get("reason") == "SchedulingGated" for c in s.get("conditions", []))
        ),
        "a new attempt queued by Kueue",
        timeout=120,
    )
    assert queued.get("failedAttempts", 0) == 0
    events = json.loads(
        cluster.kubectl(
            "get", "events", "--field-selector", "involvedObject.name=queued", "-o", "json"
        ).stdout
    )["items"]
    preempted = [e for e in events if e["reason"] == Reason.PREEMPTED]
    assert preempted, [(e["reason"], e["message"]) for e in events]
    assert f"stopped by Kueue ({PREEMPTED})" in preempted[0]["message"], preempted[0]
    assert "not counted against backoffLimit" in preempted[0]["message"], preempted[0]

    # The urgent work is done: the quota returns and the job resumes.
    cp.cluster.request("DELETE", "/api/v1/namespaces/default/pods/urgent?gracePeriodSeconds=0")
    status = cluster.wait_phase("queued", "Succeeded")
    assert status["disruptions"] == 1
    assert status.get("failedAttempts", 0) == 0
    assert status["attempts"] == 2
    assert status["progress"]["step"] == TOTAL_STEPS
    assert cp.kubelet is not None
    first_log = cp.kubelet.pod_log("default", first_pod)
    second_log = cp.kubelet.pod_log("default", status["podName"])
    stopped = re.search(r"stopped by SIGTERM at step (\d+)/", first_log)
    assert stopped, first_log[-2000:]
    resumed = re.search(r"resuming from \S+/checkpoint-(\d+) \(step (\d+)\)", second_log)
    assert resumed, second_log[-2000:]
    assert int(resumed[2]) == int(stopped[1]) < TOTAL_STEPS
