"""Operator scale benchmark: a burst of LoRAJobs against the harness API server.

For each size N: a fresh control plane (tests/harness/controlplane.py: API
server, test kubelet with SimulatedRuntime so pods start no process, and the
real `kopf run` operator as a subprocess). N LoRAJobs are created over HTTPS
(16 requests in flight), as fast as the API server takes them (a burst) or, for
a size written `N@R`, at R jobs per second (a steady arrival rate: the latency
of a system that is not saturated); a watch on pods and on LoRAJobs timestamps
what happens. Reported per size:

* create -> pod-created latency (job's create response to the pod's ADDED event)
  p50 / p99 / max, and the time until every job has its pod;
* status-update lag: pod Running (kubelet's status write) -> job `status.phase`
  Running (the operator's status patch), p50 / p99;
* operator peak RSS (sampled every 100 ms) and CPU seconds (user + system) of the
  operator process, from the first create until every job is Running (and the CPU
  seconds of this process, which hosts the API server, the kubelet and the watches);
* the ceiling: raw writes/s (create + merge-patch) of the same API server
  (tests.harness.apiserver.measure_write_throughput), before the jobs exist.

    python -m bench.operator_scale --sizes 100,1000,5000,1000@40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil
from lorajob_operator.objects import LABEL_JOB

from bench.common import add_common_args, format_table, percentile, write_results
from tests.harness.apiserver import measure_write_throughput
from devcluster.controlplane import ControlPlane
from devcluster.kubelet import NodeConfig, SimulatedRuntime

__all__ = ["job_manifest", "main", "run_size"]

GROUP, VERSION, PLURAL = "finetune.loraops.dev", "v1alpha1", "lorajobs"
NAMESPACE = "default"
IN_FLIGHT = 16
_MiB = 2**20


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
    writes: int | None = None  # API writes (resourceVersion increments) during the burst


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
                    on_event(event["type"], event["object"])


async def _burst(
    cp: ControlPlane, n: int, timeout: float, tl: Timeline, rate: float | None = None
) -> float:
    """Create n jobs (at `rate` per second, or as fast as they are taken), wait until
    each is Running; returns the first create's send time."""
    ssl_ctx = ssl.create_default_context(cafile=str(cp.api.tls.ca_cert))
    headers = {"Authorization": f"Bearer {cp.api.token}"}
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT + 4, ssl=ssl_ctx)
    jobs_path = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
    done = asyncio.Event()

    def on_pod(kind: str, pod: dict[str, Any]) -> None:
        job = pod["metadata"].get("labels", {}).get(LABEL_JOB)
        if job is None or kind == "DELETED":
            return
        now = time.perf_counter()
        tl.pod_added.setdefault(job, now)
        if pod.get("status", {}).get("phase") == "Running":
            tl.pod_running.setdefault(job, now)

    def on_job(kind: str, job: dict[str, Any]) -> None:
        if kind != "DELETED" and job.get("status", {}).get("phase") == "Running":
            tl.job_running.setdefault(job["metadata"]["name"], time.perf_counter())
            if len(tl.job_running) >= n:
                done.set()

    async with aiohttp.ClientSession(cp.api.url, headers=headers, connector=connector) as session:
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

        rv_before = await _resource_version(session, jobs_path)
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
        rv_after = await _resource_version(session, jobs_path)
        if rv_before is not None and rv_after is not None:
            tl.writes = rv_after - rv_before
    return first


async def _resource_version(session: aiohttp.ClientSession, path: str) -> int | None:
    """The store's global resourceVersion (an integer in the harness; None otherwise)."""
    async with session.get(path, params={"limit": "1"}) as r:
        r.raise_for_status()
        rv = (await r.json())["metadata"].get("resourceVersion", "")
    return int(rv) if str(rv).isdigit() else None


def _lat(start: dict[str, float], end: dict[str, float]) -> list[float]:
    return sorted(end[k] - start[k] for k in start if k in end)


def _stats(values: list[float]) -> dict[str, float | None]:
    return {
        "p50_s": percentile(values, 50),
        "p99_s": percentile(values, 99),
        "max_s": max(values) if values else None,
    }


