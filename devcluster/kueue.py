"""The real Kueue manager (v0.17, built by `devcluster.binaries`) against a running
`devcluster.cluster.Cluster`.

    with Cluster(workdir) as cluster, start_kueue(cluster, workdir / "kueue") as kueue:
        kueue.apply([resource_flavor("default"),
                     cluster_queue("cq", {"default": {"cpu": 2}}),
                     local_queue("default", "lq", "cq")])
        # pods labelled kueue.x-k8s.io/queue-name=lq in `default` now queue in "cq"

Installation follows Kueue's own manifests: `kubectl kustomize <module>/config/default`
renders them from the module's source in Go's module cache, and everything is applied
except the controller Deployment (nothing here runs images) and the visibility
APIService (an aggregated API nothing can route to would break discovery).

Webhooks are reached the way controller-runtime's envtest reaches them: the API server
cannot route to a Service here, so every `clientConfig.service` (admission webhooks
and the CRDs' conversion webhooks) becomes `clientConfig.url:
https://127.0.0.1:<port><path>` with the cluster CA as `caBundle`, and the manager
serves a certificate for 127.0.0.1 issued by that CA. Kueue's internal certificate
management is off so that it does not replace either.

The manager runs as the cluster admin with the Configuration from the rendered
ConfigMap, edited for a loopback process: webhook, health and metrics on 127.0.0.1
(metrics off), no leader election, the `pod` integration on, Kueue managing every
namespace but kube-system and kueue-system, waitForPodsReady off, the visibility
server off.

One wart: with internal certificate management off, Kueue reads a metrics serving
certificate from the fixed path /etc/kueue/metrics/certs (cmd/kueue/main.go) and exits
without it, even with metrics off. `ensure_metrics_cert` writes one there once.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import copy
import fcntl
import functools
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import yaml

from devcluster import binaries
from devcluster.cluster import ApiStatusError, Cluster
from devcluster.pki import CertificateAuthority
from devcluster.process import Process, free_port, log_tail, wait_for
from devcluster.tools import REPO_ROOT, kubectl

__all__ = [
    "ADMISSION_GATE",
    "API_VERSION",
    "MANAGED_LABEL",
    "NAMESPACE",
    "POD_FINALIZER",
    "PRIORITY_CLASS_LABEL",
    "QUEUE_LABEL",
    "TERMINATION_TARGET",
    "TOPOLOGY_GATE",
    "KueueProcess",
    "cluster_queue",
    "condition",
    "configure",
    "example_documents",
    "install_documents",
    "is_admitted",
    "local_queue",
    "priority_class",
    "render_manifests",
    "resource_flavor",
    "server_side_apply",
    "start_kueue",
    "wait_queues_active",
    "workload_for_pod",
    "workload_priority_class",
    "workloads",
]

Obj = dict[str, Any]

NAMESPACE = "kueue-system"
GROUP = "kueue.x-k8s.io"
API_VERSION = f"{GROUP}/v1beta2"  # v1beta2 is served and stored; v1beta1 is served, converted
# Labels, gates and conditions of the plain-Pod integration (pkg/controller/jobs/pod).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # makes a pod in a managed namespace Kueue's
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"  # a WorkloadPriorityClass
MANAGED_LABEL = "kueue.x-k8s.io/managed"  # set to "true" by the webhook on managed pods
POD_FINALIZER = "kueue.x-k8s.io/managed"  # likewise; removed once the pod finishes or goes
ADMISSION_GATE = "kueue.x-k8s.io/admission"  # removed when the Workload is admitted
TOPOLOGY_GATE = "kueue.x-k8s.io/topology"  # TAS (on by default); removed at admission too
POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
POD_GROUP_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
TERMINATION_TARGET = "TerminationTarget"  # the pod condition Kueue sets before deleting

METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
_EXCLUDED_KINDS = frozenset({"Deployment", "APIService"})
_WEBHOOK_KINDS = frozenset({"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"})
_CONFIG_MAP = "kueue-manager-config"
_CONFIG_KEY = "controller_manager_config.yaml"
_START_TIMEOUT = 120.0
_FIELD_MANAGER = "devcluster-kueue"
_SYSTEM_NAMESPACES = ("kube-system", NAMESPACE)


class KueueStartError(RuntimeError):
    """Kueue could not be installed or did not become ready."""


# ------------------------------------------------------------------ manifests
def _kustomize(source: str) -> str:
    result = subprocess.run(
        [str(kubectl()), "kustomize", f"{source}/config/default"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise KueueStartError(f"kubectl kustomize {source}/config/default:\n{result.stderr}")
    # 1.7 MB of YAML: libyaml parses it in half a second, pure Python in five.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    documents = [d for d in yaml.load_all(result.stdout, Loader=loader) if isinstance(d, dict)]
    return json.dumps(documents)


@functools.cache
def _rendered(source: str) -> str:
    """The rendering as JSON, kept beside the Kueue binary (the module's source in
    Go's module cache never changes for a version) so each process renders once."""
    cache = binaries.KUEUE.path.parent / "manifests.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        if cached["source"] == source:
            return json.dumps(cached["documents"])
    text = _kustomize(source)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".manifests.")
        with os.fdopen(fd, "w") as out:
            out.write(f'{{"source": {json.dumps(source)}, "documents": {text}}}')
        os.chmod(tmp, 0o644)
        os.replace(tmp, cache)
    return text


