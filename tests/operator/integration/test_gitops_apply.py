"""A GitOps controller (Flux applies server-side; Argo CD can too) and the operator
share each LoRAJob: the applier owns the spec, the operator owns the status and its
finalizer. On the real API server's server-side apply, that must never conflict,
and neither side may undo the other's fields."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.operator.integration.conftest import BASE_SPEC, GROUP, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

APPLIER = "flux-kustomize-controller"


def _manifest(name: str, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": name, "namespace": "default", **metadata},
        "spec": {**BASE_SPEC, "output": {"uri": f"s3://adapters/default/{name}"}},
    }


def _apply(cluster: Cluster, manifest: dict[str, Any]) -> None:
    """`kubectl apply --server-side` without --force-conflicts: a conflict fails."""
    cluster.cp.kubectl(
        "apply",
        "--server-side",
        f"--field-manager={APPLIER}",
        "-f",
        "-",
        input=json.dumps(manifest),
    )


def _owners(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """managedFields by manager (and subresource): what each one owns."""
    return {
        f"{m['manager']}/{m.get('subresource', '')}": m.get("fieldsV1", {})
        for m in job["metadata"].get("managedFields") or []
    }


def test_server_side_apply_and_the_operator_never_conflict(cluster: Cluster) -> None:
    name = "gitops-ssa"
    (cluster.fake_dir / f"default__{name}.json").write_text(json.dumps({"hold_at_step": 2}))
    _apply(cluster, _manifest(name, labels={"team": "a"}, annotations={"ticket": "ML-1"}))
    cluster.wait_phase(name, "Running")

    # The same file applied again while the operator writes status: no conflict, and
    # nothing changes (the generation counts spec changes only).
    _apply(cluster, _manifest(name, labels={"team": "a"}, annotations={"ticket": "ML-1"}))
    job = cluster.job(name)
    assert job is not None
    assert job["metadata"]["generation"] == 1

    owners = _owners(job)
    # The applier owns the spec; no other manager owns any spec field, and the
    # operator's writes are the status subresource and the finalizer.
    spec_owners = {who for who, fields in owners.items() if "f:spec" in fields}
    assert spec_owners == {f"{APPLIER}/"}, owners
    assert any(who.endswith("/status") for who in owners), owners
    assert f"{GROUP}/finalizer" in job["metadata"]["finalizers"]

    # A field dropped from the file is removed (server-side apply prunes what the
    # applier owned), and the operator's finalizer and status are untouched.
    _apply(cluster, _manifest(name, labels={"team": "a"}))
    job = cluster.job(name)
    assert job is not None
    assert "ticket" not in (job["metadata"].get("annotations") or {})
    assert f"{GROUP}/finalizer" in job["metadata"]["finalizers"]
    assert job["status"]["phase"] == "Running"

    cluster.release(name)
    cluster.wait_phase(name, "Succeeded")
    # A sync after the job finished applies cleanly too, and keeps the result.
    _apply(cluster, _manifest(name, labels={"team": "a"}))
    job = cluster.job(name)
    assert job is not None
    assert job["metadata"]["generation"] == 1
    assert job["status"]["phase"] == "Succeeded"


def test_deleting_an_applied_job_waits_for_its_pods(cluster: Cluster) -> None:
    """Pruning a job from the repository deletes it; the operator's finalizer stops the
    trainer first, and the job is then gone for good (no apply fight brings it back)."""
    name = "gitops-prune"
    (cluster.fake_dir / f"default__{name}.json").write_text(json.dumps({"hold_at_step": 2}))
    _apply(cluster, _manifest(name))
    cluster.wait_phase(name, "Running")
    cluster.cp.kubectl("delete", f"lorajobs.{GROUP}", name, "--wait=false")
    cluster.cp.wait_for(lambda: cluster.job(name) is None, timeout=60, message=f"{name} deleted")
    assert cluster.pods(name) == []


def test_a_changed_file_applied_after_success_runs_the_job_again(cluster: Cluster) -> None:
    """A finished job is not frozen: a sync of a changed file is accepted (it used to be
    refused for good, until someone deleted the object) and the declared spec runs."""
    name = "gitops-change"
    manifest = _manifest(name)
    manifest["spec"]["training"] = {"maxSteps": 10, "checkpointEverySteps": 5}
    _apply(cluster, manifest)
    cluster.wait_phase(name, "Succeeded")

    manifest["spec"]["training"]["maxSteps"] = 15  # the commit that asks for more steps
    _apply(cluster, manifest)
    status = cluster.wait_status(
        name,
        lambda s: s.get("phase") == "Succeeded" and s.get("completedGeneration") == 2,
        "the changed file's generation completed",
    )
    assert status["progress"]["step"] == 15
    assert cluster.attempts_log(name) == ["attempt=1 resumed_from=0", "attempt=2 resumed_from=10"]
    # The same file again: nothing to do, and no conflict with the operator's status.
    _apply(cluster, manifest)
    job = cluster.job(name)
    assert job is not None
    assert job["metadata"]["generation"] == 2
    assert job["status"]["attempts"] == 2
