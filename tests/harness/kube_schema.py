"""Structural-schema handling for custom resources: defaulting, pruning, validation.

Mirrors what the API server does with a CRD's `openAPIV3Schema`, in that order:
unknown fields are pruned (unless `x-kubernetes-preserve-unknown-fields`), defaults
are applied, then the object is validated and every violation is reported as a
field cause of a 422 Invalid, worded like the real server.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft4Validator  # type: ignore[import-untyped]
from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped]

Schema = dict[str, Any]


@dataclass(frozen=True)
class FieldCause:
    reason: str  # FieldValueRequired | FieldValueInvalid | FieldValueNotSupported | FieldValueTypeInvalid
    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "field": self.field}


def _is_preserving(schema: Schema) -> bool:
    return bool(schema.get("x-kubernetes-preserve-unknown-fields"))


def prune(
    schema: Schema,
    value: Any,
    *,
    root: bool = False,
    path: str = "",
    dropped: list[str] | None = None,
) -> Any:
    """Drop fields the schema does not declare (in place; returns value); the
    dotted paths of dropped fields are appended to `dropped`."""
    dropped = dropped if dropped is not None else []
    if isinstance(value, dict):
        props: dict[str, Schema] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key in list(value):
            if root and key in ("apiVersion", "kind", "metadata"):
                continue
            child = f"{path}.{key}" if path else key
            if key in props:
                prune(props[key], value[key], path=child, dropped=dropped)
            elif isinstance(additional, dict):
                prune(additional, value[key], path=child, dropped=dropped)
            elif additional is True or _is_preserving(schema):
                continue
            elif schema.get("type") == "object" or props:
                del value[key]
                dropped.append(child)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            prune(schema["items"], item, path=f"{path}[{index}]", dropped=dropped)
    return value


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Fill `default`s of absent properties, recursively (in place; returns value)."""
    if isinstance(value, dict):
        props: dict[str, Schema] = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for key, item in value.items():
                if key not in props:
                    apply_defaults(additional, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


def to_json_schema(schema: Any) -> Any:
    """Translate Kubernetes OpenAPI extensions into plain draft-4 JSON Schema."""
    if isinstance(schema, list):
        return [to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, sub in schema.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: to_json_schema(v) for k, v in sub.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = to_json_schema(sub)
        elif key in ("format", "default", "description", "example") or key.startswith(
            "x-kubernetes"
        ):
            continue  # annotations only; formats are advisory on the server too
        else:
            out[key] = sub
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and "type" in out:
        kinds = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*kinds, "null"]
    out.pop("nullable", None)
    if schema.get("x-kubernetes-embedded-resource"):
        out.setdefault("type", "object")
    return out


def _field_path(path: Any) -> str:
    text = ""
    for step in path:
        if isinstance(step, int):
            text += f"[{step}]"
        else:
            text += f".{step}" if text else str(step)
    return text


def _literal(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))[:200]


def _cause(error: ValidationError) -> FieldCause:
    field = _field_path(error.absolute_path)
    shown = field or "<root>"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else ""
        full = f"{field}.{missing}" if field else missing
        return FieldCause("FieldValueRequired", full, "Required value")
    if error.validator == "type":
        expected = error.validator_value
        kinds = " or ".join(expected) if isinstance(expected, list) else str(expected)
        return FieldCause(
            "FieldValueTypeInvalid",
            field,
            f"Invalid value: {_literal(error.instance)}: {shown} in body must be of type {kinds}: "
            f"{_literal(type(error.instance).__name__)}",
        )
    if error.validator == "enum":
        allowed = ", ".join(_literal(v) for v in error.validator_value)
        return FieldCause(
            "FieldValueNotSupported",
            field,
            f"Unsupported value: {_literal(error.instance)}: supported values: {allowed}",
        )
    wording = {
        "minimum": f"should be greater than or equal to {error.validator_value}",
        "maximum": f"should be less than or equal to {error.validator_value}",
        "exclusiveMinimum": f"should be greater than {error.schema.get('minimum')}",
        "exclusiveMaximum": f"should be less than {error.schema.get('maximum')}",
        "pattern": f"should match '{error.validator_value}'",
        "minLength": f"should be at least {error.validator_value} chars long",
        "maxLength": f"may not be longer than {error.validator_value}",
        "minItems": f"should have at least {error.validator_value} items",
        "maxItems": f"must have at most {error.validator_value} items",
        "minProperties": f"should have at least {error.validator_value} properties",
        "maxProperties": f"should have at most {error.validator_value} properties",
    }.get(str(error.validator), error.message)
    return FieldCause(
        "FieldValueInvalid",
        field,
        f"Invalid value: {_literal(error.instance)}: {shown} in body {wording}",
    )


class CompiledSchema:
    """One served version's schema, ready to prune/default/validate objects."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        validated = copy.deepcopy(schema)
        (validated.get("properties") or {}).pop("metadata", None)
        self._validator = Draft4Validator(to_json_schema(validated))

    def admit(self, obj: dict[str, Any]) -> tuple[list[FieldCause], list[str]]:
        """Prune + default `obj` in place; return its validation errors and the
        paths of the unknown fields that were pruned."""
        dropped: list[str] = []
        prune(self.schema, obj, root=True, dropped=dropped)
        apply_defaults(self.schema, obj)
        body = {k: v for k, v in obj.items() if k != "metadata"}
        causes = [_cause(e) for e in self._validator.iter_errors(body)]
        return sorted(causes, key=lambda c: c.field), dropped
