"""Operator scale benchmark: a burst of LoRAJobs against a real kube-apiserver.

For each size N: a fresh local cluster (`devcluster.controlplane.ControlPlane`:
etcd, kube-apiserver, kube-controller-manager and kube-scheduler v1.35.4 on
127.0.0.1, the process kubelet in `SimulatedRuntime` mode so pods start no
process, and the real `kopf run` operator as the Helm chart's ServiceAccount).
Everything shares this machine's cores. First the ceiling: the API server's raw
write rate (ConfigMap create + merge-patch, 16 in flight, from a separate process:
`bench.apiserver_ceiling`), before any job exists. Then N LoRAJobs are created over
HTTPS as the admin (16 requests in flight), as fast as the API server takes them (a
burst) or, for a size written `N@R`, at R jobs per second (a steady arrival rate:
the latency of a system that is not saturated); a watch on pods and one on
LoRAJobs timestamp what happens. Reported per size:

* create -> pod-created latency (job's create response to the pod's ADDED event)
  p50 / p99 / max, and the time until every job has its pod;
* status lag: pod Running (kubelet's status write) -> job `status.phase` Running
  (the operator's status patch), p50 / p99;
* operator peak RSS (sampled every 100 ms) and CPU seconds, from the first create
  until every job is Running; the CPU seconds of the control-plane processes
  (kube-apiserver, etcd, controller manager, scheduler) and of this process (the
  kubelet, the watches and the creates) over the same span;
* API writes per job: the API server's `apiserver_request_total` for write verbs,
  before and after (every client's writes: the benchmark's creates, the operator,
  the scheduler's bindings, the kubelet's status updates, Events); the operator's
  own requests (API Priority and Fairness, flow schema `service-accounts`: only the
  operator's ServiceAccount falls in it here);
* throttling: the operator's `lorajob_api_throttled_total{reason}` (client: waited
  for LORAJOB_API_QPS/BURST; server: answered 429) and the API server's 429s and
  APF rejections.

    python -m bench.operator_scale --sizes 100,1000,1000@40 [--api-qps 200 --api-burst 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import ssl
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil
from lorajob_operator.objects import LABEL_JOB

from bench.apiserver_ceiling import measure_write_ceiling
from bench.common import add_common_args, format_table, percentile, write_results
from devcluster import binaries
from devcluster.controlplane import ControlPlane, free_port
from devcluster.kubelet import NodeConfig, SimulatedRuntime

__all__ = ["job_manifest", "main", "parse_size", "run_size"]

GROUP, VERSION, PLURAL = "finetune.loraops.dev", "v1alpha1", "lorajobs"
NAMESPACE = "default"
IN_FLIGHT = 16
_MiB = 2**20
_WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY"})
# The operator runs as a ServiceAccount outside kube-system: APF puts its requests in
# this flow schema (the controllers' ServiceAccounts are in kube-system's; the admin
# is exempt).
_OPERATOR_FLOW_SCHEMA = "service-accounts"


def job_manifest(name: str) -> dict[str, Any]:
    """A small valid CPU LoRAJob (never trains: the kubelet simulates its pod)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoRAJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://bench-models/tiny-llama"},
            "dataset": {"uri": "s3://bench-data/train.jsonl"},
            "output": {"uri": f"s3://bench-out/{name}"},
            "training": {"maxSteps": 10},
            "resources": {"gpus": 0, "cpu": "100m", "memory": "256Mi"},
        },
    }


@dataclass
class Timeline:
    """Monotonic timestamps per job name."""

    created: dict[str, float] = field(default_factory=dict)
    pod_added: dict[str, float] = field(default_factory=dict)
    pod_running: dict[str, float] = field(default_factory=dict)
    job_running: dict[str, float] = field(default_factory=dict)


