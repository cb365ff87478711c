"""The plugin's commands: progress, logs, adapter, why."""

# The S3 client (boto3 via lora_trainer.storage) is imported only by `adapter`.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from kubernetes.client.exceptions import ApiException

from lorajob_operator.kubectl_lj.cluster import Cluster, wait_for_next, wait_for_pod, wait_started
from lorajob_operator.kubectl_lj.errors import PluginError
from lorajob_operator.kubectl_lj.manifest import manifest_files, verify_file
from lorajob_operator.kubectl_lj.view import (
    current_attempt,
    finished,
    job_key,
    progress_line,
    why_report,
)

__all__ = ["cmd_adapter", "cmd_logs", "cmd_progress", "cmd_why"]


def cmd_progress(cluster: Cluster, args: argparse.Namespace, out: TextIO) -> int:
    namespace = None if args.all_namespaces else args.namespace
    items, version = cluster.jobs(namespace)
    wanted = set(args.names)
    jobs = {
        job_key(j): j
        for j in items
        if not wanted or (j.get("metadata") or {}).get("name") in wanted
    }
    missing = wanted - {name for _, name in jobs}
    if missing:
        raise PluginError(f"no lorajob named {', '.join(sorted(missing))} in {namespace}")
    if not jobs:
        print("no lorajobs" + (f" in namespace {namespace}" if namespace else ""), file=out)
        return 0
    live = args.watch and out.isatty()
    shown = _render(jobs, out, redraw_lines=0)
    if not args.watch:
        return 0
    last = {k: progress_line(j) for k, j in jobs.items()}

    def update(key: tuple[str, str], obj: Mapping[str, Any] | None) -> None:
        nonlocal shown
        if obj is None:
            print(f"{key[0]}/{key[1]} was deleted", file=out, flush=True)
            jobs.pop(key, None)
            return
        jobs[key] = dict(obj)
        line = progress_line(obj)
        if line != last.get(key):
            last[key] = line
            if live:
                shown = _render(jobs, out, redraw_lines=shown)
            else:
                print(line, file=out, flush=True)

    while not all(finished(j) for j in jobs.values()):
        try:
            for event in cluster.watch_jobs(namespace, version):
                obj = event["object"]
                if event["type"] == "ERROR":  # e.g. 410 Gone: the history is compacted
                    raise ApiException(status=int(obj.get("code") or 500), reason=obj.get("reason"))
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if job_key(obj) in jobs:
                    update(job_key(obj), None if event["type"] == "DELETED" else obj)
                if all(finished(j) for j in jobs.values()):
                    break
        except ApiException as exc:
            if exc.status != 410:
                raise PluginError(f"watching lorajobs: {exc.reason}") from exc
            items, version = cluster.jobs(namespace)  # too old to resume: list again
            fresh = {job_key(j): j for j in items}
            for key in list(jobs):
                update(key, fresh.get(key))
    failed = [k for k, j in jobs.items() if (j.get("status") or {}).get("phase") == "Failed"]
    return 1 if failed else 0


def _render(
    jobs: Mapping[tuple[str, str], Mapping[str, Any]], out: TextIO, redraw_lines: int
) -> int:
    if redraw_lines:
        out.write(f"\x1b[{redraw_lines}F\x1b[J")  # back to the table's first line, clear below
    for key in sorted(jobs):
        out.write(progress_line(jobs[key]) + "\n")
    out.flush()
    return len(jobs)


def cmd_logs(cluster: Cluster, args: argparse.Namespace, out: TextIO) -> int:
    job = cluster.job(args.namespace, args.name)
    _check_rank(job, args.rank)
    attempt = args.attempt or current_attempt(job)
    tail = args.tail if args.tail >= 0 else None
    while True:
        pod = wait_for_pod(cluster, job, attempt, args.follow, args.rank)
        if pod is None:
            raise PluginError(_no_pod(job, attempt, args.rank))
        name = pod["metadata"]["name"]
        if args.follow or attempt > 1:
            rank = f", node rank {args.rank}" if _nodes(job) > 1 else ""
            print(f"==> attempt {attempt}{rank}: pod {name} <==", file=out, flush=True)
        wait_started(cluster, pod, args.follow)
        for chunk in cluster.stream_log(args.namespace, name, tail, args.follow):
            out.write(chunk)
            out.flush()
        if not args.follow:
            return 0
        # The pod's log ended: the job finished, or the next attempt takes over.
        job = wait_for_next(cluster, job, attempt)
        if current_attempt(job) <= attempt:
            phase = (job.get("status") or {}).get("phase")
            print(f"==> lorajob {args.namespace}/{args.name}: {phase} <==", file=out)
            return 0
        attempt, tail = current_attempt(job), None


def _nodes(job: Mapping[str, Any]) -> int:
    return int(((job.get("spec") or {}).get("resources") or {}).get("nodes") or 1)


