"""The control plane: CRDs from crds/, kubelet, operator start/stop, cleanup, throughput."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.apiserver import ApiServer, measure_write_throughput
from tests.harness.controlplane import ControlPlane, WaitTimeoutError, wait_for
from tests.harness.kubelet import cpu_node
from tests.harness.tools import helm, kubectl

REPO = Path(__file__).resolve().parents[2]


def test_tools_are_extracted_and_runnable() -> None:
    out = subprocess.run(
        [str(kubectl()), "version", "--client"], capture_output=True, text=True, check=True
    ).stdout
    assert "v1.35" in out
    out = subprocess.run(
        [str(helm()), "version", "--short"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("v4.")


def test_control_plane_applies_repo_crds_and_runs_pods(tmp_path: Path) -> None:
    with ControlPlane(tmp_path / "cp", nodes=[cpu_node()]) as plane:
        resources = plane.kubectl(
            "api-resources", "--api-group=finetune.loraops.dev", "-o", "name"
        ).stdout.split()
        assert resources == ["lorajobs.finetune.loraops.dev"]
        plane.kubectl(
            "run",
            "once",
            "--image=python:3.11",
            "--restart=Never",
            "--command",
            "--",
            "python",
            "-c",
            "print(1)",
        )
        plane.wait_for(
            lambda: (plane.get("pods", "once") or {}).get("status", {}).get("phase") == "Succeeded",
            message="pod ran",
        )
        assert plane.env() == {"KUBECONFIG": str(plane.kubeconfig)}
        assert plane.kubelet is not None
        pids = plane.kubelet.process_ids()
    assert not pids


def test_operator_start_failure_is_reported_with_its_log(tmp_path: Path) -> None:
    plane = ControlPlane(
        tmp_path / "cp", kubelet=False, operator=True, operator_module="no_such_operator_module_xyz"
    )
    with pytest.raises(RuntimeError, match="no_such_operator_module_xyz"):
        plane.start()
    assert not plane.operator_running


def test_wait_for_reports_the_last_error() -> None:
    def broken() -> bool:
        raise ValueError("still broken")

    with pytest.raises(WaitTimeoutError, match="still broken"):
        wait_for(broken, timeout=0.2, message="never")


def test_cli_prints_kubeconfig_and_stops_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.harness.controlplane", "--workdir", str(tmp_path / "cli")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("export KUBECONFIG=")
        kubeconfig = first.split("=", 1)[1].strip()
        out = subprocess.run(
            [str(kubectl()), "--kubeconfig", kubeconfig, "get", "nodes", "-o", "name"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == "node/gpu-node-1"
    finally:
        process.send_signal(signal.SIGTERM)  # unwinds like Ctrl-C
        process.wait(timeout=30)
    assert process.returncode == 0


def test_write_throughput_is_measurable(api: ApiServer) -> None:
    rate = measure_write_throughput(api, count=200, concurrency=8)
    assert rate > 50, f"{rate:.0f} writes/s"
    assert measure_write_throughput(api, count=50, concurrency=4, in_process=True) > 20
    store = api.store
    assert store is not None
    leftovers = api.call(
        lambda: list(store.iter_entries(store.resource("", "v1", "configmaps"), "default"))
    )
    assert leftovers == [], "the measurement cleans up after itself"
