"""The pod reflector (podwatch.follow_pods) and the cache it fills (Runtime.pods_listed /
pod_changed): list, watch, resume, list again after 410, and pods deleted unseen."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from lorajob_operator import controller, podwatch
from lorajob_operator.kube import KubeError
from lorajob_operator.settings import load_settings

from tests.operator.runtime.kubefakes import NAME, NAMESPACE, job, pod
from tests.operator.runtime.test_controller import FakeKube, runtime

Event = tuple[str, dict[str, Any]]


def _at(body: dict[str, Any], version: int) -> dict[str, Any]:
    body["metadata"]["resourceVersion"] = str(version)
    return body


class ScriptedSource:
    """Listings and watch streams handed out in order; the test ends when both run out."""

    def __init__(
        self, listings: list[list[dict[str, Any]]], streams: list[list[Event] | Exception]
    ):
        self.listings = listings
        self.streams = streams
        self.calls: list[tuple[str, str | None, str]] = []
        self.done = asyncio.Event()

    async def list_trainer_pods_at(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        listed = self.listings.pop(0)
        version = str(len(self.calls) * 100 + 100)
        self.calls.append(("list", namespace, version))
        return listed, version

    async def watch_trainer_pods(
        self, namespace: str | None, resource_version: str
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.calls.append(("watch", namespace, resource_version))
        if not self.streams:
            self.done.set()
            await asyncio.Event().wait()  # a quiet stream, until cancelled
        stream = self.streams.pop(0)
        if isinstance(stream, Exception):
            raise stream
        for event in stream:
            yield event


class RecordingSink:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def pods_listed(
        self, namespace: str | None, pods: list[dict[str, Any]], resource_version: str
    ) -> None:
        assert resource_version.isdigit()
        self.seen.append(("listed", [namespace, *(p["metadata"]["name"] for p in pods)]))

    def pod_changed(self, type: str, pod: Mapping[str, Any]) -> None:
        self.seen.append((type, pod["metadata"]["name"]))

    def pod_watch_restarted(self, reason: str) -> None:
        self.seen.append(("restarted", reason))


def _follow(source: ScriptedSource, sink: RecordingSink, namespace: str | None = None) -> None:
    async def main() -> None:
        task = asyncio.create_task(podwatch.follow_pods(source, sink, namespace))
        await asyncio.wait_for(source.done.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_lists_then_watches_and_resumes_from_the_last_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(podwatch, "RETRY_SECONDS", 0.01)
    bookmark = {"kind": "Pod", "metadata": {"resourceVersion": "130"}}
    source = ScriptedSource(
        [[pod(1)]],
        [
            [("MODIFIED", _at(pod(1), 110)), ("BOOKMARK", bookmark)],  # the server's timeout
            KubeError("connection reset"),  # a broken stream: resumed, not listed again
            [("DELETED", _at(pod(1), 140))],
        ],
    )
    sink = RecordingSink()
    _follow(source, sink, NAMESPACE)
    assert source.calls == [
        ("list", NAMESPACE, "100"),
        ("watch", NAMESPACE, "100"),
        ("watch", NAMESPACE, "130"),
        ("watch", NAMESPACE, "130"),
        ("watch", NAMESPACE, "140"),
    ]
    assert sink.seen == [
        ("listed", [NAMESPACE, f"{NAME}-1"]),
        ("MODIFIED", f"{NAME}-1"),
        ("restarted", "error"),
        ("DELETED", f"{NAME}-1"),
    ]


def test_an_expired_watch_lists_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(podwatch, "RETRY_SECONDS", 0.01)
    gone = {"code": 410, "reason": "Expired", "message": "too old resource version: 100"}
    source = ScriptedSource([[pod(1)], []], [[("ERROR", gone)]])
    sink = RecordingSink()
    _follow(source, sink)
    assert [c[0] for c in source.calls] == ["list", "watch", "list", "watch"]
    assert sink.seen == [
        ("listed", [None, f"{NAME}-1"]),
        ("restarted", "expired"),
        ("listed", [None]),
    ]


def test_a_listing_drops_pods_deleted_while_no_watch_ran() -> None:
    """No DELETED event comes for a pod deleted between two watches: the listing
    itself says it is gone, and its job is woken to act on it at once."""
    rt = runtime(FakeKube(job()))
    key = (NAMESPACE, NAME)
    uid = job()["metadata"]["uid"]
    rt.watch_job(key, job())
    running = _at(pod(1), 20)
    rt.informer.pods_listed(None, [running], "30")
    assert [p["metadata"]["name"] for p in rt.informer.job_pods(uid)] == [f"{NAME}-1"]

    async def drain() -> None:
        while len(rt.queue):
            rt.queue.done(await rt.queue.get())

    asyncio.run(drain())
    rt.states[key].last = controller.Reconciled(job=job(), pod_ip=None, requeue_after=None)
    rt.states[key].dirty = False
    rt.informer.pods_listed(NAMESPACE, [running], "40")  # unchanged: nothing to do
    assert not rt.states[key].dirty
    rt.informer.pods_listed("elsewhere", [], "50")  # another namespace's listing leaves ours alone
    assert rt.informer.job_pods(uid) != []
    rt.informer.pods_listed(NAMESPACE, [], "60")
    assert rt.informer.job_pods(uid) == []
    rt.informer.pod_watch_restarted("expired")
    assert rt.metrics.pod_watch_restarts.labels(reason="expired")._value.get() == 1
    assert rt.states[key].dirty
    assert len(rt.queue) == 1  # woken at once, not debounced


def test_a_pod_created_after_the_listing_was_taken_is_kept() -> None:
    """A pass creates a pod while the listing is on its way: the listing does not
    hold it, and the watch that follows will deliver its ADDED event."""
    rt = runtime(FakeKube(job()))
    uid = job()["metadata"]["uid"]
    rt.informer.remember_pod(_at(pod(1, "Pending"), 150), newer=False)  # the create's response
    rt.informer.pods_listed(None, [], "100")
    assert [p["metadata"]["name"] for p in rt.informer.job_pods(uid)] == [f"{NAME}-1"]
    rt.informer.pod_changed("ADDED", _at(pod(1, "Pending"), 150))
    assert rt.informer.job_pods(uid) != []
    rt.informer.pods_listed(None, [], "160")  # a later listing without it: deleted meanwhile
    assert rt.informer.job_pods(uid) == []


def test_a_listing_updates_changed_pods_but_never_goes_back() -> None:
    rt = runtime(FakeKube(job()))
    uid = job()["metadata"]["uid"]
    rt.informer.pod_changed("ADDED", _at(pod(1, "Pending"), 20))
    rt.informer.pods_listed(None, [_at(pod(1), 30)], "35")
    assert rt.informer.job_pods(uid)[0]["status"]["phase"] == "Running"
    rt.informer.pods_listed(None, [_at(pod(1, "Pending"), 25)], "35")  # older than the cache: kept
    assert rt.informer.job_pods(uid)[0]["status"]["phase"] == "Running"


def test_one_pod_watch_per_watched_namespace_or_one_for_all() -> None:
    """Namespaced RBAC (the chart's watchNamespaces) allows no cluster-wide watch."""
    settings = load_settings()
    scoped = settings.model_copy(update={"namespaces": ["team-a", "team-b"]})
    assert controller.pod_watch_scopes(scoped) == ["team-a", "team-b"]
    assert controller.pod_watch_scopes(settings.model_copy(update={"namespaces": []})) == [None]


def test_failures_in_a_row_back_off_and_a_delivered_event_resets_that(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", record)
    monkeypatch.setattr(podwatch, "RETRY_MAX_SECONDS", 3.0)
    down = KubeError("connection refused")
    source = ScriptedSource([[]], [down, down, down, [("MODIFIED", _at(pod(1), 110))], down])
    _follow(source, RecordingSink())
    # 1, 2, then 4 capped at 3; the stream that delivered an event ended at once
    # (a pause of 1 before the next), and the failure after it starts from 1 again.
    assert delays == [1.0, 2.0, 3.0, 1.0, 1.0]
