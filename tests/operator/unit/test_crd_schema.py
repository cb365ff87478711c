"""The CRD: generated from api.py, structural, committed copy up to date, examples valid."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft4Validator  # type: ignore[import-untyped]
from lorajob_operator.api import API_VERSION, KIND, InvalidSpecError, parse_spec
from lorajob_operator.crd import (
    build_crd,
    openapi_schema,
    render_yaml,
    structural,
    structural_problems,
)

REPO = Path(__file__).resolve().parents[3]
CRD_FILE = REPO / "crds" / "finetune.loraops.dev_lorajobs.yaml"
# Every manifest under examples/ that holds a LoRAJob (other kinds are skipped).
EXAMPLES = sorted(
    p for p in (REPO / "examples").rglob("*.yaml") if "kind: LoRAJob" in p.read_text()
)


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 (Kubernetes flavour) -> draft-4 JSON Schema, as the API server reads it."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if node.get("x-kubernetes-preserve-unknown-fields") and out.get("type") == "object":
        out.setdefault("additionalProperties", True)
    elif out.get("type") == "object" and "properties" in out:
        # The API server prunes (and kubectl --validate=strict rejects) unknown fields.
        out.setdefault("additionalProperties", False)
    return out


def validate(obj: dict[str, Any]) -> list[str]:
    validator = Draft4Validator(to_json_schema(openapi_schema()))
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


def test_committed_crd_matches_models() -> None:
    if os.environ.get("UPDATE_GOLDEN"):
        CRD_FILE.write_text(render_yaml())
    assert CRD_FILE.exists(), "crds/finetune.loraops.dev_lorajobs.yaml is missing; run make crds"
    assert CRD_FILE.read_text() == render_yaml(), (
        "the committed CRD differs from the API models; run make crds"
    )


def test_schema_is_structural() -> None:
    assert structural_problems(openapi_schema()) == []


def test_crd_validates_against_apiextensions_schema() -> None:
    kubernetes_validate.validate(build_crd(), "1.35.0", strict=True)


def test_crd_shape() -> None:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "lorajobs.finetune.loraops.dev"
    assert crd["spec"]["names"]["shortNames"] == ["lj"]
    assert crd["spec"]["scope"] == "Namespaced"
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Succeeded"] == '.status.conditions[?(@.type=="Succeeded")].status'
    assert all("[-1:]" not in path for path in columns.values())
    assert columns["Phase"] == ".status.phase"
    assert columns["Progress"] == ".status.progress.percent"
    assert columns["Loss"] == ".status.progress.loss"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_schema_details() -> None:
    spec = openapi_schema()["properties"]["spec"]
    props = spec["properties"]
    assert spec["required"] == ["model", "dataset", "output"]
    assert props["training"]["properties"]["learningRate"]["exclusiveMinimum"] is True
    # No nullable in the spec: a null is pruned (unset), so CEL's has() means "set".
    assert props["activeDeadlineSeconds"] == {
        "description": props["activeDeadlineSeconds"]["description"],
        "minimum": 1,
        "type": "integer",
    }
    target = props["lora"]["properties"]["targetModules"]
    assert target["x-kubernetes-preserve-unknown-fields"] is True
    assert "type" not in target
    assert target["anyOf"][0] == {"enum": ["all-linear"]}
    assert target["anyOf"][1]["maxItems"] == 64
    affinity = props["scheduling"]["properties"]["affinity"]
    assert "x-kubernetes-preserve-unknown-fields" not in affinity  # other keys are refused
    assert affinity["properties"]["nodeAffinity"]["x-kubernetes-preserve-unknown-fields"]
    assert props["backoffLimit"]["default"] == 3
    assert "default" not in props["resources"]["properties"]["gpuResourceName"]
    status = openapi_schema()["properties"]["status"]
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert "Succeeded" in status["properties"]["phase"]["enum"]
    assert all("default" not in p for p in status["properties"].values())


def test_structural_checker_catches_violations() -> None:
    bad = {
        "type": "object",
        "properties": {
            "a": {"description": "no type"},
            "b": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "c": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "d": {"$ref": "#/x", "type": "string"},
            "e": {"type": "number", "exclusiveMinimum": 0},
            "f": {"type": "array"},
        },
    }
    problems = "\n".join(structural_problems(bad))
    for needle in (
        "a: must specify a type",
        "b: must specify a type",
        "b.anyOf[0]: type is not allowed",
        "c: properties and additionalProperties",
        "d: $ref is not allowed",
        "e: exclusiveMinimum must be a boolean",
        "f: an array must specify items",
    ):
        assert needle in problems


def test_structural_converts_pydantic_constructs() -> None:
    defs = {"M": {"type": "object", "properties": {"x": {"type": "integer"}}, "title": "M"}}
    node = {"anyOf": [{"$ref": "#/$defs/M"}, {"type": "null"}], "default": None, "title": "T"}
    assert structural(node, defs) == {
        "type": "object",
        "properties": {"x": {"type": "integer"}},
        "nullable": True,
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(REPO)) for p in EXAMPLES])
def test_examples_validate_against_crd_and_parse(path: Path) -> None:
    text = path.read_text().replace("${S3_ENDPOINT}", "http://127.0.0.1:9000")
    for doc in yaml.safe_load_all(text):
        if not doc or doc.get("kind") != KIND:
            continue
        assert doc["apiVersion"] == API_VERSION
        assert validate(doc) == []
        parse_spec(doc["spec"])


def test_full_example_sets_every_field() -> None:
    doc = yaml.safe_load((REPO / "examples" / "lorajob-full.yaml").read_text())
    schema = openapi_schema()["properties"]["spec"]

    def missing(node: dict[str, Any], value: Any, path: str) -> list[str]:
        out = []
        for name, sub in (node.get("properties") or {}).items():
            if name not in value:
                out.append(f"{path}.{name}")
            elif "properties" in sub and name != "affinity":  # affinity: a core/v1 object
                out.extend(missing(sub, value[name], f"{path}.{name}"))
        return out

    assert missing(schema, doc["spec"], "spec") == []


def test_schema_rejects_what_parse_spec_rejects() -> None:
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "x"},
        "spec": {
            "model": {"uri": "s3://m/x"},
            "dataset": {"uri": "s3://d/x"},
            "output": {"uri": "s3://o/x"},
            "resources": {"gpus": -1},
            "training": {"learningRate": 0, "optimizer": "adam"},
        },
    }
    errors = "\n".join(validate(copy.deepcopy(doc)))
    assert "spec.resources.gpus" in errors
    assert "spec.training.learningRate" in errors
    assert "spec.training.optimizer" in errors
    with pytest.raises(InvalidSpecError):
        parse_spec(doc["spec"])


def test_optional_enums_are_not_nullable() -> None:
    def walk(node: dict[str, Any], path: str) -> list[str]:
        bad = [path] if "enum" in node and node.get("nullable") else []
        for name, sub in (node.get("properties") or {}).items():
            bad += walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            bad += walk(node["items"], f"{path}[]")
        return bad

    assert walk(openapi_schema(), "") == []