class OperatorSampler:
    """Samples the operator process's RSS in a thread; CPU seconds from start to stop."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.rss_at_start = 0
        self.cpu_seconds = 0.0
        self._cpu_start = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _cpu(self) -> float:
        t = self.process.cpu_times()
        return float(t.user + t.system)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def start(self) -> None:
        self.rss_at_start = self.process.memory_info().rss
        self._cpu_start = self._cpu()
        self._thread.start()

    def stop(self) -> None:
        self.cpu_seconds = self._cpu() - self._cpu_start
        self._stop.set()
        self._thread.join()


def _operator_pid() -> int:
    """The `kopf run` child of this process (ControlPlane starts it)."""
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "kopf" in cmd and "run" in cmd:
            return int(child.pid)
    raise RuntimeError("operator process not found")


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user + system CPU seconds of each process so far."""
    out = {}
    for name, pid in pids.items():
        t = psutil.Process(pid).cpu_times()
        out[name] = float(t.user + t.system)
    return out


# ------------------------------------------------------------ Prometheus metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str, names: frozenset[str]) -> list[tuple[str, dict[str, str], float]]:
    """The samples of the named metrics in a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(tuple(names)):
            continue
        match = _SAMPLE.match(line)
        if match is None or match.group(1) not in names:
            continue
        labels = dict(_LABEL.findall(match.group(2) or ""))
        samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def _get_text(url: str, context: ssl.SSLContext | None = None) -> str:
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        return str(response.read().decode())


def server_counters(url: str, context: ssl.SSLContext) -> dict[str, float]:
    """The API server's counters this benchmark reads (`/metrics`, as the admin), flat:
    `writes`, `writes:<resource>[/<subresource>]`, `code_429`, `apf_rejected`, and the
    operator's flow schema's `operator_requests`, `operator_apf_wait_s` (summed seconds
    its requests waited in APF queues)."""
    names = frozenset(
        {
            "apiserver_request_total",
            "apiserver_flowcontrol_dispatched_requests_total",
            "apiserver_flowcontrol_rejected_requests_total",
            "apiserver_flowcontrol_request_wait_duration_seconds_sum",
        }
    )
    out: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        out[key] = out.get(key, 0.0) + value

    for name, labels, value in parse_metrics(_get_text(f"{url}/metrics", context), names):
        if name == "apiserver_request_total":
            if labels.get("code") == "429":
                add("code_429", value)
            if labels.get("verb") in _WRITE_VERBS:
                add("writes", value)
                resource = labels.get("resource", "")
                if labels.get("subresource"):
                    resource += "/" + labels["subresource"]
                add(f"writes:{resource}", value)
        elif name == "apiserver_flowcontrol_rejected_requests_total":
            add("apf_rejected", value)
        elif labels.get("flow_schema") == _OPERATOR_FLOW_SCHEMA:
            if name == "apiserver_flowcontrol_dispatched_requests_total":
                add("operator_requests", value)
            else:
                add("operator_apf_wait_s", value)
    return out


def operator_counters(port: int) -> dict[str, float]:
    """The operator's throttling counters (its metrics endpoint): `client`, `server`
    (lorajob_api_throttled_total by reason) and `client_wait_s`."""
    names = frozenset({"lorajob_api_throttled_total", "lorajob_api_throttle_wait_seconds_total"})
    out: dict[str, float] = {}
    for name, labels, value in parse_metrics(_get_text(f"http://127.0.0.1:{port}/metrics"), names):
        key = labels.get("reason", "") if name == "lorajob_api_throttled_total" else "client_wait_s"
        out[key] = out.get(key, 0.0) + value
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in sorted(after)}


# ------------------------------------------------------------------- the burst
async def _watch(
    session: aiohttp.ClientSession, path: str, on_event: Callable[[str, dict[str, Any]], None]
) -> None:
    """Follow a watch stream forever (re-opened if the server closes it)."""
    while True:
        async with session.get(path, params={"watch": "1"}, timeout=aiohttp.ClientTimeout()) as r:
            r.raise_for_status()
            async for line in r.content:
                if line.strip():
                    event = json.loads(line)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        on_event(event["type"], event["object"])


async def _burst(
    cp: ControlPlane, n: int, timeout: float, tl: Timeline, rate: float | None = None
) -> float:
    """Create n jobs (at `rate` per second, or as fast as they are taken), wait until
    each is Running; returns the first create's send time."""
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT + 4, ssl=cp.cluster.admin_ssl_context())
    jobs_path = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
    done = asyncio.Event()

    def on_pod(kind: str, pod: dict[str, Any]) -> None:
        job = (pod["metadata"].get("labels") or {}).get(LABEL_JOB)
        if job is None or kind == "DELETED":
            return
        now = time.perf_counter()
        tl.pod_added.setdefault(job, now)
        if (pod.get("status") or {}).get("phase") == "Running":
            tl.pod_running.setdefault(job, now)

    def on_job(kind: str, job: dict[str, Any]) -> None:
        if kind != "DELETED" and (job.get("status") or {}).get("phase") == "Running":
            tl.job_running.setdefault(job["metadata"]["name"], time.perf_counter())
            if len(tl.job_running) >= n:
                done.set()

    async with aiohttp.ClientSession(cp.cluster.url, connector=connector) as session:
        watches = [
            asyncio.create_task(_watch(session, f"/api/v1/namespaces/{NAMESPACE}/pods", on_pod)),
            asyncio.create_task(_watch(session, jobs_path, on_job)),
        ]
        await asyncio.sleep(0.5)  # let both watches open before the first create
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def creator() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                if rate is not None:  # job i is due i / rate seconds after the first
                    await asyncio.sleep(first + i / rate - time.perf_counter())
                name = f"bench-{i:05d}"
                async with session.post(jobs_path, json=job_manifest(name)) as r:
                    if r.status != 201:
                        raise RuntimeError(f"create {name}: {r.status} {await r.text()}")
                tl.created[name] = time.perf_counter()

        first = time.perf_counter()
        try:
            await asyncio.gather(*(creator() for _ in range(IN_FLIGHT)))
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            print(f"  timed out: {len(tl.job_running)}/{n} jobs Running", file=sys.stderr)
        finally:
            for w in watches:
                w.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
    return first


