"""1. Discovery, version, health, and bearer-token auth."""

from __future__ import annotations

from typing import Any

from tests.harness.apiserver import ApiServer
from tests.harness_tests.helpers import Http


def _names(resource_list: dict[str, Any]) -> set[str]:
    return {r["name"] for r in resource_list["resources"]}


def test_core_and_group_discovery(http: Http) -> None:
    assert http.ok("GET", "/api")["versions"] == ["v1"]
    core = _names(http.ok("GET", "/api/v1"))
    assert {
        "namespaces",
        "pods",
        "pods/status",
        "pods/eviction",
        "pods/log",
        "pods/binding",
        "secrets",
        "events",
        "nodes",
        "resourcequotas",
        "serviceaccounts",
        "configmaps",
    } <= core
    groups = {g["name"]: g for g in http.ok("GET", "/apis")["groups"]}
    for group in (
        "events.k8s.io",
        "apiextensions.k8s.io",
        "admissionregistration.k8s.io",
        "coordination.k8s.io",
    ):
        assert groups[group]["preferredVersion"]["version"] == "v1"
    assert "customresourcedefinitions" in _names(http.ok("GET", "/apis/apiextensions.k8s.io/v1"))
    assert "validatingwebhookconfigurations" in _names(
        http.ok("GET", "/apis/admissionregistration.k8s.io/v1")
    )
    assert "events" in _names(http.ok("GET", "/apis/events.k8s.io/v1"))
    assert "leases" in _names(http.ok("GET", "/apis/coordination.k8s.io/v1"))


def test_crd_resources_are_discoverable(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    group = http.ok("GET", "/apis/example.com")
    assert group["preferredVersion"]["groupVersion"] == "example.com/v1"
    resources = {r["name"]: r for r in http.ok("GET", "/apis/example.com/v1")["resources"]}
    assert resources["widgets"]["shortNames"] == ["wd"]
    assert resources["widgets"]["categories"] == ["gadgets"]
    assert resources["widgets"]["namespaced"] is True
    assert resources["widgets"]["kind"] == "Widget"
    assert "widgets/status" in resources
    assert {"get", "list", "watch", "create", "update", "patch", "delete"} <= set(
        resources["widgets"]["verbs"]
    )


def test_version_and_health_need_no_token(api: ApiServer) -> None:
    anonymous = Http(api, token="")
    status, version = anonymous.get("/version")
    assert status == 200
    assert version["major"] == "1"
    assert version["minor"] == "35"
    for path in ("/healthz", "/readyz", "/livez"):
        assert anonymous.get(path) == (200, "ok")


def test_requests_without_the_token_are_rejected(api: ApiServer) -> None:
    for token in ("", "wrong-token"):
        status, body = Http(api, token=token).get("/api/v1/namespaces")
        assert status == 401
        assert body["kind"] == "Status"
        assert body["reason"] == "Unauthorized"


def test_unknown_resource_is_404(http: Http) -> None:
    status, body = http.get("/apis/nope.example.com/v1/things")
    assert status == 404
    assert body["reason"] == "NotFound"
