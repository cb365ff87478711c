"""The operator's watch cache: reconciliations from watched bodies instead of API
reads, and the cases where the loop must still ask the API (restart safety)."""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import replace
from typing import Any

import pytest
from lorajob_operator import controller, informer, pods, reconcile
from lorajob_operator.settings import load_settings

from tests.operator.runtime.kubefakes import NAME, NAMESPACE, T0, at, job, pod, termination
from tests.operator.runtime.test_controller import FakeKube, run, runtime

SETTINGS = load_settings()


def _trainer_pod(status: dict[str, Any], **meta: Any) -> dict[str, Any]:
    """The pod decide() itself builds for attempt 1, as the server would return it."""
    facts: dict[str, Any] = {"missing_secrets": (), "active_in_namespace": 0}
    decision = reconcile.decide(reconcile.Observed(job(), [], T0, **facts), SETTINGS)
    assert decision.create is not None
    body = copy.deepcopy(decision.create.body)
    body["metadata"].update(uid="pod-uid-1", resourceVersion="7", **meta)
    body["spec"]["nodeName"] = "gpu-node-1"
    body["status"] = status
    return body


def _comparable(decision: reconcile.Decision) -> tuple[reconcile.Decision, Any]:
    """The decision with its create's pod body only (CreatePod also holds the
    builder that would decide a refused create, an object compared by identity)."""
    create = decision.create
    return replace(decision, create=None), create and (create.attempt, create.body)


def _written(attempt_status: dict[str, Any]) -> dict[str, Any]:
    """A job whose status says attempt 1 runs in pod tune-1."""
    return job(
        status={"attempts": 1, "podName": f"{NAME}-1", **attempt_status}, resourceVersion="5"
    )


@pytest.mark.parametrize(
    "status",
    [
        {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]},
        pod(1)["status"],
        pod(1, "Failed", exit_code=1, message=termination("Failed", "TrainerError"))["status"],
        pod(1, "Succeeded", exit_code=0, message=termination())["status"],
        pod(1, "Pending", waiting="ErrImagePull")["status"],
    ],
)
def test_pod_view_decides_like_the_whole_pod(status: dict[str, Any]) -> None:
    full = _trainer_pod(status)
    view = pods.pod_view(full)
    assert "env" not in str(view["spec"])  # the bulk is gone
    for body in (job(), _written({"phase": "Running"})):
        whole = reconcile.decide(reconcile.Observed(body, [full], at(60)), SETTINGS)
        slim = reconcile.decide(reconcile.Observed(body, [view], at(60)), SETTINGS)
        assert _comparable(slim) == _comparable(whole)


