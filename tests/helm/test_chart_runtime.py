"""The operator starts from exactly what the chart's Deployment gives it.

The container's command (the image ENTRYPOINT, `python -m lorajob_operator`) runs with
the env rendered by `helm template`, against the harness API server; its liveness
endpoint must answer on the port the chart's probes use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from devcluster.controlplane import ControlPlane, free_port
from tests.helm.chart import one, render
from tests.packaging.dockerfile import parse_dockerfile

REPO = Path(__file__).resolve().parents[2]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.slow
def test_operator_runs_with_the_charts_env_and_answers_its_probe() -> None:
    health_port, metrics_port = free_port(), free_port()
    manifests = render(
        {
            "healthPort": str(health_port),
            "metrics.port": str(metrics_port),
            "watchNamespaces": "{team-a}",
        }
    )
    container: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    probe_port = next(p for p in container["ports"] if p["name"] == "health")["containerPort"]
    assert probe_port == health_port
    entrypoint = parse_dockerfile(REPO / "operator" / "Dockerfile").entrypoint
    assert entrypoint[0] == "python"
    env = {var["name"]: var["value"] for var in container["env"]}

    with ControlPlane(kubelet=False) as cp:
        proc = subprocess.Popen(
            [sys.executable, *entrypoint[1:]],
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "KUBECONFIG": str(cp.kubeconfig),
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO / "operator"), str(REPO / "trainer_image")]
                ),
                **env,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not _healthy(health_port):
                assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
                assert time.monotonic() < deadline, "the operator never answered /healthz"
                time.sleep(0.2)
            # The metrics port from the chart is where Prometheus finds the operator.
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                assert b"lorajob_jobs" in response.read()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
