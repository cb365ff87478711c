"""The process kubelet: a node agent that runs pods as local processes.

It is an ordinary API client (HTTPS with a client certificate or a bearer token),
doing the kubelet's part of a real cluster and nothing more (kube-scheduler binds
the pods, kube-controller-manager does node lifecycle, eviction and garbage
collection):

* registers Nodes (default: one GPU node `gpu-node-1`, 8x H100, tainted
  `nvidia.com/gpu=present:NoSchedule`), renews their Leases in kube-node-lease and
  re-posts their Ready status, so the node lifecycle controller treats them as a
  cluster would;
* runs each bound pod's containers as process groups: `python`/`python3` is the
  current interpreter; env from values, Secret/ConfigMap keys (missing ->
  `CreateContainerConfigError`), fieldRefs, resourceFieldRefs; emptyDir mounts
  are per-pod host directories and any env value, argument or workingDir under a
  mount path is rewritten onto them; the terminationMessagePath becomes a host file
  whose content lands in `state.terminated.message`; pod IPs are 127.B.x.y, with a
  /16 block B per kubelet that no concurrent kubelet on the machine uses
  (`routable_pod_ips`: 198.18.B.x, added to lo, which Services can select);
* cluster DNS (`cluster_dns`, the kubelet's --cluster-dns): each pod gets the
  resolv.conf its dnsPolicy and dnsConfig call for (ClusterFirst: the cluster DNS,
  search `<ns>.svc.cluster.local svc.cluster.local cluster.local`, ndots:5), mounted
  over /etc/resolv.conf in a private mount namespace of its processes
  (devcluster/clusterdns.py); without it pods use the host's resolver;
* reports status through pods/status: Pending -> Running -> Succeeded/Failed;
* on graceful deletion (deletionTimestamp) sends SIGTERM to the process group,
  SIGKILL after the grace period, then deletes the pod with grace 0;
* simulations: annotation `harness.loraops.dev/simulate: OOMKilled` (+
  `harness.loraops.dev/simulate-after-seconds`) or `ImagePullBackOff`, image pull
  errors for images matching a pattern, `evict()` (Eviction API), `lose_node()`
  (heartbeats stop; the controllers do the rest);
* honours `spec.activeDeadlineSeconds` (pod Failed, reason DeadlineExceeded);
* probes: liveness (failure -> the container is stopped, then restarted per policy) and
  readiness (containerStatuses[].ready and the Ready condition), via httpGet,
  tcpSocket or exec;
* restartPolicy Always/OnFailure: exited containers are restarted after a short
  doubling back-off (CrashLoopBackOff, restartCount, lastState);
* init containers run one after the other before the main containers (a failed one
  fails the pod);
* `SimulatedRuntime`: optionally run no processes at all (operator benchmarks);
* serves container logs at /containerLogs/<ns>/<pod>/<container> for `kubectl logs`;
* not done: a network namespace per pod (pods bind on their own IP, but a port one
  binds on every address, torch's c10d store on 29400, is taken for all pods on the
  machine), startup/grpc probes, init-container restarts, resource
  limits enforcement, and mount paths *inside* a string (a `-c` script): pass paths
  through env values or whole arguments, which are rewritten (paths that already
  exist on the host are kept: they are files a test handed to the pod).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import aiohttp
import yaml
from aiohttp import web

from devcluster.clusterdns import CLUSTER_DOMAIN, in_pod_mounts, pod_resolv_conf
from devcluster.process import claim_loopback_block
from devcluster.quantity import parse_quantity

T = TypeVar("T")
Obj = dict[str, Any]

SIMULATE_ANNOTATION = "harness.loraops.dev/simulate"
SIMULATE_AFTER_ANNOTATION = "harness.loraops.dev/simulate-after-seconds"
TERMINATION_MESSAGE_LIMIT = 4096
RETRY_INTERVAL = 0.5  # seconds between retries of image pulls / missing Secrets
# Container restart back-off: doubling from 0.5s to 5s (the real kubelet: 10s to 5min).
RESTART_BACKOFF_SECONDS = 0.5
RESTART_BACKOFF_MAX_SECONDS = 5.0
# Node heartbeats, as a kubelet's defaults (renew every 10 s of a 40 s lease) scaled
# down so the node lifecycle controller (grace period: see devcluster.cluster.Timings)
# notices a lost node within seconds.
LEASE_DURATION_SECONDS = 10
LEASE_RENEW_SECONDS = 1.0
STATUS_REPORT_SECONDS = 10.0
_MERGE = {"Content-Type": "application/merge-patch+json"}
_STRATEGIC = {"Content-Type": "application/strategic-merge-patch+json"}
_LIVE_GROUPS: set[int] = set()  # process groups still running, for the atexit net


def _kill_leftovers() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


atexit.register(_kill_leftovers)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _session_args(config: Obj) -> tuple[str, dict[str, Any]]:
    """aiohttp ClientSession arguments from a one-context kubeconfig document: the
    server, its CA, and a bearer token or a client certificate."""
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    ssl_context = ssl.create_default_context()
    if cluster.get("certificate-authority-data"):
        ssl_context = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
    headers = {}
    if user.get("token"):
        headers["Authorization"] = f"Bearer {user['token']}"
    if user.get("client-certificate-data"):
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            ssl_context.load_cert_chain(cert, key)
    return cluster["server"], {
        "headers": headers,
        "connector": aiohttp.TCPConnector(ssl=ssl_context, limit=32),
    }


@dataclass(frozen=True)
class NodeConfig:
    """A fake node. Capacity values are Kubernetes quantities."""

    name: str = "gpu-node-1"
    labels: dict[str, str] = field(
        default_factory=lambda: {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "nvidia.com/gpu.count": "8",
        }
    )
    capacity: dict[str, str] = field(
        default_factory=lambda: {
            "cpu": "64",
            "memory": "512Gi",
            "nvidia.com/gpu": "8",
            "pods": "110",
        }
    )
    taints: tuple[dict[str, str], ...] = (
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
    )

    def node_object(self) -> Obj:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **self.labels,
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels},
            "spec": {"taints": [dict(t) for t in self.taints]} if self.taints else {},
        }


def cpu_node(name: str = "cpu-node-1") -> NodeConfig:
    """A node without GPUs or taints."""
    return NodeConfig(
        name=name, labels={}, capacity={"cpu": "16", "memory": "64Gi", "pods": "110"}, taints=()
    )


# ----------------------------------------------------------------- scheduling
@dataclass(frozen=True)
class SimulatedRuntime:
    """Containers that start no process: each is Running for `seconds`, then exits
    with `exit_code` and `termination_message` (a string, or a function of the pod).
    Signals end it early (exit 128+signal). For benchmarks that measure the
    operator rather than process start-up; probes are not run for them."""

    seconds: float = 0.0
    exit_code: int = 0
    termination_message: str | Callable[[Obj], str] = ""


@dataclass
class ContainerRun:
    name: str
    log_path: Path
    termination_path: Path | None
    process: asyncio.subprocess.Process | None = None
    started_at: str = ""
    exit_code: int | None = None
    finished_at: str = ""
    oom_killed: bool = False
    ready: bool = True  # False until a readinessProbe first succeeds
    simulated: SimulatedRuntime | None = None
    stop_signal: asyncio.Future[int] | None = None  # simulated containers: the kill
    restart_count: int = 0
    last_state: Obj | None = None  # the previous run's `terminated` state
    back_off: str = ""  # CrashLoopBackOff message while waiting to restart


@dataclass
class PodRun:
    """Everything the kubelet tracks for one pod it runs."""

    uid: str
    namespace: str
    name: str
    node: str
    ip: str
    directory: Path
    containers: dict[str, ContainerRun] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    terminating: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    killed_for_node_loss: bool = False
    no_restart: bool = False  # set when the pod is being stopped for good
    resolv_conf: Path | None = None  # the pod's /etc/resolv.conf; None: the host's


class ContainerConfigError(Exception):
    """Env/volume source missing; the pod waits with CreateContainerConfigError."""


class Kubelet:
    """See the module docstring. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        kubeconfig: Path,
        workdir: Path | None = None,
        *,
        nodes: Iterable[NodeConfig] = (NodeConfig(),),
        image_pull_error_pattern: str | None = None,
        base_env: dict[str, str] | None = None,
        python: str = sys.executable,
        simulated_runtime: SimulatedRuntime | None = None,
        cluster_dns: str | None = None,
        cluster_domain: str = CLUSTER_DOMAIN,
        routable_pod_ips: bool = False,
    ) -> None:
        self.kubeconfig = kubeconfig
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="kubelet-")
            workdir = Path(self._tempdir.name)
        self.workdir = workdir
        self.nodes = {n.name: n for n in nodes}
        self.image_pull_error = (
            re.compile(image_pull_error_pattern) if image_pull_error_pattern else None
        )
        self.base_env = dict(base_env or {})
        self.python = python
        self.simulated_runtime = simulated_runtime
        # A real kubelet's --cluster-dns / --cluster-domain; None: pods use the host's
        # resolver whatever their dnsPolicy (a kubelet without --cluster-dns falls
        # back to Default for ClusterFirst pods).
        self.cluster_dns = cluster_dns
        self.cluster_domain = cluster_domain
        self.routable_pod_ips = routable_pod_ips
        if routable_pod_ips and os.geteuid() != 0:
            raise PermissionError(
                "routable_pod_ips adds each pod's address to the loopback interface, "
                "which needs root"
            )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._log_port = 0
        self.pods: dict[str, Obj] = {}  # uid -> latest pod object seen
        self.runs: dict[str, PodRun] = {}  # uid -> running pod
        self._ips_in_use: set[str] = set()
        self._next_ip = 2  # where the search for a free pod IP starts (round robin)
        self._ip_block = 0
        self._ip_lock: IO[str] | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready_since: dict[str, str] = {}  # node -> when it last became Ready
        self._lost_nodes: set[str] = set()

    # ------------------------------------------------------------- lifecycle
    def start(self) -> Kubelet:
        self._claim_ip_block()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start_async())
            except BaseException as exc:
                ready.set_exception(exc)
                return
            ready.set_result(None)
            self._loop.run_forever()
            self._loop.run_until_complete(self._stop_async())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="test-kubelet", daemon=True)
        self._thread.start()
        ready.result(timeout=60)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=60)
        self._thread = None
        if self._ip_lock is not None:
            self._flush_pod_ips()
            self._ip_lock.close()  # releases the flock on the IP block
            self._ip_lock = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> Kubelet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def run(self, coro: Awaitable[T], timeout: float = 60) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start_async(self) -> None:
        api_server, options = _session_args(yaml.safe_load(self.kubeconfig.read_text()))
        self._session = aiohttp.ClientSession(api_server, **options)
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._serve_logs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # Served over TLS: the API server proxies `kubectl logs` to the kubelet over HTTPS.
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._serving_ssl())
        await site.start()
        server = site._server
        assert server is not None
        self._log_port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        for node in self.nodes.values():
            await self._register(node)
        rv = await self._initial_list()
        self._spawn(self._watch_pods(rv))
        for node in self.nodes.values():
            self._spawn(self._heartbeat(node))

    def _serving_ssl(self) -> ssl.SSLContext:
        """A self-signed certificate for the log endpoint (the API server does not
        verify kubelet certificates unless told to, and a real kubelet's are often
        self-signed too)."""
        from devcluster.pki import CertificateAuthority  # noqa: PLC0415 - start-up only

        return (
            CertificateAuthority(self.workdir / "pki")
            .serving("kubelet", ("127.0.0.1",))
            .server_context()
        )

    async def _stop_async(self) -> None:
        self._stopping = True
        for run in list(self.runs.values()):
            for container in run.containers.values():
                self._signal(container, signal.SIGKILL)
        for run in list(self.runs.values()):
            for container in run.containers.values():
                if container.process is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(container.process.wait(), 10)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # ----------------------------------------------------------------- API
    async def _request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        assert self._session is not None
        data = json.dumps(body) if body is not None else None
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with self._session.request(method, path, data=data, headers=hdrs) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text) if text else None
            except ValueError:
                return response.status, text

    async def _patch_status(self, pod: Obj, status: Obj) -> None:
        meta = pod["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
        code, body = await self._request("PATCH", path, {"status": status}, _STRATEGIC)
        if (
            code == 200
            and isinstance(body, dict)
            and body["metadata"].get("uid") == meta.get("uid")
        ):
            self._set_pod(meta["uid"], body)

    async def _event(
        self, pod: Obj, type_: str, reason: str, message: str, component: str = "kubelet"
    ) -> None:
        """A core/v1 Event about `pod`, as the scheduler and kubelet post them."""
        meta = pod["metadata"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": component},
            "firstTimestamp": now_rfc3339(),
            "lastTimestamp": now_rfc3339(),
            "eventTime": None,
            "count": 1,
            "reportingComponent": component,
            "reportingInstance": now,
        }
        with contextlib.suppress(aiohttp.ClientError):
            await self._request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)

    async def _register(self, node: NodeConfig) -> None:
        code, body = await self._request("POST", "/api/v1/nodes", node.node_object())
        if code not in (201, 409):
            raise RuntimeError(f"registering node {node.name} failed: {code} {body}")
        await self._set_node_status(node)
        await self._renew_lease(node)

    async def _set_node_status(self, node: NodeConfig) -> None:
        """Post the node's status with a fresh Ready heartbeat, as a kubelet does."""
        now = now_rfc3339()
        since = self._ready_since.setdefault(node.name, now)
        status = {
            "capacity": dict(node.capacity),
            "allocatable": dict(node.capacity),
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": node.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self._log_port}},
            "nodeInfo": {
                "kubeletVersion": "v1.35.4-devcluster",
                "containerRuntimeVersion": "devcluster://local-process",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": since,
                }
            ],
        }
        code, body = await self._request(
            "PATCH", f"/api/v1/nodes/{node.name}/status", {"status": status}, _STRATEGIC
        )
        if code != 200:
            raise RuntimeError(f"node status for {node.name} failed: {code} {body}")

    async def _renew_lease(self, node: NodeConfig) -> None:
        """The node's Lease in kube-node-lease: what the node lifecycle controller
        watches to tell a live kubelet from a lost one."""
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node.name}"
        spec = {
            "holderIdentity": node.name,
            "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": now,
        }
        code, _ = await self._request("PATCH", path, {"spec": spec}, _MERGE)
        if code == 404:
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": node.name, "namespace": "kube-node-lease"},
                "spec": spec,
            }
            await self._request("POST", path.rsplit("/", 1)[0], lease)

    async def _heartbeat(self, node: NodeConfig) -> None:
        """Renew the Lease every LEASE_RENEW_SECONDS and re-post the status every
        STATUS_REPORT_SECONDS, until the node is lost."""
        last_status = asyncio.get_running_loop().time()
        while not self._stopping:
            await asyncio.sleep(LEASE_RENEW_SECONDS)
            if node.name in self._lost_nodes:
                continue
            try:
                await self._renew_lease(node)
                now = asyncio.get_running_loop().time()
                if now - last_status >= STATUS_REPORT_SECONDS:
                    await self._set_node_status(node)
                    last_status = now
            except (TimeoutError, aiohttp.ClientError, RuntimeError):
                continue  # the API server is busy; the next beat tries again

    # ---------------------------------------------------------------- watch
    async def _initial_list(self) -> str:
        code, body = await self._request("GET", "/api/v1/pods")
        if code != 200:
            raise RuntimeError(f"listing pods failed: {code} {body}")
        for pod in body.get("items") or []:
            self._on_pod("ADDED", pod)
        return str(body["metadata"]["resourceVersion"])

    async def _watch_pods(self, rv: str) -> None:
        assert self._session is not None
        while not self._stopping:
            try:
                params = {
                    "watch": "true",
                    "resourceVersion": rv,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": "300",
                }
                async with self._session.get(
                    "/api/v1/pods",
                    params=params,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
                ) as response:
                    buffer = b""
                    async for chunk in response.content.iter_any():
                        buffer += chunk
                        *lines, buffer = buffer.split(b"\n")
                        for line in lines:
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            obj = event.get("object") or {}
                            if event.get("type") == "ERROR":
                                rv = await self._initial_list()
                                break
                            rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                            if event.get("type") != "BOOKMARK":
                                self._on_pod(event["type"], obj)
            except (TimeoutError, aiohttp.ClientError, ValueError):
                if self._stopping:
                    return
                await asyncio.sleep(0.2)

    def _on_pod(self, kind: str, pod: Obj) -> None:
        meta = pod.get("metadata") or {}
        uid = meta.get("uid", "")
        if kind == "DELETED":
            self._set_pod(uid, None)
            run = self.runs.get(uid)
            if run is not None and run.finished.is_set():
                self._forget(run)
            elif run is not None:
                run.terminating.set()
            return
        self._set_pod(uid, pod)
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if not node or node not in self.nodes or node in self._lost_nodes:
            return  # not bound yet (kube-scheduler binds), or not one of ours
        phase = (pod.get("status") or {}).get("phase")
        run = self.runs.get(uid)
        if meta.get("deletionTimestamp"):
            if run is None:
                self._spawn(self._finish_deletion(pod))
            elif run.finished.is_set():
                self._spawn(self._complete_deletion(run))
            else:
                run.terminating.set()
            return
        if run is None and phase not in ("Succeeded", "Failed"):
            run = self._new_run(pod)
            self.runs[uid] = run
            run.task = self._spawn(self._run_pod(run))

    def _set_pod(self, uid: str, pod: Obj | None) -> None:
        """The pod's latest version (None: gone)."""
        if pod is None:
            self.pods.pop(uid, None)
        else:
            self.pods[uid] = pod

    # ----------------------------------------------------------------- pods
    @property
    def _pod_ip_prefix(self) -> str:
        """This kubelet's pod IP range (see _claim_ip_block): 127.<block>.0.0/16, or
        with routable_pod_ips 198.18.<block>.0/24 (RFC 2544's range, unused by any
        real network), because Endpoints and EndpointSlices reject loopback
        addresses (ValidateEndpointIP) and a Service would never select the pod."""
        if self.routable_pod_ips:
            return f"198.18.{self._ip_block}.0/24"
        return f"127.{self._ip_block}.0.0/16"

    def _allocate_ip(self) -> str:
        """Next free IP in this kubelet's range, searched from after the last one
        handed out, as a CNI's allocator does: a freed IP is not reused at once, and
        allocating is O(1) while few are in use."""
        size = 256 if self.routable_pod_ips else 256 * 256
        for step in range(size):
            n = (self._next_ip + step) % size
            if n % 256 in (0, 255) or n < 2:
                continue
            if self.routable_pod_ips:
                ip = f"198.18.{self._ip_block}.{n}"
            else:
                ip = f"127.{self._ip_block}.{n // 256}.{n % 256}"
            if ip not in self._ips_in_use:
                if self.routable_pod_ips:
                    # Local to this machine like a 127.x address, but an ordinary
                    # unicast one: the pod binds and is reached on it.
                    _ip("addr", "add", f"{ip}/32", "dev", "lo")
                self._ips_in_use.add(ip)
                self._next_ip = n + 1
                return ip
        raise RuntimeError("out of pod IPs")

    def _release_ip(self, ip: str) -> None:
        self._ips_in_use.discard(ip)
        if self.routable_pod_ips:
            with contextlib.suppress(OSError, RuntimeError):
                _ip("addr", "del", f"{ip}/32", "dev", "lo")

    def _flush_pod_ips(self) -> None:
        """Remove every address of this kubelet's routable range from lo (at start: a
        crashed kubelet's leftovers in the block it now owns; at stop: its own)."""
        if self.routable_pod_ips:
            with contextlib.suppress(OSError, RuntimeError):
                _ip("-4", "addr", "flush", "dev", "lo", "to", self._pod_ip_prefix)

    def _claim_ip_block(self) -> None:
        """Pick a 127.<block>.0.0/16 no other kubelet on this machine uses: pods bind
        fixed ports (the trainer's 8080) on their IP, so pod IPs must be unique
        machine-wide (see claim_loopback_block)."""
        self._ip_block, self._ip_lock = claim_loopback_block()
        self._flush_pod_ips()

    def _new_run(self, pod: Obj) -> PodRun:
        meta = pod["metadata"]
        directory = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        run = PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            node=pod["spec"]["nodeName"],
            ip=self._allocate_ip(),
            directory=directory,
        )
        if self.cluster_dns is not None:
            resolv = pod_resolv_conf(pod, self.cluster_dns, self.cluster_domain)
            if resolv is not None:
                run.resolv_conf = directory / "resolv.conf"
                run.resolv_conf.write_text(resolv)
        return run

    @staticmethod
    def _in_pod(run: PodRun, argv: list[str]) -> list[str]:
        """The command as it runs in the pod: with the pod's own /etc/resolv.conf
        when the kubelet gave it one (the pid stays the command's; see in_pod_mounts)."""
        return in_pod_mounts(argv, run.resolv_conf) if run.resolv_conf is not None else argv

    async def _get_obj(self, kind: str, namespace: str, name: str) -> Obj | None:
        code, body = await self._request("GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}")
        return body if code == 200 else None

    async def _key_ref(self, kind: str, ref: Obj, namespace: str) -> str | None:
        name, key = ref.get("name", ""), ref.get("key", "")
        obj = await self._get_obj("secrets" if kind == "Secret" else "configmaps", namespace, name)
        if obj is None:
            if ref.get("optional"):
                return None
            raise ContainerConfigError(f'{kind.lower()} "{name}" not found')
        if kind == "Secret":
            data = obj.get("data") or {}
            if key in data:
                return base64.b64decode(data[key]).decode()
        else:
            data = obj.get("data") or {}
            if key in data:
                return str(data[key])
        if ref.get("optional"):
            return None
        return_kind = "Secret" if kind == "Secret" else "ConfigMap"
        raise ContainerConfigError(f"couldn't find key {key} in {return_kind} {namespace}/{name}")

    def _field_ref(self, pod: Obj, run: PodRun, path: str) -> str:
        meta = pod["metadata"]
        if path.startswith("metadata.labels['") or path.startswith("metadata.annotations['"):
            section, key = path.split("['", 1)
            return str((meta.get(section.split(".")[1]) or {}).get(key.rstrip("']"), ""))
        values = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "status.podIP": run.ip,
            "status.hostIP": "127.0.0.1",
            "spec.nodeName": run.node,
            "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", "default"),
        }
        return str(values.get(path, ""))

    @staticmethod
    def _resource_field(container: Obj, ref: Obj) -> str:
        resource = ref.get("resource", "")
        section, _, name = resource.partition(".")
        value = ((container.get("resources") or {}).get(section) or {}).get(name)
        if value is None:
            return "0"
        divisor = parse_quantity(ref.get("divisor", "1"))
        amount = parse_quantity(value) / divisor
        return str(-(-amount.numerator // amount.denominator))  # ceiling, like the kubelet

    def _mounts(self, pod: Obj, run: PodRun, container: Obj) -> dict[str, Path]:
        volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"], {})
            host = run.directory / "volumes" / mount["name"]
            host.mkdir(parents=True, exist_ok=True)
            if mount.get("subPath"):
                host = host / mount["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            if (
                "emptyDir" in volume
                or "secret" in volume
                or "configMap" in volume
                or "hostPath" in volume
            ):
                mounts[mount["mountPath"].rstrip("/") or "/"] = host
        return mounts

    async def _fill_volumes(self, pod: Obj, run: PodRun) -> None:
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            host = run.directory / "volumes" / volume["name"]
            host.mkdir(parents=True, exist_ok=True)
            for kind, source_key in (("Secret", "secret"), ("ConfigMap", "configMap")):
                source = volume.get(source_key)
                if not source:
                    continue
                name = source.get("secretName") if kind == "Secret" else source.get("name")
                obj = await self._get_obj(
                    "secrets" if kind == "Secret" else "configmaps", run.namespace, name or ""
                )
                if obj is None:
                    if source.get("optional"):
                        continue
                    raise ContainerConfigError(f'{kind.lower()} "{name}" not found')
                for key, value in (obj.get("data") or {}).items():
                    data = base64.b64decode(value) if kind == "Secret" else str(value).encode()
                    (host / key).write_bytes(data)

    @staticmethod
    def _rewrite(value: str, mounts: dict[str, Path]) -> str:
        """Map a container path under a mount onto the pod's host directory.

        A path *below* a mount that already exists on the host is left alone: in
        the harness that is a host file a test handed to the pod (a script under
        /tmp while the pod mounts an emptyDir at /tmp), not a container path."""
        for mount_path in sorted(mounts, key=len, reverse=True):
            if value == mount_path:
                return str(mounts[mount_path])
            if value.startswith(mount_path.rstrip("/") + "/"):
                if os.path.exists(value):
                    return value
                return str(mounts[mount_path]) + value[len(mount_path.rstrip("/")) :]
        return value

    async def _container_env(
        self, pod: Obj, run: PodRun, container: Obj, mounts: dict[str, Path], termination: Path
    ) -> dict[str, str]:
        env: dict[str, str] = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOSTNAME": run.name,
            "HOME": str(run.directory),
            "LANG": "C.UTF-8",
        }
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        env.update(self.base_env)
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                ref = source.get(key)
                if not ref:
                    continue
                obj = await self._get_obj(
                    "secrets" if kind == "Secret" else "configmaps",
                    run.namespace,
                    ref.get("name", ""),
                )
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise ContainerConfigError(f'{kind.lower()} "{ref.get("name")}" not found')
                for k, v in (obj.get("data") or {}).items():
                    env[prefix + k] = base64.b64decode(v).decode() if kind == "Secret" else str(v)
        termination_path = container.get("terminationMessagePath", "/dev/termination-log")
        for item in container.get("env") or []:
            name = item["name"]
            value: str | None
            if "valueFrom" in item:
                source = item["valueFrom"]
                if "secretKeyRef" in source:
                    value = await self._key_ref("Secret", source["secretKeyRef"], run.namespace)
                elif "configMapKeyRef" in source:
                    value = await self._key_ref(
                        "ConfigMap", source["configMapKeyRef"], run.namespace
                    )
                elif "fieldRef" in source:
                    value = self._field_ref(pod, run, source["fieldRef"].get("fieldPath", ""))
                elif "resourceFieldRef" in source:
                    value = self._resource_field(container, source["resourceFieldRef"])
                else:
                    value = ""
                if value is None:
                    continue
            else:
                value = _expand(str(item.get("value", "")), env)
            # The termination file is a host path already: never rewrite it onto a mount
            # (it lives under /tmp, which the trainer pod also mounts as an emptyDir).
            env[name] = (
                str(termination) if value == termination_path else self._rewrite(value, mounts)
            )
        return env

    async def _run_pod(self, run: PodRun) -> None:
        try:
            await self._run_pod_inner(run)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            pod = self.pods.get(run.uid)
            if pod is not None:
                with contextlib.suppress(Exception):
                    await self._patch_status(
                        pod,
                        {
                            "phase": "Failed",
                            "reason": "HarnessKubeletError",
                            "message": f"{type(exc).__name__}: {exc}",
                        },
                    )
        finally:
            run.finished.set()
            if run.uid not in self.pods or self.pods[run.uid]["metadata"].get("deletionTimestamp"):
                await self._complete_deletion(run)

    async def _run_pod_inner(self, run: PodRun) -> None:
        pod = self.pods[run.uid]
        spec = pod["spec"]
        containers = spec.get("containers") or []
        started = now_rfc3339()
        base_status: Obj = {
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": started,
        }
        init_containers = spec.get("initContainers") or []
        # 1. Image pulls and container config (env sources); both wait and retry.
        attempts = 0
        while not run.terminating.is_set():
            attempts += 1
            simulated = (pod["metadata"].get("annotations") or {}).get(SIMULATE_ANNOTATION)
            waiting = self._image_problem(
                containers, backoff=attempts > 1, always=simulated == "ImagePullBackOff"
            )
            reason, message = waiting if waiting else ("", "")
            env_by_container: dict[str, tuple[dict[str, str], dict[str, Path], Path]] = {}
            if not waiting:
                try:
                    await self._fill_volumes(pod, run)
                    for container in [*init_containers, *containers]:
                        mounts = self._mounts(pod, run, container)
                        termination = run.directory / f"termination-{container['name']}"
                        env = await self._container_env(pod, run, container, mounts, termination)
                        env_by_container[container["name"]] = (env, mounts, termination)
                except ContainerConfigError as exc:
                    reason, message = "CreateContainerConfigError", str(exc)
            if not reason:
                break
            await self._event(
                pod,
                "Warning",
                "Failed",
                f"Error: {message}" if reason == "CreateContainerConfigError" else message,
            )
            await self._patch_status(
                pod,
                {
                    **base_status,
                    "phase": "Pending",
                    "conditions": _conditions(
                        ready=False, initialized=True, reason="ContainersNotReady"
                    ),
                    "containerStatuses": [_waiting_status(c, reason, message) for c in containers],
                },
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.terminating.wait(), timeout=RETRY_INTERVAL)
            pod = self.pods.get(run.uid, pod)
        if run.terminating.is_set():
            return
        # 1b. Init containers, one after the other; a failed one fails the pod.
        for index, init in enumerate(init_containers):
            env, mounts, termination = env_by_container[init["name"]]
            await self._start_container(run, init, env, mounts, termination)
            record = run.containers[init["name"]]
            stopper = asyncio.ensure_future(run.terminating.wait())
            exited = asyncio.ensure_future(self._wait_exit(record))
            await asyncio.wait({stopper, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                run.no_restart = True
                await self._terminate(run, pod)
            await exited
            stopper.cancel()
            failed = record.exit_code != 0
            pending_init = [
                _waiting_status(c, "PodInitializing", "") for c in init_containers[index + 1 :]
            ]
            await self._patch_status(
                pod,
                {
                    **base_status,
                    "phase": "Failed" if failed else "Pending",
                    "conditions": _conditions(
                        ready=False, initialized=False, reason="ContainersNotInitialized"
                    ),
                    "initContainerStatuses": [
                        self._container_status(run, c) for c in init_containers[: index + 1]
                    ]
                    + pending_init,
                    "containerStatuses": [
                        _waiting_status(c, "PodInitializing", "") for c in containers
                    ],
                },
            )
            if failed or run.terminating.is_set():
                return
        # 2. Start every container.
        for container in containers:
            env, mounts, termination = env_by_container[container["name"]]
            await self._start_container(run, container, env, mounts, termination)
            run.containers[container["name"]].ready = (
                "readinessProbe" not in container or self.simulated_runtime is not None
            )
            await self._event(pod, "Normal", "Started", f"Started container {container['name']}")

        async def report_running() -> None:
            await self._patch_status(
                pod,
                {
                    **base_status,
                    "phase": "Running",
                    "conditions": _conditions(
                        ready=all(c.ready for c in run.containers.values()), initialized=True
                    ),
                    "containerStatuses": [self._container_status(run, c) for c in containers],
                },
            )

        await report_running()
        probes = [
            asyncio.ensure_future(
                self._probe_loop(
                    run,
                    pod,
                    container,
                    kind=kind,
                    prepared=env_by_container[container["name"]],
                    report=report_running,
                )
            )
            for container in containers
            for kind in ("livenessProbe", "readinessProbe")
            if container.get(kind) and self.simulated_runtime is None
        ]
        # 3. Wait for exits, deletion or a simulated OOM kill.
        simulate = (pod["metadata"].get("annotations") or {}).get(SIMULATE_ANNOTATION)
        after = float(
            (pod["metadata"].get("annotations") or {}).get(SIMULATE_AFTER_ANNOTATION, "1")
        )
        waits = [
            asyncio.ensure_future(
                self._supervise(
                    run, pod, c, prepared=env_by_container[c["name"]], report=report_running
                )
            )
            for c in containers
        ]
        terminating = asyncio.ensure_future(run.terminating.wait())
        oom = asyncio.ensure_future(asyncio.sleep(after)) if simulate == "OOMKilled" else None
        deadline_s = spec.get("activeDeadlineSeconds")
        deadline = asyncio.ensure_future(asyncio.sleep(float(deadline_s))) if deadline_s else None
        extras = [f for f in (oom, deadline) if f is not None]
        helpers: list[asyncio.Future[Any]] = [*waits, terminating, *extras, *probes]
        pending: set[asyncio.Future[Any]] = set(helpers)
        deadline_exceeded = False
        try:
            while any(not w.done() for w in waits):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if oom is not None and oom in done:
                    for container in run.containers.values():
                        container.oom_killed = True
                        self._signal(container, signal.SIGKILL)
                if deadline is not None and deadline in done:
                    # spec.activeDeadlineSeconds: the kubelet stops the pod gracefully.
                    deadline_exceeded = run.no_restart = True
                    await self._terminate(run, pod)
                    break
                if terminating in done:
                    run.no_restart = True
                    await self._terminate(run, pod)
                    break
            await asyncio.gather(*waits, return_exceptions=True)
        finally:
            for future in helpers:
                future.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        if run.killed_for_node_loss:
            return
        # 4. Final status.
        pod = self.pods.get(run.uid, pod)
        codes = [c.exit_code for c in run.containers.values()]
        phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        if deadline_exceeded:
            phase = "Failed"
            base_status["reason"] = "DeadlineExceeded"
            base_status["message"] = "Pod was active on the node longer than the specified deadline"
            await self._event(pod, "Normal", "DeadlineExceeded", base_status["message"])
        await self._patch_status(
            pod,
            {
                **base_status,
                "phase": phase,
                "conditions": _conditions(ready=False, initialized=True, reason="PodCompleted"),
                "containerStatuses": [self._container_status(run, c) for c in containers],
            },
        )

    async def _supervise(
        self,
        run: PodRun,
        pod: Obj,
        container: Obj,
        *,
        prepared: tuple[dict[str, str], dict[str, Path], Path],
        report: Callable[[], Awaitable[None]],
    ) -> None:
        """Wait for one container to exit and restart it as spec.restartPolicy says,
        with a (harness-short) doubling back-off shown as CrashLoopBackOff."""
        policy = (pod.get("spec") or {}).get("restartPolicy", "Always")
        name = container["name"]
        while True:
            record = run.containers[name]
            await self._wait_exit(record)
            restart = policy == "Always" or (policy == "OnFailure" and record.exit_code != 0)
            if not restart or run.no_restart or run.terminating.is_set() or self._stopping:
                return
            delay = min(
                RESTART_BACKOFF_SECONDS * 2**record.restart_count, RESTART_BACKOFF_MAX_SECONDS
            )
            record.back_off = (
                f"back-off {delay:g}s restarting failed container={name} pod={run.name}"
            )
            await self._event(
                pod,
                "Warning",
                "BackOff",
                f"Back-off restarting failed container {name} in pod {run.name}",
            )
            await report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.terminating.wait(), timeout=delay)
            if run.no_restart or run.terminating.is_set() or self._stopping:
                record.back_off = ""
                return
            last_state = self._container_status(run, container)["state"]["terminated"]
            env, mounts, termination = prepared
            await self._start_container(run, container, env, mounts, termination)
            fresh = run.containers[name]
            fresh.restart_count, fresh.last_state = record.restart_count + 1, last_state
            await self._event(pod, "Normal", "Started", f"Started container {name}")
            await report()

    async def _probe_loop(
        self,
        run: PodRun,
        pod: Obj,
        container: Obj,
        *,
        kind: str,
        prepared: tuple[dict[str, str], dict[str, Path], Path],
        report: Callable[[], Awaitable[None]],
    ) -> None:
        """Run one liveness/readiness probe on its schedule, like the kubelet's prober."""
        probe = container[kind]
        label = "Liveness" if kind == "livenessProbe" else "Readiness"
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        failures = successes = 0
        while True:  # cancelled when the pod ends; restarted containers are probed anew
            record = run.containers[container["name"]]
            if record.exit_code is not None:
                failures = successes = 0
                await asyncio.sleep(float(probe.get("periodSeconds", 10)))
                continue
            error = await self._probe_once(run, container, probe, prepared)
            if error is None:
                failures, successes = 0, successes + 1
                if (
                    kind == "readinessProbe"
                    and not record.ready
                    and successes >= int(probe.get("successThreshold", 1))
                ):
                    record.ready = True
                    await report()
            else:
                failures, successes = failures + 1, 0
                await self._event(pod, "Warning", "Unhealthy", f"{label} probe failed: {error}")
                if failures >= int(probe.get("failureThreshold", 3)):
                    if kind == "livenessProbe":
                        await self._event(
                            pod,
                            "Normal",
                            "Killing",
                            f"Container {record.name} failed liveness probe, will be restarted",
                        )
                        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
                        self._signal(record, signal.SIGTERM)
                        try:
                            await asyncio.wait_for(self._wait_done(record), timeout=float(grace))
                        except TimeoutError:
                            self._signal(record, signal.SIGKILL)
                        failures = 0
                        continue
                    if record.ready:
                        record.ready = False
                        await report()
            await asyncio.sleep(float(probe.get("periodSeconds", 10)))

    async def _probe_once(
        self,
        run: PodRun,
        container: Obj,
        probe: Obj,
        prepared: tuple[dict[str, str], dict[str, Path], Path],
    ) -> str | None:
        """None when the probe passes, else the kubelet-style failure message."""
        timeout = float(probe.get("timeoutSeconds", 1))
        ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}

        def port_of(action: Obj) -> int:
            port = action.get("port")
            return int(
                ports.get(port, 0) if isinstance(port, str) and not port.isdigit() else port or 0
            )

        try:
            if "httpGet" in probe:
                action = probe["httpGet"]
                scheme = str(action.get("scheme", "HTTP")).lower()
                url = f"{scheme}://{action.get('host') or run.ip}:{port_of(action)}{action.get('path', '/')}"
                async with (
                    aiohttp.ClientSession() as client,
                    client.get(
                        url, timeout=aiohttp.ClientTimeout(total=timeout), ssl=False
                    ) as response,
                ):
                    if 200 <= response.status < 400:
                        return None
                    return f"HTTP probe failed with statuscode: {response.status}"
            if "tcpSocket" in probe:
                action = probe["tcpSocket"]
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(action.get("host") or run.ip, port_of(action)), timeout
                )
                writer.close()
                return None
            if "exec" in probe:
                env, mounts, _ = prepared
                argv = [
                    self._rewrite(_expand(a, env), mounts)
                    for a in probe["exec"].get("command") or []
                ]
                if argv and argv[0] in ("python", "python3"):
                    argv[0] = self.python
                process = await asyncio.create_subprocess_exec(
                    *self._in_pod(run, argv),
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                try:
                    output, _ = await asyncio.wait_for(process.communicate(), timeout)
                except TimeoutError:
                    process.kill()
                    await process.wait()
                    return f"command timed out after {timeout:g}s"
                return (
                    None
                    if process.returncode == 0
                    else output.decode(errors="replace").strip()[-200:]
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None  # grpc probes are not emulated: treated as passing

    def _image_problem(
        self, containers: list[Obj], *, backoff: bool, always: bool = False
    ) -> tuple[str, str] | None:
        if self.image_pull_error is None and not always:
            return None
        for container in containers:
            image = str(container.get("image", ""))
            if always or (self.image_pull_error and self.image_pull_error.search(image)):
                if backoff:
                    return "ImagePullBackOff", f'Back-off pulling image "{image}"'
                return (
                    "ErrImagePull",
                    f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
                    f"{image}: not found",
                )
        return None

    async def _start_container(
        self,
        run: PodRun,
        container: Obj,
        env: dict[str, str],
        mounts: dict[str, Path],
        termination: Path,
    ) -> None:
        name = container["name"]
        log_path = run.directory / f"{name}.log"
        if self.simulated_runtime is not None:
            runtime = self.simulated_runtime
            message = runtime.termination_message
            if callable(message):
                message = message(self.pods.get(run.uid) or {})
            termination.write_text(message)
            log_path.touch()
            run.containers[name] = ContainerRun(
                name=name,
                log_path=log_path,
                termination_path=termination,
                started_at=now_rfc3339(),
                simulated=runtime,
                stop_signal=asyncio.get_running_loop().create_future(),
            )
            return
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        if not argv:
            raise RuntimeError(
                f"container {name}: the harness cannot run an image's default entrypoint; set command"
            )
        # Map container paths onto the pod's volumes first, then swap in the host's
        # interpreter: that is a host path and may itself lie under a mount path such
        # as /tmp (a checkout under /tmp must still run its pods).
        argv = [self._rewrite(_expand(a, env), mounts) for a in argv]
        if argv[0] in ("python", "python3") or re.fullmatch(
            r"(/usr(/local)?/bin/)?python3?(\.\d+)?", argv[0]
        ):
            argv[0] = self.python
        cwd = self._rewrite(container.get("workingDir") or "", mounts) or str(run.directory)
        Path(cwd).mkdir(parents=True, exist_ok=True)
        termination.unlink(missing_ok=True)
        record = ContainerRun(name=name, log_path=log_path, termination_path=termination)
        with log_path.open("ab") as log:
            record.process = await asyncio.create_subprocess_exec(
                *self._in_pod(run, argv),
                env=env,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE_GROUPS.add(record.process.pid)
        record.started_at = now_rfc3339()
        run.containers[name] = record

    async def _wait_exit(self, container: ContainerRun) -> None:
        if container.simulated is not None:
            assert container.stop_signal is not None
            try:
                sig = await asyncio.wait_for(
                    asyncio.shield(container.stop_signal), container.simulated.seconds
                )
                container.exit_code = 128 + sig
            except TimeoutError:
                container.exit_code = container.simulated.exit_code
            container.finished_at = now_rfc3339()
            return
        assert container.process is not None
        code = await container.process.wait()
        _LIVE_GROUPS.discard(container.process.pid)
        # Reap the rest of the group so nothing outlives the container.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(container.process.pid, signal.SIGKILL)
        container.exit_code = (
            128 - code if code < 0 else code
        )  # signals as the runtime reports them
        container.finished_at = now_rfc3339()

    @staticmethod
    def _signal(container: ContainerRun, sig: signal.Signals) -> None:
        if container.exit_code is not None:
            return
        if container.stop_signal is not None:
            if not container.stop_signal.done():
                container.stop_signal.set_result(int(sig))
            return
        if container.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(container.process.pid, sig)

    async def _terminate(self, run: PodRun, pod: Obj) -> None:
        """Graceful stop: SIGTERM, wait the grace period, SIGKILL."""
        pod = self.pods.get(run.uid, pod)
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        for container in run.containers.values():
            await self._event(pod, "Normal", "Killing", f"Stopping container {container.name}")
            self._signal(container, signal.SIGTERM)
        waits = [self._wait_done(c) for c in run.containers.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout=max(float(grace), 0.0))
        except TimeoutError:
            for container in run.containers.values():
                self._signal(container, signal.SIGKILL)

    @staticmethod
    async def _wait_done(container: ContainerRun) -> None:
        if container.process is not None:
            await container.process.wait()
        while container.simulated is not None and container.exit_code is None:
            await asyncio.sleep(0.01)

    def _container_status(self, run: PodRun, container: Obj) -> Obj:
        record = run.containers.get(container["name"])
        status: Obj = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": f"harness://{container.get('image', '')}",
            "restartCount": record.restart_count if record else 0,
            "ready": False,
            "started": False,
            "state": {},
        }
        if record is not None and record.last_state is not None:
            status["lastState"] = {"terminated": record.last_state}
        # Explicit nulls: the status is a strategic merge patch, and a container
        # state has exactly one of running/waiting/terminated.
        if record is None:
            return {
                **status,
                "state": {
                    "waiting": {"reason": "ContainerCreating"},
                    "running": None,
                    "terminated": None,
                },
            }
        status["containerID"] = (
            f"harness://{run.uid[:8]}-{record.name}-{record.process.pid if record.process else 'sim'}"
        )
        if record.exit_code is None:
            return {
                **status,
                "ready": record.ready,
                "started": True,
                "state": {
                    "running": {"startedAt": record.started_at},
                    "waiting": None,
                    "terminated": None,
                },
            }
        code = record.exit_code
        reason = "OOMKilled" if record.oom_killed else ("Completed" if code == 0 else "Error")
        terminated: Obj = {
            "exitCode": code,
            "reason": reason,
            "startedAt": record.started_at,
            "finishedAt": record.finished_at,
            "containerID": status["containerID"],
        }
        message = self._termination_message(record, container, code)
        if message:
            terminated["message"] = message
        if record.back_off:
            waiting = {"reason": "CrashLoopBackOff", "message": record.back_off}
            return {
                **status,
                "lastState": {"terminated": terminated},
                "state": {"waiting": waiting, "running": None, "terminated": None},
            }
        return {**status, "state": {"terminated": terminated, "running": None, "waiting": None}}

    @staticmethod
    def _termination_message(record: ContainerRun, container: Obj, code: int) -> str:
        message = b""
        if record.termination_path is not None and record.termination_path.is_file():
            message = record.termination_path.read_bytes()[:TERMINATION_MESSAGE_LIMIT]
        if (
            not message
            and code != 0
            and container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            with contextlib.suppress(OSError):
                lines = record.log_path.read_bytes().splitlines()[-80:]
                message = b"\n".join(lines)[-2048:]
        return message.decode("utf-8", errors="replace")

    async def _finish_deletion(self, pod: Obj) -> None:
        """A terminating pod we never ran (or already finished): just remove it."""
        meta = pod["metadata"]
        await self._request(
            "DELETE",
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
            {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
        )

    def _forget(self, run: PodRun) -> None:
        self.runs.pop(run.uid, None)
        self._release_ip(run.ip)

    async def _complete_deletion(self, run: PodRun) -> None:
        self._forget(run)
        pod = self.pods.get(run.uid)
        if pod is not None and pod["metadata"].get("deletionTimestamp"):
            await self._finish_deletion(pod)

    # ---------------------------------------------------------- simulations
    def evict(self, namespace: str, name: str) -> None:
        """Evict a pod through the Eviction API (as `kubectl drain` does)."""

        async def evict() -> None:
            code, body = await self._request(
                "POST",
                f"/api/v1/namespaces/{namespace}/pods/{name}/eviction",
                {
                    "apiVersion": "policy/v1",
                    "kind": "Eviction",
                    "metadata": {"name": name, "namespace": namespace},
                },
            )
            if code != 201:
                raise RuntimeError(f"eviction of {namespace}/{name} failed: {code} {body}")

        self.run(evict())

    def lose_node(self, node: str, *, keep_processes: bool = False) -> None:
        """The node is lost: its kubelet stops renewing the Lease and posting status,
        and stops acting on the node's pods. What follows is the real control plane's
        doing: the node lifecycle controller marks it Unknown and taints it
        unreachable, the taint-eviction controller deletes its pods once their
        tolerations run out, and the pods stay Terminating (nobody confirms) until the
        Node is deleted or tainted out-of-service.

        The processes die with the node (a power loss) unless `keep_processes` (a
        network partition: the trainer runs on, unseen)."""

        async def lose() -> None:
            self._lost_nodes.add(node)
            if keep_processes:
                return
            for run in [r for r in self.runs.values() if r.node == node]:
                run.killed_for_node_loss = run.no_restart = True
                for container in run.containers.values():
                    self._signal(container, signal.SIGKILL)

        self.run(lose())

    def restore_node(self, node: str) -> None:
        """The node's kubelet comes back: heartbeats resume (the node lifecycle
        controller lifts the taints) and it acts on its pods again."""

        async def restore() -> None:
            self._lost_nodes.discard(node)
            self._ready_since.pop(node, None)
            await self._set_node_status(self.nodes[node])
            await self._renew_lease(self.nodes[node])
            await self._initial_list()

        self.run(restore())

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """Captured stdout+stderr of a pod's container (any pod this kubelet ran)."""
        matches = sorted(
            (self.workdir / "pods").glob(f"{namespace}_{name}_*"), key=lambda p: p.stat().st_mtime
        )
        if not matches:
            raise FileNotFoundError(f"no logs for pod {namespace}/{name}")
        logs = sorted(matches[-1].glob(f"{container or '*'}.log"))
        return "".join(p.read_text(errors="replace") for p in logs)

    def process_ids(self) -> list[int]:
        """PIDs of the container processes still running (tests assert cleanup)."""
        return [
            c.process.pid
            for r in list(self.runs.values())
            for c in r.containers.values()
            if c.process is not None and c.exit_code is None
        ]

    # ----------------------------------------------------------------- logs
    async def _serve_logs(self, request: web.Request) -> web.StreamResponse:
        namespace, pod, container = (
            request.match_info[k] for k in ("namespace", "pod", "container")
        )
        matches = sorted(
            (self.workdir / "pods").glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime
        )
        path = matches[-1] / f"{container}.log" if matches else None
        if path is None or not path.exists():
            return web.Response(
                status=404,
                text=f'container "{container}" in pod "{pod}" is waiting to start: ContainerCreating',
            )
        follow = request.query.get("follow") in ("true", "1")
        tail = request.query.get("tailLines")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        data = path.read_bytes()
        if tail:
            data = b"".join(data.splitlines(keepends=True)[-int(tail) :])
        await response.write(data)
        if follow:
            offset = path.stat().st_size
            uid = matches[-1].name.rsplit("_", 1)[-1]
            while True:
                running = any(
                    r.uid.startswith(uid) and not r.finished.is_set() for r in self.runs.values()
                )
                size = path.stat().st_size
                if size > offset:
                    with path.open("rb") as handle:
                        handle.seek(offset)
                        await response.write(handle.read(size - offset))
                    offset = size
                if not running:
                    break
                await asyncio.sleep(0.2)
        return response


def _ip(*args: str) -> None:
    """Run iproute2's `ip` (pod addresses on lo); raises with its message."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion; $$ escapes."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)


def _conditions(*, ready: bool, initialized: bool, reason: str = "") -> list[Obj]:
    now = now_rfc3339()
    state = "True" if ready else "False"
    extra = {"reason": reason} if reason and not ready else {}
    return [
        {
            "type": "PodReadyToStartContainers",
            "status": "True",
            "lastTransitionTime": now,
            "lastProbeTime": None,
        },
        {
            "type": "Initialized",
            "status": "True" if initialized else "False",
            "lastTransitionTime": now,
            "lastProbeTime": None,
        },
        {
            "type": "Ready",
            "status": state,
            "lastTransitionTime": now,
            "lastProbeTime": None,
            **extra,
        },
        {
            "type": "ContainersReady",
            "status": state,
            "lastTransitionTime": now,
            "lastProbeTime": None,
            **extra,
        },
        {
            "type": "PodScheduled",
            "status": "True",
            "lastTransitionTime": now,
            "lastProbeTime": None,
        },
    ]


def _waiting_status(container: Obj, reason: str, message: str) -> Obj:
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": False,
        "started": False,
        "restartCount": 0,
        "state": {
            "waiting": {"reason": reason, "message": message},
            "running": None,
            "terminated": None,
        },
    }
