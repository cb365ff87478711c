"""`kubectl lj logs -f` follows a job across attempts: an eviction ends attempt 1's pod,
the plugin goes on with attempt 2's and stops when the job has finished.

Through the real kubectl (plugin discovery on PATH) against the operator on a control
plane with the fake trainer; tests/e2e/test_kubectl_plugin.py covers the other commands
with a real training job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from devcluster.tools import kubectl
from tests.operator.integration.conftest import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
# Waits tolerate a loaded 2-core machine (they return as soon as the state is there).
WAIT = 120


def test_logs_follow_the_next_attempt_after_an_eviction(cluster: Cluster) -> None:
    plugin = Path(sys.executable).parent / "kubectl-lj"
    assert plugin.is_file(), f"{plugin} is missing: the package's console scripts (make venv)"
    env = {
        **os.environ,
        **cluster.cp.env(),
        "PATH": f"{plugin.parent}{os.pathsep}{os.environ['PATH']}",
    }
    cluster.create_job("lj-follow", script={"hold_at_step": 8})
    cluster.wait_status(
        "lj-follow", lambda s: (s.get("progress") or {}).get("step", 0) >= 8, "step 8", timeout=WAIT
    )
    logs = subprocess.Popen(
        [str(kubectl()), "lj", "logs", "lj-follow", "-f"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(logs.stdout.readline, "")) if logs.stdout else None,
        daemon=True,
    )
    reader.start()
    try:
        # Evict only once the plugin follows attempt 1's pod.
        cluster.cp.wait_for(
            lambda: any(line.startswith("fake trainer: attempt 1") for line in list(lines)),
            timeout=WAIT,
            message="kubectl lj logs -f to show attempt 1",
        )
        assert cluster.cp.kubelet is not None
        cluster.cp.kubelet.evict("default", "lj-follow-1")
        cluster.wait_status(
            "lj-follow",
            lambda s: s.get("attempts") == 2 and (s.get("progress") or {}).get("step", 0) >= 8,
            "attempt 2 at step 8",
            timeout=WAIT,
        )
        cluster.release("lj-follow")
        cluster.wait_phase("lj-follow", "Succeeded", timeout=WAIT)
        logs.wait(timeout=WAIT)
        reader.join(timeout=WAIT)
    finally:
        logs.kill()
    print("".join(lines))  # shown with -s
    assert logs.returncode == 0, logs.stderr.read() if logs.stderr else ""
    assert [line.rstrip("\n") for line in lines] == [
        "==> attempt 1: pod lj-follow-1 <==",
        "fake trainer: attempt 1 starts at step 0",
        "==> attempt 2: pod lj-follow-2 <==",
        "fake trainer: attempt 2 starts at step 8",  # the checkpoint saved on SIGTERM
        "==> lorajob default/lj-follow: Succeeded <==",
    ]
    # Once the job has finished, -f prints the last attempt's log and stops.
    done = subprocess.run(
        [str(kubectl()), "lj", "logs", "lj-follow", "-f"],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "==> attempt 2: pod lj-follow-2 <==",
        "fake trainer: attempt 2 starts at step 8",
        "==> lorajob default/lj-follow: Succeeded <==",
    ]
    # An evicted attempt's pod is deleted (the Eviction API deletes it): said plainly.
    earlier = subprocess.run(
        [str(kubectl()), "lj", "logs", "lj-follow", "--attempt", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert earlier.returncode == 1
    assert earlier.stderr == (
        "error: the pod of attempt 1 of lorajob default/lj-follow is gone (evicted, preempted "
        "or deleted); the current attempt is 2\n"
    )
