"""A job on several nodes (spec.resources.nodes): decide() runs its pods as one group.

Created together, released together (the gang gate) or admitted together (Kueue), ended
together: one pod's failure, disruption or loss ends the attempt for all of them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lorajob_operator import objects, reconcile
from lorajob_operator.conditions import ConditionType
from lorajob_operator.settings import load_settings
from loraops_contract.protocol import ExitCode
from loraops_contract.reasons import Reason

from tests.operator.runtime.kubefakes import NAME, SPEC, T0, at, job, pod, stamp, termination
from tests.operator.runtime.test_reconcile import World

NODES = 2
GANG_SPEC: dict[str, Any] = {**SPEC, "resources": {"gpus": 0, "nodes": NODES}}
SETTINGS = load_settings(
    retry_backoff_seconds=10,
    retry_backoff_max_seconds=300,
    max_disruptions=3,
    gang_timeout_seconds=300,
    gang_retry_seconds=60,
)
UNSCHEDULABLE = [
    {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    }
]


def member(
    rank: int,
    attempt: int = 1,
    phase: str = "Running",
    *,
    gated: bool = False,
    node: str | None = "auto",
    created: datetime = T0,
    ip: str | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """The pod of node rank `rank`, as the API server shows it."""
    p = pod(attempt, phase, **kw)
    meta = p["metadata"]
    meta["name"] = objects.pod_name(NAME, attempt, rank)
    meta["uid"] = f"pod-uid-{attempt}-{rank}"
    meta["creationTimestamp"] = stamp(created)
    meta["labels"][objects.LABEL_NODE_RANK] = str(rank)
    meta["annotations"][objects.ANNOTATION_NODES] = str(NODES)
    if gated:
        p["spec"]["schedulingGates"] = [{"name": objects.GANG_GATE}]
    if gated or node is None:
        p["spec"].pop("nodeName", None)
    elif node != "auto":
        p["spec"]["nodeName"] = node
    else:
        p["spec"]["nodeName"] = f"node-{rank}"
    if ip is not None and phase == "Running":
        p["status"]["podIP"] = ip
    return p


def started(w: World) -> None:
    """Attempt 1 created, released and running on two nodes."""
    d = w.step()
    assert d.create is not None
    w.pods = [member(0, ip="10.0.0.10"), member(1, ip="10.0.0.11")]
    w.step(at(5))


def test_all_pods_and_the_rendezvous_service_are_created_in_one_pass() -> None:
    w = World(job(spec=GANG_SPEC), SETTINGS)
    d = w.step()
    assert d.create is not None
    names = [d.create.body["metadata"]["name"], *(p["metadata"]["name"] for p in d.create.more)]
    assert names == [f"{NAME}-1-n0", f"{NAME}-1-n1"]
    assert d.create.service is not None
    assert d.create.service["metadata"]["name"] == f"{NAME}-1-rdzv"
    assert w.status["podName"] == f"{NAME}-1-n0"
    assert w.status["ranksReady"] == "0/2"
    assert [r["pod"] for r in w.status["ranks"]] == names
    assert "one per node, started together" in w.cond(ConditionType.RUNNING)["message"]


def test_the_gate_comes_off_all_pods_only_when_all_exist() -> None:
    w = World(job(spec=GANG_SPEC), SETTINGS)
    w.step()
    # The operator stopped after creating rank 0: the next pass creates the rest and
    # keeps rank 0 gated.
    w.pods = [member(0, phase="Pending", gated=True)]
    d = w.step(at(2))
    assert d.ungate == []
    assert d.create is not None
    assert d.create.attempt == 1
    assert d.create.body["metadata"]["name"] == f"{NAME}-1-n1"
    assert d.create.more == ()
    assert w.status["phase"] == "Queued"
    assert [r["state"] for r in w.status["ranks"]] == ["Gated", "Missing"]
    # Both exist: both released in one pass.
    w.pods.append(member(1, phase="Pending", gated=True))
    d = w.step(at(3))
    assert sorted(d.ungate) == [f"{NAME}-1-n0", f"{NAME}-1-n1"]
    assert d.create is None
    assert "start together" in w.cond(ConditionType.QUEUED)["message"]


def test_running_group_reports_progress_from_global_rank_0s_pod() -> None:
    """torch's c10d rendezvous puts global rank 0 on the pod whose address (its IP, the
    launcher's --local-addr) sorts first; that pod serves progress."""
    w = World(job(spec=GANG_SPEC), SETTINGS)
    started(w)
    d = w.step(at(10))
    assert w.status["phase"] == "Running"
    assert d.progress_ip == "10.0.0.10"
    assert w.status["ranksReady"] == "2/2"
    assert [(r["rank"], r["node"], r["state"]) for r in w.status["ranks"]] == [
        (0, "node-0", "Running"),
        (1, "node-1", "Running"),
    ]
    # The rendezvous sorts addresses as strings: 10.0.0.100 < 10.0.0.11 < 10.0.0.9.
    w.pods = [member(0, ip="10.0.0.9"), member(1, ip="10.0.0.100")]
    assert w.step(at(11)).progress_ip == "10.0.0.100"
    # One rank not running yet: the group is not Running, and no progress is read.
    w.pods[1] = member(1, phase="Pending", waiting="ContainerCreating")
    d = w.step(at(12))
    assert d.progress_ip is None
    assert w.status["phase"] != "Running"