def _lat(start: dict[str, float], end: dict[str, float]) -> list[float]:
    return sorted(end[k] - start[k] for k in start if k in end)


def _stats(values: list[float]) -> dict[str, float | None]:
    return {
        "p50_s": percentile(values, 50),
        "p99_s": percentile(values, 99),
        "max_s": max(values) if values else None,
    }


def _per_job(value: float | None, n: int) -> float | None:
    return value / n if value is not None else None


def run_size(
    n: int,
    timeout: float,
    log_level: str,
    rate: float | None = None,
    *,
    ceiling_writes: int = 1000,
    api_qps: float | None = None,
    api_burst: int | None = None,
) -> dict[str, Any]:
    node = NodeConfig(
        name="bench-node",
        capacity={"cpu": "100000", "memory": "100000Ti", "nvidia.com/gpu": "8", "pods": "100000"},
        taints=(),
    )
    metrics_port = free_port()
    env = {"LORAJOB_METRICS_PORT": str(metrics_port)}
    if log_level:
        env["LORAJOB_LOG_LEVEL"] = log_level
    if api_qps is not None:
        env["LORAJOB_API_QPS"] = f"{api_qps:g}"
    if api_burst is not None:
        env["LORAJOB_API_BURST"] = str(api_burst)
    plane = ControlPlane(
        nodes=[node],
        operator=True,
        operator_env=env,
        simulated_runtime=SimulatedRuntime(seconds=24 * 3600),  # Running until deleted
    )
    with plane as cp:
        cluster = cp.cluster
        context = cluster.admin_ssl_context()
        control_plane = {name: p.pid for name, p in cluster.processes.items()}
        server_version = cluster.request("GET", "/version").get("gitVersion")
        # The ceiling: the same API server, before any job exists.
        cp_before = _cpu_seconds(control_plane)
        admin = cluster.admin_cert
        ceiling = measure_write_ceiling(
            cluster.url,
            ca=admin.ca_cert,
            cert=admin.cert,
            key=admin.key,
            count=ceiling_writes,
            concurrency=IN_FLIGHT,
        )
        ceiling["server_cpu_s"] = _delta(cp_before, _cpu_seconds(control_plane))

        sampler = OperatorSampler(_operator_pid())
        tl = Timeline()
        server_before = server_counters(cluster.url, context)
        operator_before = operator_counters(metrics_port)
        bench = psutil.Process()  # the kubelet, the watches and the creates live here
        bench_cpu = sum(bench.cpu_times()[:2])
        cp_before = _cpu_seconds(control_plane)
        sampler.start()
        first = asyncio.run(_burst(cp, n, timeout, tl, rate))
        sampler.stop()
        cp_cpu = _delta(cp_before, _cpu_seconds(control_plane))
        bench_cpu = sum(bench.cpu_times()[:2]) - bench_cpu
        end = max(tl.job_running.values(), default=time.perf_counter())
        server = _delta(server_before, server_counters(cluster.url, context))
        throttled = _delta(operator_before, operator_counters(metrics_port))
    create_to_pod = _lat(tl.created, tl.pod_added)
    status_lag = _lat(tl.pod_running, tl.job_running)
    all_pods = max(tl.pod_added.values()) - first if len(tl.pod_added) == n else None
    writes = server.get("writes")
    by_resource = {
        k.removeprefix("writes:"): v / n for k, v in server.items() if k.startswith("writes:") and v
    }
    operator_requests = server.get("operator_requests")
    return {
        "jobs": n,
        "rate_per_s": rate,  # None: a burst
        "api_server": server_version,
        "operator_api_qps": api_qps,  # None: the operator's default
        "operator_api_burst": api_burst,
        "ceiling": ceiling,
        "jobs_with_pod": len(tl.pod_added),
        "jobs_running": len(tl.job_running),
        "create_s": max(tl.created.values()) - first,
        "create_to_pod": _stats(create_to_pod),
        "all_pods_s": all_pods,
        "all_running_s": end - first if len(tl.job_running) == n else None,
        "status_lag": _stats(status_lag),
        "api_writes_per_job": _per_job(writes, n),
        "api_writes_per_job_by_resource": dict(sorted(by_resource.items())),
        "operator_requests_per_job": _per_job(operator_requests, n),
        "operator_apf_wait_s_mean": (
            server.get("operator_apf_wait_s", 0.0) / operator_requests
            if operator_requests
            else None
        ),
        "server_429": server.get("code_429", 0.0),
        "server_apf_rejected": server.get("apf_rejected", 0.0),
        "operator_throttled": {
            "client": throttled.get("client", 0.0),
            "server": throttled.get("server", 0.0),
            "client_wait_s": throttled.get("client_wait_s", 0.0),
        },
        "operator_peak_rss_mib": sampler.peak_rss / _MiB,
        "operator_rss_at_start_mib": sampler.rss_at_start / _MiB,
        "operator_cpu_s": sampler.cpu_seconds,
        "operator_cpu_ms_per_job": 1000 * sampler.cpu_seconds / n,
        "control_plane_cpu_s": cp_cpu,
        "control_plane_cpu_s_total": sum(cp_cpu.values()),
        "bench_cpu_s": bench_cpu,
    }


