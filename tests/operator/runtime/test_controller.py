"""controller.reconcile_job/execute against an in-memory stand-in for kube.Kube:
the glue between decisions and API calls (order, quota fallback, Secrets, progress)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any, cast

from lorajob_operator import controller
from lorajob_operator.kube import Kube, QuotaExceeded
from lorajob_operator.metrics import Metrics
from lorajob_operator.objects import JobRef
from lorajob_operator.policy import Policy
from lorajob_operator.settings import load_settings
from lorajob_operator.trainer_progress import ProgressError, ProgressReader
from loraops_contract.protocol import Progress

from tests.operator.runtime.kubefakes import NAME, NAMESPACE, SPEC, apply_status, job, pod


class FakeKube:
    """Records calls; keeps one job and its pods like an API server would."""

    def __init__(self, body: dict[str, Any] | None, pods: list[dict[str, Any]] | None = None):
        self.body = body
        self.pods = pods or []
        self.other_pods: list[dict[str, Any]] = []
        self.secrets: set[str] = set()
        self.quota_message: str | None = None
        self.calls: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []

    def _call(self, op: str, namespace: str, name: str | None = None) -> None:
        """Record an API call; every call must be about our job's namespace (and job)."""
        assert namespace == NAMESPACE
        assert name in (None, NAME)
        self.calls.append(op)

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("get_job", namespace, name)
        return copy.deepcopy(self.body)

    async def list_job_pods(self, job: JobRef) -> list[dict[str, Any]]:
        self._call("list_job_pods", job.namespace, job.name)
        return copy.deepcopy(self.pods)

    async def list_trainer_pods(self, namespace: str) -> list[dict[str, Any]]:
        self._call("list_trainer_pods", namespace)
        return copy.deepcopy(self.pods + self.other_pods)

    async def secret_exists(self, namespace: str, name: str) -> bool:
        self._call(f"secret_exists:{name}", namespace)
        return name in self.secrets

    async def create_pod(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        self._call("create_pod", namespace)
        if self.quota_message:
            raise QuotaExceeded(self.quota_message)
        self.created.append(dict(body))
        return copy.deepcopy(dict(body))

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None) -> None:
        assert grace_seconds is not None
        self._call(f"delete_pod:{name}", namespace)

    async def patch_job_status(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        self._call("patch_status", namespace, name)
        assert self.body is not None
        self.body = apply_status(self.body, dict(patch))
        meta = self.body["metadata"]
        if "resourceVersion" in meta:  # a write gets the next version, as on a server
            meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
        return self.body

    async def post_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        self._call("post_event", namespace)
        self.events.append(dict(body))

    async def delete_job(self, namespace: str, name: str) -> None:
        self._call("delete_job", namespace, name)

    @property
    def status(self) -> dict[str, Any]:
        return dict((self.body or {}).get("status") or {})


class FakeReader:
    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.reads: list[str] = []

    async def read(self, pod_ip: str) -> Progress:
        self.reads.append(pod_ip)
        if self.progress is None:
            raise ProgressError("not yet")
        return self.progress


def runtime(
    kube: FakeKube, reader: FakeReader | None = None, **settings: Any
) -> controller.Controller:
    return controller.Controller(
        settings=load_settings(**settings),
        kube=cast(Kube, kube),
        metrics=Metrics(),
        reader=cast(ProgressReader, reader or FakeReader(None)),
    )


def run(rt: controller.Controller, *, poll: bool = True) -> controller.Reconciled | None:
    return asyncio.run(
        controller.reconcile_job(
            rt, NAMESPACE, NAME, controller.job_logger(NAMESPACE, NAME), poll_progress=poll
        )
    )


def test_new_job_creates_pod_before_status_then_events() -> None:
    kube = FakeKube(job())
    rt = runtime(kube)
    result = run(rt)
    assert result is not None
    assert result.pod_ip is None
    assert result.requeue_after is None
    assert result.job["status"]["attempts"] == 1  # the job as written
    assert kube.calls == [
        "get_job",
        "list_job_pods",
        "create_pod",
        "patch_status",
        "post_event",
        "post_event",
    ]
    assert kube.created[0]["metadata"]["name"] == f"{NAME}-1"
    assert kube.status["attempts"] == 1
    assert [e["reason"] for e in kube.events] == ["SpecValid", "PodCreated"]
    assert rt.metrics.attempts.labels(kind="PodCreated")._value.get() == 1


def test_quota_refusal_queues_the_job_and_records_no_attempt() -> None:
    kube = FakeKube(job())
    kube.quota_message = 'pods "tune-1" is forbidden: exceeded quota: gpus'
    rt = runtime(kube)
    result = run(rt)
    assert result is not None
    assert result.requeue_after == 15
    assert kube.status["phase"] == "Queued"
    assert kube.status.get("attempts", 0) == 0
    assert "PodCreated" not in [e["reason"] for e in kube.events]
    assert "QuotaExceeded" in [e["reason"] for e in kube.events]
    assert NAME in rt.queued[NAMESPACE]
    assert rt.metrics.attempts.labels(kind="PodCreated")._value.get() == 0


def test_missing_secret_is_checked_and_reported() -> None:
    kube = FakeKube(job(spec={**SPEC, "storage": {"credentialsSecret": "creds"}}))
    rt = runtime(kube)
    run(rt)
    assert "secret_exists:creds" in kube.calls
    assert "create_pod" not in kube.calls
    assert kube.status["phase"] == "Queued"
    kube.secrets.add("creds")
    run(rt)
    assert kube.created


def test_concurrency_limit_counts_other_jobs_live_pods() -> None:
    kube = FakeKube(job())
    other = pod(1)
    other["metadata"]["labels"]["finetune.loraops.dev/job-uid"] = "someone-else"
    kube.other_pods = [other]
    rt = runtime(kube, policy=Policy(max_concurrent_jobs_default=1))
    run(rt)
    assert "create_pod" not in kube.calls
    queued = next(c for c in kube.status["conditions"] if c["type"] == "Queued")
    assert queued["reason"] == "ConcurrencyLimit"


def test_concurrency_limit_counts_from_the_pod_cache_once_the_watch_has_listed() -> None:
    """A queue of jobs waiting for a slot must not list the namespace's pods once
    per job every time a slot frees: after the watch's listing, the cache counts."""
    kube = FakeKube(job())
    rt = runtime(kube, policy=Policy(max_concurrent_jobs_default=1))
    other = pod(1)
    other["metadata"]["labels"]["finetune.loraops.dev/job-uid"] = "someone-else"
    other["metadata"]["resourceVersion"] = "5"
    elsewhere = copy.deepcopy(other)
    elsewhere["metadata"].update(namespace="team-b", uid="pod-b")
    elsewhere["metadata"]["labels"]["finetune.loraops.dev/job-uid"] = "team-b-job"
    rt.informer.pods_listed(None, [other, elsewhere], "10")
    run(rt)
    assert "list_trainer_pods" not in kube.calls
    assert "create_pod" not in kube.calls
    queued = next(c for c in kube.status["conditions"] if c["type"] == "Queued")
    assert queued["reason"] == "ConcurrencyLimit"
    rt.informer.pod_changed("DELETED", other)  # the slot frees up (the other namespace's pod stays)
    run(rt)
    assert "list_trainer_pods" not in kube.calls
    assert kube.created  # one job of this namespace runs: its own


def test_running_pod_progress_is_read_and_copied() -> None:
    kube = FakeKube(job(), [])
    run(runtime(kube))  # creates attempt 1
    kube.pods = [pod(1)]
    reader = FakeReader(Progress(stage="training", step=4, total_steps=8))
    rt = runtime(kube, reader)
    result = run(rt)
    assert result is not None
    assert result.pod_ip == "127.0.0.9"
    assert reader.reads == ["127.0.0.9"]
    assert kube.status["progress"]["percent"] == 50.0
    # No poll requested: the reader is left alone.
    run(rt, poll=False)
    assert reader.reads == ["127.0.0.9"]


def test_unreadable_progress_is_counted_not_fatal() -> None:
    kube = FakeKube(job(), [])
    run(runtime(kube))
    kube.pods = [pod(1)]
    rt = runtime(kube, FakeReader(None))
    run(rt)
    assert rt.metrics.progress_poll_errors._value.get() == 1
    assert kube.status["phase"] == "Running"


def test_job_gone_ends_the_loop() -> None:
    assert run(runtime(FakeKube(None))) is None


def test_ttl_deletes_the_job() -> None:
    status = {
        "phase": "Succeeded",
        "attempts": 1,
        "completionTime": "2020-01-01T00:00:00Z",
        "observedGeneration": 1,
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed"}],
    }
    kube = FakeKube(job(spec={**SPEC, "ttlSecondsAfterFinished": 0}, status=status))
    run(runtime(kube))
    assert "delete_job" in kube.calls


def test_progress_only_poll_patches_progress_without_reconciling() -> None:
    kube = FakeKube(job(), [])
    run(runtime(kube))
    kube.pods = [pod(1)]
    reader = FakeReader(Progress(stage="training", step=2, total_steps=8))
    rt = runtime(kube, reader, status_min_interval_seconds=0)
    last = run(rt)
    assert last is not None
    kube.calls.clear()
    reader.progress = Progress(stage="training", step=6, total_steps=8)
    polled = asyncio.run(controller.poll_progress(rt, last, controller.job_logger(NAMESPACE, NAME)))
    assert kube.calls == ["patch_status"]  # no GET, no LIST
    assert polled is not None
    assert polled.job["status"]["progress"]["step"] == 6
    # Nothing new: nothing written.
    kube.calls.clear()
    again = asyncio.run(
        controller.poll_progress(rt, polled, controller.job_logger(NAMESPACE, NAME))
    )
    assert again is polled
    assert kube.calls == []


def test_no_progress_poll_for_a_pod_being_stopped() -> None:
    kube = FakeKube(job(), [])
    run(runtime(kube))
    kube.pods = [pod(1)]
    run(runtime(kube))
    kube.body = {**(kube.body or {}), "spec": {**SPEC, "suspend": True}}
    result = run(runtime(kube, FakeReader(Progress(step=1))))
    assert result is not None
    assert result.pod_ip is None
    assert "delete_pod:tune-1" in kube.calls
