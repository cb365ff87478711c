"""11. CRDs: dynamic registration, conditions, schema defaulting/pruning/validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.harness.apiserver import ApiServer
from tests.harness_tests.helpers import TEST_CRD, WIDGETS, Http, widget

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
REPO = Path(__file__).resolve().parents[2]


def test_crd_gets_established(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    crd = http.ok("GET", f"{CRDS}/widgets.example.com")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    assert crd["status"]["acceptedNames"]["shortNames"] == ["wd"]
    assert crd["status"]["storedVersions"] == ["v1"]


def test_crd_name_must_match_names(http: Http) -> None:
    bad = {**TEST_CRD, "metadata": {"name": "wrong.example.com"}}
    status, body = http.post(CRDS, bad)
    assert status == 422
    assert "spec.names.plural" in body["message"]


def test_schema_defaults_and_pruning(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    created = http.ok(
        "POST", WIDGETS, widget("d", unknown="dropped", extra={"free": {"form": 1}}, port="http")
    )
    assert created["spec"]["color"] == "red"  # default applied
    assert "unknown" not in created["spec"]  # pruned
    assert created["spec"]["extra"] == {"free": {"form": 1}}  # preserve-unknown-fields
    assert created["spec"]["port"] == "http"  # int-or-string
    assert http.ok("POST", WIDGETS, widget("d2", port=8080, note=None))["spec"]["port"] == 8080


def test_strict_field_validation_rejects_unknown_fields(
    http: Http, widget_crd: dict[str, Any]
) -> None:
    del widget_crd
    status, body = http.post(f"{WIDGETS}?fieldValidation=Strict", widget("s", typo=1))
    assert status == 400
    assert (
        body["message"]
        == 'Widget in version "v1" cannot be handled as a Widget: strict decoding error: unknown field "spec.typo"'
    )


def test_invalid_objects_get_422_with_field_causes(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    status, body = http.post(
        WIDGETS,
        {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "bad"},
            "spec": {"size": 0, "color": "green"},
        },
    )
    assert status == 422
    assert body["reason"] == "Invalid"
    causes = {c["field"]: c for c in body["details"]["causes"]}
    assert causes["spec.size"]["reason"] == "FieldValueInvalid"
    assert "should be greater than or equal to 1" in causes["spec.size"]["message"]
    assert causes["spec.color"]["reason"] == "FieldValueNotSupported"
    assert body["message"].startswith(
        'Widget.example.com "bad" is invalid: [spec.color: Unsupported value: "green"'
    )
    status, body = http.post(
        WIDGETS,
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "bad"}, "spec": {}},
    )
    assert status == 422
    assert body["details"]["causes"] == [
        {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.size"}
    ]
    status, body = http.post(WIDGETS, widget("bad", size="big"))  # type: ignore[arg-type]
    assert status == 422
    assert "must be of type integer" in body["message"]


def test_patches_are_validated(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    http.ok("POST", WIDGETS, widget("v"))
    status, _ = http.patch(f"{WIDGETS}/v", {"spec": {"size": -5}})
    assert status == 422


def test_deleting_a_crd_removes_its_objects_and_api(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    http.ok("POST", WIDGETS, widget("gone"))
    http.ok("DELETE", f"{CRDS}/widgets.example.com")
    assert http.get("/apis/example.com/v1")[0] == 404
    http.ok("POST", CRDS, TEST_CRD)
    assert http.ok("GET", WIDGETS)["items"] == []


def test_lorajob_crd_schema_is_enforced(api: ApiServer, http: Http) -> None:
    """The repo's generated LoRAJob CRD: defaults land, violations are 422 with causes."""
    crd = yaml.safe_load((REPO / "crds" / "finetune.loraops.dev_lorajobs.yaml").read_text())
    http.ok("POST", CRDS, crd)
    job = yaml.safe_load((REPO / "examples" / "lorajob-tiny.yaml").read_text())
    jobs = "/apis/finetune.loraops.dev/v1alpha1/namespaces/default/lorajobs"
    created = http.ok("POST", jobs, job)
    assert created["spec"]["lora"]["dropout"] == 0.05  # schema default
    job["metadata"]["name"] = "bad"
    job["spec"]["dataset"]["evalSplit"] = 0.5  # exclusiveMaximum
    job["spec"]["training"]["maxSteps"] = 0
    status, body = http.post(jobs, job)
    assert status == 422, body
    fields = sorted(c["field"] for c in body["details"]["causes"])
    assert fields == ["spec.dataset.evalSplit", "spec.training.maxSteps"]
    assert "should be less than 0.5" in body["message"]
    del api


def test_status_writes_validate_only_what_changed(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    http.ok("POST", WIDGETS, widget("r"))
    # a status write does not re-validate the (unchanged) spec, and a bad status is caught
    patched = http.ok(
        "PATCH",
        f"{WIDGETS}/r/status",
        {"status": {"phase": "x"}},
        content_type="application/merge-patch+json",
    )
    assert patched["status"] == {"phase": "x"}
