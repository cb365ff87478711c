"""Spec changes on the real control plane: the declared spec is what eventually runs.

A resumable change (more steps) restarts a running trainer, which resumes from the
checkpoint it saves as it stops; a run-defining change (the learning rate) starts a new
run from step 0, never from the old run's checkpoints, even when a later attempt of the
new run restarts; a finished job runs again when its spec changes. The fake trainer
keeps one checkpoint per training run, as the real one keeps one namespace per run.
"""

from __future__ import annotations

from typing import Any

import pytest
from loraops_contract.protocol import ExitCode

from tests.operator.integration.conftest import Cluster

# Each module starts a whole control plane (API server, kubelet, operator).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _step(status: dict[str, Any]) -> int:
    return int((status.get("progress") or {}).get("step", 0))


def _reasons(cluster: Cluster, name: str) -> list[str]:
    return [e["reason"] for e in cluster.events(name)]


def _no_failures(status: dict[str, Any]) -> None:
    assert status.get("failedAttempts", 0) == 0, status
    assert status.get("disruptions", 0) == 0, status


def test_more_steps_while_running_resume_from_the_checkpoint_saved_on_stop(
    cluster: Cluster,
) -> None:
    # Attempt 2 (the restart for the change) fails at step 12: attempt 3 resumes too.
    script = {"hold_at_step": 8, "fail": {"2": int(ExitCode.TRANSIENT)}, "fail_at_step": 12}
    cluster.create_job("longer", script=script)
    cluster.wait_status("longer", lambda s: _step(s) >= 8, "step 8")
    cluster.patch_job("longer", {"spec": {"training": {"maxSteps": 30}}})

    # The trainer saved checkpoint 8 as it stopped; status names it before attempt 2 runs.
    restarted = cluster.wait_status(
        "longer", lambda s: s.get("attempts") == 2, "attempt 2 for the new spec"
    )
    assert restarted["lastCheckpoint"].endswith("/attempt-1/checkpoint-8"), restarted
    assert restarted["runGeneration"] == 2
    _no_failures(restarted)
    cluster.release("longer")
    done = cluster.wait_phase("longer", "Succeeded")

    run = cluster.runs_log("longer")[0][1]
    assert cluster.runs_log("longer") == [(1, run, 0), (2, run, 8), (3, run, 10)]
    assert _step(done) == 30
    assert done["progress"]["totalSteps"] == 30
    assert (done["runGeneration"], done["completedGeneration"], done["runId"]) == (2, 2, run)
    assert done["failedAttempts"] == 1  # attempt 2's failure; the restart is not one
    assert done.get("disruptions", 0) == 0
    assert "SpecChanged" in _reasons(cluster, "longer")


def test_another_learning_rate_while_running_starts_a_new_run_from_step_0(
    cluster: Cluster,
) -> None:
    # The new run (attempt 2) fails at step 7, after its checkpoint 5: attempt 3 must
    # resume from that, not from the old run's checkpoint 8.
    script = {"hold_at_step": 8, "fail": {"2": int(ExitCode.TRANSIENT)}, "fail_at_step": 7}
    cluster.create_job("relearn", script=script)
    first = cluster.wait_status("relearn", lambda s: _step(s) >= 8, "step 8")
    cluster.patch_job("relearn", {"spec": {"training": {"learningRate": 1e-3}}})
    cluster.wait_status("relearn", lambda s: s.get("attempts") == 3, "attempt 3")
    cluster.release("relearn")
    done = cluster.wait_phase("relearn", "Succeeded")

    (_, old_run, _), (_, new_run, _), _ = cluster.runs_log("relearn")
    assert old_run == first["runId"] != new_run == done["runId"]
    assert cluster.runs_log("relearn") == [(1, old_run, 0), (2, new_run, 0), (3, new_run, 5)]
    assert _step(done) == 20
    assert f"/run-{new_run}/" in done["lastCheckpoint"]
    assert (done["runGeneration"], done["completedGeneration"]) == (2, 2)
    assert done["failedAttempts"] == 1
    (created,) = [
        e["message"]
        for e in cluster.events("relearn")
        if e["reason"] == "PodCreated" and "relearn-2" in e["message"]
    ]
    assert "a new training run" in created, created


def test_a_finished_job_runs_again_when_its_spec_changes(cluster: Cluster) -> None:
    cluster.create_job("again", training={"maxSteps": 10, "checkpointEverySteps": 5})
    first = cluster.wait_phase("again", "Succeeded")
    assert first["completedGeneration"] == 1

    # More steps: the same run, resumed from where it finished.
    cluster.patch_job("again", {"spec": {"training": {"maxSteps": 15}}})
    longer = cluster.wait_status(
        "again",
        lambda s: s.get("phase") == "Succeeded" and s.get("completedGeneration") == 2,
        "generation 2 completed",
    )
    assert _step(longer) == 15
    # Another learning rate: a new run, from step 0.
    cluster.patch_job("again", {"spec": {"training": {"learningRate": 1e-3}}})
    relearned = cluster.wait_status(
        "again",
        lambda s: s.get("phase") == "Succeeded" and s.get("completedGeneration") == 3,
        "generation 3 completed",
    )
    run, new_run = cluster.runs_log("again")[0][1], relearned["runId"]
    assert cluster.runs_log("again") == [(1, run, 0), (2, run, 10), (3, new_run, 0)]
    assert new_run != run
    assert relearned["attempts"] == 3
    _no_failures(relearned)
    # A change of a control field alone changes nothing: no attempt, still complete.
    cluster.patch_job("again", {"spec": {"ttlSecondsAfterFinished": 3600}})
    settled = cluster.wait_status(
        "again", lambda s: s.get("completedGeneration") == 4, "generation 4 recorded"
    )
    assert (settled["phase"], settled["attempts"]) == ("Succeeded", 3)
