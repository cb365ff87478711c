"""Spec rules that pydantic and the LoRAJob CRD both enforce, each written once.

A `Rule` holds one check in two languages side by side: a CEL expression for the
CRD's `x-kubernetes-validations` (so the API server refuses a bad spec at
`kubectl apply`, with or without the admission webhook) and a Python predicate for
pydantic (the webhook, the operator's `parse_spec` and the trainer). Both sides
print the same message, which names the field and the fix; tests check that both
sides refuse the same specs.

A rule sits either on a value (`Annotated[str, rule]`: CEL's `self` and the Python
predicate's argument are the value) or on a model (`RULES` of a `SpecModel`:
`self` is the object, and `field` names the field the message is about, as the
CRD's `fieldPath` and as the pydantic error location). This module is pydantic-only
(no torch): the operator builds the CRD from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler, ValidationError
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

__all__ = [
    "RULE_ERROR",
    "VALIDATIONS_KEY",
    "Rule",
    "cel_string",
    "enforce",
    "matches",
    "model_rules_schema",
    "regex_rule",
]

VALIDATIONS_KEY = "x-kubernetes-validations"
# The pydantic error type of a model rule: its message is complete (field and fix), so
# error formatters add no "(got ...)" echo of the whole object.
RULE_ERROR = "spec_rule"

Reason = Literal["FieldValueInvalid", "FieldValueRequired", "FieldValueForbidden"]


@dataclass(frozen=True)
class Rule:
    """One validation rule, in CEL for the CRD and in Python for pydantic.

    cel: true when valid; `self` is the value or object the rule sits on. Kubernetes
        applies the CRD's defaults first, so a field with a default is always there
        (inside a section that is there); optional fields need `has()`.
    message: what is wrong and how to fix it, without the field path (the API server
        and the error formatters put the path in front).
    check: the same rule in Python over the parsed value or model; true when valid.
    field: camelCase path, relative to the model, of the field the message is about
        ("" = the value itself). Only for rules on a model.
    reason: how the API server words the refusal ("Required value", "Forbidden").
    before: a value rule that checks the raw input before pydantic converts it (a rule
        about the input's type, which pydantic would otherwise report its own way).
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field: str = ""
    reason: Reason = "FieldValueInvalid"
    before: bool = False

    def validation(self) -> dict[str, str]:
        """The rule as one entry of the CRD's x-kubernetes-validations."""
        entry = {"rule": self.cel, "message": self.message}
        if self.field:
            entry["fieldPath"] = "." + self.field
        if self.reason != "FieldValueInvalid":
            entry["reason"] = self.reason
        return entry

    def holds(self, value: Any) -> bool:
        try:
            return bool(self.check(value))
        except (TypeError, ValueError, AttributeError):
            return False  # a value of the wrong shape does not satisfy the rule

    # -- as Annotated metadata on a value
    def _validate(self, value: Any) -> Any:
        if not self.holds(value):
            raise ValueError(self.message)
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        schema = handler(source)
        if self.before:
            return core_schema.no_info_before_validator_function(self._validate, schema)
        return core_schema.no_info_after_validator_function(self._validate, schema)

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        target = handler.resolve_ref_schema(out)
        target.setdefault(VALIDATIONS_KEY, []).append(self.validation())
        return out


def cel_string(text: str) -> str:
    """`text` as a CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def matches(pattern: str, *, subject: str = "self") -> tuple[str, Callable[[str], bool]]:
    """`pattern` matched against the whole string: the CEL call on `subject` and the
    Python predicate.

    The same RE2-compatible pattern runs on both sides: ASCII classes in Python (as in
    RE2), and a full match, since Python's `$` also matches before a final newline."""
    compiled = re.compile(pattern, re.ASCII)
    cel = f"{subject}.matches({cel_string('^(?:' + pattern + ')$')})"
    return cel, lambda value: compiled.fullmatch(value) is not None


def regex_rule(pattern: str, message: str, *, max_length: int | None = None) -> Rule:
    """A value rule: the whole string matches `pattern` and is at most `max_length` long."""
    cel, ok = matches(pattern)
    if max_length is None:
        return Rule(cel=cel, message=message, check=ok)
    limit = max_length
    return Rule(
        cel=f"size(self) <= {limit} && {cel}",
        message=message,
        check=lambda value: len(value) <= limit and ok(value),
    )


def _error(rule: Rule) -> InitErrorDetails:
    loc = tuple(rule.field.split(".")) if rule.field else ()
    return InitErrorDetails(
        type=PydanticCustomError(RULE_ERROR, "{message}", {"message": rule.message}),
        loc=loc,
        input=None,
    )


def enforce(model: BaseModel, rules: Iterable[Rule]) -> None:
    """Raise one pydantic error per rule `model` breaks, located at the rule's field."""
    errors = [_error(rule) for rule in rules if not rule.holds(model)]
    if errors:
        raise ValidationError.from_exception_data(type(model).__name__, errors)


def model_rules_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """pydantic json_schema_extra: a model's RULES as the CRD's x-kubernetes-validations."""
    rules: tuple[Rule, ...] = getattr(model, "RULES", ())
    if rules:
        schema[VALIDATIONS_KEY] = [rule.validation() for rule in rules]