def _object_path(document: Obj) -> str:
    """The API path of one object of the kinds Kueue's manifests hold (their plurals
    are all kind + "s")."""
    api_version = document["apiVersion"]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    meta = document["metadata"]
    plural = f"{document['kind'].lower()}s"
    if meta.get("namespace"):
        return f"{prefix}/namespaces/{meta['namespace']}/{plural}/{quote(meta['name'])}"
    return f"{prefix}/{plural}/{quote(meta['name'])}"


def server_side_apply(
    cluster: Cluster, documents: Iterable[Obj], field_manager: str, workers: int = 8
) -> None:
    """Server-side apply (what `kubectl apply --server-side --force-conflicts` does),
    straight to the API and in parallel: Namespaces first, then everything else.
    Kueue's ~80 objects and 1.7 MB of CRDs through kubectl take seconds longer."""
    query = f"?fieldManager={quote(field_manager)}&force=true"

    def apply(document: Obj) -> None:
        cluster.request(
            "PATCH",
            _object_path(document) + query,
            json.dumps(document).encode(),
            content_type="application/apply-patch+yaml",
            timeout=60,
        )

    docs = list(documents)
    for namespace in [d for d in docs if d["kind"] == "Namespace"]:
        apply(namespace)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(apply, [d for d in docs if d["kind"] != "Namespace"]):
            pass


def render_manifests(source: Path | None = None) -> list[Obj]:
    """Kueue's installation manifests, rendered from the module's kustomize bases
    (`kubectl kustomize <source>/config/default`; cached, each call returns copies)."""
    directory = source if source is not None else binaries.kueue_source()
    documents: list[Obj] = json.loads(_rendered(str(directory)))
    return documents


def _point_at(client_config: Obj, base_url: str, ca_bundle: str) -> None:
    service = client_config.pop("service", None)
    if service is None:
        return
    path = str(service.get("path") or "/")
    client_config["url"] = base_url + (path if path.startswith("/") else f"/{path}")
    client_config["caBundle"] = ca_bundle


def install_documents(
    manifests: Iterable[Obj], webhook_url: str, ca_pem: bytes
) -> tuple[list[Obj], list[Obj]]:
    """Kueue's manifests, made to work without Services (pure): returns (everything to
    apply before the manager starts, the webhook configurations to apply once it
    serves). Webhook clientConfigs point at `webhook_url` with `ca_pem` as caBundle;
    the Deployment and APIServices are dropped."""
    ca_bundle = base64.b64encode(ca_pem).decode()
    base = webhook_url.rstrip("/")
    before: list[Obj] = []
    webhooks: list[Obj] = []
    for original in manifests:
        document = copy.deepcopy(original)
        kind = document.get("kind")
        if kind in _EXCLUDED_KINDS:
            continue
        if kind in _WEBHOOK_KINDS:
            for hook in document.get("webhooks") or []:
                _point_at(hook.setdefault("clientConfig", {}), base, ca_bundle)
            webhooks.append(document)
            continue
        if kind == "CustomResourceDefinition":
            conversion = (document.get("spec") or {}).get("conversion") or {}
            if conversion.get("strategy") == "Webhook":
                _point_at(conversion["webhook"].setdefault("clientConfig", {}), base, ca_bundle)
        before.append(document)
    return before, webhooks


