"""2-3. CRUD metadata semantics and optimistic concurrency."""

from __future__ import annotations

from typing import Any

from tests.harness.controlplane import wait_for
from tests.harness_tests.helpers import WIDGETS, Http, widget

CMS = "/api/v1/namespaces/default/configmaps"


def test_create_sets_server_metadata(http: Http) -> None:
    first = http.ok("POST", CMS, {"metadata": {"name": "a"}, "data": {"k": "v"}})
    second = http.ok("POST", CMS, {"metadata": {"name": "b"}})
    meta = first["metadata"]
    assert len(meta["uid"]) == 36
    assert meta["uid"] != second["metadata"]["uid"]
    assert meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    assert meta["namespace"] == "default"
    assert int(second["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert first["kind"] == "ConfigMap"
    assert first["apiVersion"] == "v1"


def test_generate_name(http: Http) -> None:
    created = http.ok("POST", CMS, {"metadata": {"generateName": "job-"}})
    name = created["metadata"]["name"]
    assert name.startswith("job-")
    assert len(name) == len("job-") + 5


def test_name_is_required_and_validated(http: Http) -> None:
    status, body = http.post(CMS, {"metadata": {}})
    assert status == 422
    assert body["reason"] == "Invalid"
    assert body["details"]["causes"][0]["field"] == "metadata.name"
    status, body = http.post(CMS, {"metadata": {"name": "Not_Valid"}})
    assert status == 422
    assert "RFC 1123" in body["message"]


def test_namespaces_must_exist(http: Http) -> None:
    status, body = http.post("/api/v1/namespaces/nowhere/configmaps", {"metadata": {"name": "x"}})
    assert status == 404
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'namespaces "nowhere" not found',
        "reason": "NotFound",
        "code": 404,
        "details": {"name": "nowhere", "kind": "namespaces"},
    }
    http.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "team-a"}})
    http.ok("POST", "/api/v1/namespaces/team-a/configmaps", {"metadata": {"name": "x"}})
    # A namespace being deleted takes its content with it and refuses new content.
    deleted = http.ok("DELETE", "/api/v1/namespaces/team-a")
    assert deleted["status"]["phase"] == "Terminating"
    wait_for(lambda: http.get("/api/v1/namespaces/team-a")[0] == 404, message="namespace gone")
    assert http.get("/api/v1/namespaces/team-a/configmaps/x")[0] == 404


def test_duplicate_create_is_already_exists(http: Http) -> None:
    http.ok("POST", CMS, {"metadata": {"name": "dup"}})
    status, body = http.post(CMS, {"metadata": {"name": "dup"}})
    assert status == 409
    assert body["reason"] == "AlreadyExists"
    assert body["message"] == 'configmaps "dup" already exists'
    assert body["details"] == {"name": "dup", "kind": "configmaps"}


