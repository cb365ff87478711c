"""A job on several nodes (spec.resources.nodes) through the real operator, API server,
scheduler and kubelet, with the fake trainer: its pods start together (the operator's
gang gate comes off all of them at once), land on different nodes, meet at the
attempt's headless Service, end together, and a group that cannot all get nodes is
deleted whole and tried again."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.operator.integration.conftest import GROUP, Cluster, operator_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

GANG_TIMEOUT = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = {"LORAJOB_GANG_TIMEOUT_SECONDS": str(GANG_TIMEOUT), "LORAJOB_GANG_RETRY_SECONDS": "2"}
    with operator_cluster(tmp_path_factory, extra_env=env) as cluster:
        yield cluster


def _service(cluster: Cluster, name: str) -> dict[str, Any] | None:
    result = cluster.cp.kubectl("get", "service", name, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _lj(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl lj` (its module, as kubectl's plugin discovery runs it) against the cluster."""
    return subprocess.run(
        [sys.executable, "-m", "lorajob_operator.kubectl_lj", *args],
        env=cluster.cp.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _plugin_shows_each_rank(cluster: Cluster) -> None:
    progress = _lj(cluster, "progress", "pair")
    assert progress.returncode == 0, progress.stderr
    assert "ranks 2/2" in progress.stdout
    why = _lj(cluster, "why", "pair", "--tail", "5")
    assert why.returncode == 0, why.stderr
    lines = why.stdout.splitlines()
    assert "  ranks:    2/2 running" in lines
    assert any(
        line.startswith("    rank 0  Running     pod pair-1-n0  node gpu-node-") for line in lines
    )
    assert any(
        line.startswith("    rank 1  Running     pod pair-1-n1  node gpu-node-") for line in lines
    )
    assert "log lines of pod pair-1-n0:" in why.stdout
    why1 = _lj(cluster, "why", "pair", "--rank", "1")
    assert "log lines of pod pair-1-n1:" in why1.stdout
    logs1 = _lj(cluster, "logs", "pair", "--rank", "1")
    assert logs1.returncode == 0, logs1.stderr
    wrong = _lj(cluster, "logs", "pair", "--rank", "2")
    assert (wrong.returncode, wrong.stderr) == (
        1,
        "error: --rank 2: lorajob default/pair runs on 2 node(s) (spec.resources.nodes), "
        "so its node ranks are 0-1\n",
    )


def test_two_nodes_start_together_and_finish_as_one_job(cluster: Cluster) -> None:
    resources = {"gpus": 1, "nodes": 2, "cpu": "1", "memory": "1Gi"}
    cluster.create_job("pair", script={"hold_at_step": 5}, resources=resources)
    running = cluster.wait_status(
        "pair",
        lambda s: s.get("phase") == "Running" and s.get("ranksReady") == "2/2",
        "both ranks running",
    )
    assert running["podName"] == "pair-1-n0"
    ranks = running["ranks"]
    assert [(r["rank"], r["pod"], r["state"]) for r in ranks] == [
        (0, "pair-1-n0", "Running"),
        (1, "pair-1-n1", "Running"),
    ]
    # The preferred anti-affinity put them on the two nodes.
    assert sorted(r["node"] for r in ranks) == ["gpu-node-1", "gpu-node-2"]
    pods = {p["metadata"]["name"]: p for p in cluster.pods("pair")}
    assert sorted(pods) == ["pair-1-n0", "pair-1-n1"]
    for pod in pods.values():
        assert not pod["spec"].get("schedulingGates"), "the gang gate came off"
    args = pods["pair-1-n1"]["spec"]["containers"][0]["args"]
    assert args[args.index("--rdzv-endpoint") + 1] == "pair-1-rdzv.default.svc:29400"
    service = _service(cluster, "pair-1-rdzv")
    assert service is not None
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    # It selects the rank-0 pod of this attempt only. (Its EndpointSlice stays empty
    # here: the API server refuses the loopback pod IPs of this cluster's kubelet; the
    # e2e test with the cluster DNS resolves and trains through it.)
    selector = service["spec"]["selector"].items()
    assert selector <= pods["pair-1-n0"]["metadata"]["labels"].items()
    assert not selector <= pods["pair-1-n1"]["metadata"]["labels"].items()
    _plugin_shows_each_rank(cluster)

    cluster.release("pair")
    done = cluster.wait_phase("pair", "Succeeded")
    assert done["attempts"] == 1
    assert done["adapter"]["uri"] == "s3://adapters/default/pair"


def test_losing_one_rank_restarts_the_whole_group(cluster: Cluster) -> None:
    resources = {"gpus": 1, "nodes": 2, "cpu": "1", "memory": "1Gi"}
    cluster.create_job("lose-one", script={"hold_at_step": 6}, resources=resources)
    cluster.wait_status(
        "lose-one",
        lambda s: s.get("ranksReady") == "2/2" and (s.get("progress") or {}).get("step", 0) >= 6,
        "both ranks running, step 6",
    )
    assert cluster.cp.kubelet is not None
    cluster.cp.kubelet.evict("default", "lose-one-1-n1")
    status = cluster.wait_status(
        "lose-one",
        lambda s: s.get("attempts") == 2 and s.get("ranksReady") == "2/2",
        "attempt 2 with both ranks running",
    )
    assert status["disruptions"] == 1
    assert status.get("failedAttempts", 0) == 0
    assert [r["pod"] for r in status["ranks"]] == ["lose-one-2-n0", "lose-one-2-n1"]
    # The rank-0 pod of attempt 1 was stopped with its group; it checkpointed at step 6
    # and attempt 2 resumed from there.
    cluster.cp.wait_for(
        lambda: "attempt=2 resumed_from=6" in cluster.attempts_log("lose-one"),
        timeout=30,
        message="attempt 2 to resume from step 6",
    )
    cluster.cp.wait_for(
        lambda: _service(cluster, "lose-one-1-rdzv") is None,
        timeout=30,
        message="attempt 1's Service deleted",
    )
    assert _service(cluster, "lose-one-2-rdzv") is not None
    cluster.release("lose-one")
    done = cluster.wait_phase("lose-one", "Succeeded")
    assert done["attempts"] == 2


def test_a_group_that_cannot_all_get_nodes_is_deleted_whole(cluster: Cluster) -> None:
    """Three pods of 8 GPUs on two 8-GPU nodes: two run, one never fits. Past the gang
    timeout all three go (the two bound ones held GPUs), Queued/GangTimeout, and the group
    is created again later, not counted as a failure."""
    resources = {"gpus": 8, "nodes": 3, "cpu": "1", "memory": "1Gi"}
    cluster.create_job("too-big", script={"hold_at_step": 2}, resources=resources)
    status = cluster.wait_status(
        "too-big",
        lambda s: any(
            c["type"] == "Queued" and c["reason"] == "GangTimeout" for c in s.get("conditions", [])
        ),
        "a gang timeout",
        timeout=GANG_TIMEOUT + 60,
    )
    assert status.get("failedAttempts", 0) == 0
    assert status["phase"] == "Queued"
    queued = next(c for c in status["conditions"] if c["type"] == "Queued")
    assert "of the 3 pods got a node within" in queued["message"]
    # Tried again with a new group: attempt 2.
    cluster.wait_status("too-big", lambda s: s.get("attempts", 0) >= 2, "attempt 2", timeout=60)
    cluster.cp.kubectl("delete", f"lorajobs.{GROUP}", "too-big", "--wait=false")
