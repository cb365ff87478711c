"""Structural-schema handling for custom resources: defaulting, pruning, validation.

Mirrors what the API server does with a CRD's `openAPIV3Schema`, in that order:
unknown fields are pruned (unless `x-kubernetes-preserve-unknown-fields`), defaults
are applied, then the object is validated and every violation is reported as a
field cause of a 422 Invalid, worded like the real server.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

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


def _literal(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))[:200]


_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
}


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True


@functools.lru_cache(maxsize=512)
def _pattern(expression: str) -> re.Pattern[str]:
    return re.compile(expression)


def _invalid(field: str, value: Any, wording: str) -> FieldCause:
    return FieldCause(
        "FieldValueInvalid",
        field,
        f"Invalid value: {_literal(value)}: {field or '<root>'} in body {wording}",
    )


def _child(field: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{field}[{key}]"
    return f"{field}.{key}" if field else key


def validate(schema: Schema, value: Any, field: str, causes: list[FieldCause]) -> None:
    """Structural-schema validation (the OpenAPI v3 subset CRDs allow), appending
    one FieldCause per violation, worded like the API server's."""
    if value is None and (schema.get("nullable") or not schema.get("type")):
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not (_type_ok("integer", value) or isinstance(value, str)):
            causes.append(
                FieldCause(
                    "FieldValueTypeInvalid",
                    field,
                    f"Invalid value: {_literal(value)}: {field} in body must be of type integer,string: "
                    f'"{_TYPE_NAMES.get(type(value), "null")}"',
                )
            )
        return
    kind = schema.get("type")
    if kind and not _type_ok(kind, value):
        causes.append(
            FieldCause(
                "FieldValueTypeInvalid",
                field,
                f"Invalid value: {_literal(value)}: {field} in body must be of type {kind}: "
                f'"{_TYPE_NAMES.get(type(value), "null")}"',
            )
        )
        return
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(_literal(v) for v in schema["enum"])
        causes.append(
            FieldCause(
                "FieldValueNotSupported",
                field,
                f"Unsupported value: {_literal(value)}: supported values: {allowed}",
            )
        )
    if _type_ok("number", value):
        _validate_number(schema, value, field, causes)
    elif isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            causes.append(
                _invalid(field, value, f"should be at least {schema['minLength']} chars long")
            )
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            causes.append(_invalid(field, value, f"may not be longer than {schema['maxLength']}"))
        if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
            causes.append(_invalid(field, value, f"should match '{schema['pattern']}'"))
    elif isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            causes.append(
                _invalid(field, value, f"should have at least {schema['minItems']} items")
            )
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            causes.append(
                FieldCause(
                    "FieldValueTooMany",
                    field,
                    f"Too many: {len(value)}: must have at most {schema['maxItems']} items",
                )
            )
        items = schema.get("items")
        if isinstance(items, dict):
            for index, item in enumerate(value):
                validate(items, item, _child(field, index), causes)
    elif isinstance(value, dict):
        _validate_object(schema, value, field, causes)
    for sub in schema.get("allOf") or []:
        validate(sub, value, field, causes)
    for keyword in ("anyOf", "oneOf"):
        options = schema.get(keyword)
        if options:
            passing = sum(1 for sub in options if not _errors(sub, value, field))
            if passing == 0 or (keyword == "oneOf" and passing > 1):
                causes.append(
                    _invalid(
                        field,
                        value,
                        f"must validate {'one and only one' if keyword == 'oneOf' else 'at least one'} schema ({keyword})",
                    )
                )
    if isinstance(schema.get("not"), dict) and not _errors(schema["not"], value, field):
        causes.append(_invalid(field, value, "must not validate the schema (not)"))


def _errors(schema: Schema, value: Any, field: str) -> list[FieldCause]:
    found: list[FieldCause] = []
    validate(schema, value, field, found)
    return found


def _validate_number(schema: Schema, value: float, field: str, causes: list[FieldCause]) -> None:
    if "minimum" in schema:
        if schema.get("exclusiveMinimum") is True and value <= schema["minimum"]:
            causes.append(_invalid(field, value, f"should be greater than {schema['minimum']}"))
        elif value < schema["minimum"]:
            causes.append(
                _invalid(field, value, f"should be greater than or equal to {schema['minimum']}")
            )
    if "maximum" in schema:
        if schema.get("exclusiveMaximum") is True and value >= schema["maximum"]:
            causes.append(_invalid(field, value, f"should be less than {schema['maximum']}"))
        elif value > schema["maximum"]:
            causes.append(
                _invalid(field, value, f"should be less than or equal to {schema['maximum']}")
            )
    multiple = schema.get("multipleOf")
    if multiple and (value / multiple) != int(value / multiple):
        causes.append(_invalid(field, value, f"should be a multiple of {multiple}"))


def _validate_object(
    schema: Schema, value: dict[str, Any], field: str, causes: list[FieldCause]
) -> None:
    for name in schema.get("required") or []:
        if name not in value:
            causes.append(FieldCause("FieldValueRequired", _child(field, name), "Required value"))
    props: dict[str, Schema] = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    for key, item in value.items():
        if key in props:
            validate(props[key], item, _child(field, key), causes)
        elif isinstance(additional, dict):
            validate(additional, item, _child(field, key), causes)
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        causes.append(
            _invalid(field, value, f"should have at least {schema['minProperties']} properties")
        )
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        causes.append(
            _invalid(field, value, f"should have at most {schema['maxProperties']} properties")
        )


class CompiledSchema:
    """One served version's schema, ready to prune/default/validate objects."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._properties: dict[str, Schema] = dict(schema.get("properties") or {})

    def admit(
        self, obj: dict[str, Any], old: dict[str, Any] | None = None
    ) -> tuple[list[FieldCause], list[str]]:
        """Prune + default `obj` in place; return its validation errors and the
        paths of the unknown fields that were pruned.

        With `old` (an update), top-level fields equal to the stored ones are not
        re-validated: they were valid when stored (the real server ratchets too),
        and a status write then costs a status-sized validation, not a whole-object one.
        """
        dropped: list[str] = []
        prune(self.schema, obj, root=True, dropped=dropped)
        apply_defaults(self.schema, obj)
        causes: list[FieldCause] = []
        for name in self.schema.get("required") or []:
            if name not in obj:
                causes.append(FieldCause("FieldValueRequired", name, "Required value"))
        for key, value in obj.items():
            sub = self._properties.get(key)
            if key in ("metadata", "apiVersion", "kind") or sub is None:
                continue
            if old is not None and old.get(key) == value:
                continue
            validate(sub, value, key, causes)
        return sorted(causes, key=lambda c: c.field), dropped