def _check_rank(job: Mapping[str, Any], rank: int) -> None:
    nodes = _nodes(job)
    if not 0 <= rank < nodes:
        meta = job["metadata"]
        raise PluginError(
            f"--rank {rank}: lorajob {meta['namespace']}/{meta['name']} runs on {nodes} "
            f"node(s) (spec.resources.nodes), so its node ranks are 0-{nodes - 1}"
        )


def _no_pod(job: Mapping[str, Any], attempt: int, rank: int = 0) -> str:
    meta = job["metadata"]
    name = f"lorajob {meta['namespace']}/{meta['name']}"
    latest = current_attempt(job)
    pod = f"pod of node rank {rank}" if _nodes(job) > 1 else "pod"
    if not attempt:
        return f"{name} has no trainer {pod} yet; -f waits for it"
    if attempt < latest:
        return (
            f"the {pod} of attempt {attempt} of {name} is gone (evicted, preempted or "
            f"deleted); the current attempt is {latest}"
        )
    return f"{name} has no trainer {pod} for attempt {attempt}"


def cmd_adapter(cluster: Cluster, args: argparse.Namespace, out: TextIO) -> int:
    try:
        import boto3  # noqa: F401  (Storage's S3 client)
        from lora_trainer.errors import TrainerError
        from lora_trainer.storage import Storage, join_uri
    except ImportError as exc:
        raise PluginError(
            f"`kubectl lj adapter` needs the S3 client ({exc.name} is missing): "
            "pip install 'lorajob-operator[trainer]' or pip install boto3"
        ) from exc

    job = cluster.job(args.namespace, args.name)
    status = job.get("status") or {}
    adapter = status.get("adapter") or {}
    if not adapter.get("manifestUri"):
        raise PluginError(
            f"lorajob {args.namespace}/{args.name} has no adapter yet (phase "
            f"{status.get('phase') or 'Pending'}); follow it with: kubectl lj progress "
            f"{args.name} -w"
        )
    storage_spec = (job.get("spec") or {}).get("storage") or {}
    env = dict(os.environ)
    if args.credentials_from_secret:
        secret = storage_spec.get("credentialsSecret")
        if not secret:
            raise PluginError("the job names no spec.storage.credentialsSecret to read")
        env.update(cluster.secret_env(args.namespace, secret))
    target = Path(args.output or f"{args.name}-adapter")
    if target.exists() and any(target.iterdir()):
        raise PluginError(f"{target} exists and is not empty; choose another --output")
    with tempfile.TemporaryDirectory(
        prefix=".lj-", dir=target.parent if target.parent.exists() else None
    ) as tmp:
        storage = Storage(
            Path(tmp) / "cache",
            env,
            default_endpoint=storage_spec.get("endpoint"),
            default_region=storage_spec.get("region"),
        )
        try:
            raw = storage.read_bytes(adapter["manifestUri"])
            if raw is None:
                raise PluginError(
                    f"{adapter['manifestUri']} is gone: the adapter was removed or is being "
                    "replaced by a new run of the job"
                )
            manifest = json.loads(raw)
            files = manifest_files(manifest)
            weights = next((f for f in files if f.path == "adapter_model.safetensors"), None)
            if adapter.get("sha256") and (weights is None or weights.sha256 != adapter["sha256"]):
                raise PluginError(
                    "the manifest in object storage is not the one status.adapter describes "
                    "(adapter_model.safetensors differs); the output was overwritten"
                )
            staging = Path(tmp) / "files"
            problems = []
            for entry in files:
                local = staging / entry.path
                storage.download_file(join_uri(adapter["uri"], entry.path), local)
                problem = verify_file(local, entry)
                if problem:
                    problems.append(problem)
                mark = "FAIL" if problem else "ok"
                print(
                    f"{mark:<4}  {entry.path}  {entry.size} bytes  sha256 {entry.sha256[:16]}",
                    file=out,
                )
        except TrainerError as exc:
            raise PluginError(f"downloading the adapter: {exc}") from exc
        if problems:
            raise PluginError(
                "the adapter does not match its manifest, nothing was written:\n  "
                + "\n  ".join(problems)
            )
        (staging / "manifest.json").write_bytes(raw)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.rmdir()
        shutil.move(str(staging), str(target))
    print(
        f"verified {len(files)} files against {adapter['manifestUri']}; adapter in {target}/",
        file=out,
    )
    return 0


def cmd_why(cluster: Cluster, args: argparse.Namespace, out: TextIO) -> int:
    job = cluster.job(args.namespace, args.name)
    _check_rank(job, args.rank)
    attempt = current_attempt(job)
    pod = cluster.attempt_pod(job, attempt, args.rank) if attempt else None
    pod_name = pod["metadata"]["name"] if pod else None
    log = cluster.log_tail(args.namespace, pod_name, args.tail) if pod_name else None
    print(why_report(job, log, pod_name), file=out)
    return 0
