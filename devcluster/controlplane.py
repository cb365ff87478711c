"""A whole local cluster for tests, the demo and the benchmarks: the real control
plane (`devcluster.cluster`), the process kubelet, optionally the S3 server, real
Kueue, and the operator running as the Helm chart's ServiceAccount.

    with ControlPlane(operator=True, s3_buckets=["models"]) as cp:
        cp.kubectl("apply", "-f", "examples/lorajob-tiny.yaml")
        cp.wait_for(lambda: cp.get("lorajobs", "tiny-demo")["status"]["phase"] == "Succeeded")
        cp.stop_operator(); cp.start_operator()   # restart mid-job

The operator's identity comes from the chart: its ServiceAccount, ClusterRole and
(with `watch_namespaces`) per-namespace Roles are rendered by `helm template` and
applied, and the operator runs with a token of that ServiceAccount. A permission the
operator needs but the chart lacks fails the test that needs it.

Manual use: `python -m devcluster.controlplane --operator --s3` prints the
KUBECONFIG to export and runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

from devcluster import chart
from devcluster.cluster import ApiStatusError, Cluster, Timings, http_ok
from devcluster.kubelet import Kubelet, NodeConfig, SimulatedRuntime
from devcluster.process import Process, WaitTimeoutError, free_port, log_tail, wait_for
from devcluster.tools import REPO_ROOT, kubectl

__all__ = ["ControlPlane", "WaitTimeoutError", "free_port", "wait_for"]

T = TypeVar("T")
DEFAULT_CRDS = (REPO_ROOT / "crds",)
OPERATOR_MODULE = "lorajob_operator.kopf_app"


def yaml_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in paths:
        files = (
            sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")) if path.is_dir() else [path]
        )
        for file in files:
            docs.extend(d for d in yaml.safe_load_all(file.read_text()) if isinstance(d, dict))
    return docs


# The chart's kinds that give the operator its identity and permissions.
_RBAC_KINDS = frozenset(
    {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
)


class ControlPlane:
    """See the module docstring.

    Args:
        workdir: where kubeconfigs, logs and pod directories go (temp dir if None).
        crds: CRD YAML files or directories created before the controllers start.
        nodes: the kubelet's nodes (default: one 8-GPU node).
        kubelet: start the process kubelet.
        s3_buckets: start the S3 server (devcluster/s3.py) with these buckets.
        operator: start the operator at start.
        operator_module: the kopf module the operator runs.
        operator_env: extra env for the operator (LORAJOB_* settings).
        watch_namespaces: run the operator namespaced (the chart's watchNamespaces:
            Roles per namespace instead of a ClusterRole); None: cluster-wide.
        operator_rbac: "chart" (the chart's ServiceAccount, default) or "admin".
        kubelet_env: env added to every container the kubelet starts.
        image_pull_error_pattern: images matching this regex fail to pull.
        simulated_runtime: run no container processes (operator benchmarks).
        kueue: start the real Kueue manager (devcluster/kueue.py).
        dns: start the cluster DNS (CoreDNS, devcluster/clusterdns.py) and give
            pods a resolv.conf naming it, so `<service>.<namespace>.svc` resolves
            in a pod as in a cluster; pods then get routable IPs (198.18.B.x on lo)
            that EndpointSlices accept. Needs root. Without it pods use the host's
            resolver.
        timings: node-lifecycle intervals (devcluster.cluster.Timings).
        apiserver_args: extra kube-apiserver flags.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        crds: Sequence[Path] = DEFAULT_CRDS,
        nodes: Iterable[NodeConfig] = (NodeConfig(),),
        kubelet: bool = True,
        s3_buckets: Sequence[str] | None = None,
        operator: bool = False,
        operator_module: str = OPERATOR_MODULE,
        operator_env: Mapping[str, str] | None = None,
        watch_namespaces: Sequence[str] | None = None,
        operator_rbac: str = "chart",
        kubelet_env: Mapping[str, str] | None = None,
        image_pull_error_pattern: str | None = None,
        simulated_runtime: SimulatedRuntime | None = None,
        kueue: bool = False,
        dns: bool = False,
        timings: Timings | None = None,
        apiserver_args: Sequence[str] = (),
    ) -> None:
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="controlplane-")
            workdir = Path(self._tempdir.name)
        self.workdir = workdir
        self.crds = list(crds)
        self.nodes = list(nodes)
        self.with_kubelet = kubelet
        self.s3_buckets = s3_buckets
        self.with_operator = operator
        self.operator_module = operator_module
        self.operator_env = dict(operator_env or {})
        self.watch_namespaces = list(watch_namespaces) if watch_namespaces is not None else None
        if operator_rbac not in ("chart", "admin"):
            raise ValueError(f"operator_rbac must be 'chart' or 'admin', not {operator_rbac!r}")
        self.operator_rbac = operator_rbac
        self.kubelet_env = dict(kubelet_env or {})
        self.image_pull_error_pattern = image_pull_error_pattern
        self.simulated_runtime = simulated_runtime
        self.with_kueue = kueue
        self.with_dns = dns
        self.cluster = Cluster(
            workdir / "cluster",
            crds=yaml_documents(p for p in self.crds if p.exists()),
            timings=timings,
            apiserver_args=apiserver_args,
        )
        self.kubelet: Kubelet | None = None
        self.s3: Any = None
        self.kueue: Any = None
        self.dns: Any = None
        self._stack = contextlib.ExitStack()
        self._operator: Process | None = None
        self.operator_log = workdir / "operator.log"
        self.operator_kubeconfig: Path | None = None
        # The operator's ports, chosen when it starts (operator_env may fix them).
        self.liveness_port = 0
        self.metrics_port = 0

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (what a person at the keyboard uses)."""
        return self.cluster.kubeconfig

    # ------------------------------------------------------------- lifecycle
    def start(self) -> ControlPlane:
        try:
            self._stack.enter_context(self.cluster)
            if self.with_kueue:
                from devcluster.kueue import start_kueue  # noqa: PLC0415 - optional component

                self.kueue = self._stack.enter_context(
                    start_kueue(self.cluster, self.workdir / "kueue")
                )
            if self.with_dns:
                from devcluster.clusterdns import start_cluster_dns  # noqa: PLC0415 - optional

                self.dns = self._stack.enter_context(
                    start_cluster_dns(self.cluster, self.workdir / "dns")
                )
            if self.s3_buckets is not None:
                from devcluster.s3 import s3_server  # noqa: PLC0415 - optional component

                self.s3 = self._stack.enter_context(s3_server(buckets=list(self.s3_buckets)))
            if self.with_kubelet:
                self.kubelet = Kubelet(
                    self.kubeconfig,
                    self.workdir / "kubelet",
                    nodes=self.nodes,
                    image_pull_error_pattern=self.image_pull_error_pattern,
                    base_env=dict(self.kubelet_env),
                    simulated_runtime=self.simulated_runtime,
                    cluster_dns=self.dns.ip if self.dns is not None else None,
                    # A Service's EndpointSlice rejects 127.x pod IPs, and DNS for
                    # Services is what the cluster DNS is for.
                    routable_pod_ips=self.dns is not None,
                )
                self._stack.enter_context(self.kubelet)
                self.wait_nodes_ready([n.name for n in self.nodes])
            self._stack.callback(self.stop_operator)
            if self.with_operator:
                self.start_operator()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._stack.close()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_nodes_ready(self, names: Sequence[str], timeout: float = 60) -> None:
        """Until the nodes are Ready and carry no NoSchedule taint of the node
        lifecycle controller (new nodes start with `node.kubernetes.io/not-ready`)."""

        def ready() -> bool:
            for name in names:
                node = self.cluster.get_path(f"/api/v1/nodes/{name}") or {}
                conditions = (node.get("status") or {}).get("conditions") or []
                if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return False
                taints = (node.get("spec") or {}).get("taints") or []
                if any(t["key"].startswith("node.kubernetes.io/") for t in taints):
                    return False
            return True

        self.wait_for(ready, timeout=timeout, message=f"nodes {', '.join(names)} Ready")

    # ------------------------------------------------------------------ CRDs
    def apply_crds(self, paths: Iterable[Path]) -> list[str]:
        """Create or update every CustomResourceDefinition in the files; returns names."""
        crds = [d for d in yaml_documents(paths) if d.get("kind") == "CustomResourceDefinition"]
        self.cluster.apply(crds)
        for crd in crds:
            self.cluster.wait_established(crd["metadata"]["name"])
        return [crd["metadata"]["name"] for crd in crds]

    # -------------------------------------------------------------- operator
    def chart_rbac(self) -> list[dict[str, Any]]:
        """The chart's ServiceAccount and RBAC documents for this operator's scope."""
        values = {}
        if self.watch_namespaces:
            values["watchNamespaces"] = "{" + ",".join(self.watch_namespaces) + "}"
        if self.operator_env.get("LORAJOB_WEBHOOK_ENABLED", "").lower() == "true":
            values["webhook.enabled"] = "true"
            # The operator registers its own configuration (LORAJOB_WEBHOOK_MANAGED,
            # true by default), which is the chart's webhook.configuration=kopf.
            if self.operator_env.get("LORAJOB_WEBHOOK_MANAGED", "true").lower() == "true":
                values["webhook.configuration"] = "kopf"
        return [d for d in chart.render(values) if d.get("kind") in _RBAC_KINDS]

    def _operator_identity(self) -> Path:
        """A kubeconfig for the operator: the chart's ServiceAccount, or the admin."""
        if self.operator_rbac == "admin":
            return self.kubeconfig
        if self.operator_kubeconfig is not None:
            return self.operator_kubeconfig
        rbac = self.chart_rbac()
        namespaces = {chart.NAMESPACE, *(self.watch_namespaces or [])}
        self.cluster.apply(
            [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                for ns in sorted(namespaces)
            ]
        )
        self.cluster.apply(rbac)
        account = next(d for d in rbac if d["kind"] == "ServiceAccount")["metadata"]
        self.operator_kubeconfig = self.cluster.service_account_kubeconfig(
            account["namespace"], account["name"], self.workdir / "operator.kubeconfig"
        )
        return self.operator_kubeconfig

    def operator_command(self) -> list[str]:
        scope = (
            [arg for ns in self.watch_namespaces for arg in ("--namespace", ns)]
            if self.watch_namespaces
            else ["--all-namespaces"]
        )
        return [
            sys.executable,
            "-m",
            "kopf",
            "run",
            "--standalone",
            *scope,
            "-m",
            self.operator_module,
            f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
        ]

    def start_operator(self, timeout: float = 90.0) -> None:
        """Start the operator and wait until its liveness endpoint answers."""
        if self.operator_running:
            raise RuntimeError("the operator is already running")
        kubeconfig = self._operator_identity()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), **self.operator_env}
        # Free ports unless the caller chose: the defaults (metrics 8000, health 8081)
        # would collide between two control planes on one host, and the second
        # operator would run without metrics.
        self.metrics_port = int(env.setdefault("LORAJOB_METRICS_PORT", str(free_port())))
        self.liveness_port = int(env.setdefault("LORAJOB_HEALTH_PORT", str(free_port())))
        if self.watch_namespaces:
            env.setdefault("LORAJOB_NAMESPACES", ",".join(self.watch_namespaces))
        pythonpath = [str(REPO_ROOT / "operator"), str(REPO_ROOT / "trainer_image"), str(REPO_ROOT)]
        if env.get("PYTHONPATH"):
            pythonpath.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        process = Process(
            "operator", self.operator_command(), self.operator_log, env=env, cwd=REPO_ROOT
        ).start()
        self._operator = process

        def alive() -> bool:
            process.check_running()
            return http_ok(f"http://127.0.0.1:{self.liveness_port}/healthz")

        try:
            wait_for(
                alive,
                timeout=timeout,
                interval=0.1,
                message=lambda: f"the operator's /healthz\n{self.operator_log_tail()}",
            )
        except BaseException:
            self.stop_operator()
            raise

    def stop_operator(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the operator's process group (SIGKILL after `timeout`); its exit code."""
        process, self._operator = self._operator, None
        return process.stop(timeout) if process is not None else None

    def kill_operator(self) -> None:
        """SIGKILL the operator (a crash)."""
        process, self._operator = self._operator, None
        if process is not None:
            process.kill()

    @property
    def operator_running(self) -> bool:
        return self._operator is not None and self._operator.running

    def operator_log_tail(self, lines: int = 60) -> str:
        return log_tail(self.operator_log, lines)

    # --------------------------------------------------------------- helpers
    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as the admin; raises with stderr when `check` and it fails."""
        return self.cluster.kubectl(*args, check=check, input=input, timeout=timeout)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should use this cluster as the admin."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def get(
        self, plural: str, name: str, namespace: str = "default", group: str = "", version: str = ""
    ) -> dict[str, Any] | None:
        """GET one object (None when absent). `plural` may be qualified
        (`lorajobs.finetune.loraops.dev`) or a plain plural found by discovery."""
        path = self.cluster.resource_path(plural, group=group, version=version)
        base = path.collection(namespace)
        try:
            return self.cluster.request("GET", f"{base}/{name}")
        except ApiStatusError as exc:
            if exc.code == 404:
                return None
            raise

    def list(
        self,
        plural: str,
        namespace: str | None = "default",
        *,
        label_selector: str = "",
        group: str = "",
    ) -> list[dict[str, Any]]:
        """LIST objects (namespace None: all namespaces)."""
        path = self.cluster.resource_path(plural, group=group)
        query = f"?labelSelector={urllib.parse.quote(label_selector)}" if label_selector else ""
        items = self.cluster.request("GET", path.collection(namespace) + query).get("items")
        return list(items or [])

    def wait_for(
        self,
        predicate: Callable[[], T | bool | None],
        timeout: float = 30.0,
        message: str = "condition",
    ) -> T:
        def describe() -> str:
            return (
                f"{message}\n--- operator log tail ---\n{self.operator_log_tail()}"
                if self.with_operator
                else message
            )

        return wait_for(predicate, timeout=timeout, message=describe)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    del signum, frame
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a local cluster until Ctrl-C.")
    parser.add_argument("--operator", action="store_true", help="start the operator")
    parser.add_argument("--s3", action="store_true", help="start the S3 server")
    parser.add_argument("--kueue", action="store_true", help="start Kueue")
    parser.add_argument("--dns", action="store_true", help="start the cluster DNS (root)")
    parser.add_argument(
        "--bucket", action="append", default=[], help="S3 bucket to create (repeatable)"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    plane = ControlPlane(
        args.workdir,
        operator=args.operator,
        kueue=args.kueue,
        dns=args.dns,
        s3_buckets=(args.bucket or ["lorajob"]) if args.s3 else None,
    )
    # SIGTERM (e.g. from `timeout` or a process manager) unwinds like Ctrl-C, so
    # everything started below is stopped and its temp files removed.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    started = time.monotonic()
    with plane:
        print(f"control plane up in {time.monotonic() - started:.1f}s")
        print(f"export KUBECONFIG={plane.kubeconfig}")
        print(f"kubectl: {kubectl()}")
        for name, log in plane.cluster.log_files().items():
            print(f"{name} log: {log}")
        if plane.dns is not None:
            print(f"cluster DNS: {plane.dns.ip} (log: {plane.dns.log})")
        if plane.s3 is not None:
            print(f"S3 endpoint: {plane.s3.endpoint} (access key {plane.s3.access_key})")
        if plane.with_operator:
            print(f"operator log: {plane.operator_log}")
            print(f"operator metrics: http://127.0.0.1:{plane.metrics_port}/metrics")
        print("Ctrl-C to stop.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
