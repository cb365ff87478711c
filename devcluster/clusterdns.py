"""Cluster DNS: the real CoreDNS (built by `devcluster.binaries`) serving
`cluster.local` from the API server, and the resolv.conf a kubelet gives its pods.

    with Cluster(workdir) as cluster, start_cluster_dns(cluster, workdir / "dns") as dns:
        kubelet = Kubelet(..., cluster_dns=dns.ip)   # pods resolve <svc>.<ns>.svc

CoreDNS runs as a cluster's kube-dns does: with the ServiceAccount and ClusterRole of
CoreDNS's own Kubernetes deployment (coredns/deployment, `system:coredns`: list and
watch Services, EndpointSlices, Pods and Namespaces) and the kubernetes plugin for
`cluster.local`. Its address stands for the kube-dns Service's ClusterIP: a
127.B.0.10 in a loopback /16 block this process claims machine-wide (as the kubelet
claims one for its pod IPs), so clusters running at once never share it. It listens
on port 53, because resolv.conf has no port field; binding port 53 needs root.

Only names under cluster.local are answered (there is no `forward` to an upstream);
a pod's other lookups fail, which on this machine (no outside network) they would
anyway. Names in /etc/hosts (localhost, the host name) still resolve: glibc reads
files before DNS.

Pods get the DNS through the kubelet: `pod_resolv_conf` is what a kubelet started
with `--cluster-dns`/`--cluster-domain` writes for a pod, and `in_pod_mounts` runs a
container's command in a private mount namespace with that file bind-mounted over
/etc/resolv.conf, the process keeping its pid (`unshare` and `sh` exec).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from devcluster import binaries
from devcluster.cluster import Cluster, http_ok
from devcluster.process import Process, claim_loopback_block, free_port, log_tail, wait_for

__all__ = [
    "CLUSTER_DOMAIN",
    "ClusterDns",
    "in_pod_mounts",
    "pod_resolv_conf",
    "start_cluster_dns",
]

Obj = dict[str, Any]
CLUSTER_DOMAIN = "cluster.local"
NAMESPACE = "kube-system"
ACCOUNT = "coredns"
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
# What the kubelet writes for ClusterFirst pods (pkg/kubelet/network/dns): ndots 5,
# so that a name with fewer than five dots is tried with each search domain first.
CLUSTER_OPTIONS = ("ndots:5",)
MAX_NAMESERVERS = 3  # glibc's MAXNS; the kubelet keeps the first three
MAX_SEARCHES = 32  # the kubelet's limit (MaxDNSSearchPaths)


def rbac_documents() -> list[Obj]:
    """CoreDNS's identity as coredns/deployment's kubernetes manifest grants it."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": ACCOUNT, "namespace": NAMESPACE},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE}],
        },
    ]


def corefile(ip: str, ready_port: int, kubeconfig: Path, domain: str = CLUSTER_DOMAIN) -> str:
    """The server block: kube-dns's default Corefile, less what needs an outside
    world (forward, cache of upstream answers) or a metrics scraper."""
    return (
        f"{domain}:53 {{\n"
        f"    bind {ip}\n"
        "    errors\n"
        "    log\n"
        f"    ready 127.0.0.1:{ready_port}\n"
        f"    kubernetes {domain} {{\n"
        f"        kubeconfig {kubeconfig}\n"
        "        pods insecure\n"
        "    }\n"
        "}\n"
    )


