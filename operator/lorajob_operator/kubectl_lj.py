"""`kubectl lj`: the LoRAJob kubectl plugin (console script `kubectl-lj`).

Like `kubectl cnpg` or `kueuectl`, it speaks the operator's language on top of the
user's kubeconfig (the official client's loader: KUBECONFIG, --kubeconfig, --context,
the context's namespace):

    kubectl lj progress [NAME ...] [-w]   a progress bar per job (-w: live until done)
    kubectl lj logs NAME [-f]             the current attempt's trainer log (-f: follows
                                          it, and the next attempts, until the job ends)
    kubectl lj adapter NAME [-o DIR]      downloads the adapter and verifies every file
                                          against its manifest (size + sha256)
    kubectl lj why NAME                   the failure reason, hint and last log lines

Pods are found by the labels the operator sets (job uid + attempt), never by name, so
any job name works. The rendering is pure (`progress_line`, `why_report`), the API
calls go through the official `kubernetes` client.
"""

# The S3 client (boto3 via lora_trainer.storage) is imported only by `adapter`.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kubernetes import client as _client
from kubernetes import config as _config
from kubernetes import watch as _watch
from kubernetes.client.exceptions import ApiException

from lorajob_operator import api
from lorajob_operator.objects import LABEL_ATTEMPT, LABEL_JOB_UID

__all__ = ["main", "progress_line", "verify_file", "why_report"]

# The official client is only partly typed; its objects are handled as Any here.
client: Any = _client
config: Any = _config
watch: Any = _watch

FINISHED = ("Succeeded", "Failed")
BAR_WIDTH = 24
# Seconds a watch stream lasts before it is opened again (the API server ends it too).
WATCH_SECONDS = 60


class PluginError(Exception):
    """A problem the user can act on; printed as `error: ...`, exit code 1."""


# --------------------------------------------------------------------------- pure


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def progress_line(job: Mapping[str, Any], width: int = BAR_WIDTH) -> str:
    """One line per job: phase, a progress bar, step, loss, tokens/s and ETA."""
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    phase = status.get("phase") or "Pending"
    step, total = progress.get("step") or 0, progress.get("totalSteps")
    ratio = 1.0 if phase == "Succeeded" else (min(1.0, step / total) if total else 0.0)
    filled = round(ratio * width)
    bar = "[" + "#" * filled + "-" * (width - filled) + "]"
    loss = progress.get("loss")
    tps = progress.get("tokensPerSecond")
    eta = 0.0 if phase in FINISHED else progress.get("etaSeconds")
    steps = f"{step}/{total}" if total else "-"
    detail = ""
    if phase not in ("Running", "Succeeded"):
        reason = _waiting_reason(status)
        detail = f"  ({reason})" if reason else ""
    return (
        f"{meta.get('namespace', '')}/{meta.get('name', '')}  {phase:<9} {bar} {ratio:4.0%}"
        f"  step {steps:>9}  loss {'-' if loss is None else f'{loss:.4f}':>7}"
        f"  tok/s {'-' if tps is None else f'{tps:.0f}':>6}  eta {_duration(eta)}{detail}"
    )


def _waiting_reason(status: Mapping[str, Any]) -> str:
    if status.get("phase") == "Failed":
        return str(status.get("failureReason") or "")
    for ctype in ("Stalled", "Suspended", "Queued", "Reconciling"):
        for cond in status.get("conditions") or []:
            if cond.get("type") == ctype and cond.get("status") == "True":
                return str(cond.get("reason") or "")
    return ""


