"""The spec rules (loraops_contract.rules): each one is in the CRD as CEL, and its Python
side is the check pydantic, parse_spec and the webhook apply, with the same message.

What the API server makes of the CEL is tested on a real one in
tests/operator/integration/test_crd_validation.py.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterator
from typing import Any

import pytest
from lorajob_operator import names
from lorajob_operator.api import InvalidSpecError, LoRAJobSpec, parse_spec
from lorajob_operator.crd import openapi_schema, structural
from loraops_contract.config import (
    SOURCE_URI_RULES,
    TrainerConfig,
    format_validation_error,
    parse_uri,
)
from loraops_contract.rules import VALIDATIONS_KEY, Rule
from pydantic import BaseModel, ValidationError

BASE: dict[str, Any] = {
    "model": {"uri": "s3://models/llama-3-8b"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://adapters/run-1"},
}

# URIs parse_uri accepts or refuses; the rules must agree on every one.
URIS = [
    "s3://bucket",
    "s3://bucket/",
    "s3://bucket/a/b.jsonl",
    "s3://bucket/a/b/",
    "s3://bucket/.hidden/x",
    "s3://bucket/a/.../b",
    "s3://bucket/a/..b",
    "s3://my.bucket-1/x",
    "s3://bucket/a/../b",
    "s3://bucket/./a",
    "s3://bucket/a/.",
    "s3://bucket//a",
    "s3://bucket/a//b",
    "s3://bucket/a/b//",
    "s3://Bucket/x",
    "s3://ab/x",
    "s3://-bucket/x",
    "s3://",
    "hf://org/name",
    "hf://name",
    "hf://org/name@v1.0",
    "hf://org/name@refs/pr/1",
    "hf://org/na me",
    "hf://org/näme",
    "hf://",
    "hf://org/name/extra",
    "/data/train.jsonl",
    "/",
    "/data/",
    "/data//x",
    "/data/../x",
    "/data/./x",
    "data/train.jsonl",
    "gs://bucket/x",
    "https://host/x",
    "/data/x://y",
    "s3://bucket/x\n",
]


def _rules_in(annotation: Any) -> Iterator[Rule]:
    """Rules attached to a type with Annotated, anywhere inside it."""
    for arg in typing.get_args(annotation):
        if isinstance(arg, Rule):
            yield arg
        elif not isinstance(arg, str | int | float):
            yield from _rules_in(arg)


def _models(model: type[BaseModel]) -> Iterator[type[BaseModel]]:
    yield model
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                yield from _models(tp)
            elif typing.get_origin(tp) in (typing.Union, types.UnionType, list, dict) or (
                typing.get_origin(tp) is typing.Annotated
            ):
                stack.extend(typing.get_args(tp))


def all_rules() -> list[Rule]:
    found: list[Rule] = []
    for model in _models(LoRAJobSpec):
        found.extend(getattr(model, "RULES", ()))
        for field in model.model_fields.values():
            found.extend(m for m in field.metadata if isinstance(m, Rule))
            found.extend(_rules_in(field.annotation))
    unique: list[Rule] = []
    for rule in found:
        if rule not in unique:
            unique.append(rule)
    return unique


def _crd_validations(node: Any) -> Iterator[dict[str, str]]:
    if isinstance(node, dict):
        yield from node.get(VALIDATIONS_KEY, [])
        for key, value in node.items():
            if key != VALIDATIONS_KEY:
                yield from _crd_validations(value)
    elif isinstance(node, list):
        for item in node:
            yield from _crd_validations(item)


def test_every_rule_is_in_the_crd() -> None:
    rules = all_rules()
    assert len(rules) >= 30
    in_crd = list(_crd_validations(openapi_schema()["properties"]["spec"]))
    for rule in rules:
        assert rule.validation() in in_crd, rule
    # ... and the CRD has no CEL of its own making beyond the fractional-bound checks.
    from_rules = [r.validation() for r in rules]
    extra = [v for v in in_crd if v not in from_rules]
    assert all(v["rule"].startswith("self ") for v in extra), extra


def test_cross_field_rules_sit_where_their_fields_are() -> None:
    spec = openapi_schema()["properties"]["spec"]
    props = spec["properties"]

    def paths(node: dict[str, Any]) -> set[str]:
        return {v.get("fieldPath", "") for v in node.get(VALIDATIONS_KEY, [])}

    assert {
        ".lora.useDora",
        ".storage.credentialsSecret",
        ".training.optimizer",
        ".training.evalEverySteps",
        ".training.strategy",
    } <= paths(spec)
    assert paths(props["training"]) == {".epochs"}
    assert paths(props["resources"]) == {".gpuProduct", ".gpus", ".nodes"}
    assert paths(props["scheduling"]["properties"]["tolerations"]["items"]) == {
        ".value",
        ".operator",
        ".tolerationSeconds",
    }
    required = [v for v in spec[VALIDATIONS_KEY] if v.get("reason") == "FieldValueRequired"]
    assert [v["fieldPath"] for v in required] == [".storage.credentialsSecret"]


@pytest.mark.parametrize("uri", URIS)
def test_uri_rules_accept_exactly_what_parse_uri_accepts(uri: str) -> None:
    try:
        parse_uri(uri)
        parsed = True
    except ValueError:
        parsed = False
    assert all(rule.holds(uri) for rule in SOURCE_URI_RULES) == parsed


SYNTAX_SAMPLES: list[tuple[names.Syntax, typing.Callable[[str], str], list[str]]] = [
    (
        names.DNS_LABEL,
        names.check_dns_label,
        ["a", "us-east-1", "A", "-a", "a-", "a.b", "a" * 63, "a" * 64, "", "a\n"],
    ),
    (
        names.DNS_SUBDOMAIN,
        names.check_dns_subdomain,
        ["a.b", "s3-creds", "a..b", ".a", "A", "a" * 253, "a" * 254, "a_b"],
    ),
    (
        names.LABEL_VALUE,
        names.check_label_value,
        ["", "NVIDIA-A100-SXM4-80GB", "a_b.c", "a b", "-a", "a" * 63, "a" * 64],
    ),
    (
        names.IMAGE,
        names.check_image,
        [
            "ghcr.io/loraops/lora-trainer:0.1.0",
            "localhost:5000/x",
            "busybox",
            "x@sha256:" + "a" * 64,
            "Ghcr.io/Foo/Bar",
            "my image",
            "x:" + "t" * 129,
        ],
    ),
]


@pytest.mark.parametrize(
    ("syntax", "check", "samples"), SYNTAX_SAMPLES, ids=[s[0].fix[:20] for s in SYNTAX_SAMPLES]
)
def test_syntax_rules_agree_with_the_name_checks(
    syntax: names.Syntax, check: typing.Callable[[str], str], samples: list[str]
) -> None:
    rule = syntax.rule("thing")
    for value in samples:
        try:
            check(value)
            ok = True
        except ValueError:
            ok = False
        assert rule.holds(value) == ok, value


@pytest.mark.parametrize(
    "value", ["8", "500m", "16Gi", "1.5", ".5", "1e3", "0", "0.0", "0Gi", "-1", "16GB", " 1", "1 "]
)
def test_quantity_rules_agree_with_check_quantity(value: str) -> None:
    try:
        names.check_quantity(value)
        ok = True
    except ValueError:
        ok = False
    assert all(r.holds(value) for r in names.quantity_rules("quantity")) == ok


@pytest.mark.parametrize(
    "value", ["nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "gpu", "kubernetes.io/cpu", "a/b/c"]
)
def test_extended_resource_rules_agree_with_the_check(value: str) -> None:
    try:
        names.check_extended_resource_name(value)
        ok = True
    except ValueError:
        ok = False
    assert all(r.holds(value) for r in names.extended_resource_rules("x")) == ok


def _problems(spec: dict[str, Any]) -> list[str]:
    with pytest.raises(InvalidSpecError) as info:
        parse_spec(spec)
    return info.value.problems


def _rule(field: str) -> Rule:
    return next(r for r in all_rules() if r.field == field)


def test_parse_spec_prints_the_crd_message() -> None:
    """The line parse_spec (and so the webhook and status) prints is the field path and
    the very message the API server prints for the CEL rule."""
    spec = copy.deepcopy(BASE) | {"training": {"epochs": 2, "maxSteps": 100}}
    assert _problems(spec) == [f"spec.training.epochs: {_rule('epochs').message}"]
    endpoint = copy.deepcopy(BASE) | {"storage": {"endpoint": "https://minio.example.com"}}
    rule = _rule("storage.credentialsSecret")
    assert _problems(endpoint) == [f"spec.storage.credentialsSecret: {rule.message}"]


def test_every_broken_rule_is_reported() -> None:
    spec = copy.deepcopy(BASE) | {
        "dataset": {"uri": "s3://data/t.jsonl", "evalSplit": 0},
        "training": {"evalEverySteps": 10, "optimizer": "paged_adamw_8bit"},
        "resources": {"gpus": 0},
    }
    assert [p.split(":")[0] for p in _problems(spec)] == [
        "spec.training.optimizer",
        "spec.training.evalEverySteps",
    ]


def test_epochs_beside_max_steps() -> None:
    # 1 is the default, which the CRD stored in every job that left epochs out.
    parse_spec(BASE | {"training": {"epochs": 1, "maxSteps": 100}})
    parse_spec(BASE | {"training": {"epochs": 3}})
    with pytest.raises(ValidationError) as info:
        TrainerConfig.model_validate(BASE | {"training": {"epochs": 2.5, "maxSteps": 100}})
    text = format_validation_error(info.value)
    assert text == f"training.epochs: {_rule('epochs').message}"  # no "(got None)"


def test_value_rules_echo_the_value() -> None:
    [line] = _problems(BASE | {"storage": {"region": "US East"}})
    assert line == f"spec.storage.region: {names.DNS_LABEL.rule('region').message} (got 'US East')"


def test_spec_schema_has_no_nullable() -> None:
    def walk(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            if "nullable" in node:
                yield path
            for key, value in node.items():
                yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, f"{path}[{i}]")

    assert list(walk(openapi_schema()["properties"]["spec"], "spec")) == []


def test_cel_inputs_are_bounded() -> None:
    """The API server estimates a rule's cost from the largest input the schema allows:
    a string under a CEL rule needs maxLength, and a list or map with rules inside
    needs maxItems / maxProperties, or the CRD is refused."""

    def walk(node: dict[str, Any], path: str) -> Iterator[str]:
        ruled = VALIDATIONS_KEY in node
        kind = node.get("type")
        has_cel_below = VALIDATIONS_KEY in str(node)
        if kind == "string" and ruled and "maxLength" not in node and "enum" not in node:
            yield f"{path}: maxLength"
        if kind == "array" and has_cel_below and "maxItems" not in node:
            yield f"{path}: maxItems"
        map_with_cel = kind == "object" and "additionalProperties" in node and has_cel_below
        if map_with_cel and "maxProperties" not in node:
            yield f"{path}: maxProperties"
        for name, sub in (node.get("properties") or {}).items():
            yield from walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from walk(node[key], f"{path}.{key}")

    spec = openapi_schema()["properties"]["spec"]
    assert list(walk(spec, "spec")) == []
    # Strings that the cross-field rules read.
    props = spec["properties"]
    assert props["output"]["properties"]["uri"]["maxLength"]
    assert props["resources"]["properties"]["gpuResourceName"]["maxLength"]


def test_fractional_bounds_become_cel() -> None:
    """The API server truncates 0.5 to 0 for an integer value, so evalSplit: 0 would be
    refused as "should be less than 0"; CEL compares doubles."""
    node = structural({"type": "number", "minimum": 0, "exclusiveMaximum": 0.5}, {})
    assert node == {
        "type": "number",
        "minimum": 0,
        VALIDATIONS_KEY: [{"rule": "self < 0.5", "message": "should be less than 0.5"}],
    }
    split = openapi_schema()["properties"]["spec"]["properties"]["dataset"]["properties"]
    assert "maximum" not in split["evalSplit"]
    parse_spec(BASE | {"dataset": {"uri": "s3://data/t.jsonl", "evalSplit": 0}})