def test_pod_view_keeps_scheduling_gates_and_deletion() -> None:
    full = _trainer_pod({"phase": "Pending"}, deletionTimestamp="2026-01-01T12:00:00Z")
    full["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    view = pods.pod_view(full)
    assert view["spec"]["schedulingGates"] == full["spec"]["schedulingGates"]
    assert view["metadata"]["deletionTimestamp"] == "2026-01-01T12:00:00Z"
    assert pods.job_key_of_pod(view) == (NAMESPACE, NAME)
    # Views of separately decoded pods share their short strings.
    other = pods.pod_view(json.loads(json.dumps(full)))
    assert other == view
    assert other["status"]["phase"] is view["status"]["phase"]
    assert next(iter(other["metadata"])) is next(iter(view["metadata"]))


def test_a_cached_pass_reads_nothing_from_the_api() -> None:
    kube = FakeKube(job(resourceVersion="1"))
    rt = runtime(kube)
    first = run(rt)  # without `seen`: GET + LIST, creates attempt 1
    assert first is not None
    assert kube.body is not None
    assert [p["metadata"]["name"] for p in rt.informer.job_pods(kube.body["metadata"]["uid"])] == [
        f"{NAME}-1"
    ]  # the create response is cached: the next pass sees its pod
    kube.calls.clear()
    seen = controller._cached_view(rt, kube.body, first)
    assert seen is not None
    again = asyncio.run(
        controller.reconcile_job(
            rt,
            NAMESPACE,
            NAME,
            controller.job_logger(NAMESPACE, NAME),
            poll_progress=False,
            seen=seen,
        )
    )
    assert again is not None
    assert "get_job" not in kube.calls
    assert "list_job_pods" not in kube.calls
    assert "create_pod" not in kube.calls  # the cached pod counts as the live attempt


def test_first_pass_of_a_job_with_attempts_asks_the_api() -> None:
    """After a restart the pod watch may not have listed the job's pods yet."""
    rt = runtime(FakeKube(job()))
    assert controller._cached_view(rt, _written({"phase": "Running"}), None) is None
    fresh = job()
    assert controller._cached_view(rt, fresh, None) == fresh  # a new job's pods are ours


def test_current_pod_missing_from_the_cache_asks_the_api() -> None:
    rt = runtime(FakeKube(job()))
    body = _written({"phase": "Running"})
    last = controller.Reconciled(job=body, pod_ip=None, requeue_after=None)
    assert controller._cached_view(rt, body, last) is None
    rt.informer.remember_pod(pod(1))
    assert controller._cached_view(rt, body, last) == body


def test_the_newer_of_watched_and_written_job_is_used() -> None:
    rt = runtime(FakeKube(job()))
    rt.informer.remember_pod(pod(1))
    watched = _written({"phase": "Pending"})
    watched["metadata"]["resourceVersion"] = "10"
    written = _written({"phase": "Running"})
    written["metadata"]["resourceVersion"] = "12"
    last = controller.Reconciled(job=written, pod_ip=None, requeue_after=None)
    assert controller._cached_view(rt, watched, last) == written  # the watch lags our write
    watched["metadata"]["resourceVersion"] = "13"
    assert controller._cached_view(rt, watched, last) == watched
    watched["metadata"]["resourceVersion"] = "opaque"
    assert controller._cached_view(rt, watched, last) is None  # cannot tell: read it


def test_pod_cache_keeps_the_newest_version_and_forgets_deleted_pods() -> None:
    rt = runtime(FakeKube(job()))
    uid = job()["metadata"]["uid"]
    running = pod(1)
    running["metadata"]["resourceVersion"] = "20"
    rt.informer.remember_pod(running)
    created = pod(1, "Pending")
    created["metadata"]["resourceVersion"] = "15"
    rt.informer.remember_pod(created, newer=False)  # a create response after the watch caught up
    assert rt.informer.job_pods(uid)[0]["status"]["phase"] == "Running"
    rt.informer.replace_pods(uid, [created])  # a listing older than what the watch showed
    assert rt.informer.job_pods(uid)[0]["status"]["phase"] == "Running"
    rt.informer.forget_pod(running)
    assert rt.informer.job_pods(uid) == []
    rt.informer.replace_pods(uid, [running])  # listed just before the deletion
    assert rt.informer.job_pods(uid) == []
    rt.informer.remember_pod(pod(2))
    rt.informer.replace_pods(uid, [])  # gone from the API: gone from the cache
    assert rt.informer.job_pods(uid) == []
    assert uid not in rt.informer.pods


def test_only_routine_pod_events_are_debounced() -> None:
    """A pod that stops must be looked at before it is gone (its last state says why)."""
    assert not pods.is_stopping(pod(1))
    assert not pods.is_stopping(pod(1, "Pending"))
    assert pods.is_stopping(pod(1, deleting=True))
    assert pods.is_stopping(pod(1, "Failed", exit_code=1))
    evicted = pod(1, conditions=[{"type": "DisruptionTarget", "status": "True"}])
    assert pods.is_stopping(evicted)

    async def check() -> None:
        rt = runtime(FakeKube(job()))
        key = (NAMESPACE, NAME)
        rt.wake(key)  # not listed yet: nothing to queue
        assert len(rt.queue) == 0
        rt.watch_job(key, job())  # first sight: queued at once
        assert len(rt.queue) == 1
        assert await rt.queue.get() == key
        rt.wake(key, urgent=False)  # no pass has begun yet: the first is never delayed
        rt.queue.done(key)
        assert len(rt.queue) == 1
        assert await rt.queue.get() == key
        rt.states[key].started = True  # the first pass runs: its pod's events can wait
        rt.states[key].dirty = False
        rt.queue.done(key)
        rt.wake(key, urgent=False)  # routine: later, with the rest of the burst
        assert rt.states[key].dirty
        assert len(rt.queue) == 0
        assert rt.queue.scheduled(key) is not None
        rt.wake(key)  # urgent: now
        assert len(rt.queue) == 1
        rt.forget_job(key, job()["metadata"]["uid"])
        assert key not in rt.states
        assert rt.queue.scheduled(key) is None

    asyncio.run(check())


def test_the_written_job_gives_way_to_the_watched_one_once_caught_up() -> None:
    written = _written({"phase": "Running"})
    written["metadata"]["resourceVersion"] = "12"
    last = controller.Reconciled(job=written, pod_ip="10.0.0.1", requeue_after=None)
    watched = copy.deepcopy(written)
    watched["metadata"]["resourceVersion"] = "11"
    assert controller._share_watched(watched, last) is last  # the watch still lags
    watched["metadata"]["resourceVersion"] = "12"
    shared = controller._share_watched(watched, last)
    assert shared.job == watched
    assert shared.job["metadata"] is watched["metadata"]  # no second copy
    assert shared.pod_ip == "10.0.0.1"
    assert controller._share_watched(watched, shared) is shared


def _turn(rt: controller.Controller) -> None:
    """One turn of the work queue for the test job, as a worker takes it."""
    key = (NAMESPACE, NAME)

    async def turn() -> None:
        if len(rt.queue) == 0:
            rt.queue.add(key)
        assert await rt.queue.get() == key
        try:
            await controller.process(rt, key)
        finally:
            rt.queue.done(key)

    asyncio.run(turn())


def _watched(body: dict[str, Any]) -> tuple[FakeKube, controller.Controller, informer.JobKey]:
    """A runtime whose job watch has shown `body` (the API holds it too)."""
    kube = FakeKube(body)
    rt = runtime(kube)
    key = (NAMESPACE, NAME)
    rt.watch_job(key, body)
    return kube, rt, key


def test_queue_passes_act_reschedule_and_parse_the_spec_once_per_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parses: list[Any] = []
    real_parse = reconcile.parse_job_spec

    def counting_parse(spec: Any, namespace: str, settings: Any) -> reconcile.ParsedSpec:
        parses.append(spec)
        return real_parse(spec, namespace, settings)

    monkeypatch.setattr(reconcile, "parse_job_spec", counting_parse)
    kube, rt, key = _watched(job(resourceVersion="1"))
    assert kube.body is not None
    _turn(rt)  # a new job's first pass trusts the watch and creates attempt 1
    assert kube.calls[:1] == ["create_pod"]
    assert "get_job" not in kube.calls
    assert "list_job_pods" not in kube.calls
    state = rt.states[key]
    assert state.last is not None
    assert not state.dirty
    assert len(parses) == 1
    kube.calls.clear()
    _turn(rt)  # a stale timer: nothing is due, nothing is done
    assert kube.calls == []
    rt.watch_job(key, kube.body)
    state.dirty = True  # an event asked for a pass: from the watch cache, no re-parse
    _turn(rt)
    assert "get_job" not in kube.calls
    assert len(parses) == 1
    edited = copy.deepcopy(kube.body)
    edited["metadata"]["generation"] = 2
    edited["spec"]["training"]["maxSteps"] = 40
    rt.watch_job(key, edited)
    state.dirty = True
    _turn(rt)
    assert parses[-1] == edited["spec"]  # a new generation is parsed again
    assert len(parses) == 2


def test_a_failed_pass_backs_off_and_rereads_the_api() -> None:
    kube, rt, key = _watched(job(resourceVersion="1"))
    _turn(rt)

    async def unreachable(namespace: str, name: str) -> None:
        raise OSError(f"connection refused: GET {namespace}/{name}")

    kube.get_job = unreachable  # type: ignore[method-assign]
    rt.states[key].next_resync = 0.0  # this pass reads the API
    rt.states[key].dirty = True
    _turn(rt)
    state = rt.states[key]
    assert state.errors == 1
    assert state.last is None
    assert state.next_resync == 0.0


def test_a_job_with_attempts_is_read_from_the_api_on_its_first_pass() -> None:
    """After a restart the watch lists a job whose pods it may not have shown yet."""
    kube, rt, _ = _watched(_written({"phase": "Running"}))
    _turn(rt)
    assert kube.calls[:2] == ["get_job", "list_job_pods"]


def test_a_job_gone_from_the_api_gets_no_more_passes() -> None:
    kube, rt, key = _watched(_written({"phase": "Running"}))
    kube.body = None
    _turn(rt)
    assert rt.states[key].gone
    kube.calls.clear()
    rt.wake(key)
    _turn(rt)
    assert kube.calls == []
    rt.forget_job(key, job()["metadata"]["uid"])  # its DELETED event
    assert key not in rt.states


def test_job_events_wake_a_known_job_only_for_what_no_pass_has_taken_up() -> None:
    """kopf's finalizer write comes back (no status yet) while the first pass runs:
    that pass has the generation already, so no second pass follows at once."""

    async def check() -> None:
        rt = runtime(FakeKube(job()))
        key = (NAMESPACE, NAME)

        async def deliver(body: dict[str, Any]) -> bool:
            """Deliver a MODIFIED event; whether it queued the job."""
            rt.job_event("MODIFIED", body, NAMESPACE, NAME)
            queued = len(rt.queue) > 0
            while len(rt.queue):
                rt.queue.done(await rt.queue.get())
            return queued

        assert await deliver(job())  # first sight: queued as new
        state = rt.states[key]
        state.started = True
        state.parsed_spec(job(), SETTINGS)  # the first pass has parsed generation 1
        assert not await deliver(job(finalizers=["finetune.loraops.dev/finalizer"]))
        assert await deliver(job(generation=2))  # a spec edit
        assert await deliver(
            job(status={"observedGeneration": 1}, deletionTimestamp="2026-01-01T00:00:00Z")
        )

    asyncio.run(check())


def test_resource_versions_compare_as_kubernetes_defines_it() -> None:
    """KEP-5504 (stable in Kubernetes 1.35): well-formed versions are positive integers
    without leading zeros, compared as numbers; anything else does not compare."""
    assert informer.compare_versions("9", "10") == -1  # not as strings
    assert informer.compare_versions("123", "123") == 0
    assert informer.compare_versions("1000", "999") == 1
    for bad in ("", "0", "012", "12a", "-5", "١٢"):
        assert informer.compare_versions(bad, "5") is None
        assert informer.compare_versions("5", bad) is None
    assert informer.is_newer(job(resourceVersion="10"), job(resourceVersion="9"))
    assert not informer.is_newer(job(resourceVersion="opaque"), job(resourceVersion="9"))