def tables(sizes: list[dict[str, Any]]) -> str:
    def arrival(s: dict[str, Any]) -> str:
        text = "burst" if s.get("rate_per_s") is None else f"{s['rate_per_s']:g}/s"
        if s.get("operator_api_qps") is not None:
            burst = s.get("operator_api_burst") or "default"
            text += f" qps {s['operator_api_qps']:g}/{burst}"
        return text

    latency = format_table(
        [
            "jobs",
            "arrival",
            "create s",
            "pod p50 s",
            "pod p99 s",
            "pod max s",
            "all pods s",
            "status p50 s",
            "status p99 s",
            "op RSS MiB",
        ],
        [
            [
                s["jobs"],
                arrival(s),
                s["create_s"],
                s["create_to_pod"]["p50_s"],
                s["create_to_pod"]["p99_s"],
                s["create_to_pod"]["max_s"],
                s["all_pods_s"],
                s["status_lag"]["p50_s"],
                s["status_lag"]["p99_s"],
                s["operator_peak_rss_mib"],
            ]
            for s in sizes
        ],
    )
    cost = format_table(
        [
            "jobs",
            "arrival",
            "op CPU s",
            "op ms/job",
            "apiserver s",
            "etcd s",
            "ctrl+sched s",
            "bench CPU s",
            "writes/job",
            "op req/job",
            "client-throttled",
            "429s",
            "ceiling w/s",
        ],
        [
            [
                s["jobs"],
                arrival(s),
                s["operator_cpu_s"],
                s["operator_cpu_ms_per_job"],
                s["control_plane_cpu_s"].get("kube-apiserver"),
                s["control_plane_cpu_s"].get("etcd"),
                s["control_plane_cpu_s"].get("kube-controller-manager", 0.0)
                + s["control_plane_cpu_s"].get("kube-scheduler", 0.0),
                s["bench_cpu_s"],
                s["api_writes_per_job"],
                s["operator_requests_per_job"],
                int(s["operator_throttled"]["client"]),
                int(s["server_429"]),
                s["ceiling"]["writes_per_s"],
            ]
            for s in sizes
        ],
    )
    peer = sizes[0]["api_server"] if sizes else "?"
    ceilings = ", ".join(f"{s['ceiling']['writes_per_s']:,.0f}" for s in sizes)
    return (
        f"{latency}\n\n{cost}\n\n"
        f"Against: real kube-apiserver {peer} + etcd {binaries.ETCD_VERSION} "
        f"(--unsafe-no-fsync), controller manager, scheduler, on this {os.cpu_count()}-core "
        "machine with the operator and the benchmark (kubelet, watches).\n"
        f"API server ceiling per size, same server before the jobs (create+merge-patch "
        f"ConfigMaps, {IN_FLIGHT} in flight, separate process): {ceilings} writes/s"
    )