def manager_configuration(manifests: Iterable[Obj]) -> Obj:
    """Kueue's Configuration from the rendered `kueue-manager-config` ConfigMap."""
    for document in manifests:
        if document.get("kind") == "ConfigMap" and document["metadata"]["name"] == _CONFIG_MAP:
            config: Obj = yaml.safe_load(document["data"][_CONFIG_KEY])
            return config
    raise KueueStartError(f"no ConfigMap {_CONFIG_MAP} in Kueue's manifests")


def configure(
    config: Mapping[str, Any],
    *,
    webhook_port: int,
    cert_dir: Path,
    health_port: int,
    frameworks: Sequence[str] = ("batch/job", "pod"),
    managed_namespaces: Sequence[str] | None = None,
    feature_gates: Mapping[str, bool] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Obj:
    """The Configuration edited for a loopback manager (pure). `managed_namespaces`:
    the namespaces whose pods Kueue manages (None: all but kube-system and
    kueue-system, Kueue's default)."""
    edited: Obj = copy.deepcopy(dict(config))
    edited["namespace"] = NAMESPACE
    edited["webhook"] = {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)}
    edited["health"] = {"healthProbeBindAddress": f"127.0.0.1:{health_port}"}
    edited["metrics"] = {"bindAddress": "0"}
    edited["leaderElection"] = {"leaderElect": False}
    edited["internalCertManagement"] = {"enable": False}
    edited.pop("waitForPodsReady", None)
    edited.pop("pprofBindAddress", None)
    edited["integrations"] = {
        **(edited.get("integrations") or {}),
        "frameworks": list(frameworks),
    }
    if managed_namespaces is None:
        requirement = {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": list(_SYSTEM_NAMESPACES),
        }
    else:
        requirement = {
            "key": "kubernetes.io/metadata.name",
            "operator": "In",
            "values": list(managed_namespaces),
        }
    edited["managedJobsNamespaceSelector"] = {"matchExpressions": [requirement]}
    # The visibility API would need an APIService the API server can route to.
    edited["featureGates"] = {"VisibilityOnDemand": False, **(feature_gates or {})}
    edited.update(extra or {})
    return edited


