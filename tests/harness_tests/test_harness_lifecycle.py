"""8-10. Finalizers and deletionTimestamp, ownerReference GC, events."""

from __future__ import annotations

from typing import Any

from tests.harness.controlplane import wait_for
from tests.harness_tests.helpers import WIDGETS, Http, widget

MERGE = "application/merge-patch+json"
CMS = "/api/v1/namespaces/default/configmaps"
PODS = "/api/v1/namespaces/default/pods"


def test_finalizers_hold_deletion_until_removed(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    body = widget("f")
    body["metadata"]["finalizers"] = ["example.com/cleanup", "example.com/other"]
    http.ok("POST", WIDGETS, body)
    terminating = http.ok("DELETE", f"{WIDGETS}/f")
    assert terminating["metadata"]["deletionTimestamp"]
    assert terminating["metadata"]["deletionGracePeriodSeconds"] == 0
    assert http.ok("GET", f"{WIDGETS}/f")["metadata"]["deletionTimestamp"]
    status, body = http.patch(
        f"{WIDGETS}/f",
        {
            "metadata": {
                "finalizers": ["example.com/cleanup", "example.com/other", "example.com/new"]
            }
        },
    )
    assert status == 403
    assert "no new finalizers" in body["message"]
    http.ok(
        "PATCH",
        f"{WIDGETS}/f",
        {"metadata": {"finalizers": ["example.com/other"]}},
        content_type=MERGE,
    )
    assert http.get(f"{WIDGETS}/f")[0] == 200
    http.ok("PATCH", f"{WIDGETS}/f", {"metadata": {"finalizers": None}}, content_type=MERGE)
    assert http.get(f"{WIDGETS}/f")[0] == 404


def test_pod_graceful_deletion_protocol(http: Http) -> None:
    pod = {
        "metadata": {"name": "g"},
        "spec": {
            "nodeName": "n1",
            "terminationGracePeriodSeconds": 45,
            "containers": [{"name": "c", "image": "x:1"}],
        },
    }
    http.ok("POST", PODS, pod)
    http.ok("PATCH", f"{PODS}/g/status", {"status": {"phase": "Running"}}, content_type=MERGE)
    terminating = http.ok("DELETE", f"{PODS}/g")
    assert terminating["metadata"]["deletionGracePeriodSeconds"] == 45
    assert http.get(f"{PODS}/g")[0] == 200, "a bound running pod waits for its kubelet"
    shorter = http.ok("DELETE", f"{PODS}/g", {"gracePeriodSeconds": 5})
    assert shorter["metadata"]["deletionGracePeriodSeconds"] == 5
    http.ok("DELETE", f"{PODS}/g", {"gracePeriodSeconds": 0})  # what the kubelet sends when done
    assert http.get(f"{PODS}/g")[0] == 404
    # unscheduled pods go at once
    http.ok(
        "POST",
        PODS,
        {"metadata": {"name": "u"}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}},
    )
    http.ok("DELETE", f"{PODS}/u")
    assert http.get(f"{PODS}/u")[0] == 404


def test_delete_preconditions(http: Http) -> None:
    http.ok("POST", CMS, {"metadata": {"name": "pc"}})
    status, body = http.delete(f"{CMS}/pc", {"preconditions": {"uid": "not-the-uid"}})
    assert status == 409
    assert "Precondition failed" in body["message"]


