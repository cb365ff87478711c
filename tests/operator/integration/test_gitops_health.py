"""GitOps health of LoRAJobs on a real control plane, read by the real readers.

The operator (fake trainer) drives jobs to every phase; each live object is then read
by the kstatus library (what Flux health checks and kpt use), by Argo CD's health
script (deploy/argocd/health.lua, in Lua 5.1 like Argo CD's gopher-lua) and by
`kubectl wait --for=condition=...`. The objects are Argo CD's test data in
deploy/argocd/testdata/: with RECORD_HEALTH_TESTDATA=1 this test writes them
afresh; otherwise it checks the stored ones still have the shape the operator writes
now (phase, status fields, condition types/statuses/reasons, observedGeneration).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml
from loraops_contract.protocol import ExitCode

from tests.operator.health_checks import TESTDATA, argocd_health, kstatus, recorded, shape
from tests.operator.integration.conftest import GROUP, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
# Waits tolerate a loaded 2-core machine (they return as soon as the state is there).
WAIT = 120

RECORD = os.environ.get("RECORD_HEALTH_TESTDATA") == "1"

# name -> (Argo CD health, kstatus status)
EXPECTED = {
    "queued": ("Progressing", "InProgress"),
    "running": ("Progressing", "InProgress"),
    "succeeded": ("Healthy", "Current"),
    "failed": ("Degraded", "Failed"),
    "suspended": ("Suspended", "InProgress"),
}


@pytest.fixture(scope="module")
def jobs(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """One job in each phase, as the API server returns it (recorded while there)."""
    seen: dict[str, dict[str, Any]] = {}

    def snapshot(name: str) -> None:
        seen[name] = cluster.job(f"health-{name}") or {}

    # Queued: the credentials Secret does not exist yet (a wait, never a failure).
    cluster.create_job("health-queued", storage={"credentialsSecret": "not-created-yet"})
    cluster.wait_status(
        "health-queued",
        lambda s: (
            s.get("phase") == "Queued"
            and any(c.get("reason") == "SecretNotFound" for c in s.get("conditions", []))
        ),
        "queued for its Secret",
        timeout=WAIT,
    )
    snapshot("queued")
    cluster.create_job("health-running", script={"hold_at_step": 8})
    cluster.wait_status(
        "health-running",
        lambda s: s.get("phase") == "Running" and (s.get("progress") or {}).get("step", 0) >= 8,
        "running at step 8",
        timeout=WAIT,
    )
    snapshot("running")
    cluster.release("health-running")
    cluster.create_job("health-succeeded")
    cluster.wait_phase("health-succeeded", "Succeeded", timeout=WAIT)
    snapshot("succeeded")
    cluster.create_job("health-failed", script={"fail": {"1": int(ExitCode.INVALID_DATASET)}})
    cluster.wait_phase("health-failed", "Failed", timeout=WAIT)
    snapshot("failed")
    cluster.create_job("health-suspended", suspend=True)
    cluster.wait_phase("health-suspended", "Suspended", timeout=WAIT)
    snapshot("suspended")
    return seen


def test_kstatus_reads_success_and_failure(jobs: dict[str, dict[str, Any]]) -> None:
    names = list(EXPECTED)
    results = kstatus([jobs[n] for n in names])
    for n, r in zip(names, results, strict=True):
        print(f"kstatus {n}: {r['status']}: {r['message']}")  # shown with -s
    got = {n: r["status"] for n, r in zip(names, results, strict=True)}
    assert got == {n: kstat for n, (_, kstat) in EXPECTED.items()}
    failed = results[names.index("failed")]
    assert failed["conditions"][0]["type"] == "Stalled"
    assert failed["conditions"][0]["reason"] == "InvalidDataset"


def test_argocd_health_of_each_phase(jobs: dict[str, dict[str, Any]]) -> None:
    for name, (argo, _) in EXPECTED.items():
        health = argocd_health(jobs[name])
        print(f"argocd {name}: {health['status']}: {health['message']}")  # shown with -s
        assert health["status"] == argo, (name, health)
    assert argocd_health(jobs["running"])["message"].startswith("Running (TrainerRunning): step ")
    assert "InvalidDataset" in argocd_health(jobs["failed"])["message"]
    assert argocd_health(jobs["succeeded"])["message"] == (
        "Adapter written to s3://adapters/default/health-succeeded"
    )


def test_kubectl_wait_tells_success_from_failure(
    cluster: Cluster, jobs: dict[str, dict[str, Any]]
) -> None:
    del jobs  # the jobs are in their phases now

    def wait(name: str, condition: str) -> int:
        out = cluster.cp.kubectl(
            "wait",
            f"lorajobs.{GROUP}/{name}",
            f"--for=condition={condition}",
            "--timeout=30s",
            check=False,
        )
        print(
            f"$ kubectl wait lorajob/{name} --for=condition={condition}\n{out.stdout}{out.stderr}"
        )
        return out.returncode

    assert wait("health-succeeded", "Ready") == 0
    assert wait("health-failed", "Stalled") == 0
    assert wait("health-failed", "Ready=False") == 0
    assert wait("health-queued", "Reconciling") == 0
    assert wait("health-suspended", "Ready=False") == 0


def test_stored_testdata_match_what_the_operator_writes(
    jobs: dict[str, dict[str, Any]],
) -> None:
    if RECORD:
        TESTDATA.mkdir(parents=True, exist_ok=True)
        for name, job in jobs.items():
            path = TESTDATA / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recorded(job), sort_keys=False, width=100))
    for name, job in jobs.items():
        stored = yaml.safe_load((TESTDATA / f"{name}.yaml").read_text())
        assert shape(stored) == shape(job), (
            f"deploy/argocd/testdata/{name}.yaml no longer matches what the operator writes; "
            "record it again: RECORD_HEALTH_TESTDATA=1 pytest " + __file__
        )
