"""`python -m lorajob_operator` runs the same operator from its settings alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from devcluster.controlplane import ControlPlane, free_port
from tests.operator.integration.conftest import BASE_SPEC, GROUP, HERE, REPO

# Each module starts a whole control plane (API server, kubelet, operator).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_python_m_lorajob_operator(tmp_path_factory: pytest.TempPathFactory) -> None:
    fake_dir = tmp_path_factory.mktemp("fake-trainer")
    kubelet_env = {
        "FAKE_TRAINER_DIR": str(fake_dir),
        "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("trainer_image", "operator")),
    }
    with ControlPlane(tmp_path_factory.mktemp("cluster"), kubelet_env=kubelet_env) as cp:
        health, metrics = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(cp.kubeconfig),
            "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("operator", "trainer_image")),
            "LORAJOB_TRAINER_COMMAND": json.dumps(["python", str(HERE / "fake_trainer.py")]),
            "LORAJOB_PROGRESS_PORT": str(free_port()),
            "LORAJOB_HEALTH_PORT": str(health),
            "LORAJOB_METRICS_PORT": str(metrics),
            "LORAJOB_NAMESPACES": "default",
        }
        log = (cp.workdir / "entrypoint.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorajob_operator"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:

            def live() -> bool:
                assert proc.poll() is None, (cp.workdir / "entrypoint.log").read_text()
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=1) as r:
                    return bool(r.status == 200)

            cp.wait_for(live, timeout=60, message="liveness endpoint")
            job = {
                "apiVersion": f"{GROUP}/v1alpha1",
                "kind": "LoRAJob",
                "metadata": {"name": "entry", "namespace": "default"},
                "spec": {**BASE_SPEC, "output": {"uri": "s3://adapters/entry"}},
            }
            cp.kubectl("apply", "-f", "-", input=json.dumps(job))
            cp.wait_for(
                lambda: (
                    ((cp.get("lorajobs", "entry") or {}).get("status") or {}).get("phase")
                    == "Succeeded"
                ),
                timeout=30,
                message="job succeeded",
            )

            # The gauge is set after the status patch lands, so a scrape right after the
            # phase turns Succeeded may still see Running: wait for it, don't race it.
            def scraped_succeeded() -> bool:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                    return b'lorajob_jobs{phase="Succeeded"} 1.0' in r.read()

            cp.wait_for(scraped_succeeded, timeout=10, message="Succeeded in lorajob_jobs")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def test_bad_settings_exit_with_a_clear_message() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("operator", "trainer_image")),
        "LORAJOB_PROGRESS_PORT": "not-a-port",
    }
    result = subprocess.run(
        [sys.executable, "-m", "lorajob_operator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "LORAJOB_PROGRESS_PORT" in result.stderr