def why_report(job: Mapping[str, Any], log: Sequence[str] | None, pod: str | None) -> str:
    """Why the job is where it is: failure reason, message, hint, and the log tail."""
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    phase = status.get("phase") or "Pending"
    name = f"{meta.get('namespace')}/{meta.get('name')}"
    lines: list[str] = []
    if phase == "Failed":
        lines.append(f"lorajob {name} failed: {status.get('failureReason') or 'unknown reason'}")
        lines.append(f"  message: {status.get('failureMessage') or '-'}")
        lines.append(f"  hint:    {status.get('hint') or '-'}")
    elif phase == "Succeeded":
        adapter = (status.get("adapter") or {}).get("uri", "-")
        lines.append(f"lorajob {name} succeeded: the adapter is at {adapter}")
    else:
        stalled = _condition(status, "Stalled")
        waiting = stalled or _condition(status, "Suspended") or _condition(status, "Queued")
        running = _condition(status, "Running")
        if waiting is not None:
            what = "cannot run" if stalled else phase.lower()
            lines.append(f"lorajob {name} {what}: {waiting.get('reason')}")
            lines.append(f"  message: {waiting.get('message') or '-'}")
            if status.get("hint"):
                lines.append(f"  hint:    {status['hint']}")
        elif running is not None:
            lines.append(f"lorajob {name} is running: {running.get('message') or '-'}")
        else:
            lines.append(f"lorajob {name} is {phase.lower()}")
    lines.append(
        f"  attempts: {status.get('attempts', 0)} (failed {status.get('failedAttempts', 0)}, "
        f"disruptions {status.get('disruptions', 0)})"
    )
    if pod is None:
        lines.append("no trainer pod to read logs from")
    elif log is None:
        lines.append(f"the log of pod {pod} cannot be read (the pod is gone or not started)")
    else:
        lines.append(f"last {len(log)} log lines of pod {pod}:")
        lines.extend(f"  {line}" for line in log)
    return "\n".join(lines)


def _condition(status: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return dict(cond)
    return None


@dataclass(frozen=True)
class FileCheck:
    path: str
    size: int
    sha256: str


def manifest_files(manifest: Mapping[str, Any]) -> list[FileCheck]:
    """The files a manifest lists, refusing paths that would leave the target directory."""
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise PluginError("the manifest lists no files")
    out = []
    for entry in files:
        path = str(entry.get("path", ""))
        # The trainer writes plain relative paths; anything else is not its manifest.
        if not path or {"", ".", ".."} & set(path.split("/")) or "\\" in path:
            raise PluginError(f"the manifest names an unsafe path {path!r}; refusing it")
        out.append(FileCheck(path, int(entry["size"]), str(entry["sha256"])))
    return out


def verify_file(local: Path, expected: FileCheck) -> str | None:
    """None when `local` matches the manifest entry, else what differs."""
    size = local.stat().st_size
    if size != expected.size:
        return f"{expected.path}: {size} bytes, the manifest says {expected.size}"
    digest = hashlib.sha256()
    with local.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.sha256:
        return f"{expected.path}: sha256 {digest.hexdigest()}, the manifest says {expected.sha256}"
    return None


# --------------------------------------------------------------------------- cluster


class Cluster:
    """The few API calls the plugin makes, with the user's kubeconfig."""

    def __init__(self, kubeconfig: str | None, context: str | None) -> None:
        try:
            config.load_kube_config(config_file=kubeconfig, context=context)
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        except (config.ConfigException, OSError) as exc:
            raise PluginError(f"cannot load the kubeconfig: {exc}") from exc
        chosen = active
        if context:
            contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c["name"] == context), active)
        self.default_namespace = str((chosen.get("context") or {}).get("namespace") or "default")
        self.custom = client.CustomObjectsApi()
        self.core = client.CoreV1Api()

    def job(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            job: dict[str, Any] = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                raise PluginError(f"lorajob {namespace}/{name} not found") from exc
            raise PluginError(f"reading lorajob {namespace}/{name}: {exc.reason}") from exc
        return job

    def jobs(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        if namespace is None:
            listing = self.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)
        else:
            listing = self.custom.list_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL
            )
        return list(listing.get("items") or []), str(listing["metadata"]["resourceVersion"])

    def watch_jobs(self, namespace: str | None, resource_version: str) -> Iterator[dict[str, Any]]:
        """(type, object) events from `resource_version` on, for WATCH_SECONDS."""
        w = watch.Watch()
        if namespace is None:
            call: Callable[..., Any] = self.custom.list_cluster_custom_object
            args: tuple[str, ...] = (api.GROUP, api.VERSION, api.PLURAL)
        else:
            call = self.custom.list_namespaced_custom_object
            args = (api.GROUP, api.VERSION, namespace, api.PLURAL)
        yield from w.stream(
            call, *args, resource_version=resource_version, timeout_seconds=WATCH_SECONDS
        )

    def attempt_pod(self, job: Mapping[str, Any], attempt: int) -> dict[str, Any] | None:
        """The trainer pod of one attempt, by label (names are shortened for long jobs)."""
        meta = job.get("metadata") or {}
        selector = f"{LABEL_JOB_UID}={meta['uid']},{LABEL_ATTEMPT}={attempt}"
        pods = self.core.list_namespaced_pod(meta["namespace"], label_selector=selector).items
        if not pods:
            return None
        pod: dict[str, Any] = client.ApiClient().sanitize_for_serialization(pods[0])
        return pod

    def log_tail(self, namespace: str, pod: str, lines: int) -> list[str] | None:
        try:
            text = self.core.read_namespaced_pod_log(pod, namespace, tail_lines=lines)
        except ApiException:
            return None
        return str(text).splitlines()

    def stream_log(self, namespace: str, pod: str, tail: int | None, follow: bool) -> Iterator[str]:
        response = self.core.read_namespaced_pod_log(
            pod, namespace, follow=follow, tail_lines=tail, _preload_content=False
        )
        try:
            for chunk in response.stream(4096):
                yield chunk.decode("utf-8", errors="replace")
        finally:
            response.release_conn()

    def secret_env(self, namespace: str, name: str) -> dict[str, str]:
        import base64

        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            raise PluginError(
                f"cannot read Secret {namespace}/{name} (spec.storage.credentialsSecret): "
                f"{exc.reason}; drop --credentials-from-secret to use your own AWS credentials"
            ) from exc
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


