"""4-5. Status subresource separation and the patch flavours."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness.kube_patch import strategic_merge_patch
from tests.harness_tests.helpers import WIDGETS, Http, widget

PODS = "/api/v1/namespaces/default/pods"
MERGE = "application/merge-patch+json"


def _pod(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "main", "image": "x:1", "command": ["true"]}]},
    }


def test_custom_resource_status_subresource(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    body = widget("s")
    body["status"] = {"phase": "Injected"}
    created = http.ok("POST", WIDGETS, body)
    assert "status" not in created  # ignored on create
    # main resource: status changes ignored, spec changes applied
    patched = http.ok(
        "PATCH",
        f"{WIDGETS}/s",
        {"spec": {"size": 2}, "status": {"phase": "Nope"}},
        content_type=MERGE,
    )
    assert patched["spec"]["size"] == 2
    assert "status" not in patched
    # /status: only status changes apply
    patched = http.ok(
        "PATCH",
        f"{WIDGETS}/s/status",
        {"spec": {"size": 99}, "metadata": {"labels": {"x": "y"}}, "status": {"phase": "Running"}},
        content_type=MERGE,
    )
    assert patched["status"] == {"phase": "Running"}
    assert patched["spec"]["size"] == 2
    assert "labels" not in patched["metadata"]
    # PUT on the main resource keeps the stored status
    current = http.ok("GET", f"{WIDGETS}/s")
    current["status"] = {"phase": "Overwritten"}
    current["spec"]["size"] = 3
    replaced = http.ok("PUT", f"{WIDGETS}/s", current)
    assert replaced["status"] == {"phase": "Running"}
    assert replaced["spec"]["size"] == 3
    # GET /status returns the whole object
    assert http.ok("GET", f"{WIDGETS}/s/status")["status"] == {"phase": "Running"}


def test_pod_status_subresource(http: Http) -> None:
    created = http.ok("POST", PODS, {**_pod("p"), "status": {"phase": "Running"}})
    assert created["status"]["phase"] == "Pending"  # the server owns pod status on create
    patched = http.ok("PATCH", f"{PODS}/p", {"status": {"phase": "Succeeded"}}, content_type=MERGE)
    assert patched["status"]["phase"] == "Pending"
    patched = http.ok(
        "PATCH",
        f"{PODS}/p/status",
        {"status": {"phase": "Running"}, "metadata": {"labels": {"a": "b"}}},
        content_type=MERGE,
    )
    assert patched["status"]["phase"] == "Running"
    assert "labels" not in patched["metadata"]


def test_pod_spec_is_mostly_immutable(http: Http) -> None:
    http.ok("POST", PODS, _pod("imm"))
    status, body = http.patch(f"{PODS}/imm", {"spec": {"restartPolicy": "Never"}})
    assert status == 422
    assert "pod updates may not change fields" in body["message"]
    http.ok(
        "PATCH",
        f"{PODS}/imm",
        {"spec": {"containers": [{"name": "main", "image": "x:2"}]}},
        content_type="application/strategic-merge-patch+json",
    )


def test_json_patch(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    http.ok("POST", WIDGETS, widget("j", extra={"items": [1, 2]}))
    patched = http.ok(
        "PATCH",
        f"{WIDGETS}/j",
        [
            {"op": "replace", "path": "/spec/size", "value": 5},
            {"op": "add", "path": "/spec/extra/items/-", "value": 3},
        ],
        content_type="application/json-patch+json",
    )
    assert patched["spec"]["size"] == 5
    assert patched["spec"]["extra"]["items"] == [1, 2, 3]
    status, body = http.patch(
        f"{WIDGETS}/j",
        [{"op": "test", "path": "/spec/size", "value": 1}],
        content_type="application/json-patch+json",
    )
    assert status == 400
    assert body["reason"] == "BadRequest"


def test_merge_patch_removes_with_null(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    http.ok("POST", WIDGETS, widget("m", note="hello"))
    patched = http.ok(
        "PATCH",
        f"{WIDGETS}/m",
        {"spec": {"note": None}, "metadata": {"annotations": {"a": "1"}}},
        content_type=MERGE,
    )
    assert "note" not in patched["spec"]
    assert patched["metadata"]["annotations"] == {"a": "1"}


def test_strategic_merge_patch_merges_keyed_lists(http: Http) -> None:
    pod = _pod("smp")
    pod["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    http.ok("POST", PODS, pod)
    patched = http.ok(
        "PATCH",
        f"{PODS}/smp/status",
        {"status": {"conditions": [{"type": "Ready", "status": "False"}]}},
        content_type="application/strategic-merge-patch+json",
    )
    patched = http.ok(
        "PATCH",
        f"{PODS}/smp/status",
        {
            "status": {
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ]
            }
        },
        content_type="application/strategic-merge-patch+json",
    )
    assert {c["type"]: c["status"] for c in patched["status"]["conditions"]} == {
        "Ready": "True",
        "PodScheduled": "True",
    }
    assert len(patched["status"]["conditions"]) == 2


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        (
            {"env": [{"name": "A", "value": "1"}]},
            {"env": [{"name": "B", "value": "2"}]},
            {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
        ),
        (
            {"env": [{"name": "A", "value": "1"}]},
            {"env": [{"name": "A", "$patch": "delete"}]},
            {"env": []},
        ),
        ({"finalizers": ["a"]}, {"finalizers": ["b"]}, {"finalizers": ["a", "b"]}),
        (
            {"finalizers": ["a", "b"]},
            {"$deleteFromPrimitiveList/finalizers": ["a"]},
            {"finalizers": ["b"]},
        ),
        ({"args": ["x"]}, {"args": ["y"]}, {"args": ["y"]}),
        # The first write of a keyed list, and lists replaced wholesale: the nulls a
        # client sends to clear fields are not stored (built-in types drop them).
        (
            {"status": {}},
            {"status": {"containerStatuses": [{"name": "c", "state": {"running": None}}]}},
            {"status": {"containerStatuses": [{"name": "c", "state": {}}]}},
        ),
        ({}, {"finalizers": ["a"]}, {"finalizers": ["a"]}),
        ({}, {"args": [{"a": None, "b": 1}]}, {"args": [{"b": 1}]}),
        ({}, {"spec": {"$patch": "replace", "x": None, "y": 2}}, {"spec": {"y": 2}}),
    ],
)
def test_strategic_merge_patch_directives(
    target: dict[str, Any], patch: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert strategic_merge_patch(target, patch) == expected


def test_unsupported_patch_type(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    http.ok("POST", WIDGETS, widget("u"))
    status, _ = http.patch(f"{WIDGETS}/u", {"spec": {}}, content_type="application/x-unknown")
    assert status == 400
