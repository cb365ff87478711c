"""One context manager for a whole test cluster: API server, CRDs, kubelet,
optionally the S3 server and the real `kopf run` operator.

    with ControlPlane(operator=True, s3_buckets=["models"]) as cp:
        cp.kubectl("apply", "-f", "examples/lorajob-tiny.yaml")
        cp.wait_for(lambda: cp.get("lorajobs", "tiny-demo")["status"]["phase"] == "Succeeded")
        cp.stop_operator(); cp.start_operator()   # restart mid-job

Manual use: `python -m tests.harness.controlplane --operator --s3` prints the
KUBECONFIG to export and runs until Ctrl-C. Every process it starts runs in its
own process group and is killed on exit (and at interpreter exit as a net).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

from tests.harness.apiserver import ApiServer
from tests.harness.kube_errors import ApiError
from tests.harness.kubelet import Kubelet, NodeConfig, SimulatedRuntime
from tests.harness.tools import REPO_ROOT, kubectl

T = TypeVar("T")
DEFAULT_CRDS = (REPO_ROOT / "crds",)
OPERATOR_MODULE = "lorajob_operator.handlers"
_OPERATOR_GROUPS: set[int] = set()


def _kill_operator_groups() -> None:
    for pgid in list(_OPERATOR_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


atexit.register(_kill_operator_groups)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WaitTimeoutError(AssertionError):
    """A wait_for condition never became true."""


def wait_for(
    predicate: Callable[[], T | bool | None],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll `predicate` until it returns something truthy (returned); exceptions
    count as "not yet". Raises WaitTimeoutError naming `message` and the last error."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result  # type: ignore[return-value]
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            suffix = (
                f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            )
            raise WaitTimeoutError(f"timed out after {timeout:.0f}s waiting for {text}{suffix}")
        time.sleep(interval)


def _yaml_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in paths:
        files = (
            sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")) if path.is_dir() else [path]
        )
        for file in files:
            docs.extend(d for d in yaml.safe_load_all(file.read_text()) if isinstance(d, dict))
    return docs


class ControlPlane:
    """See the module docstring.

    Args:
        workdir: where kubeconfig, logs and pod directories go (temp dir if None).
        crds: CRD YAML files or directories applied at start (default: `crds/`).
        nodes: fake nodes for the kubelet (default: one 8-GPU node).
        kubelet: start the test kubelet.
        s3_buckets: start the S3 server (tests/harness/s3.py) with these buckets;
            None: no S3 server.
        operator: start `kopf run` for `operator_module` at start.
        operator_env: extra env for the operator (LORAJOB_* settings).
        kubelet_env: env added to every container the kubelet starts.
        image_pull_error_pattern: images matching this regex fail to pull.
        simulated_runtime: run no container processes (see kubelet.SimulatedRuntime);
            for benchmarks of the operator itself.
        kueue: emulate Kueue's plain-Pod integration (see kube_kueue.py).
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
        kubelet_env: Mapping[str, str] | None = None,
        image_pull_error_pattern: str | None = None,
        simulated_runtime: SimulatedRuntime | None = None,
        kueue: bool = False,
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
        self.kubelet_env = dict(kubelet_env or {})
        self.image_pull_error_pattern = image_pull_error_pattern
        self.simulated_runtime = simulated_runtime
        self.api = ApiServer(workdir / "apiserver", kueue=kueue)
        self.kubelet: Kubelet | None = None
        self.s3: Any = None
        self._stack = contextlib.ExitStack()
        self._operator: subprocess.Popen[bytes] | None = None
        self.operator_log = workdir / "operator.log"
        self.liveness_port = 0

    @property
    def kubeconfig(self) -> Path:
        return self.api.kubeconfig

    # ------------------------------------------------------------- lifecycle
    def start(self) -> ControlPlane:
        try:
            self._stack.enter_context(self.api)
            self.apply_crds(self.crds)
            if self.s3_buckets is not None:
                from tests.harness.s3 import s3_server  # noqa: PLC0415 - optional component

                self.s3 = self._stack.enter_context(s3_server(buckets=list(self.s3_buckets)))
            if self.with_kubelet:
                env = dict(self.kubelet_env)
                self.kubelet = Kubelet(
                    self.kubeconfig,
                    self.workdir / "kubelet",
                    nodes=self.nodes,
                    image_pull_error_pattern=self.image_pull_error_pattern,
                    base_env=env,
                    simulated_runtime=self.simulated_runtime,
                )
                self._stack.enter_context(self.kubelet)
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

    # ------------------------------------------------------------------ CRDs
    def apply_crds(self, paths: Iterable[Path]) -> list[str]:
        """Create (or replace) every CustomResourceDefinition in the files; returns names."""
        assert self.api.store is not None
        store = self.api.store
        crd_type = store.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        names = []
        for doc in _yaml_documents(p for p in paths if p.exists()):
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            name = doc["metadata"]["name"]

            async def apply(doc: dict[str, Any] = doc, name: str = name) -> None:
                existing = store.find(crd_type, "", name)
                if existing is None:
                    await store.create(crd_type, "", doc)
                else:
                    doc.setdefault("metadata", {})["resourceVersion"] = existing["metadata"][
                        "resourceVersion"
                    ]
                    await store.update(crd_type, "", name, doc)

            self.api.run(apply())
            names.append(name)
        return names

    # -------------------------------------------------------------- operator
    def operator_command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "kopf",
            "run",
            "--standalone",
            "--all-namespaces",
            "-m",
            self.operator_module,
            f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
        ]

    def start_operator(self, timeout: float = 60.0) -> None:
        """Start `kopf run` and wait until its liveness endpoint answers."""
        if self._operator is not None and self._operator.poll() is None:
            raise RuntimeError("the operator is already running")
        self.liveness_port = free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.operator_env}
        pythonpath = [str(REPO_ROOT / "operator"), str(REPO_ROOT / "trainer_image"), str(REPO_ROOT)]
        if env.get("PYTHONPATH"):
            pythonpath.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        with self.operator_log.open("ab") as log:
            log.write(f"\n===== operator start {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self._operator = subprocess.Popen(
                self.operator_command(),
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _OPERATOR_GROUPS.add(self._operator.pid)
        process = self._operator

        def alive() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the operator exited with {process.returncode}:\n{self.operator_log_tail()}"
                )
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1
                ) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        try:
            deadline = time.monotonic() + timeout
            while not alive():
                if time.monotonic() > deadline:
                    raise WaitTimeoutError(
                        f"operator not live after {timeout}s:\n{self.operator_log_tail()}"
                    )
                time.sleep(0.1)
        except BaseException:
            self.stop_operator()
            raise

    def stop_operator(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the operator's process group (SIGKILL after `timeout`); its exit code."""
        process, self._operator = self._operator, None
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        # Anything the operator left in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        _OPERATOR_GROUPS.discard(process.pid)
        return process.returncode

    @property
    def operator_running(self) -> bool:
        return self._operator is not None and self._operator.poll() is None

    def operator_log_tail(self, lines: int = 60) -> str:
        if not self.operator_log.exists():
            return "<no operator log>"
        return "\n".join(self.operator_log.read_text(errors="replace").splitlines()[-lines:])

    # --------------------------------------------------------------- helpers
    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raises with stderr when `check` and it fails."""
        result = subprocess.run(
            [str(kubectl()), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            env={**os.environ, "KUBECACHEDIR": str(self.workdir / "kubectl-cache")},
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should use this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def get(
        self, plural: str, name: str, namespace: str = "default", group: str = "", version: str = ""
    ) -> dict[str, Any] | None:
        """Read an object straight from the store (None when absent). `plural` may be
        qualified (`lorajobs.finetune.loraops.dev`) or a plain plural looked up by name."""
        assert self.api.store is not None
        store = self.api.store

        def read() -> dict[str, Any] | None:
            resource = None
            for r in store.types.values():
                if (
                    (plural in (r.plural, r.storage_key))
                    and (not group or r.group == group)
                    and (not version or r.version == version)
                ):
                    resource = r
                    break
            if resource is None:
                raise ApiError(404, "NotFound", f"unknown resource {plural}")
            found = store.find(resource, namespace if resource.namespaced else "", name)
            # A private deep copy: callers may mutate it without touching the store.
            return json.loads(json.dumps(found)) if found is not None else None

        return self.api.call(read)

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
    parser = argparse.ArgumentParser(description="Run the harness control plane until Ctrl-C.")
    parser.add_argument("--operator", action="store_true", help="start the kopf operator")
    parser.add_argument("--s3", action="store_true", help="start the S3 server")
    parser.add_argument(
        "--bucket", action="append", default=[], help="S3 bucket to create (repeatable)"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    plane = ControlPlane(
        args.workdir,
        operator=args.operator,
        s3_buckets=(args.bucket or ["lorajob"]) if args.s3 else None,
    )
    # SIGTERM (e.g. from `timeout` or a process manager) unwinds like Ctrl-C, so
    # everything started below is stopped and its temp files removed.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    with plane:
        print(f"export KUBECONFIG={plane.kubeconfig}")
        print(f"kubectl: {kubectl()}")
        if plane.s3 is not None:
            print(f"S3 endpoint: {plane.s3.endpoint} (access key {plane.s3.access_key})")
        if plane.with_operator:
            print(f"operator log: {plane.operator_log}")
        print("Ctrl-C to stop.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