class ClusterDns:
    """The CoreDNS process; `ip` is the address pods' resolv.conf names."""

    def __init__(self, cluster: Cluster, workdir: Path, *, domain: str = CLUSTER_DOMAIN) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.domain = domain
        self.ip = ""
        self.ready_port = 0
        self.log = workdir / "coredns.log"
        self._process: Process | None = None
        self._block: IO[str] | None = None

    def start(self) -> ClusterDns:
        if os.geteuid() != 0:
            raise PermissionError(
                "cluster DNS listens on port 53 (resolv.conf cannot name another port) and "
                "gives pods their own /etc/resolv.conf through a mount namespace; both need "
                "root. Run as root, or use ControlPlane(dns=False) (pods then use the host's "
                "resolver)"
            )
        binary = binaries.require(binaries.COREDNS)
        self.workdir.mkdir(parents=True, exist_ok=True)
        block, self._block = claim_loopback_block()
        try:
            self.ip = f"127.{block}.0.10"
            self.cluster.apply(rbac_documents())
            kubeconfig = self.cluster.service_account_kubeconfig(
                NAMESPACE, ACCOUNT, self.workdir / "coredns.kubeconfig"
            )
            self.ready_port = free_port()
            conf = self.workdir / "Corefile"
            conf.write_text(corefile(self.ip, self.ready_port, kubeconfig, self.domain))
            self._process = Process("coredns", [str(binary), "-conf", str(conf)], self.log)
            self._process.start()
            wait_for(
                self._ready,
                timeout=60,
                interval=0.1,
                message=lambda: f"CoreDNS /ready\n{log_tail(self.log)}",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        """The ready plugin answers 200 once every plugin (the kubernetes plugin's
        informers) has synced."""
        assert self._process is not None
        self._process.check_running()
        return http_ok(f"http://127.0.0.1:{self.ready_port}/ready")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop()
        if self._block is not None:
            self._block.close()  # releases the claim on the address block
            self._block = None

    def __enter__(self) -> ClusterDns:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_cluster_dns(cluster: Cluster, workdir: Path, **options: Any) -> ClusterDns:
    """Start CoreDNS for the running `cluster`; use it as a context manager to stop it."""
    return ClusterDns(cluster, workdir, **options).start()


# ------------------------------------------------------------- pod side
def _parse_resolv_conf(text: str) -> tuple[list[str], list[str], list[str]]:
    nameservers: list[str] = []
    searches: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if fields[0] == "nameserver" and len(fields) > 1:
            nameservers.append(fields[1])
        elif fields[0] in ("search", "domain"):
            searches = fields[1:]  # the last search/domain line wins, as in glibc
        elif fields[0] == "options":
            options.extend(fields[1:])
    return nameservers, searches, options


def _merge_options(base: Sequence[str], extra: Sequence[Obj]) -> list[str]:
    """dnsConfig.options override options of the same name (the kubelet's rule)."""
    merged: dict[str, str] = {}
    for text in base:
        merged[text.partition(":")[0]] = text
    for option in extra:
        name = str(option.get("name") or "")
        if name:
            value = option.get("value")
            merged[name] = f"{name}:{value}" if value is not None else name
    return list(merged.values())


def pod_resolv_conf(
    pod: Obj,
    cluster_dns: str,
    domain: str = CLUSTER_DOMAIN,
    host_resolv_conf: str | None = None,
) -> str | None:
    """The /etc/resolv.conf a kubelet with `--cluster-dns=<cluster_dns>
    --cluster-domain=<domain>` gives `pod` (pkg/kubelet/network/dns), or None when
    the pod simply uses the host's file.

    dnsPolicy ClusterFirst (the default) uses the cluster DNS and searches
    `<ns>.svc.<domain> svc.<domain> <domain>` with ndots:5, except with hostNetwork,
    where it falls back to Default; ClusterFirstWithHostNet always uses the cluster
    DNS; Default is the host's file; None is only what `spec.dnsConfig` says.
    `spec.dnsConfig` (nameservers, searches, options) is merged into any of them.
    """
    spec = pod.get("spec") or {}
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    config = spec.get("dnsConfig") or {}
    cluster_first = policy == "ClusterFirstWithHostNet" or (
        policy == "ClusterFirst" and not spec.get("hostNetwork")
    )
    if cluster_first:
        namespace = pod["metadata"].get("namespace") or "default"
        nameservers = [cluster_dns]
        searches = [f"{namespace}.svc.{domain}", f"svc.{domain}", domain]
        options: list[str] = list(CLUSTER_OPTIONS)
    elif policy == "None":
        nameservers, searches, options = [], [], []
    else:
        if not config:
            return None
        text = host_resolv_conf if host_resolv_conf is not None else HOST_RESOLV_CONF.read_text()
        nameservers, searches, options = _parse_resolv_conf(text)
    nameservers = [*nameservers, *(config.get("nameservers") or [])][:MAX_NAMESERVERS]
    searches = list(dict.fromkeys([*searches, *(config.get("searches") or [])]))[:MAX_SEARCHES]
    options = _merge_options(options, config.get("options") or [])
    lines = [f"nameserver {server}" for server in nameservers]
    if searches:
        lines.append("search " + " ".join(searches))
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def in_pod_mounts(argv: Sequence[str], resolv_conf: Path) -> list[str]:
    """`argv` run in a private mount namespace in which `resolv_conf` is
    /etc/resolv.conf, as a container runtime mounts the kubelet's file into the
    container. unshare and sh each exec the next program, so the pid the caller gets
    is the command's own (signals, process groups and the exit code are its); the
    bind mount never reaches the host (propagation private)."""
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        str(resolv_conf),
        *argv,
    ]