def test_not_found_is_a_status(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    status, body = http.get(f"{WIDGETS}/missing")
    assert status == 404
    assert body["kind"] == "Status"
    assert body["reason"] == "NotFound"
    assert body["code"] == 404
    assert body["message"] == 'widgets.example.com "missing" not found'
    assert body["details"] == {"name": "missing", "kind": "widgets", "group": "example.com"}


def test_stale_resource_version_conflicts(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    created = http.ok("POST", WIDGETS, widget("w"))
    stale = created["metadata"]["resourceVersion"]
    http.ok(
        "PATCH",
        f"{WIDGETS}/w",
        {"metadata": {"labels": {"a": "b"}}},
        content_type="application/merge-patch+json",
    )
    created["spec"]["size"] = 3
    status, body = http.put(f"{WIDGETS}/w", created)
    assert status == 409
    assert body["reason"] == "Conflict"
    assert "the object has been modified" in body["message"]
    status, body = http.patch(
        f"{WIDGETS}/w", {"metadata": {"resourceVersion": stale}, "spec": {"size": 4}}
    )
    assert status == 409
    assert body["reason"] == "Conflict"
    # Custom resources need a resourceVersion for PUT (no unconditional update).
    del created["metadata"]["resourceVersion"]
    status, body = http.put(f"{WIDGETS}/w", created)
    assert status == 422


def test_generation_tracks_spec_changes_only(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    http.ok("POST", WIDGETS, widget("g"))

    def generation() -> int:
        return int(http.ok("GET", f"{WIDGETS}/g")["metadata"]["generation"])

    http.ok(
        "PATCH",
        f"{WIDGETS}/g",
        {"metadata": {"annotations": {"x": "y"}}},
        content_type="application/merge-patch+json",
    )
    http.ok(
        "PATCH",
        f"{WIDGETS}/g/status",
        {"status": {"phase": "Running"}},
        content_type="application/merge-patch+json",
    )
    assert generation() == 1
    http.ok(
        "PATCH", f"{WIDGETS}/g", {"spec": {"size": 9}}, content_type="application/merge-patch+json"
    )
    assert generation() == 2


def test_resource_versions_are_global_and_monotonic(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    versions = []
    for i in range(5):
        versions.append(
            int(
                http.ok("POST", CMS, {"metadata": {"name": f"m{i}"}})["metadata"]["resourceVersion"]
            )
        )
        versions.append(
            int(http.ok("POST", WIDGETS, widget(f"m{i}"))["metadata"]["resourceVersion"])
        )
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)
    listed = http.ok("GET", CMS)
    assert int(listed["metadata"]["resourceVersion"]) >= versions[-1]


def test_secret_string_data_is_folded_into_data(http: Http) -> None:
    secret = http.ok(
        "POST",
        "/api/v1/namespaces/default/secrets",
        {"metadata": {"name": "s"}, "stringData": {"k": "v"}},
    )
    assert secret["data"] == {"k": "dg=="}
    assert "stringData" not in secret
    assert secret["type"] == "Opaque"


def test_labels_and_annotations_are_validated(http: Http) -> None:
    status, body = http.post(CMS, {"metadata": {"name": "l", "labels": {"job": "x" * 64}}})
    assert status == 422
    assert body["details"]["causes"][0]["field"] == "metadata.labels"
    assert "must be no more than 63 characters" in body["message"]
    status, body = http.post(CMS, {"metadata": {"name": "l", "labels": {"bad key!": "v"}}})
    assert status == 422
    big = {"metadata": {"name": "a", "annotations": {"x": "y" * (256 * 1024)}}}
    status, body = http.post(CMS, big)
    assert status == 422
    assert "Too long" in body["message"]
    http.ok(
        "POST", CMS, {"metadata": {"name": "ok", "labels": {"app.kubernetes.io/name": "x-1.2_3"}}}
    )
    status, _ = http.patch(f"{CMS}/ok", {"metadata": {"labels": {"v": "-bad-"}}})
    assert status == 422


def test_request_bodies_are_limited(http: Http) -> None:
    status, body = http.post(
        CMS, {"metadata": {"name": "huge"}, "data": {"x": "y" * (3 * 1024 * 1024)}}
    )
    assert status == 413
    assert body["message"] == "Request entity too large: limit is 3145728"


def test_pod_specs_are_validated(http: Http) -> None:
    pods = "/api/v1/namespaces/default/pods"
    bad = {
        "metadata": {"name": "bad"},
        "spec": {
            "restartPolicy": "Sometimes",
            "containers": [
                {
                    "name": "Main",
                    "resources": {
                        "requests": {"cpu": "2", "nvidia.com/gpu": "1"},
                        "limits": {"cpu": "1", "nvidia.com/gpu": "2", "memory": "lots"},
                    },
                    "env": [{"name": "1BAD", "value": "x"}],
                    "volumeMounts": [{"name": "missing", "mountPath": "/x"}],
                }
            ],
        },
    }
    status, body = http.post(pods, bad)
    assert status == 422
    fields = {c["field"] for c in body["details"]["causes"]}
    assert fields == {
        "spec.restartPolicy",
        "spec.containers[0].name",
        "spec.containers[0].image",
        "spec.containers[0].resources.limits[memory]",
        "spec.containers[0].resources.requests[memory]",  # defaulted from the limit
        "spec.containers[0].resources.requests",
        "spec.containers[0].resources.requests[nvidia.com/gpu]",
        "spec.containers[0].env[0].name",
        "spec.containers[0].volumeMounts[0].name",
    }
    status, body = http.post(pods, {"metadata": {"name": "empty"}, "spec": {"containers": []}})
    assert status == 422
