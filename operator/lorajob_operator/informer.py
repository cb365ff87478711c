"""The operator's copy of the cluster: LoRAJobs as their watch shows them, trainer pods as
the pod reflector (podwatch.follow_pods) lists and watches them; the informer of
client-go's informer/reflector pair.

It owns what is cached and how it is kept right: the job bodies kopf's watch delivers,
the pod views (pods.pod_view) by job uid, the pods this process deleted (so a listing
taken just before a deletion does not bring one back), which scopes have been listed
(from then on the cache holds every trainer pod there), what a relisting replaces, and
which of two versions of an object is the newer (`is_newer`). It decides nothing about
jobs: a pod change wakes the pod's job through the `wake` callback the controller
gives it, and the controller reads from here.

Resource versions. Kubernetes 1.35 guarantees that the resourceVersions of two objects
of the same resource compare as integers (KEP-5504, stable in 1.35; client-go's
resourceversion.CompareResourceVersion): a well-formed one is a positive integer
without leading zeros, and the larger is the later. `compare_versions` follows that
rule exactly and answers None for anything else, where the caller then treats the
versions as opaque (equal or not) and reads the API instead of trusting the cache.
Before 1.35 every API server in practice (etcd revisions) wrote such versions, but
nothing promised it; the fallback keeps such a server correct, at the cost of reads.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from lorajob_operator import objects
from lorajob_operator.metrics import Metrics
from lorajob_operator.pods import is_live, is_stopping, job_key_of_pod, pod_view

__all__ = ["Informer", "JobKey", "compare_versions", "is_newer", "resource_version"]

log = logging.getLogger("lorajob_operator.informer")

JobKey = tuple[str, str]  # (namespace, name)
# Uids of recently deleted pods, so an API listing taken just before a deletion
# does not bring the pod back into the watch cache.
DELETED_POD_MEMORY = 4096


def resource_version(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("resourceVersion") or "")


def compare_versions(a: str, b: str) -> int | None:
    """-1, 0 or 1 as resourceVersion `a` is earlier than, the same as or later than `b`
    (two objects of one resource), or None where either is not a well-formed version
    (KEP-5504: a positive integer without leading zeros; see the module docstring)."""
    for rv in (a, b):
        if not (rv.isascii() and rv.isdigit()) or rv.startswith("0"):
            return None
    if len(a) != len(b):
        return -1 if len(a) < len(b) else 1
    return (a > b) - (a < b)


def is_newer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether `a` is a later version of an object than `b` (False where that cannot
    be told)."""
    return compare_versions(resource_version(a), resource_version(b)) == 1


def _uid(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("uid", ""))


def _namespace(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("namespace", ""))


def _pod_keys(pod: Mapping[str, Any]) -> tuple[str | None, str]:
    """(job uid label, the pod's uid, or its name where a test body has no uid)."""
    meta = pod.get("metadata") or {}
    job_uid = (meta.get("labels") or {}).get(objects.LABEL_JOB_UID)
    return (str(job_uid) if job_uid else None), str(meta.get("uid") or meta.get("name"))