def ensure_metrics_cert(ca: CertificateAuthority, directory: Path = METRICS_CERT_DIR) -> None:
    """Kueue with internal cert management off loads <directory>/tls.{crt,key} at start
    (even with metrics off) and exits without them: write a pair once (under a lock,
    so parallel test processes never leave a mismatched pair)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            crt, key = directory / "tls.crt", directory / "tls.key"
            if crt.is_file() and key.is_file():
                with contextlib.suppress(ssl.SSLError, OSError):
                    ssl.create_default_context().load_cert_chain(crt, key)
                    return
            issued = ca.serving("kueue-metrics", ("127.0.0.1", "localhost"))
            for source, target in ((issued.key, key), (issued.cert, crt)):
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.")
                with os.fdopen(fd, "wb") as out:
                    out.write(source.read_bytes())
                os.chmod(tmp, 0o600 if target is key else 0o644)
                os.replace(tmp, target)
    except PermissionError as exc:
        raise KueueStartError(
            f"Kueue (internal cert management off) needs a metrics certificate at "
            f"{directory}/tls.crt and tls.key and this user cannot write there: {exc}"
        ) from exc


# ----------------------------------------------------------------- the manager
class KueueProcess:
    """Kueue installed into `cluster` and its manager running as a local process.

    `start()` installs (idempotent: server-side apply), starts the manager and returns
    once its readiness endpoint answers and the API server calls its webhooks;
    `stop()` stops it and removes the webhook configurations (pods in managed
    namespaces could not be created with a failing webhook); `restart()` keeps them.
    """

    def __init__(
        self,
        cluster: Cluster,
        workdir: Path,
        *,
        frameworks: Sequence[str] = ("batch/job", "pod"),
        managed_namespaces: Sequence[str] | None = None,
        feature_gates: Mapping[str, bool] | None = None,
        config_extra: Mapping[str, Any] | None = None,
        log_level: int = 2,
    ) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.frameworks = list(frameworks)
        self.managed_namespaces = list(managed_namespaces) if managed_namespaces else None
        self.feature_gates = dict(feature_gates or {})
        self.config_extra = dict(config_extra or {})
        self.log_level = log_level
        self.log = workdir / "kueue.log"
        self.config_path = workdir / "kueue-config.yaml"
        self.cert_dir = workdir / "certs"
        self.webhook_port = 0
        self.health_port = 0
        self.process: Process | None = None
        self.webhook_configurations: list[Obj] = []
        self.crd_names: list[str] = []
        self.started_seconds = 0.0
        # Seconds per start-up phase: install (render + apply + CRDs Established),
        # manager (process start to /readyz), webhooks (until the API server calls them).
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------- lifecycle
    def start(self) -> KueueProcess:
        started = mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.timings[name] = round(now - mark, 2)
            mark = now

        try:
            if not self.webhook_configurations:
                self._install()
                phase("install")
            self._start_manager()
            self._wait_ready()
            phase("manager")
            server_side_apply(self.cluster, self.webhook_configurations, _FIELD_MANAGER)
            self._wait_webhooks()
            phase("webhooks")
        except BaseException:
            self.stop()
            raise
        self.started_seconds = time.monotonic() - started
        return self

    def stop(self, *, remove_webhooks: bool = True) -> int | None:
        """Stop the manager; its exit code (None if it was not running)."""
        process, self.process = self.process, None
        code = process.stop() if process is not None else None
        if remove_webhooks:
            for document in self.webhook_configurations:
                kind = document["kind"]
                path = (
                    "/apis/admissionregistration.k8s.io/v1/"
                    f"{kind.lower()}s/{document['metadata']['name']}"
                )
                with contextlib.suppress(ApiStatusError, OSError):
                    self.cluster.request("DELETE", path)
        return code

    def restart(self) -> None:
        """Stop and start the manager (same ports, certificates and configuration)."""
        self.stop(remove_webhooks=False)
        self._start_manager()
        self._wait_ready()
        self._wait_webhooks()

    def kill(self) -> None:
        """SIGKILL the manager (a crash); the webhook configurations stay."""
        if self.process is not None:
            self.process.kill()
            self.process = None

    def __enter__(self) -> KueueProcess:
        return self if self.process is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log, lines)

    # --------------------------------------------------------------- start-up
    def _install(self) -> None:
        ca = self.cluster.ca
        if ca is None:
            raise KueueStartError("the cluster is not started (no CA)")
        binaries.require(binaries.KUEUE)
        self.workdir.mkdir(parents=True, exist_ok=True)
        manifests = render_manifests()
        self.webhook_port, self.health_port = free_port(), free_port()

        serving = ca.serving("kueue-webhook", ("127.0.0.1", "localhost"))
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(serving.cert, self.cert_dir / "tls.crt")
        shutil.copyfile(serving.key, self.cert_dir / "tls.key")
        ensure_metrics_cert(ca)

        before, self.webhook_configurations = install_documents(
            manifests, f"https://127.0.0.1:{self.webhook_port}", ca.pem
        )
        config = configure(
            manager_configuration(manifests),
            webhook_port=self.webhook_port,
            cert_dir=self.cert_dir,
            health_port=self.health_port,
            frameworks=self.frameworks,
            managed_namespaces=self.managed_namespaces,
            feature_gates=self.feature_gates,
            extra=self.config_extra,
        )
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        server_side_apply(self.cluster, before, _FIELD_MANAGER)
        self.crd_names = [
            d["metadata"]["name"] for d in before if d["kind"] == "CustomResourceDefinition"
        ]
        for name in self.crd_names:
            self.cluster.wait_established(name)

    def argv(self) -> list[str]:
        return [
            str(binaries.require(binaries.KUEUE)),
            f"--config={self.config_path}",
            f"--kubeconfig={self.cluster.kubeconfig}",
            f"--zap-log-level={self.log_level}",
            "--zap-encoder=console",
        ]

    def _start_manager(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        self.process = Process("kueue", self.argv(), self.log, env=env, cwd=self.workdir).start()

    def _check(self) -> None:
        if self.process is None:
            raise KueueStartError("the Kueue manager is not running")
        self.process.check_running()

    def _wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        url = f"http://127.0.0.1:{self.health_port}/readyz"

        def ready() -> bool:
            self._check()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_for(
            ready,
            timeout=timeout,
            interval=0.1,
            message=lambda: f"Kueue's /readyz\n--- {self.log} ---\n{self.log_tail()}",
        )

    def _wait_webhooks(self, timeout: float = 60) -> None:
        """Until the API server calls the pod webhook: a dry-run pod with the queue
        label comes back gated (the configuration takes a moment to be picked up)."""
        namespace = self._probe_namespace()
        if namespace is None:
            return
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"generateName": "kueue-probe-", "labels": {QUEUE_LABEL: "probe"}},
            "spec": {"containers": [{"name": "probe", "image": "probe"}]},
        }
        path = f"/api/v1/namespaces/{namespace}/pods?dryRun=All"

        def gated() -> bool:
            self._check()
            pod = self.cluster.request("POST", path, body)
            gates = (pod.get("spec") or {}).get("schedulingGates") or []
            return any(g.get("name") == ADMISSION_GATE for g in gates)

        wait_for(
            gated,
            timeout=timeout,
            interval=0.2,
            message=lambda: f"Kueue's pod webhook\n--- {self.log} ---\n{self.log_tail()}",
        )

    def _probe_namespace(self) -> str | None:
        if self.managed_namespaces is None:
            return "default"
        for namespace in self.managed_namespaces:
            if self.cluster.get_path(f"/api/v1/namespaces/{namespace}") is not None:
                return namespace
        return None

    # ---------------------------------------------------------------- queues
    def apply(self, documents: Iterable[Obj], timeout: float = 60) -> None:
        """Apply queue setup (ResourceFlavors, ClusterQueues, LocalQueues,
        WorkloadPriorityClasses, ...) and wait until the queues among them are Active."""
        docs = list(documents)
        self.cluster.apply(docs)
        wait_queues_active(self.cluster, docs, timeout=timeout)


def start_kueue(cluster: Cluster, workdir: Path, **options: Any) -> KueueProcess:
    """Install Kueue into the running `cluster` and start its manager (see
    KueueProcess); use it as a context manager to stop it."""
    return KueueProcess(cluster, workdir, **options).start()


# ------------------------------------------------------------ queue objects
def resource_flavor(name: str, node_labels: Mapping[str, str] | None = None) -> Obj:
    spec: Obj = {"nodeLabels": dict(node_labels)} if node_labels else {}
    return {
        "apiVersion": API_VERSION,
        "kind": "ResourceFlavor",
        "metadata": {"name": name},
        "spec": spec,
    }


def cluster_queue(
    name: str,
    quotas: Mapping[str, Mapping[str, str | int]],
    *,
    cohort: str | None = None,
    namespace_selector: Mapping[str, Any] | None = None,
    within_cluster_queue: str = "LowerPriority",
    reclaim_within_cohort: str = "Any",
) -> Obj:
    """A ClusterQueue with one resource group: `quotas` maps each flavor (in order of
    preference) to its nominal quota per resource. Every namespace may use it unless
    `namespace_selector` says otherwise; lower-priority workloads are preempted."""
    resources = sorted({r for quota in quotas.values() for r in quota})
    spec: Obj = {
        "namespaceSelector": dict(namespace_selector or {}),
        "preemption": {
            "withinClusterQueue": within_cluster_queue,
            "reclaimWithinCohort": reclaim_within_cohort,
        },
        "resourceGroups": [
            {
                "coveredResources": resources,
                "flavors": [
                    {
                        "name": flavor,
                        "resources": [
                            {"name": r, "nominalQuota": quota.get(r, 0)} for r in resources
                        ],
                    }
                    for flavor, quota in quotas.items()
                ],
            }
        ],
    }
    if cohort:
        spec["cohortName"] = cohort
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": spec,
    }


def local_queue(namespace: str, name: str, cluster_queue_name: str) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue_name},
    }


def workload_priority_class(name: str, value: int, description: str = "") -> Obj:
    """Kueue's own priority (label kueue.x-k8s.io/priority-class on the pod): it orders
    and preempts Workloads without touching the pod's scheduling priority."""
    return {
        "apiVersion": API_VERSION,
        "kind": "WorkloadPriorityClass",
        "metadata": {"name": name},
        "value": value,
        "description": description,
    }