def _owned(name: str, owner: dict[str, Any]) -> dict[str, Any]:
    ref = {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    return {
        "metadata": {"name": name, "ownerReferences": [ref]},
        "spec": {"containers": [{"name": "c", "image": "x:1"}]},
    }


def test_owner_deletion_collects_dependents(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    owner = http.ok("POST", WIDGETS, widget("owner"))
    http.ok("POST", PODS, _owned("child-1", owner))
    http.ok("POST", PODS, _owned("child-2", owner))
    http.ok(
        "POST",
        PODS,
        {"metadata": {"name": "stranger"}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}},
    )
    http.ok("DELETE", f"{WIDGETS}/owner")
    wait_for(
        lambda: http.get(f"{PODS}/child-1")[0] == 404 and http.get(f"{PODS}/child-2")[0] == 404,
        message="dependents collected",
    )
    assert http.get(f"{PODS}/stranger")[0] == 200


def test_dependents_with_a_live_second_owner_survive(
    http: Http, widget_crd: dict[str, Any]
) -> None:
    del widget_crd
    first = http.ok("POST", WIDGETS, widget("first"))
    second = http.ok("POST", WIDGETS, widget("second"))
    child = _owned("shared", first)
    child["metadata"]["ownerReferences"].append(
        {**_owned("x", second)["metadata"]["ownerReferences"][0], "controller": False}
    )
    http.ok("POST", CMS, {"metadata": child["metadata"]})
    http.ok("DELETE", f"{WIDGETS}/first")
    http.ok("POST", CMS, {"metadata": {"name": "barrier"}})  # let the background GC run
    assert http.get(f"{CMS}/shared")[0] == 200
    http.ok("DELETE", f"{WIDGETS}/second")
    wait_for(lambda: http.get(f"{CMS}/shared")[0] == 404, message="collected after the last owner")


def test_orphan_propagation_keeps_dependents(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    owner = http.ok("POST", WIDGETS, widget("o"))
    http.ok("POST", CMS, {"metadata": _owned("kept", owner)["metadata"]})
    http.ok("DELETE", f"{WIDGETS}/o", {"propagationPolicy": "Orphan"})
    kept = http.ok("GET", f"{CMS}/kept")
    assert "ownerReferences" not in kept["metadata"]


def test_core_events(http: Http) -> None:
    event = {
        "metadata": {"generateName": "w."},
        "involvedObject": {"kind": "Widget", "name": "w", "namespace": "default", "uid": "u-1"},
        "reason": "Created",
        "message": "hello",
        "type": "Normal",
    }
    created = http.ok("POST", "/api/v1/namespaces/default/events", event)
    assert created["metadata"]["name"].startswith("w.")
    found = http.ok(
        "GET",
        "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dw,involvedObject.uid%3Du-1",
    )
    assert [e["message"] for e in found["items"]] == ["hello"]
    assert (
        http.ok(
            "GET", "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dother"
        )["items"]
        == []
    )
    events = http.watch("/api/v1/events?watch=1", until=1)
    assert events[0]["object"]["reason"] == "Created"


def test_events_k8s_io(http: Http) -> None:
    event = {
        "metadata": {"name": "e1"},
        "regarding": {"kind": "Pod", "name": "p"},
        "reason": "Started",
        "note": "ok",
        "type": "Normal",
        "action": "Run",
        "reportingController": "x",
        "reportingInstance": "y",
        "eventTime": "2026-01-01T00:00:00.000000Z",
    }
    http.ok("POST", "/apis/events.k8s.io/v1/namespaces/default/events", event)
    assert http.ok("GET", "/apis/events.k8s.io/v1/events")["items"][0]["note"] == "ok"


def test_dangling_owner_references_are_collected(http: Http) -> None:
    ghost = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "ghost", "uid": "no-such-uid"},
    }
    http.ok("POST", CMS, {"metadata": _owned("orphan", ghost)["metadata"]})
    wait_for(lambda: http.get(f"{CMS}/orphan")[0] == 404, message="orphan collected")


def test_lists_are_sorted_by_namespace_and_name(http: Http) -> None:
    for name in ("zeta", "alpha", "mid"):
        http.ok("POST", CMS, {"metadata": {"name": name}})
    names = [i["metadata"]["name"] for i in http.ok("GET", CMS)["items"]]
    assert names == ["alpha", "mid", "zeta"]


def test_foreground_deletion_waits_for_dependents(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    owner = http.ok("POST", WIDGETS, widget("fg"))
    child = _owned("fg-child", owner)
    child["metadata"]["finalizers"] = ["example.com/hold"]
    http.ok("POST", CMS, {"metadata": child["metadata"]})
    deleting = http.ok("DELETE", f"{WIDGETS}/fg", {"propagationPolicy": "Foreground"})
    assert "foregroundDeletion" in deleting["metadata"]["finalizers"]
    wait_for(
        lambda: http.ok("GET", f"{CMS}/fg-child")["metadata"].get("deletionTimestamp"),
        message="child terminating",
    )
    assert http.get(f"{WIDGETS}/fg")[0] == 200, "the owner waits for its dependents"
    http.ok("PATCH", f"{CMS}/fg-child", {"metadata": {"finalizers": None}}, content_type=MERGE)
    wait_for(
        lambda: http.get(f"{WIDGETS}/fg")[0] == 404, message="owner removed after its dependents"
    )