def run_size(n: int, timeout: float, log_level: str, rate: float | None = None) -> dict[str, Any]:
    node = NodeConfig(
        name="bench-node",
        capacity={"cpu": "100000", "memory": "100000Ti", "nvidia.com/gpu": "8", "pods": "100000"},
        taints=(),
    )
    plane = ControlPlane(
        nodes=[node],
        operator=True,
        operator_env={"LORAJOB_LOG_LEVEL": log_level} if log_level else {},
        simulated_runtime=SimulatedRuntime(seconds=24 * 3600),  # Running until deleted
    )
    with plane as cp:
        sampler = OperatorSampler(_operator_pid())
        tl = Timeline()
        harness = psutil.Process()  # API server, kubelet and the watch client live here
        harness_cpu = sum(harness.cpu_times()[:2])
        sampler.start()
        first = asyncio.run(_burst(cp, n, timeout, tl, rate))
        sampler.stop()
        harness_cpu = sum(harness.cpu_times()[:2]) - harness_cpu
        end = max(tl.job_running.values(), default=time.perf_counter())
    create_to_pod = _lat(tl.created, tl.pod_added)
    status_lag = _lat(tl.pod_running, tl.job_running)
    all_pods = max(tl.pod_added.values()) - first if len(tl.pod_added) == n else None
    return {
        "jobs": n,
        "rate_per_s": rate,  # None: a burst
        "jobs_with_pod": len(tl.pod_added),
        "jobs_running": len(tl.job_running),
        "create_s": max(tl.created.values()) - first,
        "create_to_pod": _stats(create_to_pod),
        "all_pods_s": all_pods,
        "all_running_s": end - first if len(tl.job_running) == n else None,
        "status_lag": _stats(status_lag),
        "api_writes_per_job": tl.writes / n if tl.writes is not None else None,
        "operator_peak_rss_mib": sampler.peak_rss / _MiB,
        "operator_rss_at_start_mib": sampler.rss_at_start / _MiB,
        "operator_cpu_s": sampler.cpu_seconds,
        "harness_cpu_s": harness_cpu,
    }


def ceiling(count: int) -> float:
    """Raw writes/s of an idle API server (no operator, no kubelet)."""
    with ControlPlane(kubelet=False, operator=False) as cp:
        return measure_write_throughput(cp.api, count=count, concurrency=IN_FLIGHT)


def table(sizes: list[dict[str, Any]], writes_per_s: float) -> str:
    rows = [
        [
            s["jobs"],
            "burst" if s.get("rate_per_s") is None else f"{s['rate_per_s']:g}/s",
            s["create_s"],
            s["create_to_pod"]["p50_s"],
            s["create_to_pod"]["p99_s"],
            s["all_pods_s"],
            s["status_lag"]["p50_s"],
            s["status_lag"]["p99_s"],
            s["operator_peak_rss_mib"],
            s["operator_cpu_s"],
            s["harness_cpu_s"],
            s["api_writes_per_job"],
        ]
        for s in sizes
    ]
    headers = [
        "jobs",
        "arrival",
        "create s",
        "pod p50 s",
        "pod p99 s",
        "all pods s",
        "status p50 s",
        "status p99 s",
        "op RSS MiB",
        "op CPU s",
        "harness CPU s",
        "writes/job",
    ]
    return (
        format_table(headers, rows)
        + f"\nAPI server ceiling (idle, create+patch ConfigMaps): {writes_per_s:,.0f} writes/s"
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
        "(README: 100,1000,5000,1000@40)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per size")
    parser.add_argument("--ceiling-writes", type=int, default=2000)
    parser.add_argument("--log-level", default="", help="LORAJOB_LOG_LEVEL for the operator")
    args = parser.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    if args.quick:
        sizes, args.ceiling_writes, args.timeout = [(5, None), (5, 50.0)], 100, 120

    writes_per_s = ceiling(args.ceiling_writes)
    results = []
    for n, rate in sizes:
        arrival = "at once" if rate is None else f"at {rate:g}/s"
        print(f"{n} jobs {arrival} ...", file=sys.stderr, flush=True)
        results.append(run_size(n, args.timeout, args.log_level, rate))
    result = {
        "quick": args.quick,
        "params": {"sizes": args.sizes, "in_flight_creates": IN_FLIGHT, "timeout_s": args.timeout},
        "api_server_writes_per_s": writes_per_s,
        "sizes": results,
        "targets": {"p99_create_to_pod_s_at_1000": 1.0, "operator_rss_mib_at_5000": 300},
    }
    print(table(results, writes_per_s))
    path = write_results("operator_scale", result, args.results_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
