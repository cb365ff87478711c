"""The API calls the plugin makes, with the user's kubeconfig and the official client."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from kubernetes import client as _client
from kubernetes import config as _config
from kubernetes import watch as _watch
from kubernetes.client.exceptions import ApiException

from lorajob_operator import api
from lorajob_operator.kubectl_lj.errors import PluginError
from lorajob_operator.kubectl_lj.view import current_attempt, finished
from lorajob_operator.objects import LABEL_ATTEMPT, LABEL_JOB_UID, node_rank

__all__ = ["Cluster", "wait_for_next", "wait_for_pod", "wait_started"]

# The official client is only partly typed; its objects are handled as Any here.
client: Any = _client
config: Any = _config
watch: Any = _watch

# Seconds a watch stream lasts before it is opened again (the API server ends it too).
WATCH_SECONDS = 60


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

    def attempt_pod(
        self, job: Mapping[str, Any], attempt: int, rank: int = 0
    ) -> dict[str, Any] | None:
        """The trainer pod of one attempt and node rank, by label (names are shortened for
        long jobs; a job on one node has one pod, of rank 0)."""
        meta = job.get("metadata") or {}
        selector = f"{LABEL_JOB_UID}={meta['uid']},{LABEL_ATTEMPT}={attempt}"
        listing = self.core.list_namespaced_pod(meta["namespace"], label_selector=selector)
        pods = client.ApiClient().sanitize_for_serialization(listing.items)
        return next((p for p in pods if node_rank(p) == rank), None)

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

        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            raise PluginError(
                f"cannot read Secret {namespace}/{name} (spec.storage.credentialsSecret): "
                f"{exc.reason}; drop --credentials-from-secret to use your own AWS credentials"
            ) from exc
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def first_matching(
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


def wait_for_pod(
    cluster: Cluster, job: Mapping[str, Any], attempt: int, follow: bool, rank: int = 0
) -> dict[str, Any] | None:
    pod = cluster.attempt_pod(job, attempt, rank) if attempt else None
    if pod is not None or not follow:
        return pod
    meta = job["metadata"]
    # Not created yet: wait for the job's pod of the attempt (or the first attempt).
    selector = f"{LABEL_JOB_UID}={meta['uid']}" + (f",{LABEL_ATTEMPT}={attempt}" if attempt else "")
    found = first_matching(
        cluster.core.list_namespaced_pod,
        (meta["namespace"],),
        lambda obj: node_rank(client.ApiClient().sanitize_for_serialization(obj)) == rank,
        label_selector=selector,
    )
    return None if found is None else client.ApiClient().sanitize_for_serialization(found)


def wait_started(cluster: Cluster, pod: Mapping[str, Any], follow: bool) -> None:
    """A pod's log exists once its container started (or ended): wait that long."""
    if not follow:
        return
    meta = pod["metadata"]

    def started(obj: Any) -> bool:
        return any(
            s.state.running or s.state.terminated for s in obj.status.container_statuses or []
        )

    first_matching(
        cluster.core.list_namespaced_pod,
        (meta["namespace"],),
        started,
        field_selector=f"metadata.name={meta['name']}",
    )


def wait_for_next(cluster: Cluster, job: Mapping[str, Any], attempt: int) -> dict[str, Any]:
    """The job once it has an attempt after `attempt` or has finished."""
    meta = job["metadata"]
    while True:
        found = first_matching(
            cluster.custom.list_namespaced_custom_object,
            (api.GROUP, api.VERSION, meta["namespace"], api.PLURAL),
            lambda j: current_attempt(j) > attempt or finished(j),
            field_selector=f"metadata.name={meta['name']}",
        )
        if found is not None:
            return dict(found)
