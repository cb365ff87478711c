"""End-to-end fixtures: a whole local cluster per test, real kubectl, real trainer.

Every test here gets its own ControlPlane (S3 + API server + kubelet + `kopf run`
operator); the trainer pods run `python -m lora_trainer` on the CPU, fine-tuning the
tiny Llama from devcluster/tiny_model.py with QLoRA.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster.controlplane import ControlPlane
from devcluster.kubelet import NodeConfig, cpu_node
from devcluster.tiny_model import build_tiny_model, write_dataset

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "lorajob-tiny.yaml"
BUCKET = "lorajob-demo"  # the bucket examples/lorajob-tiny.yaml points at
SECRET = "demo-s3-credentials"  # the Secret it names
JOB_TIMEOUT_S = 240.0
# Fast retries and re-checks: the defaults (10s, 15s) are for real clusters.
FAST_OPERATOR_ENV = {
    "LORAJOB_POLICY": '{"allowPrivateEndpoints": true}',
    "LORAJOB_PROGRESS_INTERVAL_SECONDS": "1",
    "LORAJOB_STATUS_MIN_INTERVAL_SECONDS": "0.5",
    "LORAJOB_RETRY_BACKOFF_SECONDS": "1",
    "LORAJOB_WAIT_BACKOFF_SECONDS": "1",
    "LORAJOB_WAIT_BACKOFF_MAX_SECONDS": "2",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)


@dataclass(frozen=True)
class Inputs:
    model_dir: Path
    dataset: Path


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("e2e-inputs")
    return Inputs(
        model_dir=build_tiny_model(root / "tiny-llama"),
        dataset=write_dataset(root / "alpaca.jsonl", "alpaca", n=96),
    )


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Cluster:
    """A running ControlPlane plus the LoRAJob-specific helpers the tests share."""

    def __init__(self, cp: ControlPlane, inputs: Inputs) -> None:
        self.cp = cp
        self.inputs = inputs
        self.s3 = cp.s3

    # --- setup --------------------------------------------------------------
    def upload_inputs(self) -> None:
        spec = self.manifest("x")["spec"]
        model_key = spec["model"]["uri"].removeprefix(f"s3://{BUCKET}/")
        data_key = spec["dataset"]["uri"].removeprefix(f"s3://{BUCKET}/")
        self.s3.upload_dir(self.inputs.model_dir, BUCKET, model_key)
        self.s3.client().upload_file(str(self.inputs.dataset), BUCKET, data_key)

    def create_secret(
        self, name: str = SECRET, access_key: str | None = None, secret_key: str | None = None
    ) -> None:
        self.kubectl(
            "create",
            "secret",
            "generic",
            name,
            f"--from-literal=AWS_ACCESS_KEY_ID={access_key or self.s3.access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={secret_key or self.s3.secret_key}",
        )

    def manifest(self, name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """examples/lorajob-tiny.yaml, renamed, pointed at this S3 server, with overrides.

        Each job writes to its own output prefix so jobs in one test never share one.
        """
        text = EXAMPLE.read_text().replace("${S3_ENDPOINT}", self.s3.endpoint)
        manifest: dict[str, Any] = yaml.safe_load(text)
        manifest["metadata"]["name"] = name
        manifest["spec"]["output"]["uri"] = f"s3://{BUCKET}/adapters/{name}"
        return deep_merge(manifest, overrides or {})

    # --- actions ------------------------------------------------------------
    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> Any:
        return self.cp.kubectl(*args, input=stdin, check=check)

    def apply(self, manifest: Mapping[str, Any], check: bool = True) -> Any:
        return self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(dict(manifest)), check=check)

    # --- reading ------------------------------------------------------------
    def job(self, name: str) -> dict[str, Any]:
        job = self.cp.get("lorajobs", name)
        assert job is not None, f"lorajob/{name} does not exist"
        return job

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.job(name).get("status") or {})

    def pods(self, name: str) -> list[dict[str, Any]]:
        out = self.kubectl("get", "pods", "-l", f"finetune.loraops.dev/job={name}", "-o", "json")
        items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
        return items

    def trainer_progress(self, pod_name: str) -> dict[str, Any]:
        """The trainer's own /progress (fresher than status, which is read every second)."""
        pod = self.cp.get("pods", pod_name) or {}
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            return {}
        with urllib.request.urlopen(f"http://{ip}:8080/progress", timeout=1) as response:
            progress: dict[str, Any] = json.loads(response.read())
        return progress

    def wait_status(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = JOB_TIMEOUT_S,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status(name)
            if predicate(status):
                return status
            if status.get("phase") == "Failed" and "Failed" not in what:
                # A failed job never recovers: report it now, not after the timeout.
                raise AssertionError(
                    f"{name} failed instead of reaching {what}\n{self.diagnostics(name)}"
                )
            time.sleep(0.25)
        raise AssertionError(
            f"{name}: timed out after {timeout:.0f}s waiting for {what}\n{self.diagnostics(name)}"
        )

    def wait_phase(self, name: str, phase: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        return self.wait_status(
            name, lambda s: s.get("phase") == phase, f"phase {phase}", timeout=timeout
        )

    def diagnostics(self, name: str) -> str:
        parts = [f"--- status ---\n{json.dumps(self.status(name), indent=1)[:3000]}"]
        for pod in self.pods(name)[-2:]:
            pod_name = pod["metadata"]["name"]
            log = self.kubectl("logs", pod_name, check=False).stdout
            parts.append(f"--- log of {pod_name} (tail) ---\n{log[-3000:]}")
        parts.append(f"--- operator log (tail) ---\n{self.cp.operator_log_tail(40)}")
        return "\n".join(parts)

    def s3_objects(self, prefix: str) -> dict[str, bytes]:
        client = self.s3.client()
        out: dict[str, bytes] = {}
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
        return out

    def download(self, prefix: str, into: Path) -> Path:
        for key, body in self.s3_objects(prefix.rstrip("/") + "/").items():
            path = into / key.removeprefix(prefix.rstrip("/") + "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        return into

    # --- the secret scan (issue #5) ------------------------------------------
    def everything_written(self) -> dict[str, str]:
        """Every text the operator, the kubelet's pods and the trainer produced.

        Operator log, every pod's log, every LoRAJob (spec + status + annotations),
        every Event, every Pod object and every object the trainer stored in S3.
        """
        texts = {"operator.log": self.cp.operator_log.read_text(errors="replace")}
        pods_root = self.cp.workdir / "kubelet" / "pods"
        for log in sorted(pods_root.glob("*/*.log")):
            texts[f"pod log {log.parent.name}/{log.name}"] = log.read_text(errors="replace")
        for kind in ("lorajobs", "events", "pods"):
            listing = self.kubectl("get", kind, "-A", "-o", "json").stdout
            texts[f"kubectl get {kind}"] = listing
        if self.cp.kubelet is not None:
            for pod in json.loads(texts["kubectl get pods"])["items"]:
                meta = pod["metadata"]
                termination = [
                    (cs.get("state") or {}).get("terminated", {}).get("message", "")
                    for cs in (pod.get("status") or {}).get("containerStatuses") or []
                ]
                texts[f"termination {meta['name']}"] = "\n".join(termination)
        for key, body in self.s3_objects("adapters/").items():
            texts[f"s3://{BUCKET}/{key}"] = body.decode("latin-1")
        return texts

    def assert_no_secret_leaks(self, secrets: list[str]) -> None:
        texts = self.everything_written()
        # The scan only proves something if it saw real output from every source.
        assert "lorajob" in texts["operator.log"], "no operator log to scan"
        assert any(k.startswith("pod log") and v for k, v in texts.items()), "no trainer log"
        assert '"LoRAJob"' in texts["kubectl get lorajobs"]
        assert '"secretKeyRef"' in texts["kubectl get pods"], "pods must reference the Secret"
        assert '"Event"' in texts["kubectl get events"]
        leaks = [
            f"{where} contains secret #{i}"
            for where, text in texts.items()
            for i, secret in enumerate(secrets)
            if secret in text
        ]
        assert not leaks, "\n".join(leaks)


@pytest.fixture
def cluster_factory(
    tiny_inputs: Inputs,
) -> Iterator[Callable[..., Cluster]]:
    """Start a cluster with extra operator settings; stopped at the end of the test.
    `dns=True` adds the cluster DNS (CoreDNS): pods resolve `<svc>.<ns>.svc`."""
    planes: list[ControlPlane] = []

    def start(
        operator_env: Mapping[str, str] | None = None,
        nodes: list[NodeConfig] | None = None,
        dns: bool = False,
    ) -> Cluster:
        cp = ControlPlane(
            nodes=nodes or [cpu_node()],
            s3_buckets=[BUCKET],
            operator=True,
            operator_env={**FAST_OPERATOR_ENV, **(operator_env or {})},
            dns=dns,
        )
        planes.append(cp)
        cp.start()
        cluster = Cluster(cp, tiny_inputs)
        cluster.upload_inputs()
        return cluster

    yield start
    for cp in reversed(planes):
        cp.stop()


@pytest.fixture
def cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    return cluster_factory()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