def parse_size(text: str) -> tuple[int, float | None]:
    """`N` (a burst of N jobs) or `N@R` (N jobs at R per second)."""
    count, at, rate = text.strip().partition("@")
    try:
        n, r = int(count), float(rate) if at else None
    except ValueError:
        raise ValueError(
            f"--sizes: {text!r} is not a job count N or N@R (R jobs per second)"
        ) from None
    if n < 1 or (r is not None and r <= 0):
        raise ValueError(f"--sizes: {text!r}: N and R must be positive")
    return n, r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(parser)
    parser.add_argument(
        "--sizes",
        default="100,1000,1000@40",
        help="comma-separated job counts, each a burst or N@R: R jobs per second "
        "(README: 100,1000,1000@40, and 5000 alone)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per size")
    parser.add_argument(
        "--ceiling-writes",
        type=int,
        default=1000,
        help="ConfigMaps the ceiling creates and patches (2 writes each)",
    )
    parser.add_argument("--log-level", default="", help="LORAJOB_LOG_LEVEL for the operator")
    parser.add_argument(
        "--api-qps", type=float, default=None, help="LORAJOB_API_QPS (default: the operator's)"
    )
    parser.add_argument(
        "--api-burst", type=int, default=None, help="LORAJOB_API_BURST (default: the operator's)"
    )
    args = parser.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    if args.quick:
        sizes, args.ceiling_writes, args.timeout = [(5, None), (5, 50.0)], 100, 120

    results = []
    for n, rate in sizes:
        arrival = "at once" if rate is None else f"at {rate:g}/s"
        print(f"{n} jobs {arrival} ...", file=sys.stderr, flush=True)
        results.append(
            run_size(
                n,
                args.timeout,
                args.log_level,
                rate,
                ceiling_writes=args.ceiling_writes,
                api_qps=args.api_qps,
                api_burst=args.api_burst,
            )
        )
    ceilings = [s["ceiling"]["writes_per_s"] for s in results]
    result = {
        "quick": args.quick,
        "params": {
            "sizes": args.sizes,
            "in_flight_creates": IN_FLIGHT,
            "timeout_s": args.timeout,
            "ceiling_writes": 2 * args.ceiling_writes,
            "operator_api_qps": args.api_qps,
            "operator_api_burst": args.api_burst,
        },
        "peer": {
            "api_server": f"real kube-apiserver {results[0]['api_server']} (devcluster)",
            "etcd": f"etcd {binaries.ETCD_VERSION}, --unsafe-no-fsync",
            "machine": f"the same {os.cpu_count()}-core machine as the operator, the "
            "controller manager, the scheduler and the benchmark (kubelet, watches)",
            "ceiling": "ConfigMap create + merge-patch, "
            f"{IN_FLIGHT} in flight, from a separate process, before each size's jobs",
        },
        # The median of the per-size ceilings (each size's own is in sizes[].ceiling).
        "api_server_writes_per_s": statistics.median(ceilings),
        "sizes": results,
        "targets": {"p99_create_to_pod_s_at_1000": 1.0, "operator_rss_mib_at_5000": 300},
    }
    print(tables(results))
    path = write_results("operator_scale", result, args.results_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
