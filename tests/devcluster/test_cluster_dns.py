"""Cluster DNS: real CoreDNS serving cluster.local from the API server, and the
kubelet's per-pod resolv.conf (devcluster/clusterdns.py).

The cluster test pins what multi-node training relies on: a pod resolves
`<service>.<namespace>.svc` of a headless Service to the IP of the pod behind it,
while the pod's process keeps its own pid and process group (the kubelet signals
and kills by them) and the host's /etc/resolv.conf is untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.clusterdns import in_pod_mounts, pod_resolv_conf
from devcluster.controlplane import ControlPlane
from devcluster.kubelet import cpu_node

HOST_RESOLV = "nameserver 10.0.0.2\nsearch corp.example\noptions timeout:2 ndots:1\n"


def _pod(namespace: str = "team-a", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": namespace}, "spec": spec}


def test_cluster_first_pods_search_their_namespace_first() -> None:
    assert pod_resolv_conf(_pod(), "127.9.0.10") == (
        "nameserver 127.9.0.10\n"
        "search team-a.svc.cluster.local svc.cluster.local cluster.local\n"
        "options ndots:5\n"
    )


def test_host_network_and_default_policies_keep_the_hosts_file() -> None:
    assert pod_resolv_conf(_pod(hostNetwork=True), "127.9.0.10") is None
    assert pod_resolv_conf(_pod(dnsPolicy="Default"), "127.9.0.10") is None
    with_host_net = pod_resolv_conf(
        _pod(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet"), "127.9.0.10"
    )
    assert with_host_net is not None
    assert with_host_net.startswith("nameserver 127.9.0.10\n")


def test_dns_config_is_merged_as_the_kubelet_merges_it() -> None:
    config = {
        "nameservers": ["10.1.1.1"],
        "searches": ["extra.example", "svc.cluster.local"],
        "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}],
    }
    assert pod_resolv_conf(_pod(dnsConfig=config), "127.9.0.10") == (
        "nameserver 127.9.0.10\nnameserver 10.1.1.1\n"
        "search team-a.svc.cluster.local svc.cluster.local cluster.local extra.example\n"
        "options ndots:2 edns0\n"
    )
    assert pod_resolv_conf(
        _pod(dnsPolicy="Default", dnsConfig=config), "127.9.0.10", host_resolv_conf=HOST_RESOLV
    ) == (
        "nameserver 10.0.0.2\nnameserver 10.1.1.1\n"
        "search corp.example extra.example svc.cluster.local\n"
        "options timeout:2 ndots:2 edns0\n"
    )
    assert pod_resolv_conf(_pod(dnsPolicy="None", dnsConfig=config), "127.9.0.10") == (
        "nameserver 10.1.1.1\nsearch extra.example svc.cluster.local\noptions ndots:2 edns0\n"
    )


def test_the_wrapper_execs_the_command_itself(tmp_path: Path) -> None:
    argv = in_pod_mounts(["python", "-c", "print(1)"], tmp_path / "resolv.conf")
    # unshare runs sh in place (no --fork) and sh execs the command: one pid.
    assert argv[0] == "unshare"
    assert "--fork" not in argv
    assert argv[-3:] == ["python", "-c", "print(1)"]
    assert 'exec "$@"' in argv[argv.index("-c") + 1]


# ------------------------------------------------------------ on a cluster
@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    if os.geteuid() != 0:
        pytest.skip("cluster DNS binds port 53 and mounts a resolv.conf: needs root")
    with ControlPlane(tmp_path_factory.mktemp("dns"), nodes=(cpu_node(),), dns=True) as cp:
        yield cp


def _container_pod(name: str, script: str, labels: dict[str, str] | None = None) -> str:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {"name": "main", "image": "python:3.11", "command": ["python", "-c", script]}
            ],
        },
    }
    return json.dumps(pod)


LOOKUP = """
import json, os, socket
resolved = sorted({a[4][0] for a in socket.getaddrinfo("rank0.default.svc", 29400)})
print(json.dumps({
    "resolved": resolved,
    "pid": os.getpid(),
    "pgid": os.getpgid(0),
    "resolv": open("/etc/resolv.conf").read(),
}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_pod_resolves_a_headless_service_to_the_pod_ip(plane: ControlPlane) -> None:
    host_resolv = Path("/etc/resolv.conf").read_text()
    plane.kubectl(
        "apply",
        "-f",
        "-",
        input=_container_pod("rank0", "import time; time.sleep(600)", {"app": "rank0"}),
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "rank0"},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"app": "rank0"},
            "ports": [{"name": "rendezvous", "port": 29400}],
        },
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(service))

    def running_ip() -> str | None:
        pod = plane.get("pods", "rank0") or {}
        status = pod.get("status") or {}
        return status.get("podIP") if status.get("phase") == "Running" else None

    rank0_ip = plane.wait_for(running_ip, timeout=90, message="pod rank0 Running")
    # Publishing the address goes through the EndpointSlice controller and CoreDNS's
    # watch; a pod that looks too early would get NXDOMAIN, so wait for the slice.
    plane.wait_for(
        lambda: any(
            rank0_ip in endpoint.get("addresses", [])
            for slice_ in plane.list(
                "endpointslices",
                label_selector="kubernetes.io/service-name=rank0",
                group="discovery.k8s.io",
            )
            for endpoint in slice_.get("endpoints") or []
        ),
        timeout=60,
        message="the EndpointSlice of rank0 naming its pod",
    )
    plane.kubectl("apply", "-f", "-", input=_container_pod("lookup", LOOKUP))

    def finished() -> dict[str, Any] | None:
        pod = plane.get("pods", "lookup") or {}
        return pod if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    pod = plane.wait_for(finished, timeout=90, message="pod lookup finished")
    log = plane.kubectl("logs", "lookup").stdout
    assert pod["status"]["phase"] == "Succeeded", log
    seen = json.loads(log.strip().splitlines()[-1])
    assert seen["resolved"] == [rank0_ip]
    assert seen["resolv"].startswith(f"nameserver {plane.dns.ip}\n")
    assert "search default.svc.cluster.local svc.cluster.local cluster.local" in seen["resolv"]
    # The pod's process is the one the kubelet started: its pid leads its group.
    assert seen["pgid"] == seen["pid"]
    assert plane.kubelet is not None
    uid = pod["metadata"]["uid"]
    started = plane.kubelet.runs[uid].containers["main"].process
    assert started is not None
    assert started.pid == seen["pid"]
    assert Path("/etc/resolv.conf").read_text() == host_resolv