def test_one_failed_rank_ends_the_attempt_for_all_and_counts_once() -> None:
    w = World(job(spec=GANG_SPEC), SETTINGS)
    started(w)
    w.pods[1] = member(1, phase="Failed", exit_code=1, finished=at(20))
    d = w.step(at(21))
    assert [x.name for x in d.delete] == [f"{NAME}-1-n0"]
    assert w.status["failedAttempts"] == 1
    assert "disruptions" not in w.status
    assert "podName" not in w.status
    message = w.cond(ConditionType.RUNNING)["message"]
    assert f"pod {NAME}-1-n1" in message
    assert "node rank 1 of 2" in message
    # Rank 0 stops (SIGTERM, then gone); after the backoff the next attempt starts all
    # pods again, and the first attempt's Service goes.
    w.pods = [member(1, phase="Failed", exit_code=1, finished=at(20))]
    assert w.step(at(25)).create is None  # backoff: 10s from the failure
    d = w.step(at(31))
    assert d.create is not None
    assert d.create.attempt == 2
    assert d.create.body["metadata"]["name"] == f"{NAME}-2-n0"
    assert d.delete_service == f"{NAME}-1-rdzv"


def test_a_permanent_failure_of_any_rank_fails_the_job() -> None:
    w = World(job(spec=GANG_SPEC), SETTINGS)
    started(w)
    bad = termination("Failed", reason=Reason.INVALID_DATASET, message="row 3 has no output")
    code = int(ExitCode.INVALID_DATASET)
    w.pods[1] = member(1, phase="Failed", exit_code=code, message=bad, finished=at(20))
    d = w.step(at(21))
    assert w.status["phase"] == "Failed"
    assert w.status["failureReason"] == Reason.INVALID_DATASET
    assert f"{NAME}-1-n0" in [x.name for x in d.delete]


def test_a_lost_rank_is_a_disruption_of_the_whole_group() -> None:
    w = World(job(spec=GANG_SPEC), SETTINGS)
    started(w)
    evicted = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]
    w.pods[1] = member(1, phase="Failed", exit_code=143, conditions=evicted, finished=at(20))
    d = w.step(at(21))
    assert [x.name for x in d.delete] == [f"{NAME}-1-n0"]
    assert w.status["disruptions"] == 1
    assert "failedAttempts" not in w.status
    assert w.cond(ConditionType.RUNNING)["reason"] == Reason.PREEMPTED


def test_a_rank_deleted_after_the_start_ends_the_attempt() -> None:
    w = World(job(spec=GANG_SPEC), SETTINGS)
    started(w)
    w.pods = [w.pods[0]]
    d = w.step(at(21))
    assert [x.name for x in d.delete] == [f"{NAME}-1-n0"]
    assert w.status["disruptions"] == 1
    assert f"{NAME}-1-n1 (node rank 1 of 2) was deleted" in w.cond(ConditionType.RUNNING)["message"]


