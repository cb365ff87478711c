"""The real API server's Priority and Fairness throttles the operator (429 with
Retry-After): the operator backs off as told and every job still gets done.

The operator's ServiceAccount is put in a priority level of its own with one seat
and no queue (limitResponse Reject), on a server with 30 seats in all: any second
concurrent request from the operator is refused with 429."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.operator.integration.conftest import GROUP, Cluster, operator_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

JOBS = 12


@pytest.fixture(scope="module")
def throttled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with operator_cluster(
        tmp_path_factory,
        apiserver_args=["--max-requests-inflight=20", "--max-mutating-requests-inflight=10"],
    ) as cluster:
        account = next(d for d in cluster.cp.chart_rbac() if d["kind"] == "ServiceAccount")
        user = f"system:serviceaccount:{account['metadata']['namespace']}:{account['metadata']['name']}"
        cluster.cp.cluster.apply(
            [
                {
                    "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
                    "kind": "PriorityLevelConfiguration",
                    "metadata": {"name": "lorajob-operator-tight"},
                    "spec": {
                        "type": "Limited",
                        "limited": {
                            "nominalConcurrencyShares": 1,
                            "lendablePercent": 0,
                            "limitResponse": {"type": "Reject"},
                        },
                    },
                },
                {
                    "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
                    "kind": "FlowSchema",
                    "metadata": {"name": "lorajob-operator-tight"},
                    "spec": {
                        "priorityLevelConfiguration": {"name": "lorajob-operator-tight"},
                        "matchingPrecedence": 500,
                        "distinguisherMethod": {"type": "ByUser"},
                        "rules": [
                            {
                                "subjects": [{"kind": "User", "user": {"name": user}}],
                                "resourceRules": [
                                    {
                                        "verbs": ["*"],
                                        "apiGroups": ["*"],
                                        "resources": ["*"],
                                        "namespaces": ["*"],
                                        "clusterScope": True,
                                    }
                                ],
                            }
                        ],
                    },
                },
            ]
        )
        yield cluster


def _server_throttles(metrics: str) -> float:
    match = re.search(r'^lorajob_api_throttled_total\{reason="server"\} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_burst_under_429s_completes_every_job(throttled: Cluster) -> None:
    names = [f"burst-{i}" for i in range(JOBS)]
    manifests = "\n---\n".join(
        f"""apiVersion: {GROUP}/v1alpha1
kind: LoRAJob
metadata: {{name: {name}, namespace: default}}
spec:
  model: {{uri: s3://models/tiny-llama}}
  dataset: {{uri: s3://data/train.jsonl}}
  output: {{uri: s3://adapters/default/{name}}}
  training: {{maxSteps: 3}}
  resources: {{gpus: 1, cpu: 100m, memory: 128Mi}}"""
        for name in names
    )
    throttled.cp.kubectl("apply", "-f", "-", input=manifests)
    for name in names:
        throttled.wait_phase(name, "Succeeded", timeout=180)
    # The server did say no, and the operator honoured it rather than failing jobs.
    assert _server_throttles(throttled.metrics()) > 0, throttled.metrics()
    for name in names:
        assert throttled.status(name)["attempts"] == 1
    # Flow control is not an error: nothing the operator (or kopf in it) logged is one.
    log = throttled.cp.operator_log.read_text(errors="replace")
    assert "[ERROR" not in log, throttled.cp.operator_log_tail(80)