def priority_class(name: str, value: int) -> Obj:
    """A Kubernetes PriorityClass: Kueue takes a Workload's priority from the pod's
    priorityClassName when the pod has no kueue.x-k8s.io/priority-class label."""
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": name},
        "value": value,
        "preemptionPolicy": "PreemptLowerPriority",
    }


def example_documents(directory: Path = REPO_ROOT / "examples" / "kueue") -> list[Obj]:
    """The Kueue objects of examples/kueue (not the LoRAJobs or ResourceQuotas)."""
    documents: list[Obj] = []
    for path in sorted(directory.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and str(document.get("apiVersion", "")).startswith(
                f"{GROUP}/"
            ):
                documents.append(document)
    return documents


# ------------------------------------------------------------------ reading
def condition(obj: Mapping[str, Any], type_: str) -> Obj | None:
    for found in (obj.get("status") or {}).get("conditions") or []:
        if found.get("type") == type_:
            return dict(found)
    return None


def _is_true(obj: Mapping[str, Any], type_: str) -> bool:
    found = condition(obj, type_)
    return found is not None and found.get("status") == "True"


def is_admitted(workload: Mapping[str, Any]) -> bool:
    return _is_true(workload, "Admitted")


def _path(kind: str, name: str, namespace: str | None = None) -> str:
    plural = f"{kind.lower()}s"
    if namespace:
        return f"/apis/{API_VERSION}/namespaces/{namespace}/{plural}/{name}"
    return f"/apis/{API_VERSION}/{plural}/{name}"


def wait_queues_active(cluster: Cluster, documents: Iterable[Obj], timeout: float = 60) -> None:
    """Until every ClusterQueue and LocalQueue among `documents` is Active (Kueue has
    them in its cache and their flavors exist)."""
    queues = [
        (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
        for d in documents
        if d.get("kind") in ("ClusterQueue", "LocalQueue")
    ]

    def active() -> bool:
        return all(
            _is_true(cluster.get_path(_path(kind, name, namespace)) or {}, "Active")
            for kind, name, namespace in queues
        )

    def describe() -> str:
        states = []
        for kind, name, namespace in queues:
            found = condition(cluster.get_path(_path(kind, name, namespace)) or {}, "Active")
            states.append(f"{kind} {namespace + '/' if namespace else ''}{name}: {found}")
        return "queues Active:\n" + "\n".join(states)

    wait_for(active, timeout=timeout, interval=0.2, message=describe)


def workloads(cluster: Cluster, namespace: str) -> list[Obj]:
    listing = cluster.request("GET", f"/apis/{API_VERSION}/namespaces/{namespace}/workloads")
    return list(listing.get("items") or [])


def workload_for_pod(cluster: Cluster, namespace: str, pod_uid: str) -> Obj | None:
    """The Workload Kueue made for a plain pod (it owns the pod's Workload)."""
    for workload in workloads(cluster, namespace):
        owners = (workload.get("metadata") or {}).get("ownerReferences") or []
        if any(o.get("kind") == "Pod" and o.get("uid") == pod_uid for o in owners):
            return workload
    return None
