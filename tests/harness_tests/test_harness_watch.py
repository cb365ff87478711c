"""6-7. List + watch with resourceVersion, bookmarks, timeouts, selectors."""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import quote

import pytest

from tests.harness import apiserver, kube_store
from tests.harness.kube_selectors import SelectorError, labels_match, parse_label_selector
from tests.harness_tests.helpers import Http

CMS = "/api/v1/namespaces/default/configmaps"


def _cm(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}}


def test_watch_replays_from_resource_version_then_streams(http: Http) -> None:
    http.ok("POST", CMS, _cm("before"))
    listed = http.ok("GET", CMS)
    rv = listed["metadata"]["resourceVersion"]
    assert [i["metadata"]["name"] for i in listed["items"]] == ["before"]
    http.ok("POST", CMS, _cm("after"))
    http.ok(
        "PATCH", f"{CMS}/after", {"data": {"x": "1"}}, content_type="application/merge-patch+json"
    )
    http.ok("DELETE", f"{CMS}/after")
    events = http.watch(f"{CMS}?watch=true&resourceVersion={rv}", until=3)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "after"),
        ("MODIFIED", "after"),
        ("DELETED", "after"),
    ]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs)
    assert rvs[0] > int(rv)


def test_watch_without_resource_version_starts_with_current_state(http: Http) -> None:
    http.ok("POST", CMS, _cm("one"))
    http.ok("POST", CMS, _cm("two"))
    events = http.watch(f"{CMS}?watch=1", until=2)
    assert sorted((e["type"], e["object"]["metadata"]["name"]) for e in events) == [
        ("ADDED", "one"),
        ("ADDED", "two"),
    ]


def test_watch_list_initial_events_end_bookmark(http: Http) -> None:
    http.ok("POST", CMS, _cm("one"))
    events = http.watch(
        f"{CMS}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
        until=2,
    )
    assert events[0]["type"] == "ADDED"
    assert events[1]["type"] == "BOOKMARK"
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_live_events_reach_a_running_watch(http: Http) -> None:
    rv = http.ok("GET", CMS)["metadata"]["resourceVersion"]
    result: list[dict[str, Any]] = []
    reader = threading.Thread(
        target=lambda: result.extend(http.watch(f"{CMS}?watch=true&resourceVersion={rv}", until=1))
    )
    reader.start()
    time.sleep(0.2)
    http.ok("POST", CMS, _cm("live"))
    reader.join(10)
    assert result[0]["type"] == "ADDED"
    assert result[0]["object"]["metadata"]["name"] == "live"


def test_bookmarks_and_timeout(http: Http, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apiserver, "BOOKMARK_INTERVAL", 0.2)
    rv = http.ok("GET", CMS)["metadata"]["resourceVersion"]
    started = time.monotonic()
    events = http.watch(
        f"{CMS}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1",
        until=100,
    )
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 5, "the server closes the watch at timeoutSeconds"
    assert events
    assert all(e["type"] == "BOOKMARK" for e in events)
    assert events[0]["object"]["kind"] == "ConfigMap"
    assert int(events[-1]["object"]["metadata"]["resourceVersion"]) >= int(rv)


def test_too_old_resource_version_is_gone(http: Http, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_store, "HISTORY_LIMIT", 3)
    rv = http.ok("GET", "/api/v1/namespaces/default/secrets")["metadata"]["resourceVersion"]
    for i in range(6):
        http.ok("POST", "/api/v1/namespaces/default/secrets", {"metadata": {"name": f"s{i}"}})
    events = http.watch(
        f"/api/v1/namespaces/default/secrets?watch=true&resourceVersion={rv}", until=1
    )
    assert events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410
    assert events[0]["object"]["reason"] == "Expired"


def test_namespaced_and_cluster_wide_watches(http: Http) -> None:
    http.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "other"}})
    rv = http.ok("GET", "/api/v1/configmaps")["metadata"]["resourceVersion"]
    http.ok("POST", "/api/v1/namespaces/other/configmaps", _cm("elsewhere"))
    http.ok("POST", CMS, _cm("here"))
    everywhere = http.watch(f"/api/v1/configmaps?watch=true&resourceVersion={rv}", until=2)
    assert [e["object"]["metadata"]["name"] for e in everywhere] == ["elsewhere", "here"]
    local = http.watch(f"{CMS}?watch=true&resourceVersion={rv}", until=1)
    assert [e["object"]["metadata"]["name"] for e in local] == ["here"]


def test_label_selectors_on_list(http: Http) -> None:
    http.ok("POST", CMS, _cm("a", app="x", tier="web"))
    http.ok("POST", CMS, _cm("b", app="y"))
    http.ok("POST", CMS, _cm("c"))

    def names(selector: str) -> list[str]:
        return sorted(
            i["metadata"]["name"]
            for i in http.ok("GET", f"{CMS}?labelSelector={quote(selector)}")["items"]
        )

    assert names("app=x") == ["a"]
    assert names("app==x") == ["a"]
    assert names("app!=x") == ["b", "c"]
    assert names("app in (x,y)") == ["a", "b"]
    assert names("app notin (x)") == ["b", "c"]
    assert names("app") == ["a", "b"]
    assert names("!app") == ["c"]
    assert names("app=x,tier=web") == ["a"]
    assert http.get(f"{CMS}?labelSelector=bad%20key%3D1")[0] == 400


def test_field_selectors_on_list_and_watch(http: Http) -> None:
    pods = "/api/v1/namespaces/default/pods"
    for name in ("p1", "p2"):
        http.ok(
            "POST",
            pods,
            {"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}},
        )
    http.ok(
        "PATCH",
        f"{pods}/p1/status",
        {"status": {"phase": "Running"}},
        content_type="application/merge-patch+json",
    )
    assert [
        i["metadata"]["name"]
        for i in http.ok("GET", f"{pods}?fieldSelector=metadata.name%3Dp2")["items"]
    ] == ["p2"]
    assert [
        i["metadata"]["name"]
        for i in http.ok("GET", f"{pods}?fieldSelector=status.phase%3DRunning")["items"]
    ] == ["p1"]
    assert [
        i["metadata"]["name"]
        for i in http.ok(
            "GET",
            "/api/v1/pods?fieldSelector=metadata.namespace%3Ddefault,status.phase!%3DRunning",
        )["items"]
    ] == ["p2"]
    assert len(http.ok("GET", f"{pods}?fieldSelector=spec.nodeName%3D")["items"]) == 2
    # A filtered watch sees an object leave its filter as DELETED.
    rv = http.ok("GET", pods)["metadata"]["resourceVersion"]
    http.ok(
        "PATCH",
        f"{pods}/p1/status",
        {"status": {"phase": "Succeeded"}},
        content_type="application/merge-patch+json",
    )
    events = http.watch(
        f"{pods}?watch=true&resourceVersion={rv}&fieldSelector=status.phase%3DRunning", until=1
    )
    assert events[0]["type"] == "DELETED"
    assert events[0]["object"]["metadata"]["name"] == "p1"


def test_label_selector_parser_edge_cases() -> None:
    requirements = parse_label_selector("a in (x, y),!b,c")
    assert labels_match(requirements, {"a": "y", "c": ""})
    assert not labels_match(requirements, {"a": "y", "b": "1", "c": ""})
    with pytest.raises(SelectorError):
        parse_label_selector("=x")