def test_the_pod_that_published_the_adapter_is_the_job_success() -> None:
    w = World(job(spec=GANG_SPEC), SETTINGS)
    started(w)
    w.pods[0] = member(0, phase="Succeeded", exit_code=0, message=termination(), finished=at(100))
    d = w.step(at(101))
    assert w.status["phase"] == "Succeeded"
    assert w.status["adapter"]["uri"] == "s3://adapters/tune"
    assert [x.name for x in d.delete] == [f"{NAME}-1-n1"]


def test_global_rank_0_may_publish_from_another_pod() -> None:
    """A pod that finished its part (exit 0, no adapter) waits for the one that holds
    global rank 0, whichever node rank it has."""
    w = World(job(spec=GANG_SPEC), SETTINGS)
    started(w)
    done = termination(with_adapter=False)
    w.pods[0] = member(0, phase="Succeeded", exit_code=0, message=done, finished=at(90))
    d = w.step(at(91))
    assert w.status["phase"] == "Running"
    assert d.delete == []
    assert d.progress_ip == "10.0.0.11"
    w.pods[1] = member(1, phase="Succeeded", exit_code=0, message=termination(), finished=at(100))
    w.step(at(101))
    assert w.status["phase"] == "Succeeded"
    assert w.status["adapter"]["uri"] == "s3://adapters/tune"
    assert "failedAttempts" not in w.status


def test_a_group_that_ends_without_an_adapter_failed() -> None:
    w = World(job(spec=GANG_SPEC), SETTINGS)
    started(w)
    done = termination(with_adapter=False)
    w.pods = [
        member(r, phase="Succeeded", exit_code=0, message=done, finished=at(90)) for r in (0, 1)
    ]
    w.step(at(91))
    assert w.status["failedAttempts"] == 1
    assert "reported no adapter" in w.cond(ConditionType.RUNNING)["message"]


def test_a_group_not_all_on_nodes_in_time_is_deleted_whole_and_retried() -> None:
    w = World(job(spec=GANG_SPEC), SETTINGS)
    w.step()
    w.pods = [member(0), member(1, phase="Pending", node=None, conditions=UNSCHEDULABLE)]
    d = w.step(at(10))
    assert d.delete == []
    assert w.status["phase"] == "Queued"
    assert d.requeue_after is not None
    assert d.requeue_after <= 290
    # Past the gang timeout: both go, rank 0 with the GPUs it holds.
    d = w.step(at(301))
    assert sorted(x.name for x in d.delete) == [f"{NAME}-1-n0", f"{NAME}-1-n1"]
    queued = w.cond(ConditionType.QUEUED)
    assert (queued["status"], queued["reason"]) == ("True", Reason.GANG_TIMEOUT)
    assert queued["lastTransitionTime"] == stamp(at(301))
    assert "only 1 of the 2 pods got a node within 300s" in queued["message"]
    assert "failedAttempts" not in w.status
    assert "disruptions" not in w.status
    # Gone: the group is created again once gang_retry_seconds have passed.
    w.pods = []
    d = w.step(at(331))
    assert d.create is None
    assert d.requeue_after == 30
    d = w.step(at(362))
    assert d.create is not None
    assert d.create.attempt == 2


def test_a_kueue_pod_group_has_no_gang_timeout_of_ours() -> None:
    """Kueue admits the whole group or none of it; its pods wait behind Kueue's gate."""
    settings = load_settings(kueue_default_queue="shared", gang_timeout_seconds=300)
    w = World(job(spec=GANG_SPEC), settings)
    d = w.step()
    assert d.create is not None
    assert objects.LABEL_KUEUE_POD_GROUP in d.create.body["metadata"]["labels"]
    kueue_gated = []
    for body in (d.create.body, *d.create.more):
        p = member(objects.node_rank(body), phase="Pending", node=None)
        p["metadata"]["labels"] = body["metadata"]["labels"]
        p["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
        kueue_gated.append(p)
    w.pods = kueue_gated
    d = w.step(at(3600))
    assert d.delete == []
    assert d.ungate == []
    assert w.cond(ConditionType.QUEUED)["reason"] == Reason.SCHEDULING_GATED


def test_a_single_node_job_has_no_ranks() -> None:
    w = World(settings=SETTINGS)
    d = w.step()
    assert d.create is not None
    assert d.create.more == ()
    assert d.create.service is None
    assert "ranks" not in w.status
    assert reconcile.Decision().ungate == []
