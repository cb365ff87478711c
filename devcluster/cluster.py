"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, built from their Go modules
(`devcluster.binaries`), with generated PKI and RBAC, as controller-runtime's
envtest starts them (plus the controller manager and scheduler, which envtest
leaves out).

    with Cluster(workdir) as cluster:
        cluster.kubectl("get", "nodes")
        cluster.request("GET", "/api/v1/namespaces/default")

Identities: the admin (client certificate in `system:masters`), the controller
manager and scheduler (their own certificates; the bootstrap RBAC policy grants
them what they need, and the controller manager gives each controller its own
ServiceAccount, as kubeadm does), and any ServiceAccount token minted through
`service_account_kubeconfig` (what the operator runs as in tests).

Timings that a real cluster measures in minutes are configurable, so node loss
and eviction can be tested in seconds through the real mechanisms.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import yaml

from devcluster import binaries
from devcluster.pki import CertFiles, CertificateAuthority, write_signing_key
from devcluster.process import Process, free_port, log_tail, wait_for
from devcluster.tools import kubectl

Obj = dict[str, Any]
CONTEXT = "devcluster"
SERVICE_CIDR = "10.0.0.0/24"
_START_TIMEOUT = 120.0  # a loaded 2-core machine; an idle one is ready in about 5 s


@dataclass(frozen=True)
class Timings:
    """Intervals the controllers use. Defaults are test-sized; a real cluster's are in
    the comments."""

    # Node lifecycle: a node whose kubelet stops heartbeating is marked Unknown after
    # this (real: 50 s), and tainted `unreachable` (NoExecute).
    node_monitor_grace_seconds: int = 8
    # The DefaultTolerationSeconds admission plugin's tolerations for the
    # not-ready/unreachable taints: pods are evicted this long after (real: 300 s).
    default_toleration_seconds: int = 10


@dataclass(frozen=True)
class ResourcePath:
    """Where a resource type lives in the API."""

    group: str
    version: str
    plural: str
    namespaced: bool

    def collection(self, namespace: str | None) -> str:
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            return f"{prefix}/namespaces/{namespace}/{self.plural}"
        return f"{prefix}/{self.plural}"


class ApiStatusError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, code: int, body: str) -> None:
        try:
            status = json.loads(body)
            message = status.get("message", body)
            self.reason = status.get("reason", "")
        except ValueError:
            message, self.reason = body, ""
        super().__init__(f"{code} {self.reason}: {message}")
        self.code = code


def kubeconfig_dict(
    server: str,
    ca_pem: bytes,
    *,
    token: str | None = None,
    cert: CertFiles | None = None,
    namespace: str = "default",
) -> Obj:
    """A one-context kubeconfig for a bearer token or a client certificate (pure)."""
    user: dict[str, str] = {}
    if token is not None:
        user["token"] = token
    if cert is not None:
        user["client-certificate-data"] = base64.b64encode(cert.cert.read_bytes()).decode()
        user["client-key-data"] = base64.b64encode(cert.key.read_bytes()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CONTEXT,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": CONTEXT, "user": user}],
        "contexts": [
            {
                "name": CONTEXT,
                "context": {"cluster": CONTEXT, "user": CONTEXT, "namespace": namespace},
            }
        ],
        "current-context": CONTEXT,
        "preferences": {},
    }


