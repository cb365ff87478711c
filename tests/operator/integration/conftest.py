"""A real control plane running the `kopf run` operator with a fake trainer.

One cluster per module (starting it takes 5-15 s); every test uses its own job
names, so tests do not see each other's objects. `operator_cluster` starts
variants (namespaced RBAC, a tight API server) for the modules that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.controlplane import ControlPlane, free_port
from devcluster.kubelet import NodeConfig

HERE = Path(__file__).parent
REPO = HERE.parents[2]
GROUP = "finetune.loraops.dev"
# A namespace whose concurrency limit is 1 (see LORAJOB_POLICY below).
LIMITED_NAMESPACE = "limited"
# Images matching this fail to pull in the test kubelet.
PULL_ERROR_IMAGE = "registry.example.com/missing"

BASE_SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny-llama"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "training": {"maxSteps": 20, "checkpointEverySteps": 5},
    "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi"},
}


class Cluster:
    """The control plane plus helpers that speak LoRAJob."""

    def __init__(self, cp: ControlPlane, fake_dir: Path, metrics_port: int) -> None:
        self.cp = cp
        self.fake_dir = fake_dir
        self.metrics_port = metrics_port

    # -- objects
    def apply(self, obj: dict[str, Any]) -> None:
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def create_job(
        self,
        name: str,
        namespace: str = "default",
        script: dict[str, Any] | None = None,
        **spec: Any,
    ) -> None:
        """Create a LoRAJob; `script` tells the fake trainer what to do (see fake_trainer.py)."""
        if script is not None:
            (self.fake_dir / f"{namespace}__{name}.json").write_text(json.dumps(script))
        body = {**BASE_SPEC, "output": {"uri": f"s3://adapters/{namespace}/{name}"}, **spec}
        self.apply(
            {
                "apiVersion": f"{GROUP}/v1alpha1",
                "kind": "LoRAJob",
                "metadata": {"name": name, "namespace": namespace},
                "spec": body,
            }
        )

    def patch_job(self, name: str, patch: dict[str, Any], namespace: str = "default") -> None:
        self.cp.kubectl(
            "patch",
            "-n",
            namespace,
            f"lorajobs.{GROUP}",
            name,
            "--type=merge",
            "-p",
            json.dumps(patch),
        )

    def job(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.cp.get("lorajobs", name, namespace)

    def status(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return dict((self.job(name, namespace) or {}).get("status") or {})

    def pods(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        out = self.cp.kubectl(
            "get", "pods", "-n", namespace, "-l", f"{GROUP}/job={name}", "-o", "json"
        ).stdout
        return list(json.loads(out)["items"])

    def events(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        out = self.cp.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
        return [
            e
            for e in json.loads(out)["items"]
            if e["involvedObject"].get("kind") == "LoRAJob" and e["involvedObject"]["name"] == name
        ]

    def release(self, name: str, namespace: str = "default") -> None:
        """Let a fake trainer held at `hold_at_step` go on."""
        (self.fake_dir / f"{namespace}__{name}.release").write_text("go")

    def attempts_log(self, name: str, namespace: str = "default") -> list[str]:
        path = self.fake_dir / f"{namespace}__{name}.attempts"
        return path.read_text().split("\n")[:-1] if path.exists() else []

    def runs_log(self, name: str, namespace: str = "default") -> list[tuple[int, str, int]]:
        """(attempt, training run, step it resumed from) of each attempt, in order."""
        path = self.fake_dir / f"{namespace}__{name}.runs"
        lines = path.read_text().split("\n")[:-1] if path.exists() else []
        fields = [dict(part.split("=") for part in line.split()) for line in lines]
        return [(int(f["attempt"]), f["run"], int(f["resumed_from"])) for f in fields]

    # -- waiting
    def wait_phase(
        self, name: str, phase: str, namespace: str = "default", timeout: float = 30
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status(name, namespace)
            if status.get("phase") in ("Failed", "Succeeded") and status["phase"] != phase:
                raise AssertionError(f"{name} ended {status['phase']}: {status}")
            return status if status.get("phase") == phase else None

        return self.cp.wait_for(check, timeout=timeout, message=f"{namespace}/{name} to be {phase}")

    def wait_status(
        self, name: str, predicate: Any, what: str, namespace: str = "default", timeout: float = 30
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status(name, namespace)
            return status if predicate(status) else None

        return self.cp.wait_for(check, timeout=timeout, message=f"{namespace}/{name}: {what}")

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())


@contextlib.contextmanager
def operator_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    *,
    extra_env: dict[str, str] | None = None,
    **controlplane: Any,
) -> Iterator[Cluster]:
    """A ControlPlane with the operator (fake trainer, fast timings) and two GPU nodes."""
    fake_dir = tmp_path_factory.mktemp("fake-trainer")
    metrics_port = free_port()
    operator_env = {
        "LORAJOB_TRAINER_COMMAND": json.dumps(["python", str(HERE / "fake_trainer.py")]),
        "LORAJOB_PROGRESS_PORT": str(free_port()),
        "LORAJOB_METRICS_PORT": str(metrics_port),
        "LORAJOB_PROGRESS_INTERVAL_SECONDS": "0.3",
        "LORAJOB_STATUS_MIN_INTERVAL_SECONDS": "0.3",
        "LORAJOB_RETRY_BACKOFF_SECONDS": "0.5",
        "LORAJOB_WAIT_BACKOFF_SECONDS": "1",
        "LORAJOB_WAIT_BACKOFF_MAX_SECONDS": "2",
        "LORAJOB_TERMINATION_GRACE_SECONDS": "10",
        "LORAJOB_POLICY": json.dumps({"maxConcurrentJobsPerNamespace": {LIMITED_NAMESPACE: 1}}),
        **(extra_env or {}),
    }
    kubelet_env = {
        "FAKE_TRAINER_DIR": str(fake_dir),
        "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("trainer_image", "operator")),
    }
    with ControlPlane(
        tmp_path_factory.mktemp("cluster"),
        operator=True,
        operator_env=operator_env,
        kubelet_env=kubelet_env,
        image_pull_error_pattern=PULL_ERROR_IMAGE,
        # Two GPU nodes, so a job can move when the node-loss test kills one.
        nodes=(NodeConfig(), NodeConfig(name="gpu-node-2")),
        **controlplane,
    ) as cp:
        yield Cluster(cp, fake_dir, metrics_port)
        if "-v" in sys.argv:
            print(cp.operator_log_tail(200))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with operator_cluster(tmp_path_factory) as cluster:
        yield cluster
