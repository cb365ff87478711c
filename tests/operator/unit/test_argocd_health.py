"""Argo CD's health check (deploy/argocd/health.lua) in a real Lua 5.1, and kstatus,
on LoRAJobs recorded from a control plane (deploy/argocd/testdata/).

The recordings are kept true to what the operator writes by
tests/operator/integration/test_gitops_health.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.operator.health_checks import (
    ARGOCD_CM,
    ARGOCD_HEALTH_KEY,
    HEALTH_LUA,
    TESTDATA,
    argocd_health,
    health_cases,
    kstatus,
)

CASES = health_cases()


@pytest.mark.parametrize(("name", "obj", "expected"), CASES, ids=[c[0] for c in CASES])
def test_health_of_recorded_jobs(name: str, obj: dict[str, Any], expected: dict[str, str]) -> None:
    assert argocd_health(obj) == expected, name


def test_every_recording_has_a_case() -> None:
    assert sorted(p.stem for p in TESTDATA.glob("*.yaml")) == sorted(c[0] for c in CASES)
    assert {c[2]["status"] for c in CASES} == {"Progressing", "Healthy", "Degraded", "Suspended"}


def _recorded(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((TESTDATA / f"{name}.yaml").read_text()))


def test_an_edit_the_operator_has_not_seen_is_progressing_not_stale_healthy() -> None:
    job = _recorded("succeeded")
    job["metadata"]["generation"] = 2
    assert argocd_health(job) == {
        "status": "Progressing",
        "message": "Waiting for the operator to observe generation 2",
    }
    assert kstatus([job])[0]["status"] == "InProgress"


def test_a_new_job_without_status_is_progressing() -> None:
    job = _recorded("queued")
    del job["status"]
    assert argocd_health(job)["status"] == "Progressing"


def test_a_refused_edit_of_a_finished_job_is_degraded() -> None:
    job = copy.deepcopy(_recorded("succeeded"))
    job["status"]["conditions"].append(
        {
            "type": "Stalled",
            "status": "True",
            "reason": "InvalidSpec",
            "message": "spec.lora.r: must be at most 256",
            "observedGeneration": 1,
        }
    )
    assert argocd_health(job) == {
        "status": "Degraded",
        "message": "InvalidSpec: spec.lora.r: must be at most 256",
    }


def test_argocd_cm_carries_the_script_verbatim() -> None:
    cm = yaml.safe_load(ARGOCD_CM.read_text())
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][ARGOCD_HEALTH_KEY] == HEALTH_LUA.read_text()


def test_lua_errors_are_not_swallowed() -> None:
    with pytest.raises(Exception, match="attempt to index"):
        argocd_health({"status": {"phase": "Running"}}, script="return obj.metadata.name.x")


@pytest.mark.slow  # builds the kstatus helper (Go) on first use
def test_kstatus_of_recorded_jobs() -> None:
    expected = {
        "queued": "InProgress",
        "running": "InProgress",
        "succeeded": "Current",
        "failed": "Failed",
        "suspended": "InProgress",
    }
    results = kstatus([_recorded(name) for name in expected])
    assert [r["status"] for r in results] == list(expected.values())


def test_a_failure_without_a_reason_still_says_what_happened() -> None:
    job = _recorded("failed")
    del job["status"]["failureReason"]
    job["status"]["conditions"] = [c for c in job["status"]["conditions"] if c["type"] != "Stalled"]
    health = argocd_health(job)
    assert health["status"] == "Degraded"
    assert health["message"].startswith("attempt 1 (pod health-failed-1) failed")