def write_kubeconfig(path: Path, document: Obj) -> Path:
    """Mode 0600, as kubectl expects of a file that holds credentials."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        yaml.safe_dump(document, out, sort_keys=False)
    return path


class Cluster:
    """See the module docstring. `crds`: CustomResourceDefinition documents created
    before the controller manager starts (its garbage collector then discovers them at
    once instead of up to 30 s later)."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        crds: Iterable[Obj] = (),
        timings: Timings | None = None,
        apiserver_args: Sequence[str] = (),
    ) -> None:
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="devcluster-")
            workdir = Path(self._tempdir.name)
        self.workdir = workdir
        self.crds = list(crds)
        self.timings = timings or Timings()
        self.apiserver_args = list(apiserver_args)
        self.pki_dir = workdir / "pki"
        self.logs = workdir / "logs"
        self.port = 0
        self.processes: dict[str, Process] = {}
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.started_seconds = 0.0
        self._admin: CertFiles | None = None
        self._ssl: ssl.SSLContext | None = None
        self.ca: CertificateAuthority | None = None
        self._resources: dict[tuple[str, str], ResourcePath] = {}  # (plural, group) ->

    # ------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> Cluster:
        started = time.monotonic()
        try:
            self._pki()
            self._start_etcd()
            self._start_apiserver()
            if self.crds:
                self.apply(self.crds)
                for crd in self.crds:
                    self.wait_established(crd["metadata"]["name"])
            self._start_controller_manager()
            self._start_scheduler()
            self.wait_default_service_account("default")
        except BaseException:
            self.stop()
            raise
        self.started_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes.pop(name).stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def check_running(self) -> None:
        for process in self.processes.values():
            process.check_running()

    # ---------------------------------------------------------------- start-up
    def _pki(self) -> None:
        self.ca = ca = CertificateAuthority(self.pki_dir)
        self.serving = ca.serving(
            "apiserver",
            (
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "10.0.0.1",
            ),
        )
        self._admin = ca.issue(
            "admin", common_name="devcluster-admin", organizations=("system:masters",), client=True
        )
        self._kubelet_client = ca.issue(
            "apiserver-kubelet-client",
            common_name="kube-apiserver-kubelet-client",
            organizations=("system:masters",),
            client=True,
        )
        self._controller_manager = ca.issue(
            "controller-manager", common_name="system:kube-controller-manager", client=True
        )
        self._scheduler = ca.issue("scheduler", common_name="system:kube-scheduler", client=True)
        self.sa_key, self.sa_pub = write_signing_key(self.pki_dir)
        self._ssl = self._admin.client_context()

    def _start(self, name: str, argv: list[str]) -> Process:
        process = Process(name, argv, self.logs / f"{name}.log").start()
        self.processes[name] = process
        return process

    def _wait(self, process: Process, ready: Any, what: str) -> None:
        def check() -> bool:
            process.check_running()
            return bool(ready())

        wait_for(
            check,
            timeout=_START_TIMEOUT,
            interval=0.1,
            message=lambda: f"{what}\n--- {process.log} ---\n{log_tail(process.log)}",
        )

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        process = self._start(
            "etcd",
            [
                str(binaries.require(binaries.ETCD)),
                "--name=devcluster",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=devcluster=http://127.0.0.1:{peer}",
                # Throwaway data: fsync buys nothing and costs most of a write's latency.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait(process, lambda: http_ok(f"{self.etcd_url}/health"), "etcd /health")

    def _start_apiserver(self) -> None:
        assert self.ca is not None
        self.port = free_port()
        process = self._start(
            "kube-apiserver",
            [
                str(binaries.require(binaries.KUBE_APISERVER)),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--etcd-servers={self.etcd_url}",
                f"--tls-cert-file={self.serving.cert}",
                f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={self.ca.cert_path}",
                f"--service-account-key-file={self.sa_pub}",
                f"--service-account-signing-key-file={self.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                # Endpoints may not hold loopback addresses, so the apiserver does not
                # publish its own (nothing here resolves the `kubernetes` Service).
                "--endpoint-reconciler-type=none",
                f"--kubelet-client-certificate={self._kubelet_client.cert}",
                f"--kubelet-client-key={self._kubelet_client.key}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--default-not-ready-toleration-seconds={self.timings.default_toleration_seconds}",
                "--default-unreachable-toleration-seconds="
                f"{self.timings.default_toleration_seconds}",
                f"--cert-dir={self.pki_dir}",
                "--v=1",
                *self.apiserver_args,
            ],
        )
        self._wait(process, self._readyz, "kube-apiserver /readyz")
        write_kubeconfig(self.kubeconfig, self.kubeconfig_for(cert=self._admin))

    def _readyz(self) -> bool:
        with contextlib.suppress(OSError, ApiStatusError):
            self.request("GET", "/readyz")
            return True
        return False

    def _component_kubeconfig(self, name: str, cert: CertFiles) -> Path:
        return write_kubeconfig(self.workdir / f"{name}.kubeconfig", self.kubeconfig_for(cert=cert))

    def _start_controller_manager(self) -> None:
        assert self.ca is not None
        kubeconfig = self._component_kubeconfig("controller-manager", self._controller_manager)
        process = self._start(
            "kube-controller-manager",
            [
                str(binaries.require(binaries.KUBE_CONTROLLER_MANAGER)),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.workdir / 'controller-manager'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.sa_key}",
                f"--root-ca-file={self.ca.cert_path}",
                "--controllers=*",
                "--node-monitor-period=1s",
                f"--node-monitor-grace-period={self.timings.node_monitor_grace_seconds}s",
                "--v=1",
            ],
        )
        # Ready once the ServiceAccount controller has made the default namespace's SA.
        self._wait(process, lambda: True, "kube-controller-manager")

    def _start_scheduler(self) -> None:
        kubeconfig = self._component_kubeconfig("scheduler", self._scheduler)
        process = self._start(
            "kube-scheduler",
            [
                str(binaries.require(binaries.KUBE_SCHEDULER)),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.workdir / 'scheduler'}",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        self._wait(process, lambda: True, "kube-scheduler")

    # ------------------------------------------------------------ identities
    def kubeconfig_for(
        self, *, token: str | None = None, cert: CertFiles | None = None, namespace: str = "default"
    ) -> Obj:
        assert self.ca is not None
        return kubeconfig_dict(self.url, self.ca.pem, token=token, cert=cert, namespace=namespace)

    @property
    def admin_cert(self) -> CertFiles:
        """The admin's client certificate and key (`system:masters`) and the CA, as PEM
        files (for a client in another process)."""
        assert self._admin is not None, "the cluster was never started"
        return self._admin

    def admin_ssl_context(self) -> ssl.SSLContext:
        """A new context that trusts the cluster's CA and presents the admin's client
        certificate (for an HTTP client of one's own, e.g. aiohttp)."""
        return self.admin_cert.client_context()

    def service_account_token(self, namespace: str, name: str, *, seconds: int = 24 * 3600) -> str:
        """A token for the ServiceAccount from the TokenRequest API (as the kubelet
        mounts them into pods)."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{quote(name)}/token"
        return str(self.request("POST", path, body)["status"]["token"])

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount (mode 0600)."""
        token = self.service_account_token(namespace, name)
        return write_kubeconfig(path, self.kubeconfig_for(token=token, namespace=namespace))

    def wait_default_service_account(self, namespace: str, timeout: float = 60) -> None:
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/default"
        wait_for(
            lambda: self.get_path(path),
            timeout=timeout,
            message=lambda: (
                f"the ServiceAccount controller to create {namespace}/default\n"
                + log_tail(self.processes["kube-controller-manager"].log)
            ),
        )

    # --------------------------------------------------------------- API use
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Obj:
        """One API call as the admin; the decoded JSON answer. Raises ApiStatusError."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise ApiStatusError(exc.code, exc.read().decode(errors="replace")) from None
        if not raw:
            return {}
        try:
            decoded = json.loads(raw)
        except ValueError:
            return {"text": raw.decode(errors="replace")}
        return decoded if isinstance(decoded, dict) else {"items": decoded}

    def resource_path(self, plural: str, *, group: str = "", version: str = "") -> ResourcePath:
        """Find a resource type by plural (`pods`, `lorajobs`, or qualified
        `lorajobs.finetune.loraops.dev`) through discovery (cached; a miss discovers
        again, for CRDs created since)."""
        if "." in plural and not group:
            plural, group = plural.split(".", 1)
        for attempt in range(2):
            if attempt or not self._resources:
                self._discover()
            matches = [
                r
                for (p, g), r in self._resources.items()
                if p == plural and (not group or g == group)
            ]
            if version:
                matches = [ResourcePath(m.group, version, m.plural, m.namespaced) for m in matches]
            if matches:
                # The core group wins a bare plural (`events`), as kubectl resolves it.
                return sorted(matches, key=lambda r: r.group != "")[0]
        raise ApiStatusError(404, json.dumps({"message": f"no resource type {plural!r}"}))

    def _discover(self) -> None:
        found: dict[tuple[str, str], ResourcePath] = {}
        for resource in self.request("GET", "/api/v1").get("resources", []):
            if "/" not in resource["name"]:
                found[(resource["name"], "")] = ResourcePath(
                    "", "v1", resource["name"], resource["namespaced"]
                )
        for group in self.request("GET", "/apis").get("groups", []):
            version = group["preferredVersion"]["version"]
            listing = self.request("GET", f"/apis/{group['name']}/{version}")
            for resource in listing.get("resources", []):
                if "/" not in resource["name"]:
                    found[(resource["name"], group["name"])] = ResourcePath(
                        group["name"], version, resource["name"], resource["namespaced"]
                    )
        self._resources = found

    def get_path(self, path: str) -> Obj | None:
        """GET; None on 404."""
        try:
            return self.request("GET", path)
        except ApiStatusError as exc:
            if exc.code == 404:
                return None
            raise

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raises with stderr when `check` and it fails."""
        result = subprocess.run(
            [str(kubectl()), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
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

    def apply(self, documents: Iterable[Obj], *, field_manager: str = "devcluster") -> None:
        """Server-side apply of the documents, as `kubectl apply --server-side` does."""
        text = yaml.safe_dump_all(list(documents), sort_keys=False)
        self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            f"--field-manager={field_manager}",
            "-f",
            "-",
            input=text,
            timeout=120,
        )

    def wait_established(self, crd_name: str, timeout: float = 60) -> None:
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd_name}"

        def established() -> bool:
            crd = self.get_path(path) or {}
            conditions = crd.get("status", {}).get("conditions", [])
            return any(
                c.get("type") == "Established" and c.get("status") == "True" for c in conditions
            )

        wait_for(established, timeout=timeout, message=f"CRD {crd_name} Established")

    def compact_etcd(self) -> int:
        """Compact etcd's history up to now (what the API server does every 5 minutes);
        returns the revision. Watches from an older resourceVersion that are served by
        etcd (not the watch cache) then end with 410 Gone."""
        status = _etcd_call(self.etcd_url, "/v3/kv/range", {"key": "AA==", "limit": 1})
        revision = int(status["header"]["revision"])
        _etcd_call(self.etcd_url, "/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def log_files(self) -> Mapping[str, Path]:
        return {name: process.log for name, process in self.processes.items()}


def _etcd_call(base: str, path: str, body: Obj) -> Obj:
    """One call to etcd's JSON gateway (its gRPC API over HTTP)."""
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        result: Obj = json.loads(response.read())
    return result


def http_ok(url: str) -> bool:
    """Whether `url` answers 200 now (a local health or readiness endpoint)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