class Informer:
    """The job and pod caches, fed by the watches (see the module docstring).

    `wake(key, urgent)` asks the controller for a pass of a job whose pod changed;
    `wake_queued(namespace)` wakes the namespace's jobs that wait for a slot, when a
    pod there ended.
    """

    def __init__(
        self,
        metrics: Metrics,
        wake: Callable[[JobKey, bool], None],
        wake_queued: Callable[[str], None],
    ) -> None:
        self.metrics = metrics
        self._wake = wake
        self._wake_queued = wake_queued
        # Every LoRAJob the job watch has shown, as it last showed it (a shallow copy).
        self.jobs: dict[JobKey, Mapping[str, Any]] = {}
        # The trainer pods as the pod watch last showed them (pods.pod_view()):
        # job uid -> pod key -> view.
        self.pods: dict[str, dict[str, dict[str, Any]]] = {}
        self.deleted_pods: OrderedDict[str, None] = OrderedDict()
        # Scopes (a namespace, or None: all) the pod watch has listed: from then on
        # the cache holds every trainer pod there (the watch adds what comes after).
        self.listed_scopes: set[str | None] = set()

    # -- jobs (kopf's watch delivers them)

    def job_changed(self, key: JobKey, body: Mapping[str, Any]) -> bool:
        """Cache the job as the watch shows it; True when it is seen for the first time
        (the startup listing, a new job, one recreated under the same name)."""
        snapshot = dict(body)  # shallow: kopf hands each event a freshly decoded body
        known = self.jobs.get(key)
        self.jobs[key] = snapshot
        return known is None or _uid(known) != _uid(snapshot)

    def job_deleted(self, key: JobKey, job_uid: str) -> None:
        """The job is gone from the API: its body and its pods leave the cache."""
        self.jobs.pop(key, None)
        self.pods.pop(job_uid, None)

    # -- pods

    def job_pods(self, job_uid: str) -> list[dict[str, Any]]:
        return list(self.pods.get(job_uid, {}).values())

    def remember_pod(self, pod: Mapping[str, Any], *, newer: bool = True) -> None:
        """Cache a pod from a watch event (`newer`: it replaces what is cached) or a
        create response (`newer=False`: kept only if the watch has not shown it yet;
        the watch may already hold a later version)."""
        job_uid, key = _pod_keys(pod)
        if job_uid is None or key in self.deleted_pods:
            return
        pods = self.pods.setdefault(job_uid, {})
        if newer or key not in pods:
            pods[key] = pod_view(pod)

    def forget_pod(self, pod: Mapping[str, Any]) -> None:
        job_uid, key = _pod_keys(pod)
        self.deleted_pods[key] = None
        while len(self.deleted_pods) > DELETED_POD_MEMORY:
            self.deleted_pods.popitem(last=False)
        pods = self.pods.get(job_uid or "")
        if pods is not None:
            pods.pop(key, None)
            if not pods:
                del self.pods[job_uid or ""]

    def replace_pods(self, job_uid: str, listed: list[dict[str, Any]]) -> None:
        """Cache the job's pods as an API listing shows them (pods gone since the
        last watch event are dropped; a version the watch already superseded is not)."""
        cached = self.pods.get(job_uid, {})
        fresh: dict[str, dict[str, Any]] = {}
        for pod in listed:
            key = _pod_keys(pod)[1]
            if key in self.deleted_pods:
                continue
            known = cached.get(key)
            fresh[key] = known if known and is_newer(known, pod) else pod_view(pod)
        if fresh:
            self.pods[job_uid] = fresh
        else:
            self.pods.pop(job_uid, None)

    def live_jobs_in(self, namespace: str) -> set[str] | None:
        """Uids of the namespace's jobs with a live trainer pod, from the cache; None
        until the pod watch has listed the namespace (the cache may lack pods)."""
        if None not in self.listed_scopes and namespace not in self.listed_scopes:
            return None
        return {
            job_uid
            for job_uid, pods in self.pods.items()
            if any(_namespace(p) == namespace and is_live(p) for p in pods.values())
        }

    # -- podwatch.PodSink: what the pod reflector delivers

    def pod_changed(self, type: str, pod: Mapping[str, Any]) -> None:
        """A trainer pod changed: cache it, wake its job; a pod that ended may free a
        queue slot."""
        if type == "DELETED":
            self.forget_pod(pod)
        else:
            self.remember_pod(pod)
        key = job_key_of_pod(pod)
        if key is not None:
            self._wake(key, type == "DELETED" or is_stopping(pod))
        if type == "DELETED" or not is_live(pod):
            namespace = _namespace(pod)
            if namespace:
                self._wake_queued(namespace)

    def pods_listed(
        self, namespace: str | None, listed: list[dict[str, Any]], resource_version: str
    ) -> None:
        """The watch listed every trainer pod of `namespace` (None: all) at
        `resource_version`: the cache becomes that listing. A cached pod missing
        from it was deleted while no watch ran (no DELETED event will come): it is
        dropped and its job woken, as are the jobs whose pods changed meanwhile.
        A pod newer than the listing (created by a pass while the listing was on
        its way) is kept: its ADDED event is still to come. Where the versions do
        not compare, a pod missing from the listing is kept until its watch event
        or the next listing: the job's resync pass reads the API meanwhile."""
        self.listed_scopes.add(namespace)
        fresh: dict[str, tuple[str, dict[str, Any]]] = {}  # pod key -> (job uid, pod)
        for pod in listed:
            job_uid, key = _pod_keys(pod)
            if job_uid is not None and key not in self.deleted_pods:
                fresh[key] = (job_uid, pod)
        for cached in list(self.pods.values()):
            for key, view in list(cached.items()):
                in_scope = namespace is None or _namespace(view) == namespace
                older = compare_versions(
                    str((view.get("metadata") or {}).get("resourceVersion") or ""),
                    resource_version,
                )
                if in_scope and key not in fresh and older is not None and older <= 0:
                    self.pod_changed("DELETED", view)
        for key, (job_uid, pod) in fresh.items():
            known = self.pods.get(job_uid, {}).get(key)
            if known is None or is_newer(pod, known):
                self.pod_changed("MODIFIED" if known else "ADDED", pod)

    def pod_watch_restarted(self, reason: str) -> None:
        self.metrics.pod_watch_restarts.labels(reason=reason).inc()