# --------------------------------------------------------------------------- commands


def _current_attempt(job: Mapping[str, Any]) -> int:
    return int((job.get("status") or {}).get("attempts") or 0)


def cmd_progress(cluster: Cluster, args: argparse.Namespace, out: TextIO) -> int:
    namespace = None if args.all_namespaces else args.namespace
    items, version = cluster.jobs(namespace)
    wanted = set(args.names)
    jobs = {
        _key(j): j for j in items if not wanted or (j.get("metadata") or {}).get("name") in wanted
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

    while not all(_finished(j) for j in jobs.values()):
        try:
            for event in cluster.watch_jobs(namespace, version):
                obj = event["object"]
                if event["type"] == "ERROR":  # e.g. 410 Gone: the history is compacted
                    raise ApiException(status=int(obj.get("code") or 500), reason=obj.get("reason"))
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if _key(obj) in jobs:
                    update(_key(obj), None if event["type"] == "DELETED" else obj)
                if all(_finished(j) for j in jobs.values()):
                    break
        except ApiException as exc:
            if exc.status != 410:
                raise PluginError(f"watching lorajobs: {exc.reason}") from exc
            items, version = cluster.jobs(namespace)  # too old to resume: list again
            fresh = {_key(j): j for j in items}
            for key in list(jobs):
                update(key, fresh.get(key))
    failed = [k for k, j in jobs.items() if (j.get("status") or {}).get("phase") == "Failed"]
    return 1 if failed else 0


def _key(job: Mapping[str, Any]) -> tuple[str, str]:
    meta = job.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _finished(job: Mapping[str, Any]) -> bool:
    return (job.get("status") or {}).get("phase") in FINISHED


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
    attempt = args.attempt or _current_attempt(job)
    tail = args.tail if args.tail >= 0 else None
    while True:
        pod = _wait_for_pod(cluster, job, attempt, args.follow)
        if pod is None:
            raise PluginError(
                f"lorajob {args.namespace}/{args.name} has no trainer pod for attempt {attempt}"
                + (" yet" if not attempt else "")
            )
        name = pod["metadata"]["name"]
        if args.follow or attempt > 1:
            print(f"==> attempt {attempt}: pod {name} <==", file=out, flush=True)
        _wait_started(cluster, pod, args.follow)
        for chunk in cluster.stream_log(args.namespace, name, tail, args.follow):
            out.write(chunk)
            out.flush()
        if not args.follow:
            return 0
        # The pod's log ended: the job finished, or the next attempt takes over.
        job = _wait_for_next(cluster, job, attempt)
        if _current_attempt(job) <= attempt:
            phase = (job.get("status") or {}).get("phase")
            print(f"==> lorajob {args.namespace}/{args.name}: {phase} <==", file=out)
            return 0
        attempt, tail = _current_attempt(job), None


def _first(
    call: Callable[..., Any], args: Sequence[Any], predicate: Callable[[Any], bool], **kwargs: Any
) -> Any:
    """The first object a watch shows that satisfies `predicate` (None after the watch
    times out). A watch without a resourceVersion starts with the objects that exist."""
    w = watch.Watch()
    for event in w.stream(call, *args, timeout_seconds=WATCH_SECONDS, **kwargs):
        if event["type"] != "DELETED" and predicate(event["object"]):
            w.stop()
            return event["object"]
    return None


def _wait_for_pod(
    cluster: Cluster, job: Mapping[str, Any], attempt: int, follow: bool
) -> dict[str, Any] | None:
    pod = cluster.attempt_pod(job, attempt) if attempt else None
    if pod is not None or not follow:
        return pod
    meta = job["metadata"]
    # Not created yet: wait for the job's pod of the attempt (or the first attempt).
    selector = f"{LABEL_JOB_UID}={meta['uid']}" + (f",{LABEL_ATTEMPT}={attempt}" if attempt else "")
    found = _first(
        cluster.core.list_namespaced_pod,
        (meta["namespace"],),
        lambda _: True,
        label_selector=selector,
    )
    return None if found is None else client.ApiClient().sanitize_for_serialization(found)


def _wait_started(cluster: Cluster, pod: Mapping[str, Any], follow: bool) -> None:
    """A pod's log exists once its container started (or ended): wait that long."""
    if not follow:
        return
    meta = pod["metadata"]

    def started(obj: Any) -> bool:
        return any(
            s.state.running or s.state.terminated for s in obj.status.container_statuses or []
        )

    _first(
        cluster.core.list_namespaced_pod,
        (meta["namespace"],),
        started,
        field_selector=f"metadata.name={meta['name']}",
    )


def _wait_for_next(cluster: Cluster, job: Mapping[str, Any], attempt: int) -> dict[str, Any]:
    """The job once it has an attempt after `attempt` or has finished."""
    meta = job["metadata"]
    while True:
        found = _first(
            cluster.custom.list_namespaced_custom_object,
            (api.GROUP, api.VERSION, meta["namespace"], api.PLURAL),
            lambda j: _current_attempt(j) > attempt or _finished(j),
            field_selector=f"metadata.name={meta['name']}",
        )
        if found is not None:
            return dict(found)


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
    attempt = _current_attempt(job)
    pod = cluster.attempt_pod(job, attempt) if attempt else None
    pod_name = pod["metadata"]["name"] if pod else None
    log = cluster.log_tail(args.namespace, pod_name, args.tail) if pod_name else None
    print(why_report(job, log, pod_name), file=out)
    return 0


# --------------------------------------------------------------------------- entry point


def _connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--kubeconfig", default=default, help="kubeconfig file (default: $KUBECONFIG)"
    )
    parser.add_argument("--context", default=default, help="kubeconfig context")
    parser.add_argument(
        "-n", "--namespace", default=default, help="namespace (default: the context's)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl lj", description="LoRAJob (finetune.loraops.dev) kubectl plugin."
    )
    _connection_options(parser, None)
    # The same options after the command (`kubectl lj why NAME -n team`), as kubectl takes them.
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    progress = sub.add_parser("progress", parents=[common], help="a progress bar per job")
    progress.add_argument("names", nargs="*", help="jobs (default: every job in the namespace)")
    progress.add_argument("-A", "--all-namespaces", action="store_true")
    progress.add_argument(
        "-w", "--watch", action="store_true", help="update live until every job shown finishes"
    )
    progress.set_defaults(run=cmd_progress)

    logs = sub.add_parser(
        "logs", parents=[common], help="the trainer log of the job's current attempt"
    )
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="follow, across attempts")
    logs.add_argument("--tail", type=int, default=-1, help="lines of the past log (-1: all)")
    logs.add_argument("--attempt", type=int, default=0, help="another attempt's pod")
    logs.set_defaults(run=cmd_logs)

    adapter = sub.add_parser(
        "adapter", parents=[common], help="download the adapter, verified against its manifest"
    )
    adapter.add_argument("name")
    adapter.add_argument("-o", "--output", help="directory to create (default: <name>-adapter)")
    adapter.add_argument(
        "--credentials-from-secret",
        action="store_true",
        help="read S3 credentials from the job's spec.storage.credentialsSecret (needs get "
        "on Secrets); default: your own AWS credentials (environment, profile)",
    )
    adapter.set_defaults(run=cmd_adapter)

    why = sub.add_parser(
        "why", parents=[common], help="why the job failed (or waits): reason, hint, log tail"
    )
    why.add_argument("name")
    why.add_argument("--tail", type=int, default=20, help="log lines to show")
    why.set_defaults(run=cmd_why)
    return parser


def main(argv: Iterable[str] | None = None, out: TextIO | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    stream = out or sys.stdout
    try:
        cluster = Cluster(args.kubeconfig, args.context)
        args.namespace = args.namespace or cluster.default_namespace
        code: int = args.run(cluster, args, stream)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
