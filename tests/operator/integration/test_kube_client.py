"""kube.Kube against a real kube-apiserver: how API answers map to what the
reconciler needs (409 = already there, quota 403 = wait, other 4xx = refusal)."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from kubernetes import config
from lorajob_operator import api
from lorajob_operator import kube as kube_module
from lorajob_operator.kube import Kube, PodRejected, QuotaExceeded
from lorajob_operator.objects import JobRef

from devcluster.controlplane import ControlPlane

# Each module starts a whole control plane (API server, kubelet, operator).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

NS = "default"


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kube, ControlPlane]]:
    # Without the watch cache a watch is served by etcd itself, so compacting etcd's
    # history (cluster.compact_etcd) expires an old resourceVersion deterministically.
    with ControlPlane(
        tmp_path_factory.mktemp("cluster"), kubelet=False, apiserver_args=["--watch-cache=false"]
    ) as cp:
        client = config.new_client_from_config(config_file=str(cp.kubeconfig))  # type: ignore[no-untyped-call]
        yield Kube(client), cp


def _run(k: Kube, scenario: Coroutine[Any, Any, None]) -> None:
    """Run one scenario in a fresh event loop, closing the session Kube opened in it."""

    async def run() -> None:
        try:
            await scenario
        finally:
            await k.close()

    asyncio.run(run())


def _pod(name: str, uid: str = "job-uid", gpus: int = 0) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "trainer", "image": "busybox:1"}
    if gpus:
        container["resources"] = {
            "requests": {"nvidia.com/gpu": str(gpus)},
            "limits": {"nvidia.com/gpu": str(gpus)},
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/managed-by": "lorajob-operator",
                "finetune.loraops.dev/job-uid": uid,
            },
        },
        "spec": {"containers": [container]},
    }


def test_create_is_idempotent_and_pods_are_listed_by_job(kube: tuple[Kube, ControlPlane]) -> None:
    k, _ = kube

    async def scenario() -> None:
        created = await k.create_pod(NS, _pod("idem-1"))
        assert created is not None
        assert created["metadata"]["name"] == "idem-1"
        assert created["metadata"]["uid"]  # the server's object, not the request
        assert await k.create_pod(NS, _pod("idem-1")) is None  # 409: already there
        with pytest.raises(PodRejected, match="does not belong"):
            await k.create_pod(NS, _pod("idem-1", uid="intruder"))
        await k.create_pod(NS, _pod("other-1", uid="other-uid"))
        mine = await k.list_job_pods(JobRef("idem", NS, "job-uid"))
        assert [p["metadata"]["name"] for p in mine] == ["idem-1"]
        every = await k.list_trainer_pods(NS)
        assert {p["metadata"]["name"] for p in every} >= {"idem-1", "other-1"}
        await k.delete_pod(NS, "idem-1", 0)
        await k.delete_pod(NS, "idem-1", 0)  # 404 is fine

    _run(k, scenario())


def test_invalid_pod_is_a_refusal(kube: tuple[Kube, ControlPlane]) -> None:
    k, _ = kube
    bad = _pod("Not_A_Name")

    async def scenario() -> None:
        with pytest.raises(PodRejected):
            await k.create_pod(NS, bad)

    _run(k, scenario())


def test_quota_is_reported_as_such(kube: tuple[Kube, ControlPlane]) -> None:
    k, cp = kube
    cp.kubectl("create", "namespace", "tight")
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "gpus", "namespace": "tight"},
        "spec": {"hard": {"requests.nvidia.com/gpu": "0"}},
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(quota))

    async def scenario() -> None:
        with pytest.raises(QuotaExceeded, match="exceeded quota"):
            await k.create_pod("tight", _pod("greedy-1", gpus=1))

    _run(k, scenario())


def test_secret_exists_without_reading_it_into_results(kube: tuple[Kube, ControlPlane]) -> None:
    k, cp = kube
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds", "namespace": NS},
        "stringData": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"},
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(secret))

    async def scenario() -> None:
        assert await k.secret_exists(NS, "creds") is True
        assert await k.secret_exists(NS, "nope") is False

    _run(k, scenario())


def test_status_merge_patch_job_delete_and_events(kube: tuple[Kube, ControlPlane]) -> None:
    k, cp = kube
    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "patched", "namespace": NS},
        "spec": {
            "model": {"uri": "s3://models/m"},
            "dataset": {"uri": "s3://data/d.jsonl"},
            "output": {"uri": "s3://out/o"},
        },
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(body))

    async def scenario() -> None:
        job = await k.get_job(NS, "patched")
        assert job is not None
        await k.patch_job_status(NS, "patched", {"attempts": 1, "podName": "patched-1"})
        await k.patch_job_status(NS, "patched", {"podName": None, "phase": "Pending"})
        after = await k.get_job(NS, "patched")
        assert after is not None
        assert after["status"] == {"attempts": 1, "phase": "Pending"}
        assert after["spec"] == job["spec"]  # the status subresource leaves spec alone
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "patched.", "namespace": NS},
            "involvedObject": {"kind": api.KIND, "name": "patched", "namespace": NS},
            "reason": "Test",
            "message": "hello",
            "type": "Normal",
        }
        await k.post_event(NS, copy.deepcopy(event))
        await k.delete_job(NS, "patched")
        await k.delete_job(NS, "patched")  # already gone: fine
        assert await k.get_job(NS, "patched") is None
        assert await k.patch_job_status(NS, "patched", {"attempts": 2}) is None

    _run(k, scenario())
    events = json.loads(cp.kubectl("get", "events", "-n", NS, "-o", "json").stdout)["items"]
    assert any(e["reason"] == "Test" for e in events)


def test_trainer_pods_are_listed_and_watched_from_the_listing(
    kube: tuple[Kube, ControlPlane],
) -> None:
    k, cp = kube

    async def next_event(namespace: str | None, version: str) -> tuple[str, dict[str, Any]]:
        # watched-1 may be updated after the listing (the kubelet binds and runs it), so
        # its MODIFIED events can come first; the stranger must never come at all.
        async for event in k.watch_trainer_pods(namespace, version):
            kind, obj = event
            assert obj.get("metadata", {}).get("name") != "not-ours", event
            if kind == "BOOKMARK" or (
                kind == "MODIFIED" and obj["metadata"]["name"] == "watched-1"
            ):
                continue
            return event
        raise AssertionError("the watch ended without an event")

    async def scenario() -> None:
        await k.create_pod(NS, _pod("watched-1", uid="watched-uid"))
        listed, version = await k.list_trainer_pods_at(None)
        assert "watched-1" in [p["metadata"]["name"] for p in listed]
        assert version.isdigit()
        stranger = _pod("not-ours")
        stranger["metadata"]["labels"] = {"app": "else"}
        await k.create_pod(NS, stranger)  # no trainer labels: never in the watch
        await k.create_pod(NS, _pod("watched-2", uid="watched-uid"))
        kind, pod = await asyncio.wait_for(next_event(NS, version), 10)
        assert (kind, pod["metadata"]["name"]) == ("ADDED", "watched-2")
        # History compacted past our version: an ERROR event (410), as in the stream.
        cp.cluster.compact_etcd()
        kind, status = await asyncio.wait_for(next_event(None, version), 10)
        assert (kind, status["code"]) == ("ERROR", 410)

    _run(k, scenario())


def test_an_open_watch_never_holds_a_connection_api_calls_need(
    kube: tuple[Kube, ControlPlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch per namespace must not take the call pool's connections (here: one)."""
    k, _ = kube
    monkeypatch.setattr(kube_module, "MAX_CONNECTIONS", 1)

    async def scenario() -> None:
        _, version = await k.list_trainer_pods_at(NS)
        opened = asyncio.Event()

        async def watch() -> None:
            stream = k.watch_trainer_pods(NS, version)
            opened.set()
            async for _ in stream:
                pass

        watching = asyncio.create_task(watch())
        await opened.wait()
        await asyncio.sleep(0.2)  # the stream is open and waits for events
        try:
            pods = await asyncio.wait_for(k.list_trainer_pods(NS), 5)
            assert isinstance(pods, list)
        finally:
            watching.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watching

    _run(k, scenario())
